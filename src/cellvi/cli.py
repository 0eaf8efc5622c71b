"""The ``cellvi`` command line: ``cellvi demo``, ``cellvi train INPUT.h5ad`` and ``cellvi de INPUT``.

``cellvi train`` writes a folder (``adata.h5ad`` with the latent, ``model/``, figures) that ``cellvi de``
reads back. Unless ``--max-epochs`` is given, training stops early on the validation ELBO.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

PATIENCE = 20  # epochs without a better validation ELBO before `cellvi train` stops


def _embed_2d(z, seed: int = 0):
    """2-D view of a latent space: ``(coords, "UMAP")`` when umap-learn is installed (``pip install
    'cellvi[umap]'``), else ``(coords, "PCA")``, its first two principal components."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # umap-learn warns on import when TensorFlow is absent
            import umap
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(2, random_state=0).fit_transform(z), "PCA"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by setting random_state": seeded means serial
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(z), "UMAP"


def _stop_reason(history: dict, *, early_stopping: bool, patience: int, cap: int) -> str:
    """Why training ended, in words, from the per-epoch history."""
    import numpy as np

    epochs = len(history["elbo_train"])
    if not early_stopping:
        return f"ran the {epochs} epochs asked for (--max-epochs)"
    val = history.get("elbo_validation")
    if not val:
        return f"reached the cap of {cap} epochs (no validation cells, so no early stopping)"
    best = int(np.argmin(val)) + 1
    if epochs - best >= patience:
        return (f"stopped early: elbo_validation did not improve for {patience} epochs after its best "
                f"({min(val):.2f}) at epoch {best}")
    return (f"reached the cap of {cap} epochs (scvi-tools heuristic min(400, 400 * 20000 / n_cells)); "
            f"best elbo_validation {min(val):.2f} at epoch {best}")


def _train_and_write(adata, out: Path, *, batch_key, labels_key, layer, max_epochs, color_keys, progress, seed,
                     patience: int = PATIENCE, accelerator: str = "auto", devices="auto", checkpoint_dir=None,
                     checkpoint_every: int = 1, resume_from=None):
    """Train SCVI (early stopping on the validation ELBO when ``max_epochs`` is None) and write ``out/``."""
    import numpy as np

    import cellvi
    from cellvi.models.base import max_epochs_heuristic

    cellvi.SCVI.setup_anndata(adata, layer=layer, batch_key=batch_key, labels_key=labels_key)
    model = cellvi.SCVI(adata)
    early_stopping = max_epochs is None
    cap = max_epochs_heuristic(adata.n_obs) if early_stopping else max_epochs
    t0 = time.perf_counter()
    model.train(max_epochs=cap, accelerator=accelerator, devices=devices, early_stopping=early_stopping,
                early_stopping_patience=patience, enable_progress_bar=progress, seed=seed, check_val_every_n_epoch=1,
                checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume_from=resume_from)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    adata.obsm["X_scvi"] = z
    out.mkdir(parents=True, exist_ok=True)
    colors = {k: adata.obs[k] for k in dict.fromkeys(color_keys) if k}
    basis = None
    if colors:
        coords, basis = _embed_2d(z, seed)
        adata.obsm[f"X_scvi_{basis.lower()}"] = coords
        cellvi.pl.embedding(coords, colors, basis=basis, title=f"SCVI latent ({z.shape[1]} dims), {basis}",
                            save=str(out / "latent.png"))
    adata.write_h5ad(out / "adata.h5ad")
    model.save(out / "model", overwrite=True)
    cellvi.pl.training_curves(model.history, save=str(out / "training_curves.png"))
    epochs = len(model.history_["elbo_train"])
    lines = [
        f"cellvi {cellvi.__version__}: SCVI on {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{model.spec.n_batches} batch(es)",
        f"trained {epochs} epochs in {seconds:.1f} s ({seconds / epochs:.2f} s/epoch); "
        + _stop_reason(model.history_, early_stopping=early_stopping, patience=patience, cap=cap),
        f"final elbo_train {model.history_['elbo_train'][-1]:.2f}"
        + (f", elbo_validation {model.history_['elbo_validation'][-1]:.2f}" if "elbo_validation" in model.history_ else ""),
    ]
    if colors:
        from sklearn.metrics import silhouette_score

        for k, v in colors.items():
            if 1 < v.nunique() < len(v):
                lines.append(f"silhouette of latent by {k}: {silhouette_score(z, np.asarray(v.astype(str))):.3f}")
    lines.append(f"wrote {out / 'adata.h5ad'} (latent in .obsm['X_scvi']"
                 + (f", its {basis} in .obsm['X_scvi_{basis.lower()}']" if basis else "") + f"), {out / 'model'}/, "
                 f"{out / 'training_curves.png'}" + (f", {out / 'latent.png'} ({basis} of the latent)" if basis else ""))
    print("\n".join(lines))
    return model


