"""Shared driver of the side-by-side training benchmarks: each library in its own subprocess,
alternating for a number of rounds so that slow spells of a noisy machine hit both; the fastest
round of each library is kept."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable


def parser(default_epochs: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=20_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--which", choices=["both", "cellvi", "scvi"], default="both")
    p.add_argument("--scvi-python", default=sys.executable)
    p.add_argument("--rounds", type=int, default=2, help="alternate the two libraries this many times; keep the fastest")
    return p


def worker(args, run_cellvi: Callable, run_scvi: Callable) -> None:
    """In a subprocess: run one library and print its result as a ``RESULT {json}`` line."""
    out = run_cellvi(args) if args.which == "cellvi" else run_scvi(args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def alternate(script: str, args) -> tuple[dict, dict]:
    """Run ``script --which cellvi`` and ``--which scvi`` alternately; the fastest result of each."""
    common = ["--n-cells", str(args.n_cells), "--n-genes", str(args.n_genes), "--epochs", str(args.epochs)]
    runs: dict[str, list[dict]] = {"cellvi": [], "scvi": []}
    for _ in range(args.rounds):
        for which, python in (("cellvi", sys.executable), ("scvi", args.scvi_python)):
            proc = subprocess.run([python, script, "--which", which, *common], capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
            runs[which].append(json.loads(line[0][7:]))
    for which, rs in runs.items():
        print(f"{which} s/epoch per round: {[round(r['s_per_epoch'], 3) for r in rs]}")
    cellvi, scvi = (min(runs[w], key=lambda r: r["s_per_epoch"]) for w in ("cellvi", "scvi"))
    return cellvi, scvi
