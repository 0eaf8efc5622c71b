"""DE calls against the number of posterior draws decoded per cell (``cellvi.de.MAX_DRAWS_PER_CELL``), across DE seeds.

Usage (from the repo root; about 4 minutes on 2 cores):

    PYTHONPATH=src python benchmarks/check_de_draws.py [--kang /work/shared/data/kang_ifnb_pbmc_small.h5ad]

One SCVI per data set, then type_0 stim vs ctrl (Kang: CD14+ monocytes stim vs ctrl) in change mode with
``batch_correction=True``, for 4 DE seeds at 1, 2 and 3 draws per cell. Printed per data set and number of draws:
the calls of each seed, the smallest pairwise Jaccard index of the calls across seeds and, on simulations, the
observed false discovery proportion and power of each seed's calls against the simulated truth. The simulated
designs were not used when choosing the number of draws (2, on the 7-type design of ``bench_de.py --part sim``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

DESIGNS = {  # fresh seeds; a small affected population, unbalanced groups, low expression
    "small population (~190 cells), lfc 0.9, seed 71": dict(n_cell_types=10, abundance_shift=1.0, de_lfc=0.9, seed=71),
    "unbalanced 3:1, lfc 0.8, seed 72": dict(n_cell_types=5, abundance_shift=5.0, de_lfc=0.8, seed=72),
    "600 counts/cell, lfc 1.2, seed 73": dict(mean_library_size=600.0, de_lfc=1.2, seed=73),
}


def calls_by_draws(model, m1, m2, names) -> dict[int, list[np.ndarray]]:
    from cellvi import de

    out, default = {}, de.MAX_DRAWS_PER_CELL
    try:
        for k in (1, 2, 3):
            de.MAX_DRAWS_PER_CELL = k
            out[k] = [model.differential_expression(idx1=m1, idx2=m2, mode="change", batch_correction=True, seed=s)
                      .loc[names, "is_de_fdr_0.05"].to_numpy(bool) for s in range(4)]
    finally:
        de.MAX_DRAWS_PER_CELL = default
    return out


def report(name: str, calls: dict[int, list[np.ndarray]], truth: np.ndarray | None) -> None:
    for k, per_seed in calls.items():
        sets = [set(np.flatnonzero(c)) for c in per_seed]
        jac = min(len(a & b) / max(len(a | b), 1) for i, a in enumerate(sets) for b in sets[i + 1:])
        line = f"{name:50s} draws {k}: calls {[len(s) for s in sets]}, min Jaccard {jac:.3f}"
        if truth is not None:
            fdp = [1.0 - truth[c].mean() if c.any() else 0.0 for c in per_seed]
            power = [truth[c].sum() / truth.sum() for c in per_seed]
            line += f", FDP {np.round(fdp, 3).tolist()}, power {np.round(power, 3).tolist()}"
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kang", default="/work/shared/data/kang_ifnb_pbmc_small.h5ad")
    args = p.parse_args()
    import cellvi

    cellvi.settings.progress_bar = False
    for name, design in DESIGNS.items():
        cellvi.settings.seed = design["seed"]
        adata = cellvi.datasets.simulate(4000, 800, **design)
        cellvi.SCVI.setup_anndata(adata, batch_key="batch")
        model = cellvi.SCVI(adata)
        model.train(max_epochs=60)
        obs = adata.obs
        t0 = obs["cell_type"] == "type_0"
        m1, m2 = (t0 & (obs["condition"] == "stim")).to_numpy(), (t0 & (obs["condition"] == "ctrl")).to_numpy()
        report(name, calls_by_draws(model, m1, m2, adata.var_names), adata.var["de_type_0"].to_numpy())
    if os.path.exists(args.kang):
        import anndata as ad

        adata = ad.read_h5ad(args.kang)
        cellvi.settings.seed = 0
        cellvi.SCVI.setup_anndata(adata, batch_key="donor")
        model = cellvi.SCVI(adata)
        model.train(max_epochs=100)
        obs = adata.obs
        mono = obs["predicted_cell_type"] == "CD14+ Monocytes"
        m1, m2 = (mono & (obs["condition"] == "stim")).to_numpy(), (mono & (obs["condition"] == "ctrl")).to_numpy()
        report("Kang CD14+ monocytes stim vs ctrl (real)", calls_by_draws(model, m1, m2, adata.var_names), None)


if __name__ == "__main__":
    main()
