"""Plots. matplotlib is imported when a plot is made, with the non-interactive Agg backend when
no display is configured."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY"))


def training_curves(history: dict[str, pd.DataFrame], keys: tuple[str, ...] = ("elbo_train", "elbo_validation"),
                    ax=None, save: str | None = None):
    """Plot per-epoch history curves (``model.history``); returns the matplotlib Axes."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for key in keys:
        if key in history:
            ax.plot(history[key].index, history[key][key], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell")
    ax.legend(frameon=False)
    if save:
        ax.figure.tight_layout()
        ax.figure.savefig(save, dpi=120)
        plt.close(ax.figure)
    return ax


def embedding(coords: np.ndarray, colors: dict[str, pd.Series], save: str | None = None, s: float = 3.0,
              basis: str | None = None, title: str | None = None):
    """Scatter of 2-D ``coords`` in one panel per entry of ``colors`` (name -> categorical values).

    ``basis`` (e.g. ``"UMAP"``, ``"PCA"``) names the axes ``UMAP 1``, ``UMAP 2``; ``title`` goes above the panels.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(colors), figsize=(4.5 * len(colors), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], colors.items()):
        cats = pd.Categorical(values)
        cmap = plt.get_cmap("tab10" if len(cats.categories) <= 10 else "tab20")
        for i, cat in enumerate(cats.categories):
            m = np.asarray(cats == cat)
            ax.scatter(coords[m, 0], coords[m, 1], s=s, color=cmap(i % cmap.N), label=str(cat), linewidths=0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        if basis:
            ax.set_xlabel(f"{basis} 1")
            ax.set_ylabel(f"{basis} 2")
        ax.legend(frameon=False, fontsize=7, markerscale=3, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=120)
        plt.close(fig)
    return fig


def volcano(results: pd.DataFrame, fdr_key: str | None = None, n_labels: int = 10, ax=None, save: str | None = None):
    """Volcano plot of a DE table: ``lfc_mean`` against ``proba_de`` (as -log10(1 - proba_de)).

    Parameters
    ----------
    results
        Output of ``model.differential_expression`` for one comparison.
    fdr_key
        Boolean column marking the calls (default: the ``is_de_fdr_*`` column), drawn in red.
    n_labels
        Label this many called features with the largest ``|lfc_mean|``.
    """
    plt = _plt()
    if results["comparison"].nunique() > 1:
        raise ValueError("results hold several comparisons; select one, e.g. results[results.comparison == ...].")
    fdr_key = fdr_key or next((c for c in results.columns if c.startswith("is_de_fdr_")), None)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    y = -np.log10(np.clip(1.0 - results["proba_de"].to_numpy(), 1e-4, 1.0))
    x = results["lfc_mean"].to_numpy()
    called = results[fdr_key].to_numpy() if fdr_key else np.zeros(len(results), bool)
    ax.scatter(x[~called], y[~called], s=4, color="0.6", linewidths=0, label="not called")
    ax.scatter(x[called], y[called], s=6, color="tab:red", linewidths=0, label=f"called ({called.sum()})")
    for i in np.argsort(-np.abs(x) * called)[: min(n_labels, called.sum())]:
        ax.annotate(str(results.index[i]), (x[i], y[i]), fontsize=6)
    ax.set_xlabel("LFC (log2, group1 vs group2)")
    ax.set_ylabel("-log10(1 - proba_de)")
    ax.set_title(str(results["comparison"].iloc[0]))
    ax.legend(frameon=False, fontsize=7)
    if save:
        ax.figure.tight_layout()
        ax.figure.savefig(save, dpi=120)
        plt.close(ax.figure)
    return ax


def sample_distance_heatmap(dist, sample_info: pd.DataFrame | None = None, color_by: list[str] | None = None,
                            method: str = "complete", cmap: str = "viridis", title: str | None = None,
                            save: str | None = None):
    """Heatmap of a sample-by-sample distance matrix, ordered by hierarchical clustering, with the
    dendrogram on top and one colour strip per sample covariate.

    Parameters
    ----------
    dist
        ``(S, S)`` array or an xarray DataArray with ``sample_x`` / ``sample_y`` coordinates (e.g.
        ``model.get_local_sample_distances(groupby="cell_type")["cell_type"].sel(cell_type_name="B")``).
    sample_info
        One row per sample, in the matrix's order (``model.sample_info``), for the colour strips.
    color_by
        Columns of ``sample_info`` to draw as strips.
    method
        Linkage method of :func:`scipy.cluster.hierarchy.linkage`.

    Returns
    -------
    The matplotlib Figure.
    """
    from scipy.cluster.hierarchy import dendrogram

    from cellvi.analysis.explore import sample_linkage

    plt = _plt()
    names = [str(s) for s in dist.coords["sample_x"].values] if hasattr(dist, "coords") else None
    d = np.asarray(dist.values if hasattr(dist, "values") else dist, dtype=np.float64)
    names = names or [str(i) for i in range(d.shape[0])]
    color_by = list(color_by or [])
    n_strips = len(color_by)
    fig = plt.figure(figsize=(6, 6 + 0.25 * n_strips))
    grid = fig.add_gridspec(2 + n_strips, 2, height_ratios=[1.2] + [0.15] * n_strips + [5], width_ratios=[20, 1],
                            hspace=0.05, wspace=0.05)
    order = dendrogram(sample_linkage(d, method), ax=fig.add_subplot(grid[0, 0]), no_labels=True,
                       color_threshold=0, above_threshold_color="k")["leaves"]
    fig.axes[0].axis("off")
    for i, key in enumerate(color_by):
        ax = fig.add_subplot(grid[1 + i, 0])
        values = pd.Categorical(sample_info[key].astype(str).to_numpy()[order])
        ax.imshow(values.codes[None, :], aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([0])
        ax.set_yticklabels([key], fontsize=8)
    ax = fig.add_subplot(grid[-1, 0])
    im = ax.imshow(d[np.ix_(order, order)], cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([names[i] for i in order], rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([names[i] for i in order], fontsize=7)
    fig.colorbar(im, cax=fig.add_subplot(grid[-1, 1]), label="distance")
    if title:
        fig.suptitle(title)
    if save:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    return fig
