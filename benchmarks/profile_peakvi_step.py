"""Op-by-op profile of one PeakVI training step, at the sizes of ``bench_peakvi.py``; cellvi or scvi-tools.

Usage (from the repo root; one library per process):

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/profile_peakvi_step.py [--threads 2] [--shapes]
    PYTHONPATH=src OMP_NUM_THREADS=2 /work/venv-scvi/bin/python benchmarks/profile_peakvi_step.py --which scvi

Minibatches of 128 cells from ``simulate_atac`` (5,000 cells x 5,000 regions, 4 types, 2 batches), default
networks, Adam lr 1e-3, weight decay 1e-3. cellvi: gather, loss (compiled kernels), backward, Adam step.
scvi-tools: its module's forward and loss on minibatches from its own data loader (gathered beforehand:
the loader and Lightning's per-step overhead are not in the step), backward, ``torch.optim.Adam``. Prints
ms per step (best of 5 runs of ``--steps``), the parts alone, then the top ops by self CPU time.
"""

from __future__ import annotations

import argparse

import torch
from profile_totalvi_step import ms_per_step, profile_steps  # (this script's folder is on sys.path)


def cellvi_setup():
    import cellvi
    from cellvi.data.loader import CountData
    from cellvi.train import TrainConfig, keep_freed_memory, make_optimizer

    keep_freed_memory()
    adata = cellvi.datasets.simulate_atac(5000, 5000, seed=0)
    cellvi.settings.seed = 0
    cellvi.PeakVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.PeakVI(adata)
    module = model.module.train()
    data = CountData(adata, model.spec)
    opt = make_optimizer(module.parameters(), TrainConfig(max_epochs=1, lr=1e-3, eps=1e-8, weight_decay=1e-3))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))

    def rows(i: int) -> torch.Tensor:
        return perm[(i * 128) % 4480:][:128]

    def loss(batch):
        return module.loss(batch, kl_weight=0.5)["loss"]

    return module, lambda i: data.gather(rows(i)), loss, opt


def scvi_setup():
    import scvi

    import cellvi

    adata = cellvi.datasets.simulate_atac(5000, 5000, seed=0)
    scvi.settings.seed = 0
    scvi.model.PEAKVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.PEAKVI(adata)
    module = model.module.train()
    loader = model._make_data_loader(adata, batch_size=128, shuffle=True)
    batches = [b for _, b in zip(range(36), loader)]
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=1e-8, weight_decay=1e-3)

    def loss(batch):
        return module(batch, loss_kwargs={"kl_weight": 0.5})[2].loss

    return module, lambda i: batches[i % len(batches)], loss, opt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--which", default="cellvi", choices=["cellvi", "scvi"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--shapes", action="store_true", help="profile per input shape")
    p.add_argument("--time-only", action="store_true", help="the step's time only (best of 15 runs), no profile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from cellvi import distributions as dist

    module, get, loss, opt = cellvi_setup() if args.which == "cellvi" else scvi_setup()

    def step(i):
        out = loss(get(i))
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()

    with dist.compiled_kernels(True):
        for i in range(20):  # warm-up (and compilation)
            step(i)
        if args.time_only:
            print(f"{args.which} threads={args.threads}: step {ms_per_step(step, args.steps, 15):.2f} ms")
            return
        batches = [get(i) for i in range(18)]

        def forward(i):
            with torch.no_grad():
                loss(batches[i % 18])

        def forward_backward(i):
            out = loss(batches[i % 18])
            opt.zero_grad(set_to_none=True)
            out.backward()

        print(f"{args.which} threads={args.threads}: step {ms_per_step(step, args.steps):.2f} ms | gather "
              f"{ms_per_step(get, args.steps):.2f} | forward (no grad) {ms_per_step(forward, args.steps):.2f} | "
              f"forward + backward {ms_per_step(forward_backward, args.steps):.2f} | Adam "
              f"{ms_per_step(lambda i: opt.step(), args.steps):.2f}")
        profile_steps(step, args.steps, args.top, args.shapes)


if __name__ == "__main__":
    main()
