"""Two training settings on one model, alternating in one process: seconds per epoch of each.

Usage (from the repo root):

    PYTHONPATH=src python benchmarks/ab_epochs.py --model mrvi --threads 1 --compare gather --compile-kernels on
    PYTHONPATH=src python benchmarks/ab_epochs.py --model mrvi --threads 1 --compare compile
    PYTHONPATH=src python benchmarks/ab_epochs.py --model peakvi --threads 2 --compare gather --compile-kernels on

``--compare gather``: the minibatch gathered in line (A) against gathered ahead in a background thread (B,
:func:`cellvi.train.prefetched`), whatever :func:`cellvi.train.spare_core` says. ``--compare compile``: eager (A)
against compiled kernels and network (B). Each round trains the same model ``--epochs`` more epochs per setting
(the order alternating between rounds) after two warm-up calls (which include any compilation); prints the
minimum, first quartile and median of the epochs' ``epoch_seconds`` per setting. Data: MrVI, 4,000 cells x 500
genes, 16 samples (``simulate_cohort``); PeakVI, 5,000 cells x 5,000 regions (``simulate_atac``); SCVI,
10,000 cells x 2,000 genes (``simulate``). Machines are noisy: compare the two settings of one run only.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import cellvi
import cellvi.train


def make_model(name: str):
    if name == "mrvi":
        adata = cellvi.datasets.simulate_cohort(4000, 500, seed=0)
        cellvi.MrVI.setup_anndata(adata, sample_key="sample")
        return cellvi.MrVI(adata)
    if name == "peakvi":
        adata = cellvi.datasets.simulate_atac(5000, 5000, seed=0)
        cellvi.PeakVI.setup_anndata(adata, batch_key="batch")
        return cellvi.PeakVI(adata)
    adata = cellvi.datasets.simulate(10000, 2000, seed=0)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    return cellvi.SCVI(adata)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["mrvi", "peakvi", "scvi"], default="mrvi")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compare", choices=["gather", "compile"], default="gather")
    p.add_argument("--compile-kernels", choices=["on", "off"], default="on", help="both arms of --compare gather")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cellvi.settings.seed = 0
    model = make_model(args.model)

    def train(arm: str) -> list[float]:
        ahead = arm == "B" if args.compare == "gather" else False
        compiled = arm == "B" if args.compare == "compile" else args.compile_kernels == "on"
        cellvi.train.spare_core = lambda: ahead  # fit() reads it through the module
        model.train(max_epochs=args.epochs, early_stopping=False, enable_progress_bar=False,
                    plan_kwargs={"compile_kernels": compiled})
        return list(model.history["epoch_seconds"].iloc[-args.epochs:, 0])

    for arm in "AB":  # warm-up, compilation included
        train(arm)
    seconds: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for arm in ("AB" if r % 2 == 0 else "BA"):
            seconds[arm] += train(arm)
    names = {"gather": ("in line", "ahead"), "compile": ("eager", "compiled")}[args.compare]
    for v, name in zip(seconds.values(), names):
        v = sorted(v)
        print(f"{args.model} threads={args.threads} {name:9s} n={len(v)}  min {v[0]:.3f}  q25 {v[len(v) // 4]:.3f}  "
              f"median {statistics.median(v):.3f} s per epoch")


if __name__ == "__main__":
    main()
