"""Data-parallel training on PyTorch's own engine (``torch.distributed``), for every model.

Launch a script that calls ``model.train(...)`` under ``torchrun --nproc_per_node N script.py`` (or
across machines with torchrun's rendezvous flags): each process trains on its shard of every
global minibatch, gradients are averaged with one all-reduce per step, BatchNorm statistics are
computed over the global minibatch, the epoch's metrics are summed over processes (so early
stopping and the lr schedule decide the same on every rank), and only rank 0 writes checkpoints
and shows progress. CPUs use the gloo backend, GPUs NCCL; the code is the same.

``batch_size`` is per process, as in scvi-tools (Lightning): N processes step on N x batch_size cells.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` unless running in an initialised process group or under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    return 0, 1


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (once); returns ``(rank, world_size)``."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world()


def local_device(accelerator_device: torch.device) -> torch.device:
    """Under torchrun each process uses the GPU of its ``LOCAL_RANK``; CPUs are shared."""
    if accelerator_device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return accelerator_device


def shard_rows(perm: Tensor, batch_size: int, rank: int, size: int, min_size: int = 1) -> Tensor:
    """This rank's rows of an epoch, in step order: global minibatch ``k`` is ``perm[k*size*batch_size:...]``
    and rank ``r`` takes its ``r``-th block of ``batch_size`` rows. The last, partial global minibatch is
    split evenly (``len // size`` rows each; dropped on every rank when that is below ``min_size``), so
    every rank takes the same number of steps.

    >>> shard_rows(torch.arange(10), 2, rank=1, size=2).tolist()  # steps [0 1 | 2 3], [4 5 | 6 7], [8 | 9]
    [2, 3, 6, 7, 9]
    """
    full = perm.numel() // (size * batch_size) * size * batch_size
    blocks = perm[:full].reshape(-1, size, batch_size)[:, rank].reshape(-1)
    tail = perm[full:]
    per_rank = tail.numel() // size
    if per_rank == 0 or per_rank < min_size:
        return blocks
    return torch.cat([blocks, tail[rank * per_rank : (rank + 1) * per_rank]])


def average_gradients(params: list[nn.Parameter], size: int) -> None:
    """Average ``.grad`` over ranks with one all-reduce of a flat buffer (a missing gradient counts as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g)
        offset += n


def broadcast_parameters(module: nn.Module) -> None:
    """Give every rank rank 0's weights and buffers."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def all_sum(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum each (scalar) tensor over ranks, in one all-reduce."""
    keys = sorted(values)
    flat = torch.stack([values[k].detach().double().reshape(()) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks with plain, blocking ``dist.all_reduce`` (the gradient of a sum over ranks
    is the sum of the ranks' gradients). ``torch.distributed.nn.functional.all_reduce`` is deprecated and now
    goes through functional collectives, whose pending work made a process abort at exit now and then
    ("terminate called without an active exception")."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global minibatch (all ranks), on CPU and GPU.

    PyTorch's ``SyncBatchNorm`` runs on GPUs only; this computes the global mean and variance from
    all-reduced sums (differentiable), so gradients match single-process training on the union.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        stats = _AllReduceSum.apply(torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([x.shape[0]])]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp_min(1), self.momentum)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def use_global_batch_norm(module: nn.Module) -> None:
    """Make every ``BatchNorm1d`` of ``module`` a :class:`GlobalBatchNorm1d`, in place (same parameters)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d


def n_processes(devices, accelerator: str) -> int:
    """How many processes ``devices`` asks for (Lightning's meaning): an int count, -1 for every GPU, or a
    list of GPU indices; 1 for "auto" and under torchrun (which already started the processes)."""
    if world()[1] > 1 or devices in ("auto", None):
        return 1
    if isinstance(devices, (list, tuple)):
        return len(devices)
    n = int(devices)
    if n == -1:
        return max(torch.cuda.device_count(), 1) if accelerator in ("auto", "gpu", "cuda") else 1
    if n < 1:
        raise ValueError(f"devices={devices!r}: give a positive count, -1 (all GPUs) or a list of GPU indices.")
    return n


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, as in a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, folder: str, cls, method: str, args: tuple, kwargs: dict) -> None:
    """One process of a ``devices=N`` run: load the model, train it data-parallel, rank 0 saves the result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, available_cores() // size))
    model = cls.load(os.path.join(folder, "start"), accelerator="cpu")
    getattr(model, method)(*args, **kwargs)
    if rank == 0:
        model.save(os.path.join(folder, "done"))
    dist.destroy_process_group()


def launch(model, method: str, n: int, args: tuple, kwargs: dict) -> None:
    """Run ``model.<method>(*args, **kwargs)`` in ``n`` processes on this machine (as torchrun would) and
    take the trained weights and history back into ``model``."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="cellvi-ddp-") as folder:
        model.save(os.path.join(folder, "start"), save_anndata=True)
        mp.spawn(_worker, args=(n, _free_port(), folder, type(model), method, args, kwargs), nprocs=n, join=True)
        trained = type(model).load(os.path.join(folder, "done"), adata=model.adata, accelerator="cpu")
    model.module.load_state_dict(trained.module.state_dict())
    model.history_, model.is_trained_ = trained.history_, trained.is_trained_
    model._restore(trained._meta())
    model.train_indices_, model.validation_indices_ = trained.train_indices_, trained.validation_indices_


def spawns_processes(train):
    """Decorator of a model's ``train``: ``devices=N`` (N > 1) runs it in N data-parallel processes."""
    import functools
    import inspect

    signature = inspect.signature(train)

    @functools.wraps(train)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        devices = bound.arguments.get("devices", "auto")
        accelerator = bound.arguments.get("accelerator", "auto")
        n = n_processes(devices, accelerator)
        if n == 1:
            return train(self, *args, **kwargs)
        from cellvi import settings

        bound.arguments["devices"] = 1
        call = dict(bound.arguments)
        call.pop("self")
        extra = call.pop(next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), ""), {})
        call["seed"] = settings.seed if call.get("seed") is None else call["seed"]  # the workers' settings are fresh
        extra.setdefault("enable_progress_bar", settings.progress_bar)
        return launch(self, train.__name__, n, (), {**call, **extra})

    return wrapper
