"""The ``cellvi`` command line: ``cellvi demo`` and ``cellvi train INPUT.h5ad``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _embed_2d(z):
    """2-D view of a latent space: PCA (fast, deterministic, no extra dependency)."""
    from sklearn.decomposition import PCA

    return PCA(2, random_state=0).fit_transform(z)


def _train_and_write(adata, out: Path, *, batch_key, labels_key, layer, max_epochs, color_keys, progress, seed):
    import numpy as np

    import cellvi

    out.mkdir(parents=True, exist_ok=True)
    cellvi.SCVI.setup_anndata(adata, layer=layer, batch_key=batch_key, labels_key=labels_key)
    model = cellvi.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, enable_progress_bar=progress, seed=seed, check_val_every_n_epoch=1)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    adata.obsm["X_scvi"] = z
    adata.write_h5ad(out / "adata.h5ad")
    model.save(out / "model", overwrite=True)
    cellvi.pl.training_curves(model.history, save=str(out / "training_curves.png"))
    colors = {k: adata.obs[k] for k in color_keys if k and k in adata.obs}
    if colors:
        cellvi.pl.embedding(_embed_2d(z), colors, save=str(out / "latent.png"))
    epochs = len(model.history_["elbo_train"])
    lines = [
        f"cellvi {cellvi.__version__}: SCVI on {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{model.spec.n_batches} batch(es)",
        f"trained {epochs} epochs in {seconds:.1f} s ({seconds / epochs:.2f} s/epoch)",
        f"final elbo_train {model.history_['elbo_train'][-1]:.2f}"
        + (f", elbo_validation {model.history_['elbo_validation'][-1]:.2f}" if "elbo_validation" in model.history_ else ""),
    ]
    if colors:
        from sklearn.metrics import silhouette_score

        for k, v in colors.items():
            if 1 < v.nunique() < len(v):
                lines.append(f"silhouette of latent by {k}: {silhouette_score(z, np.asarray(v.astype(str))):.3f}")
    lines.append(f"wrote {out / 'adata.h5ad'} (latent in .obsm['X_scvi']), {out / 'model'}/, "
                 f"{out / 'training_curves.png'}" + (f", {out / 'latent.png'}" if colors else ""))
    print("\n".join(lines))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellvi", description="Deep generative models for single-cell omics.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulate data, train SCVI, write latent + figures")
    demo.add_argument("--n-cells", type=int, default=4000)
    demo.add_argument("--n-genes", type=int, default=1000)
    demo.add_argument("--max-epochs", type=int, default=60)
    demo.add_argument("--out", type=Path, default=Path("cellvi_demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    train = sub.add_parser("train", help="train SCVI on an .h5ad file of raw counts")
    train.add_argument("input", type=Path)
    train.add_argument("--batch-key", default=None)
    train.add_argument("--labels-key", default=None)
    train.add_argument("--layer", default=None)
    train.add_argument("--max-epochs", type=int, default=None)
    train.add_argument("--color", action="append", default=[], help="obs column to colour the latent plot by")
    train.add_argument("--out", type=Path, default=Path("cellvi_out"))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import cellvi

    try:
        if args.command == "demo":
            adata = cellvi.datasets.simulate(args.n_cells, args.n_genes, seed=args.seed)
            _train_and_write(adata, args.out, batch_key="batch", labels_key=None, layer=None,
                             max_epochs=args.max_epochs, color_keys=["cell_type", "batch"],
                             progress=not args.no_progress, seed=args.seed)
        else:
            adata = cellvi.datasets.read_h5ad(args.input)
            _train_and_write(adata, args.out, batch_key=args.batch_key, labels_key=args.labels_key, layer=args.layer,
                             max_epochs=args.max_epochs, color_keys=[args.batch_key, args.labels_key, *args.color],
                             progress=not args.no_progress, seed=args.seed)
    except ValueError as e:
        print(f"cellvi: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
