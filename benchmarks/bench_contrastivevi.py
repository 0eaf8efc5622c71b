"""ContrastiveVI: cellvi vs scvi-tools, side by side in one run, on the same simulated data.

Usage (from the repo root; scvi-tools lives in its own venv):

    python benchmarks/bench_contrastivevi.py --scvi-python /work/venv-scvi/bin/python

Data: ``cellvi.datasets.simulate`` (3 cell types, 2 batches, ctrl/stim) plus a target-only program
(half of the stim cells, across cell types, express 20 genes 4x higher), built by the same function
as the tests (``cellvi.datasets.simulate_contrastive``). Background = ctrl, target = stim.
Both libraries train with identical settings: batch_key="batch", default architecture
(n_hidden=128, 10 + 10 latent dimensions, ZINB, observed library size), batch size 128, the same
number of epochs, train_size=0.9, Adam lr 1e-3 / eps 0.01 / weight decay 1e-6, default KL warm-up
(400 epochs), no gradient clipping (scvi-tools' default), CPU. Each library runs in its own
subprocess, one after the other (never at the same time), alternating for ``--rounds`` rounds; the
fastest round of each is reported (the metrics do not depend on the round: both are seeded).

Reported per library: seconds per epoch (training wall time / epochs) and separation metrics on the
salient and background latents (posterior means): silhouette and 5-fold logistic-regression accuracy
of the program ("on"/"off") among target cells, and cell-type silhouette over all cells.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _sidebyside  # noqa: E402
from _sidebyside import scvi_epoch_timer, steady_mean  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_data(n_cells: int, n_genes: int, seed: int = 0):
    sys.path.insert(0, str(ROOT / "src"))  # also in the scvi-tools environment: the simulator needs no torch
    from cellvi.datasets import simulate_contrastive

    return simulate_contrastive(n_cells, n_genes, n_program=20, lfc=2.0, seed=seed, mean_library_size=500)


def metrics(salient: np.ndarray, background: np.ndarray, obs) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(0)
    target = np.flatnonzero(obs["condition"].to_numpy() == "stim")
    tsub = rng.choice(target, min(target.size, 3000), replace=False)
    allsub = rng.choice(len(obs), min(len(obs), 3000), replace=False)
    program = obs["program"].to_numpy()
    cell_type = obs["cell_type"].astype(str).to_numpy()

    def acc(x, y):
        return float(cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5).mean())

    out = {}
    for name, e in (("salient", salient), ("background", background)):
        out[f"{name}_program_silhouette"] = float(silhouette_score(e[tsub], program[tsub]))
        out[f"{name}_program_accuracy"] = acc(e[tsub], program[tsub])
        out[f"{name}_cell_type_silhouette"] = float(silhouette_score(e[allsub], cell_type[allsub]))
    return out


def sets(adata):
    cond = adata.obs["condition"].to_numpy()
    return np.flatnonzero(cond == "ctrl"), np.flatnonzero(cond == "stim")


def run_cellvi(args) -> dict:
    import torch

    import cellvi

    adata = make_data(args.n_cells, args.n_genes)
    cellvi.settings.seed = 0
    cellvi.ContrastiveVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.ContrastiveVI(adata)
    bg, tg = sets(adata)
    t0 = time.perf_counter()
    model.train(bg, tg, max_epochs=args.epochs, batch_size=128, train_size=0.9, gradient_clip_val=None,
                enable_progress_bar=False, accelerator="cpu",
                compile_kernels={"auto": None, "on": True, "off": False}[args.compile_kernels])
    seconds = time.perf_counter() - t0
    epochs = model.history_["epoch_seconds"]
    out = {"library": f"cellvi {cellvi.__version__}", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "s_per_epoch": steady_mean(epochs), "s_total_per_epoch": seconds / args.epochs,
           "first_epoch_s": epochs[0], "final_elbo_train": model.history_["elbo_train"][-1]}
    out.update(metrics(model.get_latent_representation(representation_kind="salient"),
                       model.get_latent_representation(representation_kind="background"), adata.obs))
    return out


def run_scvi(args) -> dict:
    import scvi
    import torch

    adata = make_data(args.n_cells, args.n_genes)
    scvi.settings.seed = 0
    scvi.external.ContrastiveVI.setup_anndata(adata, batch_key="batch")
    model = scvi.external.ContrastiveVI(adata)
    bg, tg = sets(adata)
    timer = scvi_epoch_timer()
    t0 = time.perf_counter()
    model.train(bg, tg, max_epochs=args.epochs, batch_size=128, train_size=0.9, enable_progress_bar=False,
                accelerator="cpu", callbacks=[timer])
    seconds = time.perf_counter() - t0
    # scvi-tools logs the ELBO per background/target pair; halve it to compare with cellvi's per-cell value
    elbo = float(model.history["elbo_train"]["elbo_train"].iloc[-1]) / 2
    out = {"library": f"scvi-tools {scvi.__version__}", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "s_per_epoch": steady_mean(timer.seconds),
           "s_total_per_epoch": seconds / args.epochs, "final_elbo_train": elbo}
    out.update(metrics(model.get_latent_representation(representation_kind="salient"),
                       model.get_latent_representation(representation_kind="background"), adata.obs))
    return out


KEYS = ("s_per_epoch", "s_total_per_epoch", "final_elbo_train", "salient_program_silhouette", "salient_program_accuracy",
        "salient_cell_type_silhouette", "background_program_silhouette", "background_program_accuracy",
        "background_cell_type_silhouette", "peak_rss_mb")


def main() -> None:
    args = _sidebyside.parser(default_epochs=15).parse_args()
    if args.which != "both":
        _sidebyside.worker(args, run_cellvi, run_scvi)
        return
    res = _sidebyside.alternate(__file__, args)
    a, b = res["cellvi"], res["scvi"]
    print(f"data: simulated {args.n_cells} cells x {args.n_genes} genes, 2 batches, background = ctrl, "
          f"target = stim, {args.epochs} epochs, batch 128 (+128); fastest of {args.rounds} alternating rounds")
    _sidebyside.print_table(a, b, KEYS)


if __name__ == "__main__":
    main()
