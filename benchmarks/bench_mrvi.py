"""MrVI: cellvi vs scvi-tools' torch MRVI, side by side in one run, on the same simulated cohort.

Usage (from the repo root; scvi-tools lives in its own venv):

    python benchmarks/bench_mrvi.py --scvi-python /work/venv-scvi/bin/python
    python benchmarks/bench_mrvi.py --memory-only          # cellvi's distance memory vs cells x samples

Data: ``cellvi.datasets.simulate_cohort`` (5 cell types; 16 samples nested as 2 groups x 2 subgroups
x 4; hierarchical DE in type_0, DA along cov2 in type_1 / type_2), written once to an .h5ad that
both libraries read. Both train with their own defaults except ``max_epochs`` (same for both):
batch 128, Adam lr 2e-3, KL warm-up 20 epochs, clipping 40, validation every epoch, CPU. Each library
runs in its own subprocess, one after the other (never at the same time).

Reported per library: seconds per epoch (``s_per_epoch``: the mean of the epochs after the first, validation
left out, measured the same way for both libraries; ``s_total_per_epoch``: ``train()``'s wall time / epochs,
which holds the compilation when cellvi compiles its network: ``--compile-kernels on``, or runs of 2M cell passes);
wall time and peak RSS growth (sampled from /proc every 2 ms) of
``get_local_sample_distances(groupby="cell_type")``, ``differential_abundance(["cov2"])``,
``get_outlier_cell_sample_pairs()`` and ``differential_expression(["cov1", "cov2"], store_lfc=True)``;
recovery: Spearman correlation of the DE subset's averaged distance matrix with the simulated one, mean
distance in the other subsets relative to the DE subset, AUPRC of |DA log ratio| for the DA cells, and the
Pearson correlation of the DE subset's mean per-gene LFC (cov1) with the simulated LFC.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sidebyside import scvi_epoch_timer, steady_mean  # noqa: E402

DATA = Path("/tmp/bench_mrvi_cohort.h5ad")


class PeakRSS:
    """Peak resident memory growth (MB) of this process while the block runs, polled from /proc."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth_mb = (self.peak - self.base) / 2**20


def timed(fn):
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
    return out, {"s": round(dt, 2), "peak_rss_growth_mb": round(mem.growth_mb, 1)}


def recovery(adata, dists, da, de) -> dict:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import average_precision_score

    truth = np.asarray(adata.uns["truth"]["sample_distances"])
    names = list(adata.uns["truth"]["sample_names"])
    avg = dists["cell_type"].sel(sample_x=names, sample_y=names)
    iu = np.triu_indices(len(names), 1)
    de_sub = avg.sel(cell_type_name="type_0").values[iu]
    others = [avg.sel(cell_type_name=t).values[iu].mean() for t in ("type_1", "type_2", "type_3", "type_4")]
    ratio = (da["cov2_log_probs"].sel(cov2="high") - da["cov2_log_probs"].sel(cov2="low")).values
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    is_da = np.isin(ct, ["type_1", "type_2"])
    cov = [c for c in de.covariate.values if str(c).startswith("cov1")][0]
    lfc = de["lfc"].sel(covariate=cov).values[ct == "type_0"].mean(0)
    return {
        "spearman_de_subset": round(float(spearmanr(de_sub, truth[iu])[0]), 3),
        "other_over_de_distance": round(float(np.mean(others) / de_sub.mean()), 3),
        "da_auprc": round(float(average_precision_score(is_da, np.abs(ratio))), 3),
        "da_auprc_baseline": round(float(is_da.mean()), 3),
        "lfc_pearson_de_subset": round(float(pearsonr(lfc, adata.var["true_lfc_cov1"].to_numpy())[0]), 3),
    }


