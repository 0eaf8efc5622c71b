"""Global defaults, set as plain attributes: ``cellvi.settings.seed = 1``.

seed
    Seed used to initialise model weights and, when ``train(seed=None)``, to split, shuffle and sample.
    Fixed by default (as in scvi-tools), so the same script gives the same model.
batch_size
    Cells per minibatch for inference methods when ``batch_size=None``.
progress_bar
    Show training progress bars by default.
"""

seed: int = 0
batch_size: int = 128
progress_bar: bool = True
