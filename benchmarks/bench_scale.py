"""Scale: SCVI seconds per epoch and peak memory as cells grow, in memory and from a backed .h5ad,
side by side with scvi-tools; and the scVI blog's headline (1.3M cells x 720 genes) end to end.

    # seconds per epoch at 10k / 100k / 1M cells x 2,000 genes (cellvi in memory, cellvi backed, scvi-tools)
    python benchmarks/bench_scale.py epochs --sizes 10000 100000 1000000 --scvi-python /work/venv-scvi/bin/python
    # 1.3M cells x 720 genes, scvi-tools' default epoch heuristic, from memory and from the backed file
    python benchmarks/bench_scale.py headline
    # one process (2 threads) against two data-parallel processes (1 thread each, torchrun, gloo)
    python benchmarks/bench_scale.py ddp --n-cells 100000

Each measurement runs in its own subprocess (peak RSS is that process's); data are simulated in
chunks of 20k cells (`cellvi.datasets.simulate`, one seed per chunk) and appended to an .h5ad on disk,
so no step ever holds more than the data being measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 20_000


def make_h5ad(path: Path, n_cells: int, n_genes: int, library: float) -> float:
    """Write ``n_cells`` simulated cells to ``path`` chunk by chunk; returns the seconds it took."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    import cellvi

    if path.exists():
        return 0.0
    t0 = time.perf_counter()
    obs = []
    for k, start in enumerate(range(0, n_cells, CHUNK)):
        a = cellvi.datasets.simulate(min(CHUNK, n_cells - start), n_genes, mean_library_size=library, seed=k)
        a.obs_names = [f"c{start + i}" for i in range(a.n_obs)]
        obs.append(a.obs)
        if k == 0:
            ad.AnnData(a.X, obs=a.obs, var=a.var).write_h5ad(path)
        else:
            with h5py.File(path, "a") as f:
                sparse_dataset(f["X"]).append(a.X)
    with h5py.File(path, "a") as f:
        del f["obs"]
        full = pd.concat(obs)
        for col in ("batch", "cell_type"):
            full[col] = full[col].astype(str).astype("category")
        write_elem(f, "obs", full)
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` (Linux), not ``ru_maxrss``: the latter keeps the parent's
    peak across fork + exec, so every worker would report at least the data generator's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    """One measurement in this process: ``args.which`` in {cellvi, cellvi-backed, scvi} on ``args.file``."""
    import anndata as ad

    out = {"which": args.which, "file": args.file}
    t0 = time.perf_counter()
    adata = ad.read_h5ad(args.file, backed="r" if args.which == "cellvi-backed" else None)
    if args.which == "scvi":
        import scvi

        scvi.settings.seed = 0
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata)
        t1 = time.perf_counter()
        model.train(max_epochs=args.epochs, train_size=1.0, batch_size=128, enable_progress_bar=False,
                    accelerator="cpu")
    else:
        import cellvi

        cellvi.settings.progress_bar = False
        cellvi.SCVI.setup_anndata(adata, batch_key="batch")
        model = cellvi.SCVI(adata)
        t1 = time.perf_counter()
        model.train(max_epochs=args.epochs, train_size=1.0, batch_size=args.per_process_batch, accelerator="cpu",
                    compile_kernels=False)
        epoch_s = model.history_["epoch_seconds"]
        out["epoch_seconds"] = epoch_s
    t2 = time.perf_counter()
    if args.latent:
        model.get_latent_representation()
    out.update(n_obs=adata.n_obs, epochs=args.epochs if args.epochs else None, setup_s=t1 - t0, train_s=t2 - t1,
               total_s=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(),
               elbo_train_last=float(model.history["elbo_train"].iloc[-1, 0]),
               n_epochs_run=len(model.history["elbo_train"]))
    out["s_per_epoch"] = out["train_s"] / out["n_epochs_run"]
    return out


def measure(python: str, which: str, file: Path, epochs: int | None, latent: bool = False) -> dict:
    cmd = [python, __file__, "_one", "--which", which, "--file", str(file)]
    cmd += ["--epochs", str(epochs)] if epochs else []
    cmd += ["--latent"] if latent else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"which": which, "file": str(file), "error": proc.stderr[-2000:]}
    return json.loads(lines[0][7:])


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="part", required=True)
    e = sub.add_parser("epochs")
    e.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    e.add_argument("--n-genes", type=int, default=2000)
    e.add_argument("--epochs", type=int, default=1)
    e.add_argument("--scvi-python", default=None)
    e.add_argument("--data-dir", type=Path, default=Path("/tmp/cellvi-scale"))
    h = sub.add_parser("headline")
    h.add_argument("--n-cells", type=int, default=1_300_000)
    h.add_argument("--n-genes", type=int, default=720)
    h.add_argument("--data-dir", type=Path, default=Path("/tmp/cellvi-scale"))
    d = sub.add_parser("ddp")
    d.add_argument("--n-cells", type=int, default=100_000)
    d.add_argument("--n-genes", type=int, default=2000)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--data-dir", type=Path, default=Path("/tmp/cellvi-scale"))
    one = sub.add_parser("_one")
    one.add_argument("--which", required=True)
    one.add_argument("--file", required=True)
    one.add_argument("--epochs", type=int, default=None)
    one.add_argument("--latent", action="store_true")
    one.add_argument("--per-process-batch", type=int, default=128)
    args = p.parse_args()
    if args.part == "_one":
        print("RESULT " + json.dumps(run_one(args)))
        return
    args.data_dir.mkdir(parents=True, exist_ok=True)
    results = []
    if args.part == "ddp":
        import os

        file = args.data_dir / f"sim_{args.n_cells}x{args.n_genes}.h5ad"
        make_h5ad(file, args.n_cells, args.n_genes, 1500.0)
        env1 = {**os.environ, "OMP_NUM_THREADS": "2"}
        one = subprocess.run([sys.executable, __file__, "_one", "--which", "cellvi", "--file", str(file), "--epochs",
                              str(args.epochs)], capture_output=True, text=True, env=env1)
        env2 = {**os.environ, "OMP_NUM_THREADS": "1"}
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              __file__, "_one", "--which", "cellvi", "--file", str(file), "--epochs", str(args.epochs),
                              "--per-process-batch", "64"], capture_output=True, text=True, env=env2)
        for name, proc in (("1 process x 2 threads, batch 128", one), ("2 processes x 1 thread, batch 64 each", two)):
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[0][7:]) if lines else {"error": proc.stderr[-2000:]}
            r["setting"] = name
            print(json.dumps(r), flush=True)
            results.append(r)
    elif args.part == "epochs":
        for n in args.sizes:
            file = args.data_dir / f"sim_{n}x{args.n_genes}.h5ad"
            print(f"{file}: simulated and written in {make_h5ad(file, n, args.n_genes, 1500.0):.0f} s", flush=True)
            runs = [("cellvi", sys.executable), ("cellvi-backed", sys.executable)]
            runs += [("scvi", args.scvi_python)] if args.scvi_python else []
            for which, python in runs:
                r = measure(python, which, file, args.epochs)
                print(json.dumps(r), flush=True)
                results.append(r)
    else:
        file = args.data_dir / f"sim_{args.n_cells}x{args.n_genes}.h5ad"
        seconds = make_h5ad(file, args.n_cells, args.n_genes, 1500.0)
        print(f"{file}: simulated and written in {seconds:.0f} s", flush=True)
        for which in ("cellvi", "cellvi-backed"):
            r = measure(sys.executable, which, file, None, latent=True)  # None: scvi-tools' epoch heuristic
            r["simulate_write_s"] = seconds
            print(json.dumps(r), flush=True)
            results.append(r)
    (args.data_dir / f"results_{args.part}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