def run(which: str, epochs: int, seed: int = 0, compile_kernels: bool | None = None, threads: int = 1) -> dict:
    import anndata
    import torch

    torch.set_num_threads(threads)
    adata = anndata.read_h5ad(DATA)
    if which == "cellvi":
        import cellvi

        cellvi.settings.progress_bar = False
        cellvi.settings.seed = seed
        cls = cellvi.MrVI
        cls.setup_anndata(adata, sample_key="sample")
        model = cls(adata)
        t = time.perf_counter()
        model.train(max_epochs=epochs, compile_kernels=compile_kernels)
        epoch_seconds = model.history_["epoch_seconds"]
    else:
        import warnings

        import scvi

        warnings.filterwarnings("ignore")
        scvi.settings.seed = seed
        cls = scvi.external.MRVI
        cls.setup_anndata(adata, sample_key="sample", backend="torch")
        model = cls(adata)
        timer = scvi_epoch_timer()
        t = time.perf_counter()
        model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False, callbacks=[timer])
        epoch_seconds = timer.seconds
    out = {"library": which, "s_per_epoch": round(steady_mean(epoch_seconds), 3),
           "s_total_per_epoch": round((time.perf_counter() - t) / epochs, 3)}
    dists, out["distances"] = timed(lambda: model.get_local_sample_distances(groupby="cell_type"))
    da, out["differential_abundance"] = timed(lambda: model.differential_abundance(sample_cov_keys=["cov2"]))
    _, out["outlier_cell_sample_pairs"] = timed(lambda: model.get_outlier_cell_sample_pairs())
    de, out["differential_expression"] = timed(
        lambda: model.differential_expression(sample_cov_keys=["cov1", "cov2"], store_lfc=True))
    out["recovery"] = recovery(adata, dists, da, de)
    return out


def memory_scaling() -> list[dict]:
    """cellvi's distances on an untrained model: peak memory with and without per-cell matrices."""
    import cellvi

    cellvi.settings.progress_bar = False
    rows = []
    for n_cells, per_sub, keeps in ((2000, 8, (True, False)), (8000, 8, (True, False)), (8000, 32, (True, False)),
                                    (32000, 32, (False,))):
        a = cellvi.datasets.simulate_cohort(n_cells, 50, n_samples_per_subgroup=per_sub, seed=0)
        cellvi.MrVI.setup_anndata(a, sample_key="sample")
        m = cellvi.MrVI(a)
        S = m.spec.n_samples
        for keep in keeps:
            _, r = timed(lambda: m.get_local_sample_distances(groupby="cell_type", keep_cell=keep))
            rows.append({"cells": n_cells, "samples": S, "keep_cell": keep, **r,
                         "cells_x_samples^2_float32_mb": round(n_cells * S * S * 4 / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=4000)
    p.add_argument("--n-genes", type=int, default=500)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--which", choices=["both", "cellvi", "scvi"], default="both")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated cohort and of both libraries")
    p.add_argument("--scvi-python", default="/work/venv-scvi/bin/python")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--compile-kernels", choices=["auto", "on", "off"], default="auto",
                   help="cellvi's compile_kernels (auto: its default, on for runs of 2M cell passes or more)")
    p.add_argument("--threads", type=int, default=1, help="PyTorch's intra-op threads, the same for both libraries")
    args = p.parse_args()
    if args.memory_only:
        memory_scaling()
        return
    if args.which != "both":
        compiled = {"auto": None, "on": True, "off": False}[args.compile_kernels]
        print("RESULT " + json.dumps(run(args.which, args.epochs, args.seed, compiled, args.threads)))
        return
    import cellvi

    cellvi.datasets.simulate_cohort(args.n_cells, args.n_genes, seed=args.seed).write_h5ad(DATA)
    results = {}
    for which, python in (("cellvi", sys.executable), ("scvi", args.scvi_python)):
        proc = subprocess.run([python, __file__, "--which", which, "--epochs", str(args.epochs), "--seed", str(args.seed),
                               "--compile-kernels", args.compile_kernels, "--threads", str(args.threads)],
                              capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
        results[which] = json.loads(line[0][7:])
        print(json.dumps(results[which]), flush=True)
    c, s = results["cellvi"], results["scvi"]
    print(f"speed-up (scvi-tools / cellvi): training {s['s_per_epoch'] / c['s_per_epoch']:.2f}x, "
          + ", ".join(f"{k} {s[k]['s'] / max(c[k]['s'], 1e-9):.2f}x"
                      for k in ("distances", "differential_abundance", "outlier_cell_sample_pairs",
                                "differential_expression")))


if __name__ == "__main__":
    main()
