"""Wall time of one SCVI training step (loss + backward + Adam, 128 cells x 2,000 genes), eager against compiled
likelihood kernels, alternating twice:

    OMP_NUM_THREADS=1 python benchmarks/step_time.py 1      # the argument: torch threads
"""

import sys
import time

import torch

import cellvi
from cellvi import distributions as dist
from cellvi.data.loader import CountData
from cellvi.train import TrainConfig, keep_freed_memory, make_optimizer


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    adata = cellvi.datasets.simulate(4000, 2000, mean_library_size=500, seed=0)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata)
    module = model.module.train()
    data = CountData(adata, model.spec)
    opt = make_optimizer(module.parameters(), TrainConfig(max_epochs=1))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        batch = data.gather(perm[(i * 128) % (len(data) - 128) :][:128])
        out = module.loss(batch, kl_weight=0.5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    for on in (False, True, False, True):
        with dist.compiled_kernels(on):
            t0 = time.perf_counter()
            for i in range(5):
                step(i)
            warm = time.perf_counter() - t0
            best = min(_timed(step) for _ in range(5))
        print(f"{'compiled' if on else 'eager'}: {best:.2f} ms/step (first 5 steps {warm:.1f} s)", flush=True)


def _timed(step, n: int = 20) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    return (time.perf_counter() - t0) / n * 1e3


if __name__ == "__main__":
    main()
