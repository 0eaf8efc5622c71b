"""Op-by-op profile of one MrVI training step, at the sizes of ``bench_mrvi.py``.

Usage (from the repo root):

    PYTHONPATH=src python benchmarks/profile_mrvi_step.py [--threads 1] [--shapes]
    git show <rev>:src/cellvi/models/mrvi.py > /tmp/mrvi_before.py
    PYTHONPATH=src python benchmarks/profile_mrvi_step.py --compare /tmp/mrvi_before.py   # A/B, no profile
    PYTHONPATH=src python benchmarks/profile_mrvi_step.py --compiled [--compare /tmp/mrvi_before.py]  # compiled

Minibatches of 128 cells from ``simulate_cohort`` (4,000 cells x 500 genes, 16 samples, no batch key),
default MrVI: gather, loss, backward, Adam step with gradient clipping. Prints ms per step (best of 5 runs of ``--steps``),
the time of ``get_local_sample_distances``, then the top ops by self CPU time. ``--compare FILE`` times,
alternating in one process, the module defined in FILE (an older ``models/mrvi.py``) against the current one,
for the training step and for the counterfactual z of 256 cells x 16 samples.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch


def load_module_file(path: str):
    spec = importlib.util.spec_from_file_location("mrvi_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mrvi_before"] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def setup(threads: int, mrvi=None):
    import cellvi
    from cellvi.data.loader import CountData
    from cellvi.models import mrvi as current
    from cellvi.train import TrainConfig, keep_freed_memory, make_optimizer

    mrvi = mrvi or current
    torch.set_num_threads(threads)
    keep_freed_memory()
    adata = cellvi.datasets.simulate_cohort(4000, 500, seed=0)
    cellvi.settings.seed = 0
    cellvi.MrVI.setup_anndata(adata, sample_key="sample")
    model = cellvi.MrVI(adata)
    spec = model.spec
    torch.manual_seed(0)
    module = mrvi.MrVIModule(spec.n_genes, spec.n_samples, spec.n_batches, spec.n_labels, model.config,
                             model.module.n_obs_per_sample).train()
    data = CountData(adata, spec)
    cfg = TrainConfig(max_epochs=1, lr=2e-3, eps=1e-8, weight_decay=1e-8)
    opt = make_optimizer(module.parameters(), cfg)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))

    def rows(i: int) -> torch.Tensor:
        return perm[(i * 128) % 3600 :][:128]

    def step(i: int) -> None:
        out = module.loss(data.gather(rows(i)), kl_weight=0.5)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step(max_grad_norm=40.0)  # as fit() calls cellvi's Adam (clipping inside its kernel)

    cells = data.gather(perm[:256])
    samples = torch.arange(spec.n_samples)

    @torch.no_grad()
    def counterfactual(i: int) -> None:
        module.eval()
        u = module.qu(cells["x"], cells["sample"], cells.get("nonzeros")).mean
        module.counterfactual_z(u, samples)
        module.train()

    return module, step, counterfactual


def main() -> None:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--shapes", action="store_true", help="profile per input shape")
    p.add_argument("--compare", default=None, help="an older models/mrvi.py to time against the current one")
    p.add_argument("--compiled", action="store_true", help="the step with compiled kernels and network (each "
                   "module file's network_terms compiled with its own options)")
    args = p.parse_args()
    from cellvi import distributions as dist

    with dist.compiled_kernels(args.compiled):
        run(args)


def run(args) -> None:
    from profile_totalvi_step import ms_per_step, profile_steps

    _, step, counterfactual = setup(args.threads)
    for i in range(20):
        step(i)
    if args.compare:
        _, old_step, old_counterfactual = setup(args.threads, load_module_file(args.compare))
        for i in range(20):
            old_step(i)
        fns = {"step before": old_step, "step now": step, "counterfactual z before": old_counterfactual,
               "counterfactual z now": counterfactual}
        results: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(8):
            for name, fn in fns.items():
                results[name].append(ms_per_step(fn, args.steps if "step" in name else 5, 1))
        for name, v in results.items():
            v = sorted(v)
            print(f"{name:26s} min {v[0]:.2f}  median {v[len(v) // 2]:.2f} ms")
        return
    print(f"threads={args.threads}: step {ms_per_step(step, args.steps):.2f} ms | counterfactual z of 256 cells x "
          f"16 samples {ms_per_step(counterfactual, 5):.2f} ms")
    profile_steps(step, args.steps, args.top, args.shapes)


if __name__ == "__main__":
    main()