def _read_h5ad(parser: argparse.ArgumentParser, path: Path, backed: bool = False):
    """The AnnData of ``path``; with ``backed`` its counts stay on disk and are read in chunks."""
    import anndata

    import cellvi

    if not path.is_file():
        parser.error(f"{path} is not a file (expected an .h5ad file of raw counts).")
    if not backed:
        return cellvi.datasets.read_h5ad(path)
    try:
        return anndata.read_h5ad(path, backed="r")
    except (OSError, KeyError) as e:
        parser.error(f"{path} cannot be opened backed (is it an .h5ad file?): {e}")


def _check_columns(parser: argparse.ArgumentParser, adata, source, **keys) -> None:
    """``parser.error`` naming the valid columns when an ``--option`` names a column ``adata.obs`` lacks."""
    for option, key in keys.items():
        for k in key if isinstance(key, list) else [key]:
            if k is not None and k not in adata.obs.columns:
                parser.error(f"--{option.replace('_', '-')} {k!r} is not a column of {source}'s .obs "
                             f"(columns: {', '.join(map(str, adata.obs.columns))}).")


def _check_groups(parser: argparse.ArgumentParser, adata, groupby: str, group1: str, group2: str | None) -> None:
    import pandas as pd

    col = adata.obs[groupby]
    groups = [str(c) for c in (col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col))
              if (col.astype(str) == str(c)).any()]
    for option, g in (("group1", group1), ("group2", group2)):
        if g is not None and g not in groups:
            parser.error(f"--{option} {g!r} is not a group of {groupby!r} (groups: {', '.join(groups)}).")
    if group2 is not None and group1 == group2:
        parser.error(f"--group1 and --group2 are the same group ({group1!r}).")


def _load_for_de(parser: argparse.ArgumentParser, path: Path):
    """(model, adata) from the output folder of ``cellvi train`` or a model folder saved with its data."""
    import json

    import anndata

    import cellvi

    if (path / "model" / "model.json").exists() and (path / "adata.h5ad").exists():  # `cellvi train --out path`
        model_dir, adata = path / "model", anndata.read_h5ad(path / "adata.h5ad")
    elif (path / "model.json").exists():  # model.save(path, save_anndata=True)
        model_dir, adata = path, None
    else:
        parser.error(f"{path} is neither the output folder of `cellvi train` (model/ and adata.h5ad) nor a saved "
                     "model folder (model.json); give one of those, or an .h5ad file to train on first.")
    name = json.loads((model_dir / "model.json").read_text()).get("model_class", "SCVI")
    model = getattr(cellvi, name).load(model_dir, adata=adata)
    return model, model.adata


