"""Measure the optional DE steps that docs/de.md quotes (``use_counts``; the defaults as a check).

    PYTHONPATH=src OMP_NUM_THREADS=2 python docs/measure_de_options.py --seed 0 [--seed 1]

Same data, model and scoring as ``benchmarks/bench_de.py --part sim --which cellvi`` (simulate(6000,
1000, seed), 80 true DE genes in type_0 stim vs ctrl; SCVI 100 epochs, batch size 128; calls at a
posterior expected FDR of 0.05), so the first row of each seed reproduces the "cellvi change (final)"
row of BENCHMARKS.md. Prints one JSON line per seed x setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_de  # noqa: E402  (its data, comparisons and scoring, not a copy of them)

SETTINGS = {
    "defaults (center_lfc, shrink_lfc)": {},
    "use_counts=True": {"use_counts": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, action="append", default=None)
    p.add_argument("--epochs", type=int, default=100)
    args = p.parse_args()
    import cellvi

    cellvi.settings.progress_bar = False
    for seed in args.seed or [0]:
        ns = argparse.Namespace(part="sim", seed=seed, n_cells=6000, n_genes=1000)
        adata, comps, batch_key, _ = bench_de.load(ns)
        cellvi.settings.seed = seed
        cellvi.SCVI.setup_anndata(adata, batch_key=batch_key)
        model = cellvi.SCVI(adata)
        model.train(max_epochs=args.epochs, batch_size=128, accelerator="cpu", enable_progress_bar=False)
        comp = "type_0 stim vs ctrl"
        m1, m2 = comps[comp]
        for name, kw in SETTINGS.items():
            df = model.differential_expression(idx1=m1, idx2=m2, mode="change", fdr_target=bench_de.FDR, silent=True,
                                               **kw).reindex(adata.var_names)
            proba, lfc = df["proba_de"].to_numpy(), df["lfc_mean"].to_numpy()
            calls = df[f"is_de_fdr_{bench_de.FDR}"].to_numpy(bool)
            row = bench_de.evaluate(adata, comp, bench_de.rank_score(proba, np.abs(lfc)), calls, lfc)
            print(json.dumps({"seed": seed, "setting": name, **{k: row[k] for k in ("auprc", "n_calls", "fdp", "power")}}),
                  flush=True)


if __name__ == "__main__":
    main()
