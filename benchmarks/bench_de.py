"""Differential expression: cellvi vs scvi-tools vs Wilcoxon vs pseudobulk DESeq2.

Usage (from the repo root; scvi-tools, scanpy and pydeseq2 live in their own venv):

    flock /work/torch.lock python benchmarks/bench_de.py --part sim --seed 0 \\
        --scvi-python /work/venv-scvi/bin/python --json /tmp/bench_de.jsonl
    flock /work/torch.lock python benchmarks/bench_de.py --part real \\
        --scvi-python /work/venv-scvi/bin/python --json /tmp/bench_de.jsonl
    python benchmarks/bench_de.py --report --json /tmp/bench_de.jsonl     # table of everything stored

``--which cellvi|scvi|baselines`` runs one worker only (to keep each locked run short); its rows are
appended to the same JSON-lines file, and ``--report`` prints the table of all of them.

Each worker runs in its own subprocess, one after the other (never two at once):

* ``cellvi``: ``cellvi.SCVI`` trained, then DE in change mode (delta 0.25) and vanilla mode.
* ``scvi``: ``scvi.model.SCVI`` with identical training settings, then the same DE calls.
* ``baselines``: scanpy ``rank_genes_groups(method="wilcoxon")`` on log1p of counts per 10^4
  (BH-adjusted p < 0.05), and pydeseq2 on pseudobulk counts (sum per donor x group, design
  ``~donor + group``, padj < 0.05).

Parts:

``sim``  ``cellvi.datasets.simulate(n_cells, n_genes, seed)``; two batches, two donors per batch.
    *type_0 stim vs ctrl*: truth in ``var["de_type_0"]``. Reported: AUPRC of the true DE genes
    (ranking by proba_de, ties broken by |LFC|; for Wilcoxon/DESeq2 by -log10 p), calls at FDR 0.05,
    observed false discovery proportion (FDP) of the calls, power (share of true DE genes called),
    seconds for the pairwise DE call and for a one-vs-rest DE over all cell types.
    *type_1 stim of batch_0 vs type_1 ctrl of both batches*: type_1 has no true DE, so every call is
    false; the batch genes (``var["batch_gene"]``) are what a confounded comparison picks up.
    Model-based DE with and without ``batch_correction``.
``real`` Kang 2018 IFN-beta PBMCs (small subset), SCVI with ``batch_key="donor"``; CD14+ monocytes
    stim vs ctrl. Reported: mean rank and top-50 count of 11 interferon-stimulated genes (all strongly
    up in stim), whether the negative controls CD3E / MS4A1 / ACTB are called, calls, seconds.

``calibration`` (cellvi only) six simulations unlike those the engine was tuned on; calls at targets 0.01-0.2:
    observed FDP and power of cell-level, donor-level (``sample_key="donor"``, change and point null) calls and of
    a Wilcoxon rank-sum test + BH on the same cells; figure ``docs/figures/de_calibration.png``.
``donors`` Kang CD14+ monocytes: cellvi donor-aware and cell-level DE for 3 training seeds (Jaccard of the calls)
    against a pydeseq2 pseudobulk reference (padj < 0.01, |LFC| > 1), beside Wilcoxon + BH.
``scaling`` (cellvi only) wall time of a pairwise and a one-vs-rest call as cells and groups grow.

Calls of scvi-tools in vanilla mode: it returns ``proba_m1``/``proba_m2`` but no ``proba_de`` and no
FDR column; the benchmark uses ``max(proba_m1, proba_m2)`` (what cellvi's vanilla ``proba_de`` is)
with the same expected-FDR rule, and marks those rows ``derived``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

KANG = "/work/shared/data/kang_ifnb_pbmc_small.h5ad"
ISGS = ["ISG15", "IFI6", "MX1", "IFIT1", "IFIT3", "ISG20", "IFITM3", "LY6E", "IFI27", "OAS1", "CXCL10"]
NEGATIVE = ["CD3E", "MS4A1", "ACTB"]
FDR = 0.05
MONO = "CD14+ Monocytes"


# --------------------------------------------------------------------------- data and comparisons


def load(args):
    """The AnnData, its comparisons {name: (mask1, mask2)}, the batch key and the one-vs-rest key."""
    if args.part == "sim":
        import cellvi

        adata = cellvi.datasets.simulate(args.n_cells, args.n_genes, n_cell_types=args.n_types, seed=args.seed)
        obs = adata.obs
        t0, t1 = obs["cell_type"] == "type_0", obs["cell_type"] == "type_1"
        stim, ctrl = obs["condition"] == "stim", obs["condition"] == "ctrl"
        comps = {
            "type_0 stim vs ctrl": ((t0 & stim).to_numpy(), (t0 & ctrl).to_numpy()),
            "type_1 stim(batch_0) vs ctrl(all)": ((t1 & stim & (obs["batch"] == "batch_0")).to_numpy(),
                                                  (t1 & ctrl).to_numpy()),
        }
        return adata, comps, "batch", "cell_type"
    import anndata as ad

    adata = ad.read_h5ad(args.kang)
    obs = adata.obs
    mono = obs["predicted_cell_type"] == MONO
    comps = {"CD14+ Mono stim vs ctrl": ((mono & (obs["condition"] == "stim")).to_numpy(),
                                         (mono & (obs["condition"] == "ctrl")).to_numpy())}
    return adata, comps, "donor", "predicted_cell_type"


# --------------------------------------------------------------------------- scoring


def efdr_calls(p: np.ndarray, target: float = FDR) -> np.ndarray:
    """Largest top set (by p) whose mean posterior probability of being null is <= target."""
    p = np.nan_to_num(np.asarray(p, float), nan=0.0)
    order = np.argsort(-p, kind="stable")
    running = np.cumsum(1.0 - p[order]) / np.arange(1, p.size + 1)
    n = int((running <= target + 1e-12).sum()) if running.size else 0
    out = np.zeros(p.size, bool)
    out[order[:n]] = True
    return out


def rank_score(primary: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """A strictly ordered score: by ``primary``, ties broken by ``tie`` (both larger = stronger)."""
    primary = np.nan_to_num(np.asarray(primary, float), nan=-np.inf)
    tie = np.nan_to_num(np.asarray(tie, float), nan=-np.inf)
    order = np.lexsort((-tie, -primary))  # last key sorts first
    score = np.empty(primary.size)
    score[order] = -np.arange(primary.size, dtype=float)
    return score


def evaluate(adata, comp: str, score: np.ndarray, calls: np.ndarray, lfc: np.ndarray | None) -> dict:
    """Metrics of one method on one comparison; ``score`` larger = more DE, in var order."""
    calls = np.asarray(calls, bool)
    out = {"n_calls": int(calls.sum())}
    if comp.startswith("type_0"):
        from sklearn.metrics import average_precision_score

        truth = adata.var["de_type_0"].to_numpy()
        tp = int((calls & truth).sum())
        out.update(auprc=float(average_precision_score(truth, score)), n_true=int(truth.sum()),
                   fdp=(out["n_calls"] - tp) / max(out["n_calls"], 1), power=tp / truth.sum())
        if lfc is not None:  # sign agreement of the called true DE genes
            true_lfc = adata.var["true_lfc_type_0"].to_numpy()
            hit = calls & truth
            out["sign_ok"] = float(np.mean(np.sign(lfc[hit]) == np.sign(true_lfc[hit]))) if hit.any() else None
    elif comp.startswith("type_1"):
        bg = adata.var["batch_gene"].to_numpy()
        out.update(n_batch_gene_calls=int((calls & bg).sum()), n_batch_genes=int(bg.sum()))
    else:  # real data
        names = list(adata.var_names)
        rank = np.empty(score.size, int)
        rank[np.argsort(-score, kind="stable")] = np.arange(1, score.size + 1)
        pos = {g: i for i, g in enumerate(names)}
        isg = [pos[g] for g in ISGS if g in pos]
        out.update(isg_mean_rank=float(np.mean(rank[isg])), isg_top50=int((rank[isg] <= 50).sum()),
                   isg_called=int(calls[isg].sum()), n_isg=len(isg),
                   neg_called={g: (bool(calls[pos[g]]) if g in pos else None) for g in NEGATIVE})
        if lfc is not None:
            out["isg_up"] = int((lfc[isg] > 0).sum())
    return out


# --------------------------------------------------------------------------- workers


def model_worker(lib: str, args) -> list[dict]:
    """Train one library's SCVI and run its DE calls."""
    import torch

    adata, comps, batch_key, ovr_key = load(args)
    names = adata.var_names
    if lib == "cellvi":
        import cellvi

        version = f"cellvi {cellvi.__version__}"
        cellvi.settings.seed = args.seed
        cellvi.SCVI.setup_anndata(adata, batch_key=batch_key)
        model = cellvi.SCVI(adata)
    else:
        import scvi

        version = f"scvi-tools {scvi.__version__}"
        scvi.settings.seed = args.seed
        scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
        model = scvi.model.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=128, accelerator="cpu", enable_progress_bar=False)
    train_s = time.perf_counter() - t0
    # warm-up: one tiny DE call, so that one-time costs (lazy imports, first allocations) are not timed
    first = np.flatnonzero(comps[next(iter(comps))][0])[:50]
    second = np.flatnonzero(comps[next(iter(comps))][1])[:50]
    model.differential_expression(idx1=first, idx2=second, mode="change", silent=True)

    def run(comp, mode, **kw):
        m1, m2 = comps[comp]
        t0 = time.perf_counter()
        df = model.differential_expression(idx1=m1, idx2=m2, mode=mode, fdr_target=FDR, silent=True, **kw)
        seconds = time.perf_counter() - t0
        df = df.loc[~df.index.duplicated()].reindex(names)
        derived = "proba_de" not in df
        proba = np.maximum(df["proba_m1"], df["proba_m2"]).to_numpy() if derived else df["proba_de"].to_numpy()
        col = f"is_de_fdr_{FDR}"
        calls = efdr_calls(proba) if col not in df else df[col].fillna(False).to_numpy(bool)
        lfc = df["lfc_mean"].to_numpy() if "lfc_mean" in df else np.log2(df["scale1"] / df["scale2"]).to_numpy()
        row = {"method": f"{lib} {mode}" + (" +batch_corr" if kw.get("batch_correction") else ""),
               "library": version, "comparison": comp, "seconds": seconds, "train_s": train_s,
               "epochs": args.epochs, "torch_threads": torch.get_num_threads(), "calls_derived": derived}
        row.update(evaluate(adata, comp, rank_score(proba, np.abs(lfc)), calls, lfc))
        return row

    rows = []
    main = next(iter(comps))
    for mode in ("change", "vanilla"):
        row = run(main, mode)
        if args.part == "sim":  # one-vs-rest over every cell type, timing only
            t0 = time.perf_counter()
            model.differential_expression(groupby=ovr_key, mode=mode, fdr_target=FDR, silent=True)
            row["ovr_seconds"] = time.perf_counter() - t0
        rows.append(row)
    if args.part == "sim":
        confounded = list(comps)[1]
        for bc in (False, True):
            rows.append(run(confounded, "change", batch_correction=bc))
    return rows


