"""TotalVI: cellvi vs scvi-tools' TOTALVI, side by side in one run, on the same simulated CITE-seq data.

Usage (from the repo root; scvi-tools lives in its own venv):

    PYTHONPATH=src python benchmarks/bench_totalvi.py --scvi-python /work/venv-scvi/bin/python \\
        --n-cells 5000 --n-genes 1000 --epochs 10
    PYTHONPATH=src python benchmarks/bench_totalvi.py --scvi-python /work/venv-scvi/bin/python --nan-check

Data: ``cellvi.datasets.simulate_citeseq`` (4 cell types, 2 batches, 30 proteins with 2 known marker
proteins per type; proteins 0-4 missing from batch_1's panel, stored as zeros). Both libraries train
with the same settings: batch_key="batch", n_latent=20, NB genes, batch size 256, Adam lr 4e-3, KL
warm-up over 0.75 * n_cells steps, train_size=0.9, no early stopping, no adversarial classifier
(both libraries turn it on by default when proteins are missing; it is off here in both), CPU. Each library runs in its
own subprocess, one after the other, alternating for ``--rounds`` rounds; the fastest round is reported.

Reported per library: seconds per epoch (cellvi: the mean of the epochs after the first, which carries
the one-off compilation of the likelihood kernels; ``s_total_per_epoch`` includes it); recovery of the
known markers: DE of proteins, each cell
type vs the rest (AUPRC of ``proba_de * sign(lfc_mean)`` against the type's markers, mean over types),
the foreground probability (per marker protein, AUROC of its type's cells vs the others, median), and
the cell-type silhouette of the latent space.

``--nan-check``: one cell gets NaN protein values; both libraries train for 3 epochs on 600 cells and
report whether the training loss stayed finite (cellvi masks NaN out of the likelihood).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _sidebyside  # noqa: E402
from _sidebyside import scvi_epoch_timer, steady_mean  # noqa: E402

KEY = "protein_expression"


def make_data(n_cells: int, n_genes: int, seed: int = 0):
    import cellvi

    return cellvi.datasets.simulate_citeseq(n_cells, n_genes, 30, missing_proteins={"batch_1": [0, 1, 2, 3, 4]},
                                            seed=seed)


def metrics(adata, latent: np.ndarray, fg, de) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score, silhouette_score

    markers = adata.uns["protein_markers"]
    cell_type = adata.obs["cell_type"].astype(str).to_numpy()
    aps = []
    de = de[de.index.str.endswith("_protein")]  # both libraries name proteins <name>_protein in DE tables
    de.index = de.index.str.removesuffix("_protein")
    for ct in markers.columns:
        part = de[(de["comparison"] == f"{ct} vs Rest") & de.index.isin(markers.index)]
        aps.append(average_precision_score(markers.loc[part.index, ct], part["proba_de"] * np.sign(part["lfc_mean"])))
    measured = ~((adata.obs["batch"] == "batch_1").to_numpy()[:, None] & (np.arange(30) < 5)[None])
    fg = np.asarray(fg)
    aucs = []
    for ct in markers.columns:
        for t in np.flatnonzero(markers[ct].to_numpy()):
            rows = measured[:, t]
            aucs.append(roc_auc_score(cell_type[rows] == ct, fg[rows, t]))
    rng = np.random.default_rng(0)
    sub = rng.choice(len(cell_type), min(len(cell_type), 3000), replace=False)
    return {"de_marker_auprc": float(np.mean(aps)), "foreground_auroc": float(np.median(aucs)),
            "cell_type_silhouette": float(silhouette_score(latent[sub], cell_type[sub]))}


def run_cellvi(args) -> dict:
    import torch

    import cellvi

    adata = make_data(args.n_cells, args.n_genes)
    cellvi.settings.seed = 0
    cellvi.settings.progress_bar = False
    cellvi.TotalVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")
    model = cellvi.TotalVI(adata, n_latent=20)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, early_stopping=False, reduce_lr_on_plateau=False, train_size=0.9,
                adversarial_classifier=False, accelerator="cpu",
                compile_kernels={"auto": None, "on": True, "off": False}[args.compile_kernels])
    seconds = time.perf_counter() - t0
    epochs = model.history_["epoch_seconds"]
    out = {"library": f"cellvi {cellvi.__version__}", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "s_per_epoch": steady_mean(epochs), "s_total_per_epoch": seconds / args.epochs,
           "first_epoch_s": epochs[0], "final_elbo_train": model.history_["elbo_train"][-1]}
    out.update(metrics(adata, model.get_latent_representation(), model.get_protein_foreground_probability(n_samples=5),
                       model.differential_expression(groupby="cell_type")))
    return out


def run_scvi(args) -> dict:
    import scvi
    import torch

    adata = make_data(args.n_cells, args.n_genes)
    scvi.settings.seed = 0
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")
    model = scvi.model.TOTALVI(adata, n_latent=20)
    timer = scvi_epoch_timer()
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, early_stopping=False, reduce_lr_on_plateau=False, train_size=0.9,
                adversarial_classifier=False, accelerator="cpu", enable_progress_bar=False, callbacks=[timer])
    seconds = time.perf_counter() - t0
    out = {"library": f"scvi-tools {scvi.__version__}", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "s_per_epoch": steady_mean(timer.seconds),
           "s_total_per_epoch": seconds / args.epochs,
           "final_elbo_train": float(model.history["elbo_train"]["elbo_train"].iloc[-1])}
    out.update(metrics(adata, model.get_latent_representation(),
                       model.get_protein_foreground_probability(n_samples=5),
                       model.differential_expression(groupby="cell_type", silent=True)))
    return out


def nan_check(library: str) -> dict:
    """Train 3 epochs with one cell's proteins NaN; report whether the loss stayed finite."""
    import cellvi

    adata = cellvi.datasets.simulate_citeseq(600, 200, 30, seed=0)
    adata.obsm[KEY].iloc[3, :] = np.nan
    try:
        if library == "cellvi":
            cellvi.settings.progress_bar = False
            cellvi.TotalVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")
            model = cellvi.TotalVI(adata)
            model.train(max_epochs=3, early_stopping=False, accelerator="cpu")
            losses = model.history_["elbo_train"]
        else:
            import scvi

            scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")
            model = scvi.model.TOTALVI(adata)
            model.train(max_epochs=3, early_stopping=False, accelerator="cpu", enable_progress_bar=False)
            losses = model.history["elbo_train"]["elbo_train"].tolist()
        return {"library": library, "finite": bool(np.isfinite(losses).all()), "elbo_train": [float(v) for v in losses]}
    except Exception as err:  # report what each library does with the NaN
        return {"library": library, "finite": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}


KEYS = ("s_per_epoch", "s_total_per_epoch", "final_elbo_train", "de_marker_auprc", "foreground_auroc", "cell_type_silhouette",
        "peak_rss_mb")


def main() -> None:
    p = _sidebyside.parser(default_epochs=10)
    p.add_argument("--nan-check", action="store_true")
    args = p.parse_args()
    if args.nan_check:
        if args.which == "both":
            import subprocess

            for which, python in (("cellvi", sys.executable), ("scvi", args.scvi_python)):
                proc = subprocess.run([python, __file__, "--nan-check", "--which", which], capture_output=True,
                                      text=True)
                print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
        else:
            print("RESULT " + json.dumps(nan_check(args.which)))
        return
    if args.which != "both":
        _sidebyside.worker(args, run_cellvi, run_scvi)
        return
    res = _sidebyside.alternate(__file__, args)
    a, b = res["cellvi"], res["scvi"]
    print(f"data: simulated CITE-seq, {args.n_cells} cells x {args.n_genes} genes + 30 proteins (5 missing in "
          f"batch_1), 2 batches, {args.epochs} epochs, batch 256; fastest of {args.rounds} alternating rounds")
    _sidebyside.print_table(a, b, KEYS)


if __name__ == "__main__":
    main()
