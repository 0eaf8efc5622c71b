"""Figures of docs/de_donors.md: donor-aware DE of CD14+ monocytes in Kang 2018 (IFN-beta stim vs ctrl).

    PYTHONPATH=src python docs/make_de_figures.py    # writes docs/figures/de_volcano_donors.png, de_per_donor.png

The calibration figure (docs/figures/de_calibration.png) is written by
``python benchmarks/bench_de.py --part calibration`` (BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import cellvi  # noqa: E402

KANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "kang_ifnb_pbmc_small.h5ad"
FIGURES = Path(__file__).resolve().parent / "figures"
MONO = "CD14+ Monocytes"


def main() -> None:
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 0
    adata = ad.read_h5ad(KANG)
    cellvi.SCVI.setup_anndata(adata, batch_key="donor")
    model = cellvi.SCVI(adata)
    model.train(max_epochs=200, batch_size=128)
    # 1. donor-aware DE: stim vs ctrl within every cell type, one call
    res = model.differential_expression(groupby="predicted_cell_type", condition_key="condition", condition1="stim",
                                        condition2="ctrl", mode="change", delta=1.0, batch_correction=True,
                                        sample_key="donor")
    mono = res[res["predicted_cell_type"] == MONO]
    # 2. volcano: donor-level effect against -log10 padj, calls in red
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    called = mono["is_de_fdr_0.05"].to_numpy()
    x, y = mono["lfc_samples"].to_numpy(), -np.log10(np.clip(mono["pvalue"].to_numpy(), 1e-300, 1))
    ax.scatter(x[~called], y[~called], s=4, color="0.6", linewidths=0, label="not called")
    ax.scatter(x[called], y[called], s=7, color="tab:red", linewidths=0, label=f"called, padj < 0.05 ({called.sum()})")
    for i in np.argsort(-y * called)[:12]:
        ax.annotate(mono.index[i], (x[i], y[i]), fontsize=6)
    ax.axvline(-1, color="k", lw=0.5, ls=":")
    ax.axvline(1, color="k", lw=0.5, ls=":")
    ax.set_xlabel("donor-level LFC (log2, stim vs ctrl)")
    ax.set_ylabel("-log10 p (TREAT, |LFC| > 1)")
    ax.set_title("CD14+ monocytes, 8 donors (paired)")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / "de_volcano_donors.png", dpi=120)
    # 3. per-donor effects of the top genes: each donor's stim/ctrl ratio, from the model's batch-corrected
    # expression (filled) and from the donor's pseudobulk counts (open), both centred per donor on the median
    # gene with 20+ counts (the compositional shift the test removes)
    cells = np.flatnonzero((adata.obs["predicted_cell_type"] == MONO).to_numpy())
    obs = adata.obs.iloc[cells]
    keys = [obs["donor"].to_numpy(), obs["condition"].to_numpy()]
    expr = model.get_normalized_expression(adata, indices=cells, transform_batch=list(adata.obs["donor"].cat.categories),
                                           n_samples=5)
    counts = pd.DataFrame(adata.X[cells].toarray(), columns=adata.var_names)
    model_means, count_sums = expr.groupby(keys).mean(), counts.groupby(keys).sum()
    count_means = count_sums.div(count_sums.sum(1), axis=0)
    well = (count_sums.xs("stim", level=1).min(0) >= 20) & (count_sums.xs("ctrl", level=1).min(0) >= 20)

    def per_donor(means):
        lfc = np.log2(means.xs("stim", level=1) + 1e-6) - np.log2(means.xs("ctrl", level=1) + 1e-6)
        return lfc.sub(lfc.loc[:, well.to_numpy()].median(1), axis=0)

    lfc_model, lfc_counts = per_donor(model_means), per_donor(count_means + 0.5 / count_sums.sum(1).to_numpy()[:, None])
    top = [g for g in list(mono.index[:10]) + ["CD3E", "ACTB"] if g in adata.var_names]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for j, g in enumerate(top):
        jitter = np.linspace(-0.2, 0.2, len(lfc_model))
        ax.scatter(j + jitter, lfc_model[g], s=12, color="tab:blue", label="model" if j == 0 else None)
        ax.scatter(j + jitter, lfc_counts[g], s=12, facecolors="none", edgecolors="tab:green",
                   label="pseudobulk counts" if j == 0 else None)
        ax.plot([j - 0.3, j + 0.3], [mono.loc[g, "lfc_samples"]] * 2,
                color="tab:red" if mono.loc[g, "is_de_fdr_0.05"] else "0.4", lw=2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(top)), [g.split("-ENSG")[0] for g in top], rotation=60, fontsize=7)
    ax.set_ylabel("per-donor LFC (log2, stim vs ctrl)")
    ax.set_title("CD14+ monocytes: each dot a donor; bar: donor-level LFC (red: called)", fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / "de_per_donor.png", dpi=120)
    summary = {"calls_per_type": res.groupby("predicted_cell_type", observed=True)["is_de_fdr_0.05"].sum()
               .astype(int).to_dict(), "mono_top": list(mono.index[:15]),
               "mono_calls": int(called.sum())}
    (FIGURES / "de_donors_metrics.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