def baseline_worker(args) -> list[dict]:
    """Wilcoxon on log-normalized counts and pseudobulk DESeq2 over donors."""
    import warnings

    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    warnings.filterwarnings("ignore")
    adata, comps, _, ovr_key = load(args)
    names = adata.var_names
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    warm = norm[:300].copy()  # numba compiles the Wilcoxon kernel on first use: not timed
    warm.obs["grp"] = pd.Categorical(np.where(np.arange(300) % 2 == 0, "a", "b"))
    sc.tl.rank_genes_groups(warm, "grp", method="wilcoxon")
    rows = []
    for k, (comp, (m1, m2)) in enumerate(comps.items()):
        # --- Wilcoxon, one pairwise comparison
        t0 = time.perf_counter()
        sub = norm[m1 | m2].copy()
        sub.obs["grp"] = pd.Categorical(np.where(m1[m1 | m2], "g1", "g2"))
        sc.tl.rank_genes_groups(sub, "grp", groups=["g1"], reference="g2", method="wilcoxon")
        seconds = time.perf_counter() - t0
        r = sc.get.rank_genes_groups_df(sub, group="g1").set_index("names").reindex(names)
        padj, p = r["pvals_adj"].to_numpy(), r["pvals"].to_numpy()
        lfc = r["logfoldchanges"].to_numpy()
        row = {"method": "wilcoxon", "library": f"scanpy {sc.__version__}", "comparison": comp, "seconds": seconds}
        if k == 0 and args.part == "sim":
            t0 = time.perf_counter()
            sc.tl.rank_genes_groups(norm, ovr_key, method="wilcoxon")
            row["ovr_seconds"] = time.perf_counter() - t0
        row.update(evaluate(adata, comp, rank_score(-np.log10(np.maximum(p, 1e-300)), np.abs(lfc)),
                            np.nan_to_num(padj, nan=1.0) < FDR, lfc))
        rows.append(row)
        if k > 0:  # the confounded comparison has no donor pairing: Wilcoxon as reference only
            continue
        # --- pseudobulk DESeq2: sum counts per donor x group, design ~donor + group
        import pydeseq2

        t0 = time.perf_counter()
        X = sp.csr_matrix(adata.X)
        keys, mats, meta = [], [], []
        for grp, mask in (("g1", m1), ("g2", m2)):
            donors = adata.obs["donor"].astype(str).to_numpy()
            for d in np.unique(donors[mask]):
                cells = mask & (donors == d)
                keys.append(f"{d}_{grp}")
                mats.append(np.asarray(X[cells].sum(0)).ravel())
                meta.append({"donor": d, "group": grp})
        counts = pd.DataFrame(np.rint(np.vstack(mats)).astype(int), index=keys, columns=names)
        metadata = pd.DataFrame(meta, index=keys)
        keep = counts.sum(0) > 0
        dds = DeseqDataSet(counts=counts.loc[:, keep], metadata=metadata, design="~donor + group",
                           inference=DefaultInference(n_cpus=1), quiet=True)
        dds.deseq2()
        ds = DeseqStats(dds, contrast=["group", "g1", "g2"], alpha=FDR, inference=DefaultInference(n_cpus=1),
                        quiet=True)
        ds.summary()
        seconds = time.perf_counter() - t0
        res = ds.results_df.reindex(names)
        p, padj, lfc = res["pvalue"].to_numpy(), res["padj"].to_numpy(), res["log2FoldChange"].to_numpy()
        row = {"method": "pydeseq2 pseudobulk", "library": f"pydeseq2 {pydeseq2.__version__}", "comparison": comp,
               "seconds": seconds, "n_pseudobulk_samples": len(keys)}
        row.update(evaluate(adata, comp, rank_score(-np.log10(np.maximum(np.nan_to_num(p, nan=1.0), 1e-300)),
                                                    np.abs(np.nan_to_num(lfc))),
                            np.nan_to_num(padj, nan=1.0) < FDR, lfc))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- calibration (cellvi only)

