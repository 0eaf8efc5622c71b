"""Regenerate the figures and numbers of docs/contrastivevi.md.

    python docs/make_contrastivevi_figures.py [--data ../shared/data/kang_ifnb_pbmc_small.h5ad]

Trains ContrastiveVI on the Kang 2018 IFN-beta PBMC subset (4,000 cells: 2,000 control = background,
2,000 stimulated = target; batch = donor), writes PNGs to docs/figures/ and prints the metrics as JSON
(also saved to docs/figures/contrastivevi_metrics.json).
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
# interferon-stimulated genes forced into the subset (see the data README)
ISGS = ["ISG15", "IFI6", "MX1", "IFIT1", "IFIT3", "ISG20", "IFI27", "OAS1", "IFITM3", "LY6E", "CXCL10"]


def silhouette(x, labels) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(x, np.asarray(labels).astype(str)))


def accuracy(x, y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(max_iter=2000), x, np.asarray(y).astype(str), cv=5).mean())


def contrastivevi_part(adata, background, target, condition, cell_type, max_epochs, out) -> dict:
    """Train ContrastiveVI, draw the figures, and return its metrics."""
    # 2. train with the defaults
    model = cellvi.ContrastiveVI(adata)
    t0 = time.perf_counter()
    model.train(background, target, max_epochs=max_epochs)
    seconds = time.perf_counter() - t0
    n_epochs = len(model.history_["elbo_train"])

    # 3. the two latent spaces, projected to 2-D with PCA for the figures
    from sklearn.decomposition import PCA

    s = model.get_latent_representation(representation_kind="salient")
    z = model.get_latent_representation(representation_kind="background")
    colors = {"condition": condition, "cell type": cell_type}
    for name, latent in (("salient", s), ("background", z)):
        coords = PCA(2, random_state=0).fit_transform(latent)
        cellvi.pl.embedding(coords, colors, save=str(out / f"contrastivevi_{name}.png"))
    s_t = PCA(2, random_state=0).fit_transform(s[target])
    cellvi.pl.embedding(s_t, {"cell type (stimulated cells)": cell_type[target]},
                        save=str(out / "contrastivevi_salient_target.png"))
    cellvi.pl.training_curves(model.history, save=str(out / "contrastivevi_training.png"))

    # 4. numbers: what each latent carries
    ct_t = cell_type[target]
    metrics = {
        "epochs": n_epochs,
        "train_seconds": round(seconds, 1),
        "background_silhouette_cell_type": silhouette(z, cell_type),
        "background_silhouette_condition": silhouette(z, condition),
        "background_accuracy_condition": accuracy(z, condition),
        "salient_silhouette_condition": silhouette(s, condition),
        "salient_accuracy_condition": accuracy(s, condition),
        "target_background_silhouette_cell_type": silhouette(z[target], ct_t),
        "target_salient_silhouette_cell_type": silhouette(s[target], ct_t),
    }

    # 5. what the salient latent adds to stimulated cells' expression: genes ranked by
    #    mean log2(salient / background) normalized expression over stimulated cells
    expr = model.get_normalized_expression(indices=target, n_samples=5, return_numpy=True)
    lfc = np.log2(expr["salient"] + 1e-6) - np.log2(expr["background"] + 1e-6)
    mean_lfc = lfc.mean(0)
    order = np.argsort(-mean_lfc)
    genes = np.asarray(adata.var_names)
    top = genes[order[:20]].tolist()
    isg_rank = {g: int(np.flatnonzero(genes[order] == g)[0]) + 1 for g in ISGS if g in set(genes)}
    metrics["top20_salient_genes"] = top
    metrics["isgs_in_top20"] = int(sum(g in top for g in ISGS))
    metrics["isg_ranks"] = isg_rank
    metrics["isg_mean_log2_salient_over_background"] = {g: round(float(mean_lfc[genes == g][0]), 2) for g in isg_rank}
    # background cells: salient expression equals background expression (s = 0)
    bg_expr = model.get_normalized_expression(indices=background[:200], return_numpy=True)
    metrics["background_cells_max_abs_salient_minus_background"] = float(
        np.abs(bg_expr["salient"] - bg_expr["background"]).max())

    # 6. differential expression inside the target set: stimulated CD14+ monocytes vs stimulated
    #    CD4 T cells, on salient expression (needs the shared DE engine)
    try:
        from cellvi import de  # noqa: F401
    except ImportError:
        metrics["de"] = "cellvi.de not available"
    else:
        mono = target[ct_t == "CD14+ Monocytes"]
        tcell = target[ct_t == "CD4 T cells"]
        res = model.differential_expression(idx1=mono, idx2=tcell, target_idx=target, mode="change",
                                            pseudocounts=None, silent=True)
        metrics["de_top10_stim_monocytes_vs_stim_cd4"] = {g: round(float(v), 2) for g, v in
                                                         res["lfc_mean"].iloc[:10].items()}
        metrics["de_n_called_fdr_0.05"] = int(res["is_de_fdr_0.05"].sum())

    return metrics


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--max-epochs", type=int, default=None, help="default: scvi-tools' heuristic (400 here)")
    p.add_argument("--out", default=str(HERE / "figures"))
    p.add_argument("--part", choices=["all", "contrastivevi", "scvi"], default="all",
                   help="'scvi': only the SCVI reference (one latent space, same settings); the metrics JSON "
                        "is updated, not replaced")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cellvi.settings.progress_bar = False

    # 1. data: control cells are the background, stimulated cells the target
    adata = cellvi.datasets.read_h5ad(args.data)
    cellvi.ContrastiveVI.setup_anndata(adata, batch_key="donor")
    condition = adata.obs["condition"].astype(str).to_numpy()
    cell_type = adata.obs["predicted_cell_type"].astype(str).to_numpy()
    background, target = np.flatnonzero(condition == "ctrl"), np.flatnonzero(condition == "stim")

    metrics_path = out / "contrastivevi_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if args.part in ("all", "contrastivevi"):
        metrics.update(contrastivevi_part(adata, background, target, condition, cell_type, args.max_epochs, out))
        metrics_path.write_text(json.dumps(metrics, indent=1))  # kept even if the SCVI reference is stopped
    # 7. reference: one latent space (SCVI) on the same cells, same batch key and epochs
    if args.part in ("all", "scvi"):
        ct_t = cell_type[target]
        cellvi.SCVI.setup_anndata(adata, batch_key="donor")
        scvi_model = cellvi.SCVI(adata)
        scvi_model.train(max_epochs=args.max_epochs)
        u = scvi_model.get_latent_representation()
        metrics["scvi_silhouette_cell_type"] = silhouette(u, cell_type)
        metrics["scvi_silhouette_condition"] = silhouette(u, condition)
        metrics["scvi_accuracy_condition"] = accuracy(u, condition)
        metrics["scvi_target_silhouette_cell_type"] = silhouette(u[target], ct_t)

    metrics_path.write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