def _write_de(model, args, out: Path) -> None:
    import cellvi

    out.mkdir(parents=True, exist_ok=True)
    delta = None if args.delta == "auto" else float(args.delta)
    res = model.differential_expression(groupby=args.groupby, group1=args.group1, group2=args.group2, mode=args.mode,
                                        delta=delta, fdr_target=args.fdr_target, batch_correction=args.batch_correction,
                                        seed=args.seed)
    res.to_csv(out / "de.csv", index_label="gene")
    cellvi.pl.volcano(res, save=str(out / "volcano.png"))
    col = model.adata.obs[args.groupby].astype(str)
    n1 = int((col == args.group1).sum())
    n2 = int((col == args.group2).sum()) if args.group2 is not None else model.adata.n_obs - n1
    lines = [
        f"DE ({args.mode} mode{', delta ' + str(res['delta'].iloc[0]) if args.mode == 'change' else ''}): "
        f"{res['comparison'].iloc[0]} ({n1} vs {n2} cells, {model.adata.n_vars} genes)",
    ]
    if args.mode == "change":  # calls exist in change mode only (vanilla proba_de is no probability of a change)
        calls = res[f"is_de_fdr_{args.fdr_target}"]
        up = int((calls & (res["lfc_mean"] > 0)).sum())
        lines.append(f"{int(calls.sum())} genes called at a posterior expected FDR of {args.fdr_target:g} "
                     f"({up} up in {args.group1}, {int(calls.sum()) - up} down)")
        top = res[calls].head(10)
        if len(top):
            lines.append("top calls (lfc_mean): " + ", ".join(f"{g} {v:+.2f}" for g, v in top["lfc_mean"].items()))
    else:
        lines.append("top genes by bayes_factor: " + ", ".join(
            f"{g} {v:.1f}" for g, v in res["bayes_factor"].head(10).items()))
    lines.append(f"wrote {out / 'de.csv'}, {out / 'volcano.png'}")
    print("\n".join(lines))