TARGETS = [0.01, 0.02, 0.05, 0.1, 0.2]
# simulations that differ from the ones the engine was tuned on (tests: 2500 x 400, 3 types, de_lfc 1.2, seed 11;
# benchmark: 6000 x 1000, 4 types, de_lfc 1, seeds 0-2): other seeds, effect sizes, expression levels, batch designs
CALIBRATION_DESIGNS = {
    "A: 5 types, weak effect (lfc 0.8)": dict(n_cell_types=5, de_lfc=0.8, seed=21),
    "B: low expression (600 counts/cell), lfc 1.5": dict(de_lfc=1.5, mean_library_size=600.0, seed=22),
    "C: 3 batches x 1 donor, 3000 counts/cell": dict(n_batches=3, n_donors_per_batch=1, mean_library_size=3000.0,
                                                     seed=23),
    "D: 7 types, small population, lfc 0.7": dict(n_cell_types=7, abundance_shift=1.0, de_lfc=0.7, seed=24),
    "E: donor noise 0.3, 6 donors": dict(n_donors_per_batch=3, donor_response_sd=0.3, seed=25),
    "F: donor noise 0.5, 8 donors": dict(n_donors_per_batch=4, donor_response_sd=0.5, de_lfc=1.5, seed=26),
    # held out: never run while the cell-level evidence (de.model_slope) was changed, only to report on it
    "G: weak effect (lfc 0.6), 12 % DE genes": dict(de_lfc=0.6, frac_de_genes=0.12, seed=41),
    "H: 10 types, small population (~190 cells)": dict(n_cell_types=10, abundance_shift=1.0, de_lfc=0.9, seed=42),
    "I: unbalanced groups (3:1), lfc 0.8": dict(n_cell_types=5, abundance_shift=5.0, de_lfc=0.8, seed=43),
    "J: 800 counts/cell, 4 % DE, groups 1:1.6": dict(n_cell_types=6, de_lfc=1.0, mean_library_size=800.0,
                                                     frac_de_genes=0.04, abundance_shift=0.5, seed=44),
}


