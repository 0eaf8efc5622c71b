"""MrVI on Kang (4,000 PBMCs, 16 samples = 8 donors x ctrl/stim) across seeds: is the stimulation in z or in u?

Usage (from the repo root; one seed per process, run them one after the other):

    PYTHONPATH=src python benchmarks/check_mrvi_seeds.py --seed 0
    git show <rev>:src/cellvi/models/mrvi.py > /tmp/mrvi_before.py
    PYTHONPATH=src python benchmarks/check_mrvi_seeds.py --seed 0 --module-file /tmp/mrvi_before.py

    /work/venv-scvi/bin/python benchmarks/check_mrvi_seeds.py --seed 0 --library scvi   # scvi-tools' torch MRVI

Trains 100 epochs (``--seed``: cellvi's ``settings.seed``, or ``scvi.settings.seed``) and prints, per
cell type, the mean sample distance between conditions over that within a condition (the stimulation as a
sample effect, in z) and the mean DA log ratio stim vs ctrl (the samples were subsampled evenly, so a large
ratio over a whole cell type means u itself separates the conditions: the effect went into u), and the final
validation loss. ``--module-file``: an older ``models/mrvi.py`` whose ``MrVIModule`` replaces the current one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import cellvi
from cellvi.models import mrvi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_mrvi_step import load_module_file  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kang_ifnb_pbmc_small.h5ad"
TYPES = ("CD14+ Monocytes", "B cells", "CD4 T cells", "NK cells")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--module-file", default=None)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--library", choices=["cellvi", "scvi"], default="cellvi")
    p.add_argument("--compile-kernels", choices=["auto", "on", "off"], default="auto",
                   help="cellvi's compile_kernels (on: its network compiled, as runs of 2M cell passes are)")
    args = p.parse_args()
    if args.module_file:
        mrvi.MrVIModule = load_module_file(args.module_file).MrVIModule
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = args.seed
    adata = cellvi.datasets.read_h5ad(args.data)
    if args.library == "scvi":
        import warnings

        import scvi

        warnings.filterwarnings("ignore")
        scvi.settings.seed = args.seed
        scvi.external.MRVI.setup_anndata(adata, sample_key="sample", backend="torch")
        model = scvi.external.MRVI(adata)
        model.train(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=False)
    else:
        cellvi.MrVI.setup_anndata(adata, sample_key="sample")
        model = cellvi.MrVI(adata)
        model.train(max_epochs=args.epochs, compile_kernels={"auto": None, "on": True, "off": False}[args.compile_kernels])
    ct = adata.obs["predicted_cell_type"].astype(str).to_numpy()
    dists = model.get_local_sample_distances(groupby="predicted_cell_type", keep_cell=False)["predicted_cell_type"]
    condition_of = adata.obs.groupby("sample", observed=True)["condition"].first().astype(str)
    cond = condition_of.loc[dists.sample_x.values].to_numpy()
    same, off = cond[:, None] == cond[None, :], ~np.eye(len(cond), dtype=bool)
    da = model.differential_abundance(sample_cov_keys=["condition"])
    ratio = (da["condition_log_probs"].sel(condition="stim") - da["condition_log_probs"].sel(condition="ctrl")).values
    out = {"library": args.library, "module": args.module_file or "current", "seed": args.seed,
           "distance_between_over_within": {}, "da_log_ratio_mean": {},
           "validation_loss": round(float(model.history["elbo_validation"].to_numpy().ravel()[-1]), 1)}
    for t in TYPES:
        d = dists.sel(predicted_cell_type_name=t).values
        out["distance_between_over_within"][t] = round(float(d[~same].mean() / d[same & off].mean()), 2)
        out["da_log_ratio_mean"][t] = round(float(ratio[ct == t].mean()), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