def _device_options(parser: argparse.ArgumentParser, args) -> dict:
    """The training options of ``--accelerator``, ``--devices``, ``--checkpoint-*`` and ``--resume-from``."""
    devices = args.devices
    if devices != "auto":
        try:
            devices = int(devices)
        except ValueError:
            parser.error(f"--devices must be 'auto' or a number, got {devices!r}.")
    if args.resume_from is not None and not (args.resume_from / "train_state.json").exists():
        parser.error(f"--resume-from {args.resume_from} holds no training checkpoint (train_state.json); give the "
                     "--checkpoint-dir of the interrupted run.")
    return {"accelerator": args.accelerator, "devices": devices, "checkpoint_dir": args.checkpoint_dir,
            "checkpoint_every": args.checkpoint_every, "resume_from": args.resume_from}


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

    training = argparse.ArgumentParser(add_help=False)  # options shared by `train` and `de INPUT.h5ad`
    training.add_argument("--batch-key", default=None, help="obs column of batches (e.g. donor)")
    training.add_argument("--labels-key", default=None)
    training.add_argument("--layer", default=None, help="layer of raw counts (default: X)")
    training.add_argument("--max-epochs", type=int, default=None,
                          help="train exactly this many epochs (default: stop when the validation ELBO has not "
                               "improved for --patience epochs, at most min(400, 400 * 20000 / n_cells) epochs)")
    training.add_argument("--patience", type=int, default=PATIENCE,
                          help=f"early-stopping patience in epochs (default {PATIENCE})")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--backed", action="store_true",
                          help="leave the counts on disk and read minibatches in chunks (files larger than memory)")
    training.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    training.add_argument("--devices", default="auto",
                          help="'auto', a number of devices (more than 1 trains data-parallel) or -1 for every GPU")
    training.add_argument("--checkpoint-dir", type=Path, default=None, help="write the training state here")
    training.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    training.add_argument("--resume-from", type=Path, default=None,
                          help="continue an interrupted run from its --checkpoint-dir (same data and options)")
    training.add_argument("--no-progress", action="store_true")

    train = sub.add_parser("train", parents=[training], help="train SCVI on an .h5ad file of raw counts",
                           description="Train SCVI and write OUT/adata.h5ad (latent in .obsm['X_scvi']), OUT/model/, "
                                       "training_curves.png and, with --color, latent.png (UMAP of the latent when "
                                       "umap-learn is installed, else PCA).")
    train.add_argument("input", type=Path)
    train.add_argument("--color", action="append", default=[], help="obs column to colour the latent plot by")
    train.add_argument("--out", type=Path, default=Path("cellvi_out"))

    de = sub.add_parser("de", parents=[training], help="Bayesian differential expression between two groups of cells",
                        description="Compare --group1 with --group2 (or with all other cells) of the obs column "
                                    "--groupby; write OUT/de.csv and OUT/volcano.png. INPUT is the output folder of "
                                    "`cellvi train`, a saved model folder, or an .h5ad file (SCVI is trained on it "
                                    "first, with the training options, and written to OUT).")
    de.add_argument("input", type=Path, help="`cellvi train` output folder, model folder, or .h5ad file")
    de.add_argument("--groupby", required=True, help="obs column holding the groups")
    de.add_argument("--group1", required=True)
    de.add_argument("--group2", default=None, help="default: all cells not in group1")
    de.add_argument("--mode", choices=["change", "vanilla"], default="change",
                    help="change (default): proba_de = P(|LFC| > delta); vanilla: P(group1 > group2)")
    de.add_argument("--delta", default="0.25", help="LFC threshold (log2) of the change mode, or 'auto'")
    de.add_argument("--fdr-target", type=float, default=0.05, help="posterior expected FDR of the calls")
    de.add_argument("--batch-correction", action="store_true",
                    help="decode both groups in every batch and average (when the groups share batches)")
    de.add_argument("--out", type=Path, default=Path("cellvi_de"))
    args = parser.parse_args(argv)
    if args.command == "de":
        if args.delta != "auto":
            try:
                float(args.delta)
            except ValueError:
                de.error(f"--delta must be a number or 'auto', got {args.delta!r}.")
        if not 0.0 < args.fdr_target < 1.0:
            de.error(f"--fdr-target must be in (0, 1), got {args.fdr_target}.")

    import cellvi

    try:
        if args.command == "demo":
            adata = cellvi.datasets.simulate(args.n_cells, args.n_genes, seed=args.seed)
            _train_and_write(adata, args.out, batch_key="batch", labels_key=None, layer=None,
                             max_epochs=args.max_epochs, color_keys=["cell_type", "batch"],
                             progress=not args.no_progress, seed=args.seed)
        elif args.command == "train":
            adata = _read_h5ad(train, args.input, args.backed)
            _check_columns(train, adata, args.input, batch_key=args.batch_key, labels_key=args.labels_key,
                           color=args.color)
            _train_and_write(adata, args.out, batch_key=args.batch_key, labels_key=args.labels_key, layer=args.layer,
                             max_epochs=args.max_epochs, color_keys=[args.batch_key, args.labels_key, *args.color],
                             progress=not args.no_progress, seed=args.seed, patience=args.patience,
                             **_device_options(train, args))
        elif args.input.suffix == ".h5ad":
            adata = _read_h5ad(de, args.input, args.backed)
            _check_columns(de, adata, args.input, batch_key=args.batch_key, labels_key=args.labels_key,
                           groupby=args.groupby)
            _check_groups(de, adata, args.groupby, args.group1, args.group2)
            model = _train_and_write(adata, args.out, batch_key=args.batch_key, labels_key=args.labels_key,
                                     layer=args.layer, max_epochs=args.max_epochs, color_keys=[args.groupby],
                                     progress=not args.no_progress, seed=args.seed, patience=args.patience,
                                     **_device_options(de, args))
            _write_de(model, args, args.out)
        else:
            if not args.input.is_dir():
                de.error(f"{args.input} is neither a folder nor an .h5ad file.")
            model, adata = _load_for_de(de, args.input)
            _check_columns(de, adata, args.input, groupby=args.groupby)
            _check_groups(de, adata, args.groupby, args.group1, args.group2)
            _write_de(model, args, args.out)
    except ValueError as e:
        print(f"cellvi: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