def wilcoxon_bh(X, rows1: np.ndarray, rows2: np.ndarray) -> np.ndarray:
    """Two-sided Wilcoxon rank-sum p-values of log1p(counts per 10^4) between two groups of cells (scipy)."""
    import scipy.sparse as sp
    from scipy.stats import mannwhitneyu

    X = sp.csr_matrix(X)
    lib = np.asarray(X.sum(1)).ravel()
    norm = lambda rows: np.log1p(np.asarray(X[rows].todense()) / lib[rows, None] * 1e4)  # noqa: E731
    return mannwhitneyu(norm(rows1), norm(rows2), axis=0).pvalue


def calibration_worker(args) -> list[dict]:
    """FDP and power of the calls at several targets, on simulations the engine was not tuned on."""
    import cellvi
    from cellvi import de

    cellvi.settings.progress_bar = False
    rows = []
    for name, design in CALIBRATION_DESIGNS.items():
        cellvi.settings.seed = design["seed"]
        adata = cellvi.datasets.simulate(args.n_cells, args.n_genes, **design)
        truth = adata.var["de_type_0"].to_numpy()
        cellvi.SCVI.setup_anndata(adata, batch_key="batch")
        model = cellvi.SCVI(adata)
        model.train(max_epochs=args.epochs)
        obs = adata.obs
        m1 = ((obs.cell_type == "type_0") & (obs.condition == "stim")).to_numpy()
        m2 = ((obs.cell_type == "type_0") & (obs.condition == "ctrl")).to_numpy()
        p_wil = de.bh_adjust(wilcoxon_bh(adata.X, np.flatnonzero(m1), np.flatnonzero(m2)))
        point = model.differential_expression(idx1=m1, idx2=m2, mode="vanilla", batch_correction=True,
                                              sample_key="donor").loc[adata.var_names, "padj"].fillna(1.0).to_numpy()
        for t in TARGETS:
            out = {"design": name, "target": t, "n_true": int(truth.sum()), "n_stim": int(m1.sum()),
                   "n_ctrl": int(m2.sum())}
            for method, sample_key in (("cellvi cells", None), ("cellvi donors", "donor")):
                res = model.differential_expression(idx1=m1, idx2=m2, mode="change", fdr_target=t,
                                                    batch_correction=True, sample_key=sample_key)
                calls = res.loc[adata.var_names, f"is_de_fdr_{t}"].to_numpy()
                out[method] = _fdp_power(calls, truth)
            out["cellvi donors, point null"] = _fdp_power(point < t, truth)
            out["wilcoxon+BH"] = _fdp_power(np.nan_to_num(p_wil, nan=1.0) < t, truth)
            rows.append(out)
            print(name, t, {k: v for k, v in out.items() if isinstance(v, dict)}, file=sys.stderr)
    return rows


def calibration_report(rows: list[dict]) -> None:
    methods = [m for m in ("cellvi cells", "cellvi donors", "cellvi donors, point null", "wilcoxon+BH") if m in rows[0]]
    print("FDP / power (calls) of each method at each target FDR")
    print(f"{'design':46s}{'target':>7s}" + "".join(f"{m:>27s}" for m in methods))
    for r in rows:
        print(f"{r['design']:46s}{r['target']:>7.2f}" + "".join(
            f"{r[m]['fdp']:>14.3f} / {r[m]['power']:.2f} ({r[m]['calls']:>3d})" for m in methods))


