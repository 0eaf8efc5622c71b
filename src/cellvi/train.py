"""The training loop: Adam, KL warm-up, gradient clipping, early stopping, NaN detection, history.

A module is anything with ``loss(batch, kl_weight=...) -> dict`` whose ``"loss"`` entry is the scalar
to minimise and whose ``"reconstruction_loss"`` / ``"kl_local"`` entries are per-cell tensors
(``"kl_global"``, when present, a scalar). Minibatches come from two callables that return fresh
iterables each epoch, so the loop knows nothing of AnnData or of how batches are built.
Metrics are summed on the device and read once per epoch: no per-step synchronisation.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01  # Adam epsilon (scvi-tools' default)
    optimizer: str = "Adam"  # "Adam" (L2 weight decay in the gradient) or "AdamW" (decoupled weight decay)
    n_epochs_kl_warmup: int | None = 400  # KL weight rises linearly from 0 to 1 over these epochs
    n_steps_kl_warmup: int | None = None  # ... or over these steps, when n_epochs_kl_warmup is None
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    early_stopping: bool = False
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    gradient_clip_val: float | None = None  # max global gradient norm (None: no clipping, as scvi-tools)
    check_val_every_n_epoch: int | None = None  # validation every n epochs (1 with early stopping)
    enable_progress_bar: bool = True


def kl_weight(epoch: int, step: int, n_epochs_kl_warmup: int | None, n_steps_kl_warmup: int | None,
              max_kl_weight: float = 1.0, min_kl_weight: float = 0.0) -> float:
    """Linear KL warm-up: ``min + (max - min) * progress`` with progress = epoch (or step) / warm-up length."""
    slope = max_kl_weight - min_kl_weight
    if n_epochs_kl_warmup:
        if epoch < n_epochs_kl_warmup:
            return min_kl_weight + slope * epoch / n_epochs_kl_warmup
    elif n_steps_kl_warmup and step < n_steps_kl_warmup:
        return min_kl_weight + slope * step / n_steps_kl_warmup
    return max_kl_weight


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed buffers for reuse instead of returning them to the OS after each step.

    A training step allocates and frees dozens of ~1 MB tensors; by default glibc serves blocks of that
    size with fresh ``mmap`` calls whose pages fault in on first touch, which costs ~15 % of a CPU
    step. Raising the mmap and trim thresholds (as ``MALLOC_MMAP_THRESHOLD_`` would) removes that.
    Linux/glibc only; a no-op elsewhere. Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 256 * 2**20))
    except (OSError, AttributeError):
        return False


class Adam:
    """Adam (with L2 weight decay, as ``torch.optim.Adam``) as one call of PyTorch's fused kernel per step.

    ``torch.optim.Adam`` does the same arithmetic, but its first construction imports ``torch._dynamo``
    (about 1.5 s, once per process, which dominated short trainings) and each step goes through
    Python bookkeeping. Checked against ``torch.optim.Adam`` in the tests; falls back to it where the
    fused kernel is missing.
    """

    def __init__(self, params, lr: float, eps: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.eps, self.weight_decay, self.betas = lr, eps, weight_decay, betas
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        steps = [self.steps[i] for i in idx]
        torch._foreach_add_(steps, 1.0)
        torch._fused_adam_(
            [self.params[i] for i in idx], [self.params[i].grad for i in idx], [self.exp_avg[i] for i in idx],
            [self.exp_avg_sq[i] for i in idx], [], steps, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
            weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False,
        )


class AdamW(Adam):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) on PyTorch's fused kernel; see :class:`Adam`."""

    @torch.no_grad()
    def step(self) -> None:
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        steps = [self.steps[i] for i in idx]
        torch._foreach_add_(steps, 1.0)
        torch._fused_adamw_(
            [self.params[i] for i in idx], [self.params[i].grad for i in idx], [self.exp_avg[i] for i in idx],
            [self.exp_avg_sq[i] for i in idx], [], steps, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
            weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False,
        )


