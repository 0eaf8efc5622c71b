"""Op-by-op profile of one TotalVI training step, at the sizes of ``bench_totalvi.py``.

Usage (from the repo root):

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/profile_totalvi_step.py [--threads 2] [--eager] [--shapes]
    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/profile_totalvi_step.py --compare   # A/B, no profile

Minibatches of 256 cells from ``simulate_citeseq`` (5,000 cells x 1,000 genes + 30 proteins, 5 missing from
batch_1, 2 batches), default TotalVI: gather, loss, backward, Adam step. Prints ms per step (best of 5 runs
of ``--steps``), the parts alone (gather, forward without gradients, forward + backward, Adam), then the top
ops by self CPU time (``--shapes``: per input shape; the profiler's own cost inflates small ops).
``--compare`` times, alternating in one process, the step as it was before the fused terms and the oneDNN
products (``terms_reference``, ``torch.mm``) against the current one.
"""

from __future__ import annotations

import argparse
import time

import torch


def setup(threads: int):
    import cellvi
    from cellvi.data.loader import CountData
    from cellvi.train import TrainConfig, keep_freed_memory, make_optimizer

    torch.set_num_threads(threads)
    keep_freed_memory()
    adata = cellvi.datasets.simulate_citeseq(5000, 1000, 30, missing_proteins={"batch_1": [0, 1, 2, 3, 4]}, seed=0)
    cellvi.settings.seed = 0
    cellvi.TotalVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = cellvi.TotalVI(adata, n_latent=20)
    module = model.module.train()
    data = CountData(adata, model.spec)
    opt = make_optimizer(module.parameters(), TrainConfig(max_epochs=1, lr=4e-3))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    n_train = 4500

    def rows(i: int) -> torch.Tensor:
        return perm[(i * 256) % n_train :][:256]

    def step(i: int) -> None:
        out = module.loss(data.gather(rows(i)), kl_weight=0.5)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return module, data, opt, rows, step


def ms_per_step(fn, n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def print_op_profile(prof, steps: int, top: int, shapes: bool) -> None:
    """The ``top`` ops of a ``torch.profiler`` run of ``steps`` steps by self CPU time: us and calls per step."""
    events = sorted(prof.key_averages(group_by_input_shape=shapes), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / steps
    print(f"profiled self CPU per step: {total / 1e3:.2f} ms")
    for e in events[:top]:
        shape = str(e.input_shapes)[:90] if shapes else ""
        print(f"{e.key[:44]:44s} {e.self_cpu_time_total / steps:8.1f} us {e.count / steps:5.1f}x  {shape}")


def profile_steps(step, steps: int, top: int, shapes: bool) -> None:
    """Run ``step(i)`` for ``i < steps`` under ``torch.profiler`` and print the op table (:func:`print_op_profile`)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for i in range(steps):
            step(i)
    print_op_profile(prof, steps, top, shapes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=36)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--eager", action="store_true", help="without the compiled likelihood kernels")
    p.add_argument("--shapes", action="store_true", help="profile per input shape")
    p.add_argument("--compare", action="store_true", help="A/B against the step before the fused terms")
    args = p.parse_args()
    from cellvi import distributions as dist
    from cellvi import nn as cnn
    from cellvi.models import totalvi

    module, data, opt, rows, step = setup(args.threads)
    with dist.compiled_kernels(not args.eager):
        for i in range(20):  # warm-up (and compilation)
            step(i)
        if args.compare:
            results: dict[str, list[float]] = {"before (reference terms, mm)": [], "now": []}
            for _ in range(8):
                for name, on in (("before (reference terms, mm)", False), ("now", True)):
                    totalvi.FUSED_TERMS[0] = cnn._ONEDNN[0] = on
                    for i in range(3):
                        step(i)
                    results[name].append(ms_per_step(step, args.steps, 1))
            totalvi.FUSED_TERMS[0] = cnn._ONEDNN[0] = True
            for name, v in results.items():
                v = sorted(v)
                print(f"{name:30s} min {v[0]:.2f}  median {v[len(v) // 2]:.2f} ms per step")
            return
        batches = [data.gather(rows(i)) for i in range(18)]

        def forward(i):
            with torch.no_grad():
                module.loss(batches[i % 18], kl_weight=0.5)

        def forward_backward(i):
            out = module.loss(batches[i % 18], kl_weight=0.5)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()

        print(f"threads={args.threads} {'eager' if args.eager else 'compiled'} kernels: step "
              f"{ms_per_step(step, args.steps):.2f} ms | gather {ms_per_step(lambda i: data.gather(rows(i)), args.steps):.2f}"
              f" | forward (no grad) {ms_per_step(forward, args.steps):.2f} | forward + backward "
              f"{ms_per_step(forward_backward, args.steps):.2f} | Adam {ms_per_step(lambda i: opt.step(), args.steps):.2f}")
        profile_steps(step, args.steps, args.top, args.shapes)


if __name__ == "__main__":
    main()