def _append(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def _fdp_power(calls: np.ndarray, truth: np.ndarray) -> dict:
    n = int(calls.sum())
    return {"calls": n, "fdp": float((calls & ~truth).sum() / max(n, 1)), "power": float((calls & truth).sum() / truth.sum())}


def calibration_figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = list(dict.fromkeys(r["design"] for r in rows))
    fig, axes = plt.subplots(2, len(designs), figsize=(3.0 * len(designs), 5.6), sharex=True)
    styles = {"cellvi cells": ("C0", "o"), "cellvi donors": ("C3", "s"), "cellvi donors, point null": ("C1", "D"),
              "wilcoxon+BH": ("C7", "^")}
    for j, d in enumerate(designs):
        rs = [r for r in rows if r["design"] == d]
        t = [r["target"] for r in rs]
        for method, (color, marker) in styles.items():
            axes[0, j].plot(t, [r[method]["fdp"] for r in rs], color=color, marker=marker, label=method)
            axes[1, j].plot(t, [r[method]["power"] for r in rs], color=color, marker=marker, label=method)
        axes[0, j].plot([0, 0.2], [0, 0.2], "k:", lw=1)
        axes[0, j].set_title(d.replace(", ", ",\n", 1), fontsize=8)
        axes[1, j].set_xlabel("target FDR")
        axes[0, j].set_ylim(-0.02, 0.6)
        axes[1, j].set_ylim(-0.02, 1.02)
    axes[0, 0].set_ylabel("observed FDP")
    axes[1, 0].set_ylabel("power")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- donors: Kang, donor-aware DE vs pseudobulk

REFERENCE_PADJ, REFERENCE_LFC = 0.01, 1.0  # the pydeseq2 reference: padj < 0.01 and |log2 FC| > 1


def _kang_mono(args):
    import anndata as ad

    adata = ad.read_h5ad(args.kang)
    obs = adata.obs
    mono = (obs["predicted_cell_type"] == MONO).to_numpy()
    return adata, mono & (obs["condition"] == "stim").to_numpy(), mono & (obs["condition"] == "ctrl").to_numpy()


def donors_cellvi_worker(args) -> list[dict]:
    """cellvi on Kang: 3 training seeds; per seed donor-aware and cell-level DE of CD14+ monocytes, and timings."""
    import cellvi

    cellvi.settings.progress_bar = False
    adata, m1, m2 = _kang_mono(args)
    rows = []
    for seed in range(3):
        cellvi.settings.seed = seed
        cellvi.SCVI.setup_anndata(adata, batch_key="donor")
        model = cellvi.SCVI(adata)
        model.train(max_epochs=args.epochs, batch_size=128)
        for method, kw in (("cellvi donors", {"sample_key": "donor"}), ("cellvi cells", {})):
            t0 = time.perf_counter()
            res = model.differential_expression(idx1=m1, idx2=m2, mode="change", delta=1.0, batch_correction=True,
                                                **kw).reindex(adata.var_names)
            row = {"method": method, "seed": seed, "seconds": time.perf_counter() - t0,
                   "calls": res[f"is_de_fdr_{FDR}"].fillna(False).astype(bool).tolist(),
                   "score": (-np.log10(np.maximum(res["pvalue"], 1e-300)) if "pvalue" in res else res["proba_de"])
                   .fillna(0).tolist(), "lfc": res["lfc_mean"].tolist()}
            if "pvalue" in res:
                row["lfc_samples"] = res["lfc_samples"].tolist()
            rows.append(row)
        if seed == 0:  # the per-donor effects of the top genes, for the docs' figure
            t0 = time.perf_counter()
            within = model.differential_expression(groupby="predicted_cell_type", condition_key="condition",
                                                   condition1="stim", condition2="ctrl", mode="change", delta=1.0,
                                                   batch_correction=True, sample_key="donor")
            rows.append({"method": "cellvi donors, every cell type", "seed": 0,
                         "seconds": time.perf_counter() - t0, "n_types": int(within["predicted_cell_type"].nunique()),
                         "calls_per_type": within.groupby("predicted_cell_type", observed=True)[f"is_de_fdr_{FDR}"]
                         .sum().astype(int).to_dict()})
    return rows


def donors_baseline_worker(args) -> list[dict]:
    """pydeseq2 pseudobulk (~donor + condition) on Kang CD14+ monocytes, the reference; Wilcoxon + BH."""
    import warnings

    import pandas as pd
    import pydeseq2
    import scanpy as sc
    import scipy.sparse as sp
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    warnings.filterwarnings("ignore")
    adata, m1, m2 = _kang_mono(args)
    names = adata.var_names
    X = sp.csr_matrix(adata.X)
    donors = adata.obs["donor"].astype(str).to_numpy()
    keys, mats, meta = [], [], []
    for grp, mask in (("stim", m1), ("ctrl", m2)):
        for d in np.unique(donors[mask]):
            keys.append(f"{d}_{grp}")
            mats.append(np.asarray(X[mask & (donors == d)].sum(0)).ravel())
            meta.append({"donor": d, "group": grp})
    counts = pd.DataFrame(np.rint(np.vstack(mats)).astype(int), index=keys, columns=names)
    keep = counts.sum(0) > 0
    inference = DefaultInference(n_cpus=1)
    dds = DeseqDataSet(counts=counts.loc[:, keep], metadata=pd.DataFrame(meta, index=keys), design="~donor + group",
                       inference=inference, quiet=True)
    dds.deseq2()
    ds = DeseqStats(dds, contrast=["group", "stim", "ctrl"], alpha=FDR, inference=inference, quiet=True)
    ds.summary()
    res = ds.results_df.reindex(names)
    padj, lfc = res["padj"].fillna(1.0).to_numpy(), res["log2FoldChange"].fillna(0.0).to_numpy()
    rows = [{"method": "pydeseq2 pseudobulk", "library": f"pydeseq2 {pydeseq2.__version__}",
             "reference": ((padj < REFERENCE_PADJ) & (np.abs(lfc) > REFERENCE_LFC)).tolist(),
             "calls": (padj < FDR).tolist(), "score": (-np.log10(np.maximum(res["pvalue"].fillna(1.0), 1e-300))).tolist(),
             "lfc": lfc.tolist()}]
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sub = norm[m1 | m2].copy()
    sub.obs["grp"] = pd.Categorical(np.where(m1[m1 | m2], "stim", "ctrl"))
    sc.tl.rank_genes_groups(sub, "grp", groups=["stim"], reference="ctrl", method="wilcoxon")
    r = sc.get.rank_genes_groups_df(sub, group="stim").set_index("names").reindex(names)
    wl = r["logfoldchanges"].fillna(0).to_numpy()
    wpadj = r["pvals_adj"].fillna(1.0).to_numpy()
    rows.append({"method": "wilcoxon+BH", "library": f"scanpy {sc.__version__}", "calls": (wpadj < FDR).tolist(),
                 "calls_lfc1": ((wpadj < FDR) & (np.abs(wl) > REFERENCE_LFC)).tolist(),
                 "score": (-np.log10(np.maximum(r["pvals"].fillna(1.0).to_numpy(), 1e-300))).tolist(), "lfc": wl.tolist()})
    return rows


def donors_report(rows: list[dict]) -> None:
    """Agreement of each method's calls with the pseudobulk reference, and the seed stability of cellvi's calls."""
    from sklearn.metrics import average_precision_score

    from cellvi.de import jaccard

    ref = np.array(next(r for r in rows if r["method"] == "pydeseq2 pseudobulk")["reference"])
    print(f"\n=== Kang CD14+ monocytes, stim vs ctrl: agreement with pydeseq2 (padj < {REFERENCE_PADJ}, |LFC| > "
          f"{REFERENCE_LFC}; {ref.sum()} genes) ===")
    print(f"{'method':34s}{'seed':>5s}{'calls':>7s}{'precision':>10s}{'recall':>8s}{'F1':>6s}{'AUPRC':>7s}{'DE s':>7s}")
    for r in rows:
        if "calls" not in r or r["method"] == "pydeseq2 pseudobulk":
            continue
        for label, key in (("", "calls"), (" (|LFC| > 1)", "calls_lfc1")):
            if key not in r:
                continue
            c = np.array(r[key], bool)
            tp = (c & ref).sum()
            prec, rec = tp / max(c.sum(), 1), tp / max(ref.sum(), 1)
            f1 = 2 * prec * rec / max(prec + rec, 1e-12)
            auprc = average_precision_score(ref, np.array(r["score"]))
            print(f"{r['method'] + label:34s}{str(r.get('seed', '')):>5s}{c.sum():>7d}{prec:>10.3f}{rec:>8.3f}{f1:>6.3f}"
                  f"{auprc:>7.3f}{r.get('seconds', float('nan')):>7.2f}")
    for method in ("cellvi donors", "cellvi cells"):
        calls = [np.array(r["calls"], bool) for r in rows if r["method"] == method]
        if len(calls) >= 2:
            print(f"seed stability (mean pairwise Jaccard of the calls over {len(calls)} training seeds), {method}: "
                  f"{jaccard(calls):.3f}")
    for r in rows:
        if r["method"] == "cellvi donors, every cell type":
            print(f"within-cluster stim vs ctrl over {r['n_types']} cell types in one call: {r['seconds']:.2f} s; "
                  f"donor-level calls per type: {r['calls_per_type']}")


# --------------------------------------------------------------------------- scaling (cellvi only)


def scaling_worker(args) -> list[dict]:
    """Wall time of one pairwise and one one-vs-rest call (change mode, defaults) as cells and groups grow."""
    import cellvi

    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 0
    rows = []
    for n_cells, n_types in [(2000, 8), (8000, 8), (32000, 8), (8000, 2), (8000, 4), (8000, 16)]:
        adata = cellvi.datasets.simulate(n_cells, args.n_genes, n_cell_types=n_types, abundance_shift=1.0, seed=0)
        cellvi.SCVI.setup_anndata(adata, batch_key="batch")
        model = cellvi.SCVI(adata)
        model.train(max_epochs=args.epochs)  # timing only: a few epochs
        t0_ = (adata.obs["cell_type"] == "type_0").to_numpy()
        stim = (adata.obs["condition"] == "stim").to_numpy()
        model.differential_expression(idx1=np.arange(50), idx2=np.arange(50, 100), mode="change")  # warm-up
        t0 = time.perf_counter()
        model.differential_expression(idx1=t0_ & stim, idx2=t0_ & ~stim, mode="change")
        pair = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.differential_expression(groupby="cell_type", mode="change")
        ovr = time.perf_counter() - t0
        rows.append({"n_cells": n_cells, "n_types": n_types, "n_genes": args.n_genes, "pairwise_s": pair,
                     "one_vs_rest_s": ovr})
        print(rows[-1], file=sys.stderr)
    return rows


def scaling_report(rows: list[dict]) -> None:
    print(f"\n{'cells':>7s}{'groups':>8s}{'genes':>7s}{'pairwise s':>12s}{'1-vs-rest s':>13s}")
    for r in rows:
        print(f"{r['n_cells']:>7d}{r['n_types']:>8d}{r['n_genes']:>7d}{r['pairwise_s']:>12.2f}{r['one_vs_rest_s']:>13.2f}")


# --------------------------------------------------------------------------- report


def fmt(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return format(v, spec) if isinstance(v, float) else str(v)


def report(rows: list[dict]) -> None:
    for (part, seed), group in _groups(rows).items():
        desc = f"seed {seed}" if part == "sim" else "Kang small"
        print(f"\n=== part {part} ({desc}) ===")
        for comp in dict.fromkeys(r["comparison"] for r in group):
            rs = [r for r in group if r["comparison"] == comp]
            print(f"\n-- {comp}")
            if comp.startswith("type_0"):
                print(f"{'method':26s}{'AUPRC':>7s}{'calls':>7s}{'FDP':>7s}{'power':>7s}{'DE s':>8s}{'1-vs-rest s':>12s}"
                      f"{'train s':>9s}")
                for r in rs:
                    calls = fmt(r["n_calls"]) + ("*" if r.get("calls_derived") else "")
                    print(f"{r['method']:26s}{fmt(r['auprc']):>7s}{calls:>7s}{fmt(r['fdp']):>7s}"
                          f"{fmt(r['power']):>7s}{fmt(r['seconds'], '.2f'):>8s}{fmt(r.get('ovr_seconds'), '.2f'):>12s}"
                          f"{fmt(r.get('train_s'), '.1f'):>9s}")
                print(f"(true DE genes: {rs[0]['n_true']}; * = calls from max(proba_m1, proba_m2) + expected-FDR rule)")
            elif comp.startswith("type_1"):
                print(f"{'method':30s}{'calls (all false)':>18s}{'batch genes called':>20s}{'DE s':>8s}")
                for r in rs:
                    print(f"{r['method']:30s}{r['n_calls']:>18d}{r['n_batch_gene_calls']:>14d} / {r['n_batch_genes']:<3d}"
                          f"{fmt(r['seconds'], '.2f'):>8s}")
            else:
                print(f"{'method':26s}{'calls':>7s}{'ISG mean rank':>14s}{'ISG top50':>10s}{'ISG called':>11s}"
                      f"{'CD3E/MS4A1/ACTB called':>24s}{'DE s':>8s}{'train s':>9s}")
                for r in rs:
                    neg = "/".join("-" if v is None else ("yes" if v else "no") for v in r["neg_called"].values())
                    calls = fmt(r["n_calls"]) + ("*" if r.get("calls_derived") else "")
                    print(f"{r['method']:26s}{calls:>7s}{fmt(r['isg_mean_rank'], '.1f'):>14s}"
                          f"{r['isg_top50']:>7d}/{r['n_isg']:<2d}{r['isg_called']:>8d}/{r['n_isg']:<2d}{neg:>24s}"
                          f"{fmt(r['seconds'], '.2f'):>8s}{fmt(r.get('train_s'), '.1f'):>9s}")
                print("(- = gene not in the data; * = calls from max(proba_m1, proba_m2) + expected-FDR rule)")
        ratios = _ratios(group)
        if ratios:
            print("\nwall-time ratio scvi-tools / cellvi: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


def summary(rows: list[dict]) -> None:
    """Mean over the simulation seeds of the type_0 comparison (and of the confounded one)."""
    sim = [r for r in rows if r["part"] == "sim"]
    seeds = sorted({r["seed"] for r in sim})
    if len(seeds) < 2:
        return
    print(f"\n=== part sim, mean over seeds {seeds} ===")
    main = [r for r in sim if r["comparison"].startswith("type_0")]
    print(f"{'method':26s}{'AUPRC':>7s}{'calls':>7s}{'FDP':>7s}{'power':>7s}{'DE s':>8s}{'1-vs-rest s':>12s}"
          f"{'train s':>9s}")
    for method in dict.fromkeys(r["method"] for r in main):
        rs = [r for r in main if r["method"] == method]

        def mean(key, rs=rs):
            vals = [r[key] for r in rs if r.get(key) is not None]
            return float(np.mean(vals)) if vals else None
        print(f"{method:26s}{fmt(mean('auprc')):>7s}{fmt(mean('n_calls'), '.1f'):>7s}{fmt(mean('fdp')):>7s}"
              f"{fmt(mean('power')):>7s}{fmt(mean('seconds'), '.2f'):>8s}{fmt(mean('ovr_seconds'), '.2f'):>12s}"
              f"{fmt(mean('train_s'), '.1f'):>9s}")
    conf = [r for r in sim if r["comparison"].startswith("type_1")]
    print(f"\n{'confounded: method':30s}{'calls (all false)':>18s}{'batch genes called':>20s}")
    for method in dict.fromkeys(r["method"] for r in conf):
        rs = [r for r in conf if r["method"] == method]
        print(f"{method:30s}{np.mean([r['n_calls'] for r in rs]):>18.1f}"
              f"{np.mean([r['n_batch_gene_calls'] for r in rs]):>14.1f} / {rs[0]['n_batch_genes']}")


def _groups(rows):
    out: dict = {}
    for r in sorted(rows, key=lambda r: (r["part"] != "sim", r.get("seed") or 0)):  # stable: keeps method order
        out.setdefault((r["part"], r.get("seed")), []).append(r)
    return out


def _ratios(group) -> dict:
    by = {(r["method"], r["comparison"]): r for r in group}
    out = {}
    for mode in ("change", "vanilla"):
        for r in group:
            if r["method"] != f"cellvi {mode}":
                continue
            s = by.get((f"scvi {mode}", r["comparison"]))
            if s:
                out[f"{mode} pairwise DE"] = s["seconds"] / r["seconds"]
                if r.get("ovr_seconds") and s.get("ovr_seconds"):
                    out[f"{mode} one-vs-rest"] = s["ovr_seconds"] / r["ovr_seconds"]
                out.setdefault("training", s["train_s"] / r["train_s"])
    return out


# --------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["sim", "real", "calibration", "donors", "scaling"], default="sim")
    p.add_argument("--seed", type=int, default=0, help="simulation and training seed")
    p.add_argument("--n-cells", type=int, default=6000)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=None, help="default: 100 (sim), 200 (real)")
    p.add_argument("--which", choices=["all", "cellvi", "scvi", "baselines"], default="all")
    p.add_argument("--scvi-python", default=sys.executable, help="python of the venv with scvi-tools, scanpy, pydeseq2")
    p.add_argument("--kang", default=KANG)
    p.add_argument("--json", default=None, help="append result rows (JSON lines) to this file")
    p.add_argument("--report", action="store_true", help="only print the table of the rows in --json")
    p.add_argument("--figure", default=None, help="where the part's figure goes (default: docs/figures/de_<part>.png)")
    p.add_argument("--n-types", type=int, default=4, help="cell types of the simulation (part sim)")
    p.add_argument("--worker", choices=["cellvi", "scvi", "baselines"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.epochs is None:
        args.epochs = {"sim": 100, "real": 200, "calibration": 60, "donors": 200, "scaling": 5}[args.part]
    if args.part == "scaling" and not args.report:
        rows = scaling_worker(args)
        _append(args.json, [{"part": "scaling", **r} for r in rows])
        scaling_report(rows)
        return
    if args.part == "calibration" and not args.report:
        rows = calibration_worker(args)
        _append(args.json, [{"part": "calibration", **r} for r in rows])
        calibration_figure(rows, args.figure or "docs/figures/de_calibration.png")
        calibration_report(rows)
        return
    if args.report:
        if not args.json:
            p.error("--report reads the rows of --json PATH")
        with open(args.json) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        own = {"calibration": calibration_report, "donors": donors_report, "scaling": scaling_report}
        for part, fn in own.items():
            if any(r["part"] == part for r in rows):
                fn([r for r in rows if r["part"] == part])
        rows = [r for r in rows if r["part"] not in own]
        report(rows)
        summary(rows)
        return
    if args.worker:
        if args.part == "donors":
            rows = donors_baseline_worker(args) if args.worker == "baselines" else donors_cellvi_worker(args)
        else:
            rows = baseline_worker(args) if args.worker == "baselines" else model_worker(args.worker, args)
        for r in rows:
            r["part"] = args.part
            r.setdefault("seed", args.seed if args.part == "sim" else None)
            print("RESULT " + json.dumps(r))
        return
    if args.part in ("real", "donors") and not os.path.exists(args.kang):
        print(f"skipping part real: {args.kang} not found")
        return
    workers = ["cellvi", "scvi", "baselines"] if args.which == "all" else [args.which]
    if args.part == "donors":
        workers = [w for w in workers if w != "scvi"]
    common = ["--part", args.part, "--seed", str(args.seed), "--n-cells", str(args.n_cells), "--n-types", str(args.n_types),
              "--n-genes", str(args.n_genes), "--epochs", str(args.epochs), "--kang", args.kang]
    rows = []
    for w in workers:  # one after the other, never two at once
        python = sys.executable if w == "cellvi" else args.scvi_python
        t0 = time.perf_counter()
        proc = subprocess.run([python, __file__, "--worker", w, *common], capture_output=True, text=True)
        lines = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{w} failed:\n{proc.stderr[-3000:]}")
        print(f"[{w}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
        rows += [json.loads(ln) for ln in lines]
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.part == "donors":
        donors_report(rows)
        return
    report(rows)
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