def make_optimizer(params, config: TrainConfig):
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "AdamW":  # decoupled weight decay: p -= lr * wd * p, outside the moments
        if hasattr(torch, "_fused_adamw_") and all(p.device.type in ("cpu", "cuda") for p in params):
            return AdamW(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
        return torch.optim.AdamW(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer != "Adam":
        raise ValueError(f"optimizer={config.optimizer!r} is not supported; use 'Adam' or 'AdamW'.")
    if hasattr(torch, "_fused_adam_") and all(p.device.type in ("cpu", "cuda") for p in params):
        return Adam(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)


class _Totals:
    """Per-epoch sums of the logged metrics, kept on the device until read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n_cells = 0
        self.n_steps = 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        n = out["reconstruction_loss"].numel()
        self.n_cells += n
        self.n_steps += 1
        for key, value in out.items():
            v = value.detach()
            v = v.sum() if v.dim() else v * (n if key == "loss" else 1)  # loss is a per-cell mean
            self.sums[key] = self.sums[key] + v if key in self.sums else v

    def read(self, split: str, n_obs: int) -> dict[str, float]:
        """scvi-tools' history keys: ``elbo_<split>``, ``reconstruction_loss_<split>``, ..."""
        vals = {k: float(v) for k, v in self.sums.items()}
        rec = vals["reconstruction_loss"] / self.n_cells
        kl_local = vals.get("kl_local", 0.0) / self.n_cells
        kl_global = vals.get("kl_global", 0.0) / max(self.n_steps, 1)
        loss = vals["loss"] / self.n_cells
        out = {
            f"elbo_{split}": rec + kl_local + kl_global / max(n_obs, 1),
            f"reconstruction_loss_{split}": rec,
            f"kl_local_{split}": kl_local,
            f"kl_global_{split}": kl_global,
            ("train_loss_epoch" if split == "train" else "validation_loss"): loss,
        }
        for key, v in vals.items():  # model-specific extras (e.g. a penalty), as per-cell means
            if key not in ("loss", "reconstruction_loss", "kl_local", "kl_global"):
                out[f"{key}_{split}"] = v / self.n_cells
        return out


def _check_finite(metrics: dict[str, float], epoch: int) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"Training diverged at epoch {epoch}: {', '.join(bad)} became NaN/inf. Try a lower `lr`, "
            "check the input for extreme values, or set `gradient_clip_val`. The model is left as it was "
            "at the failure; retrain from a fresh model."
        )


def fit(
    module: nn.Module,
    train_batches: Callable[[], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]] | None,
    config: TrainConfig,
    *,
    n_obs_train: int,
    n_obs_val: int = 0,
) -> dict[str, list[float]]:
    """Train ``module`` in place; returns the history, one value per epoch for each key."""
    keep_freed_memory()
    optimizer = make_optimizer(module.parameters(), config)
    params = [p for p in module.parameters() if p.requires_grad]
    val_every = 1 if config.early_stopping else config.check_val_every_n_epoch
    history: dict[str, list[float]] = {}
    best, bad_epochs, step = math.inf, 0, 0
    bar = tqdm(range(config.max_epochs), desc="Epochs", disable=not config.enable_progress_bar, leave=False)
    for epoch in bar:
        w = kl_weight(epoch, step, config.n_epochs_kl_warmup, config.n_steps_kl_warmup,
                      config.max_kl_weight, config.min_kl_weight)
        module.train()
        totals = _Totals()
        for batch in train_batches():
            if config.n_steps_kl_warmup and not config.n_epochs_kl_warmup:
                w = kl_weight(epoch, step, None, config.n_steps_kl_warmup, config.max_kl_weight, config.min_kl_weight)
            out = module.loss(batch, kl_weight=w)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if config.gradient_clip_val is not None:
                torch.nn.utils.clip_grad_norm_(params, config.gradient_clip_val, foreach=True)
            optimizer.step()
            totals.add(out)
            step += 1
        metrics = totals.read("train", n_obs_train)
        metrics["kl_weight"] = w
        _check_finite(metrics, epoch)
        if val_batches is not None and val_every and (epoch + 1) % val_every == 0 and n_obs_val > 0:
            metrics.update(evaluate(module, val_batches(), "validation", n_obs_val))
        for key, v in metrics.items():
            history.setdefault(key, []).append(v)
        bar.set_postfix(train_loss=f"{metrics['train_loss_epoch']:.1f}")
        if config.early_stopping and config.early_stopping_monitor in metrics:
            current = metrics[config.early_stopping_monitor]
            if current < best - config.early_stopping_min_delta:
                best, bad_epochs = current, 0
            else:
                bad_epochs += 1
                if bad_epochs >= config.early_stopping_patience:
                    break
    bar.close()
    module.eval()
    return history


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[dict], split: str, n_obs: int) -> dict[str, float]:
    """The history metrics of ``module`` over ``batches`` at full KL weight, in eval mode."""
    was_training = module.training
    module.eval()
    totals = _Totals()
    for batch in batches:
        totals.add(module.loss(batch, kl_weight=1.0))
    module.train(was_training)
    return totals.read(split, n_obs)
