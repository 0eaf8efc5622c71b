"""Regenerate the figures and numbers of docs/peakvi.md.

    PYTHONPATH=src python docs/make_peakvi_figures.py \
        [--data ../shared/data/atac_hematopoiesis_granja2019_small.h5ad]

Trains PeakVI on the Granja 2019 bone-marrow scATAC subset (600 cells, 6 cell types x 100, 5,000
random peaks, 2 samples), once with scvi-tools' defaults and once with a network sized for 5,000
peaks, writes PNGs to docs/figures/ and prints the metrics as JSON (also saved to
docs/figures/peakvi_metrics.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cellvi

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "atac_hematopoiesis_granja2019_small.h5ad"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--max-epochs", type=int, default=500)  # early stopping ends sooner
    args = p.parse_args()
    out = HERE / "figures"
    out.mkdir(exist_ok=True)
    cellvi.settings.seed = 0
    cellvi.settings.progress_bar = False

    adata = cellvi.datasets.read_h5ad(args.data)
    labels = adata.obs["BioClassification"].astype(str).to_numpy()
    cellvi.PeakVI.setup_anndata(adata, batch_key="Group")
    knn = lambda x: float(cross_val_score(KNeighborsClassifier(15), x, labels, cv=5).mean())  # noqa: E731
    # for reference: LSI (TF-IDF + truncated SVD, first component dropped), the usual scATAC baseline
    from sklearn.decomposition import TruncatedSVD

    Y = (adata.X > 0).astype(np.float32)
    idf = np.log(1 + Y.shape[0] / (1 + np.asarray(Y.sum(0)).ravel()))
    lsi = TruncatedSVD(20, random_state=0).fit_transform(Y.multiply(1 / Y.sum(1)).multiply(idf).tocsr())[:, 1:]
    # scvi-tools' defaults (sized for 100k+ peaks: n_hidden = sqrt(5000) = 70, n_latent = 8, lr 1e-4)
    defaults = cellvi.PeakVI(adata)
    defaults.train(max_epochs=args.max_epochs)
    # the model of the figures: wider for 5,000 peaks, lr 1e-3, 200 epochs (early stopping on 60 validation
    # cells stopped too early: kNN accuracy 0.56 after 103 epochs)
    model = cellvi.PeakVI(adata, n_hidden=128, n_latent=10)
    t0 = time.perf_counter()
    model.train(max_epochs=200, lr=1e-3, early_stopping=False)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    d = model.get_library_size_factors()
    depth = np.asarray((adata.X > 0).sum(1)).ravel()

    # latent space by cell type and by the cell factor
    xy = PCA(2, random_state=0).fit_transform(z)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ct in sorted(set(labels)):
        m = labels == ct
        axes[0].scatter(*xy[m].T, s=7, label=ct)
    axes[0].legend(fontsize=7)
    axes[0].set_title("latent z (PCA) by cell type")
    sc = axes[1].scatter(*xy.T, s=7, c=d, cmap="viridis")
    axes[1].set_title("cell factor d")
    fig.colorbar(sc, ax=axes[1])
    fig.tight_layout()
    fig.savefig(out / "peakvi_latent.png", dpi=110)
    plt.close(fig)

    # differential accessibility: B cells vs naive CD8 T cells, and B cells vs the rest
    da_rest = model.differential_accessibility(groupby="BioClassification", group1="17_B")
    da = model.differential_accessibility(groupby="BioClassification", group1="17_B", group2="19_CD8.N")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rest_calls = da_rest["is_da_fdr"].to_numpy(dtype=bool)
    ax.scatter(da_rest["effect_size"][~rest_calls], da_rest["bayes_factor"][~rest_calls], s=4, c="lightgray",
               label="not called")
    ax.scatter(da_rest["effect_size"][rest_calls], da_rest["bayes_factor"][rest_calls], s=8, c="crimson",
               label="DA at 5 % expected FDR")
    ax.set_xlabel("effect_size = est_prob2 - est_prob1 (rest - B)")
    ax.set_ylabel("bayes_factor")
    ax.set_title("differential accessibility, 17_B vs the other 5 types")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "peakvi_da_volcano.png", dpi=110)
    plt.close(fig)

    calls = da["is_da_fdr"].to_numpy(dtype=bool)
    sign_agree = float((np.sign(da["effect_size"][calls]) == np.sign(da["emp_effect"][calls])).mean())
    metrics = {
        "cells": adata.n_obs, "regions": adata.n_vars, "epochs": len(model.history_["elbo_train"]),
        "train_seconds": round(seconds, 1), "n_latent": model.module.n_latent,
        "knn_cell_type_accuracy_latent": knn(z),
        "knn_cell_type_accuracy_lsi": knn(lsi / np.linalg.norm(lsi, axis=1, keepdims=True)),
        "knn_cell_type_accuracy_scvi_tools_defaults": knn(defaults.get_latent_representation()),
        "epochs_scvi_tools_defaults": len(defaults.history_["elbo_train"]),
        "cell_type_silhouette_latent": float(silhouette_score(z, labels)),
        "spearman_cell_factor_vs_accessible_regions": float(spearmanr(d, depth).statistic),
        "da_calls_B_vs_CD8N": int(calls.sum()),
        "da_calls_B_vs_rest": int(da_rest["is_da_fdr"].sum()),
        "da_calls_B_vs_rest_sign_agrees_with_observed": float(
            (np.sign(da_rest["effect_size"]) == np.sign(da_rest["emp_effect"]))[da_rest["is_da_fdr"].astype(bool)].mean()),
        "regions_observed_in_at_least_10_of_both_B_and_CD8N": int(((da["emp_prob1"] >= 0.1) & (da["emp_prob2"] >= 0.1)).sum()),
        "da_calls_more_open_in_B": int((da["effect_size"][calls] < 0).sum()),
        "da_calls_sign_agrees_with_observed": sign_agree,
        "pearson_effect_vs_emp_effect": float(np.corrcoef(da["effect_size"], da["emp_effect"])[0, 1]),
    }
    print(json.dumps(metrics, indent=1))
    (out / "peakvi_metrics.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
