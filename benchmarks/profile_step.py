"""Op-by-op profile of one SCVI training step: cellvi against the plain-PyTorch floor script.

Usage (from the repo root):

    python benchmarks/profile_step.py [--floor /work/shared/bench/scvi_step_floor.py] [--steps 30]

Both run the same kind of minibatches (128 cells x 2,000 genes of ``cellvi.datasets.simulate`` at mean
library size 500, ZINB, default networks): loss, backward, Adam step, ``--steps`` times after a warm-up,
under ``torch.profiler``. Prints ms per step and the top ops by self CPU time for each.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch


def cellvi_step(adata, n_steps: int, compiled: bool = True):
    import cellvi
    from cellvi.data.loader import CountData
    from cellvi.train import TrainConfig, keep_freed_memory, make_optimizer

    keep_freed_memory()
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata)
    module = model.module.train()
    data = CountData(adata, model.spec)
    opt = make_optimizer(module.parameters(), TrainConfig(max_epochs=1))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(data), generator=g)

    def step(i):
        with cellvi.distributions.compiled_kernels(compiled):
            batch = data.gather(perm[(i * 128) % (len(data) - 128):][:128])
            out = module.loss(batch, kl_weight=0.5)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
    return step


def floor_step(path: str, adata, n_steps: int):
    from cellvi.train import keep_freed_memory

    spec = importlib.util.spec_from_file_location("scvi_step_floor", path)
    fl = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    spec.loader.exec_module(fl)
    torch.set_num_threads(threads)  # the script sets its own thread count on import
    keep_freed_memory()  # as cellvi's training loop does
    X = adata.X.tocsr()
    data = fl.Data(X.indptr, X.indices, X.data, adata.obs["batch"].cat.codes.values, X.shape[1])
    torch.manual_seed(0)
    mod = fl.FastSCVI(data.G)
    opt = fl.make_opt(mod, fl.OPTS)
    if fl.OPTS.get("kcomp") == "1":
        fl.compile_kernels()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(X.shape[0], generator=g)

    def step(i):
        idx = perm[(i * 128) % (X.shape[0] - 128):][:128]
        loss = fl.forward_loss(mod, data, idx, fl.OPTS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def profile(name: str, step, n_steps: int, top: int) -> None:
    for i in range(20):  # warm-up (and any compilation)
        step(i)
    walls, cpus = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n_steps):
            step(i)
        walls.append((time.perf_counter() - t0) / n_steps * 1e3)
        cpus.append((time.process_time() - c0) / n_steps * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(n_steps):
            step(i)
    print(f"\n=== {name}: {min(walls):.2f} ms per step wall, {min(cpus):.2f} ms process CPU (unprofiled, best of 3) ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--floor", default="/work/shared/bench/scvi_step_floor.py")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--which", default="both", choices=["both", "cellvi", "floor"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eager", action="store_true", help="cellvi without its compiled likelihood kernels")
    args = p.parse_args()
    import cellvi

    torch.set_num_threads(args.threads)
    adata = cellvi.datasets.simulate(4000, 2000, n_batches=2, mean_library_size=500, seed=7)
    if args.which in ("both", "cellvi"):
        profile("cellvi", cellvi_step(adata.copy(), args.steps, not args.eager), args.steps, args.top)
    if args.which in ("both", "floor"):
        profile("floor", floor_step(args.floor, adata, args.steps), args.steps, args.top)


if __name__ == "__main__":
    main()
