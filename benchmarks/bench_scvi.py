"""SCVI: cellvi vs scvi-tools, side by side in one run, on the same simulated data.

Usage (from the repo root; scvi-tools lives in its own venv, see BENCHMARKS.md):

    python benchmarks/bench_scvi.py --scvi-python /work/venv-scvi/bin/python \
        [--floor /work/shared/bench/scvi_step_floor.py]

Each library runs in its own subprocess, one after the other (never at the same time), alternating
for ``--rounds`` rounds (the fastest round of each is reported), on the same cells: 90 % train,
10 % held out. Reported per library: seconds per epoch (training wall time /
epochs), held-out ELBO per cell (higher is better), cell-type and batch silhouette of the held-out
latent, peak resident memory, and ``import`` time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _sidebyside  # noqa: E402
from _sidebyside import scvi_epoch_timer, steady_mean  # noqa: E402


def make_data(n_cells: int, n_genes: int, seed: int = 0):
    import cellvi

    adata = cellvi.datasets.simulate(n_cells, n_genes, n_batches=2, mean_library_size=500, seed=seed)
    rng = np.random.default_rng(seed)
    test = np.zeros(n_cells, bool)
    test[rng.choice(n_cells, n_cells // 10, replace=False)] = True
    return adata[~test].copy(), adata[test].copy()


def silhouettes(z, obs) -> dict:
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    sub = rng.choice(len(z), min(len(z), 2000), replace=False)
    return {f"silhouette_{k}": float(silhouette_score(z[sub], obs[k].astype(str).to_numpy()[sub]))
            for k in ("cell_type", "batch")}


def run_cellvi(args) -> dict:
    import torch

    import cellvi

    train, test = make_data(args.n_cells, args.n_genes)
    cellvi.SCVI.setup_anndata(train, batch_key="batch")
    model = cellvi.SCVI(train)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=128, train_size=1.0, enable_progress_bar=False,
                accelerator="cpu", compile_kernels={"auto": None, "on": True, "off": False}[args.compile_kernels])
    seconds = time.perf_counter() - t0
    epochs = model.history_["epoch_seconds"]
    out = {"library": f"cellvi {cellvi.__version__}", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "s_per_epoch": steady_mean(epochs), "s_total_per_epoch": seconds / args.epochs,
           "first_epoch_s": epochs[0], "compile_kernels": args.compile_kernels, "heldout_elbo": model.get_elbo(test)}
    out.update(silhouettes(model.get_latent_representation(test), test.obs))
    return out


def run_scvi(args) -> dict:
    import scvi
    import torch

    train, test = make_data(args.n_cells, args.n_genes)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(train, batch_key="batch")
    model = scvi.model.SCVI(train)
    timer = scvi_epoch_timer()
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=128, train_size=1.0, enable_progress_bar=False,
                accelerator="cpu", callbacks=[timer])
    seconds = time.perf_counter() - t0
    elbo = float(model.get_elbo(test))
    out = {"library": f"scvi-tools {scvi.__version__}", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "s_per_epoch": steady_mean(timer.seconds),
           "s_total_per_epoch": seconds / args.epochs, "heldout_elbo": elbo}
    out.update(silhouettes(model.get_latent_representation(test), test.obs))
    return out


def import_seconds(python: str, module: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([python, "-c", f"import {module}"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    args = _sidebyside.parser(default_epochs=10).parse_args()
    if args.which != "both":
        _sidebyside.worker(args, run_cellvi, run_scvi)
        return
    # the floor trains on as many cells as the libraries' training set (90 %), so the same steps per epoch
    res = _sidebyside.alternate(__file__, args, floor_cells=args.n_cells - args.n_cells // 10)
    results = [res["cellvi"], res["scvi"]]
    results[0]["import_s"] = import_seconds(sys.executable, "cellvi")
    results[1]["import_s"] = import_seconds(args.scvi_python, "scvi")
    a = cellvi_res = results[0]
    b = results[1]
    print(f"data: simulated {args.n_cells} cells x {args.n_genes} genes, 2 batches, {args.epochs} epochs, batch 128; "
          f"fastest of {args.rounds} alternating rounds")
    print(f"{'':24s}{'cellvi':>14s}{'scvi-tools':>14s}")
    for key in ("s_per_epoch", "s_total_per_epoch", "heldout_elbo", "silhouette_cell_type", "silhouette_batch",
                "peak_rss_mb", "import_s"):
        print(f"{key:24s}{a[key]:14.3f}{b[key]:14.3f}")
    print(f"speed-up (scvi-tools s/epoch / cellvi s/epoch): {b['s_per_epoch'] / cellvi_res['s_per_epoch']:.2f}x")
    if "floor" in res:
        f = res["floor"]
        print(f"floor ({f['opts']}): {f['s_per_epoch']:.3f} s/epoch (no held-out ELBO: the script does not evaluate); "
              f"scvi-tools / floor {b['s_per_epoch'] / f['s_per_epoch']:.2f}x, cellvi / floor "
              f"{cellvi_res['s_per_epoch'] / f['s_per_epoch']:.2f}x")
        results.append(f)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
