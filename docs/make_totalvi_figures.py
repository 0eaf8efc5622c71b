"""Regenerate the figures and numbers of docs/totalvi.md.

    PYTHONPATH=src python docs/make_totalvi_figures.py [--data-dir ../shared/data]

Trains TotalVI on the 10x PBMC CITE-seq subset (400 cells from two 10x runs = 2 batches, 14 proteins;
the 2,000 genes with the most counts) and on the ECCITE-seq PBMCs (500 cells, 49 proteins including
the isotype controls IgG1 and IgG2a), writes PNGs to docs/figures/ and prints the metrics as JSON
(also saved to docs/figures/totalvi_metrics.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cellvi

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data"
KEY = "protein_expression"


def top_genes(adata, n: int = 2000):
    """The ``n`` genes with the most counts (keeps the example fast; totalVI reads raw counts)."""
    totals = np.asarray(adata.X.sum(0)).ravel()
    return adata[:, np.sort(np.argsort(-totals)[:n])].copy()


def train(adata, batch_key, max_epochs):
    cellvi.TotalVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key=batch_key)
    model = cellvi.TotalVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs)
    return model, time.perf_counter() - t0


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--max-epochs", type=int, default=300)
    args = p.parse_args()
    out = HERE / "figures"
    out.mkdir(exist_ok=True)
    cellvi.settings.seed = 0
    cellvi.settings.progress_bar = False
    metrics = {}

    # 1. 10x PBMC, two batches
    adata = top_genes(cellvi.datasets.read_h5ad(Path(args.data_dir) / "citeseq_pbmc10x_2batch_tiny.h5ad"))
    model, seconds = train(adata, "batch", args.max_epochs)
    z = model.get_latent_representation()
    rna, pro = model.get_normalized_expression(n_samples=25)
    fg = model.get_protein_foreground_probability(n_samples=25)
    clusters = KMeans(6, n_init=10, random_state=0).fit_predict(z)
    adata.obs["cluster"] = [f"c{c}" for c in clusters]
    names = {c: c.replace("_TotalSeqB", "") for c in pro.columns}
    raw = adata.obsm[KEY]
    metrics["pbmc10x"] = {
        "cells": adata.n_obs, "genes": adata.n_vars, "proteins": raw.shape[1],
        "epochs": len(model.history_["elbo_train"]), "train_seconds": round(seconds, 1),
        "batch_silhouette_latent": float(silhouette_score(z, adata.obs["batch"].astype(str))),
        "cluster_silhouette_latent": float(silhouette_score(z, clusters)),
        "spearman_raw_vs_denoised_protein_median": float(np.median([
            spearmanr(raw[c], pro[c]).statistic for c in raw.columns])),
        "mean_foreground_probability": {names[c]: round(float(v), 3) for c, v in fg.mean(0).items()},
    }
    # latent (PCA of the posterior means) coloured by batch and by denoised CD3, CD19, CD14
    xy = PCA(2, random_state=0).fit_transform(z)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for b in adata.obs["batch"].cat.categories:
        m = (adata.obs["batch"] == b).to_numpy()
        axes[0].scatter(*xy[m].T, s=6, label=b)
    axes[0].legend(fontsize=7)
    axes[0].set_title("latent z (PCA) by batch")
    for ax, prot in zip(axes[1:], ["CD3_TotalSeqB", "CD19_TotalSeqB", "CD14_TotalSeqB"]):
        sc = ax.scatter(*xy.T, s=6, c=np.log1p(pro[prot]), cmap="viridis")
        ax.set_title(f"denoised {names[prot]} (log1p)")
        fig.colorbar(sc, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "totalvi_latent.png", dpi=110)
    plt.close(fig)
    # foreground probability: mean per cluster
    table = fg.groupby(adata.obs["cluster"].to_numpy()).mean().rename(columns=names)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    im = ax.imshow(table.to_numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_title("mean foreground probability per cluster (k-means on z)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "totalvi_foreground.png", dpi=110)
    plt.close(fig)
    # DE: the cluster with the most CD19 foreground (B cells) vs the rest, genes and proteins in one table
    b_cluster = table["CD19"].idxmax()
    de = model.differential_expression(groupby="cluster", group1=b_cluster)
    is_protein = de.index.str.endswith("_protein")  # scvi-tools' names: <protein>_protein
    names.update({f"{c}_protein": n for c, n in list(names.items())})
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(de["lfc_mean"][~is_protein], de["bayes_factor"][~is_protein], s=5, c="lightgray", label="genes")
    ax.scatter(de["lfc_mean"][is_protein], de["bayes_factor"][is_protein], s=25, c="crimson", label="proteins")
    for name, row in de[is_protein].iterrows():
        if abs(row["lfc_mean"]) > 1:
            ax.annotate(names[name], (row["lfc_mean"], row["bayes_factor"]), fontsize=7)
    ax.set_xlabel("lfc_mean (log2)")
    ax.set_ylabel("bayes_factor")
    ax.set_title(f"{b_cluster} (most CD19 foreground) vs rest")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "totalvi_de_volcano.png", dpi=110)
    plt.close(fig)
    top = de[is_protein].head(5)
    metrics["pbmc10x"]["b_cluster"] = b_cluster
    metrics["pbmc10x"]["b_cluster_top_proteins"] = {names[k]: round(float(v), 2) for k, v in top["lfc_mean"].items()}
    metrics["pbmc10x"]["de_calls_genes"] = int(de[~is_protein]["is_de_fdr_0.05"].sum())
    metrics["pbmc10x"]["de_calls_proteins"] = int(de[is_protein]["is_de_fdr_0.05"].sum())
    # training curve
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(model.history_["elbo_train"], label="train")
    ax.plot(model.history_["elbo_validation"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("-ELBO per cell")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "totalvi_training.png", dpi=110)
    plt.close(fig)

    # 2. ECCITE-seq: isotype controls have no specific target, so their counts should be background
    eccite = top_genes(cellvi.datasets.read_h5ad(Path(args.data_dir) / "eccite_pbmc_mimitou2019.h5ad"))
    model2, seconds2 = train(eccite, None, args.max_epochs)
    fg2 = model2.get_protein_foreground_probability(n_samples=25).mean(0)
    isotypes = ["IgG1", "IgG2a"]
    metrics["eccite"] = {
        "cells": eccite.n_obs, "proteins": len(fg2), "epochs": len(model2.history_["elbo_train"]),
        "train_seconds": round(seconds2, 1),
        "isotype_mean_foreground": {k: round(float(fg2[k]), 3) for k in isotypes},
        "other_proteins_median_foreground": round(float(fg2.drop(isotypes).median()), 3),
        "isotype_rank_from_lowest": {k: int((fg2 < fg2[k]).sum()) + 1 for k in isotypes},
        "highest_foreground": {k: round(float(v), 3) for k, v in fg2.sort_values(ascending=False).head(5).items()},
    }
    print(json.dumps(metrics, indent=1))
    (out / "totalvi_metrics.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
