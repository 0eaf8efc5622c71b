"""Shared driver of the side-by-side training benchmarks: each library in its own subprocess,
alternating for a number of rounds so that slow spells of a noisy machine hit both; the fastest
round of each library is kept."""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parser(default_epochs: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=20_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--which", choices=["both", "cellvi", "scvi"], default="both")
    p.add_argument("--scvi-python", default=sys.executable)
    p.add_argument("--rounds", type=int, default=2, help="alternate the two libraries this many times; keep the fastest")
    p.add_argument("--compile-kernels", choices=["auto", "on", "off"], default="on",
                   help="cellvi's compiled likelihood kernels (auto: as train() decides; on for the steady state)")
    p.add_argument("--floor", default=None,
                   help="path of a plain-PyTorch SCVI step script (scvi_step_floor.py) to time in the same rounds")
    return p


def steady_mean(epoch_seconds: list[float]) -> float:
    """Seconds per epoch in the steady state: the mean over the epochs after the first (the first carries
    one-off work: cellvi's kernel compilation, Lightning's set-up). Both libraries are measured this way."""
    steady = epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds
    return sum(steady) / len(steady)


def scvi_epoch_timer():
    """A Lightning callback for scvi-tools' ``train(callbacks=[...])`` recording each epoch's training time in
    ``.seconds`` with the validation pass left out, as cellvi's ``history_["epoch_seconds"]``."""
    import time

    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds, self._start, self._val = [], None, 0.0

        def on_train_epoch_start(self, trainer, module):
            self._start, self._val = time.perf_counter(), 0.0

        def on_validation_start(self, trainer, module):
            self._val_start = time.perf_counter()

        def on_validation_end(self, trainer, module):
            if self._start is not None:  # (not the sanity check before training)
                self._val += time.perf_counter() - self._val_start

        def on_train_epoch_end(self, trainer, module):
            self.seconds.append(time.perf_counter() - self._start - self._val)

    return EpochTimer()


def worker(args, run_cellvi: Callable, run_scvi: Callable) -> None:
    """In a subprocess: run one library and print its result as a ``RESULT {json}`` line."""
    out = run_cellvi(args) if args.which == "cellvi" else run_scvi(args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def run_floor(path: str, n_cells: int, epochs: int) -> dict:
    """The floor script's seconds per epoch (mean over its epochs, as the libraries' wall time / epochs)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, path, str(n_cells), str(epochs)], capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{'n_cells'")]
    if proc.returncode or not line:
        sys.exit(f"floor failed:\n{proc.stderr[-3000:]}")
    out = ast.literal_eval(line[0])
    return {"library": "plain-PyTorch floor", "s_per_epoch": sum(out["sec_per_epoch"]) / len(out["sec_per_epoch"]),
            "fastest_epoch_s": out["min"], "opts": out["opts"]}


def alternate(script: str, args, floor_cells: int | None = None) -> dict[str, dict]:
    """Run ``script --which cellvi``, the floor script (``args.floor``, on ``floor_cells`` cells) and
    ``--which scvi`` alternately; the fastest result of each, keyed "cellvi", "floor", "scvi"."""
    common = ["--n-cells", str(args.n_cells), "--n-genes", str(args.n_genes), "--epochs", str(args.epochs),
              "--compile-kernels", args.compile_kernels]
    order = ["cellvi"] + (["floor"] if args.floor else []) + ["scvi"]
    runs: dict[str, list[dict]] = {w: [] for w in order}
    for _ in range(args.rounds):
        for which in order:
            if which == "floor":
                runs[which].append(run_floor(args.floor, floor_cells or args.n_cells, args.epochs))
                continue
            python = sys.executable if which == "cellvi" else args.scvi_python
            proc = subprocess.run([python, script, "--which", which, *common], capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
            runs[which].append(json.loads(line[0][7:]))
    for which, rs in runs.items():
        print(f"{which} s/epoch per round: {[round(r['s_per_epoch'], 3) for r in rs]}")
    return {w: min(rs, key=lambda r: r["s_per_epoch"]) for w, rs in runs.items()}


def print_table(a: dict, b: dict, keys) -> None:
    """The two libraries' results side by side (cellvi ``a``, scvi-tools ``b``), the speed-up, and both as JSON."""
    width = max(len(k) for k in keys) + 2
    print(f"{'':{width}s}{'cellvi':>12s}{'scvi-tools':>12s}")
    for key in keys:
        print(f"{key:{width}s}{a[key]:12.3f}{b[key]:12.3f}")
    print(f"speed-up (scvi-tools s/epoch / cellvi s/epoch): {b['s_per_epoch'] / a['s_per_epoch']:.2f}x")
    print(json.dumps([a, b]))

