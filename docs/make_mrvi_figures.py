"""Figures and numbers of docs/mrvi.md: MrVI on the Kang et al. 2018 PBMCs (8 donors x ctrl / IFN-beta).

    PYTHONPATH=src python docs/make_mrvi_figures.py [--max-epochs 100] [--seed 1]

Writes docs/figures/mrvi_*.png and docs/figures/mrvi_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cellvi

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "kang_ifnb_pbmc_small.h5ad"
GLIOBLASTOMA = HERE.parents[1] / "shared" / "data" / "glioblastoma_panobinostat.h5ad"


def glioblastoma(max_epochs: int, out: Path) -> dict:
    """Zhao et al. 2021 slices: 5 patients x {DMSO, panobinostat}; DE of the drug adjusted for the patient."""
    adata = cellvi.datasets.read_h5ad(GLIOBLASTOMA)
    adata.obs["all"] = "all cells"
    cellvi.MrVI.setup_anndata(adata, sample_key="sample_id")
    model = cellvi.MrVI(adata)
    t = time.perf_counter()
    model.train(max_epochs=max_epochs)
    metrics = {"cells": adata.n_obs, "genes": adata.n_vars, "samples": int(model.spec.n_samples),
               "epochs": max_epochs, "train_s": round(time.perf_counter() - t, 1)}
    d = model.get_local_sample_distances(groupby="all", keep_cell=False)["all"].sel(all_name="all cells")
    info = model.sample_info
    cond = info["condition"].astype(str).to_numpy()
    patient = info["patient_id"].astype(str).to_numpy()
    off = ~np.eye(len(cond), dtype=bool)
    dv = d.values
    same_p, same_c = patient[:, None] == patient, cond[:, None] == cond
    metrics["mean_distance_same_patient_other_condition"] = round(float(dv[same_p & off].mean()), 3)
    metrics["mean_distance_same_condition_other_patient"] = round(float(dv[same_c & ~same_p].mean()), 3)
    metrics["mean_distance_other_patient_other_condition"] = round(float(dv[~same_c & ~same_p].mean()), 3)
    cellvi.pl.sample_distance_heatmap(d, info, color_by=["condition", "patient_id"],
                                      title="glioblastoma slices: sample distances (all cells)",
                                      save=str(out / "mrvi_glioblastoma_distances.png"))
    de = model.differential_expression(sample_cov_keys=["condition", "patient_id"], store_lfc=True,
                                       store_lfc_metadata_subset=["condition"])
    cov = "condition_panobinostat"
    metrics["de_fraction_cells_padj_below_0.05_panobinostat"] = round(float((de["padj"].sel(covariate=cov) < 0.05).mean()), 3)
    lfc = de["lfc"].sel(covariate_sub=cov).values.mean(0)
    symbols = adata.var["symbol"].astype(str).to_numpy()
    for name, order in (("up", np.argsort(-lfc)[:8]), ("down", np.argsort(lfc)[:8])):
        metrics[f"de_top8_{name}_panobinostat"] = {symbols[i]: round(float(lfc[i]), 2) for i in order}
    return metrics


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--out", default=str(HERE / "figures"))
    p.add_argument("--dataset", choices=["kang", "glioblastoma"], default="kang")
    p.add_argument("--seed", type=int, default=0, help="cellvi.settings.seed: initialisation, split, training draws")
    args = p.parse_args()
    cellvi.settings.seed = args.seed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cellvi.settings.progress_bar = False
    plt = cellvi.pl._plt()
    if args.dataset == "glioblastoma":
        metrics = glioblastoma(args.max_epochs, out)
        (out / "mrvi_glioblastoma_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(json.dumps(metrics, indent=1))
        return

    # 1. data: a sample is a donor in one condition (16 samples)
    adata = cellvi.datasets.read_h5ad(args.data)
    cellvi.MrVI.setup_anndata(adata, sample_key="sample")
    model = cellvi.MrVI(adata)
    t = time.perf_counter()
    model.train(max_epochs=args.max_epochs)
    metrics = {"cells": adata.n_obs, "genes": adata.n_vars, "samples": int(model.spec.n_samples),
               "epochs": args.max_epochs, "seed": args.seed, "train_s": round(time.perf_counter() - t, 1)}
    cellvi.pl.training_curves(model.history, save=str(out / "mrvi_training.png"))
    ct = adata.obs["predicted_cell_type"].astype(str).to_numpy()

    # 2. sample distances, averaged per cell type; heatmap for monocytes and for B cells
    dists = model.get_local_sample_distances(groupby="predicted_cell_type", keep_cell=False)["predicted_cell_type"]
    info = model.sample_info
    within, between = {}, {}
    cond = info["condition"].astype(str).to_numpy()
    same = cond[:, None] == cond[None, :]
    off = ~np.eye(len(cond), dtype=bool)
    for name in dists.predicted_cell_type_name.values:
        d = dists.sel(predicted_cell_type_name=name).values
        within[name] = float(d[same & off].mean())
        between[name] = float(d[~same].mean())
    metrics["distance_between_over_within_condition"] = {k: round(between[k] / within[k], 2) for k in within}
    for name in ("CD14+ Monocytes", "B cells"):
        if name in dists.predicted_cell_type_name.values:
            cellvi.pl.sample_distance_heatmap(dists.sel(predicted_cell_type_name=name), info,
                                              color_by=["condition", "donor"], title=f"{name}: sample distances",
                                              save=str(out / f"mrvi_distances_{name.split()[0].strip('+').lower()}.png"))
    plt.close("all")

    # 3. differential abundance: stim vs ctrl density ratio per cell
    da = model.differential_abundance(sample_cov_keys=["condition"])
    ratio = (da["condition_log_probs"].sel(condition="stim") - da["condition_log_probs"].sel(condition="ctrl")).values
    metrics["da_log_ratio_mean_by_cell_type"] = {t: round(float(ratio[ct == t].mean()), 2) for t in np.unique(ct)}

    # 4. differential expression: condition effect per cell, LFCs
    de = model.differential_expression(sample_cov_keys=["condition"], store_lfc=True)
    lfc = de["lfc"].sel(covariate="condition_stim")
    eff = de["effect_size"].sel(covariate="condition_stim").values
    metrics["de_effect_size_median_by_cell_type"] = {t: round(float(np.median(eff[ct == t])), 1) for t in np.unique(ct)}
    metrics["de_fraction_padj_below_0.05"] = round(float((de["padj"].values < 0.05).mean()), 3)
    mono = ct == "CD14+ Monocytes"
    top = lfc.values[mono].mean(0)
    order = np.argsort(-top)[:10]
    metrics["de_top10_up_in_stim_monocytes"] = {str(lfc.gene.values[i]): round(float(top[i]), 2) for i in order}

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    types = [t for t in np.unique(ct) if (ct == t).sum() >= 50]
    axes[0].boxplot([ratio[ct == t] for t in types], showfliers=False)
    axes[0].set_xticks(range(1, len(types) + 1))
    axes[0].set_xticklabels(types, rotation=60, ha="right", fontsize=7)
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("DA: log q_stim(u) - log q_ctrl(u)")
    axes[1].boxplot([eff[ct == t] for t in types], showfliers=False)
    axes[1].set_xticks(range(1, len(types) + 1))
    axes[1].set_xticklabels(types, rotation=60, ha="right", fontsize=7)
    axes[1].set_ylabel("DE: effect size of condition (chi2)")
    fig.tight_layout()
    fig.savefig(out / "mrvi_da_de.png", dpi=120)
    (out / "mrvi_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
