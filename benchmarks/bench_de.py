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

        adata = cellvi.datasets.simulate(args.n_cells, args.n_genes, seed=args.seed)
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
    p.add_argument("--part", choices=["sim", "real"], default="sim")
    p.add_argument("--seed", type=int, default=0, help="simulation and training seed")
    p.add_argument("--n-cells", type=int, default=6000)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=None, help="default: 100 (sim), 200 (real)")
    p.add_argument("--which", choices=["all", "cellvi", "scvi", "baselines"], default="all")
    p.add_argument("--scvi-python", default=sys.executable, help="python of the venv with scvi-tools, scanpy, pydeseq2")
    p.add_argument("--kang", default=KANG)
    p.add_argument("--json", default=None, help="append result rows (JSON lines) to this file")
    p.add_argument("--report", action="store_true", help="only print the table of the rows in --json")
    p.add_argument("--worker", choices=["cellvi", "scvi", "baselines"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.epochs is None:
        args.epochs = 100 if args.part == "sim" else 200
    if args.report:
        if not args.json:
            p.error("--report reads the rows of --json PATH")
        with open(args.json) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        report(rows)
        summary(rows)
        return
    if args.worker:
        rows = baseline_worker(args) if args.worker == "baselines" else model_worker(args.worker, args)
        for r in rows:
            r.update(part=args.part, seed=args.seed if args.part == "sim" else None)
            print("RESULT " + json.dumps(r))
        return
    if args.part == "real" and not os.path.exists(args.kang):
        print(f"skipping part real: {args.kang} not found")
        return
    workers = ["cellvi", "scvi", "baselines"] if args.which == "all" else [args.which]
    common = ["--part", args.part, "--seed", str(args.seed), "--n-cells", str(args.n_cells),
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
    report(rows)
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
