"""The training loop: Adam, KL warm-up, gradient clipping, early stopping, NaN detection, history.

A module is anything with ``loss(batch, kl_weight=...) -> dict`` whose ``"loss"`` entry is the scalar
to minimise and whose ``"reconstruction_loss"`` / ``"kl_local"`` entries are per-cell tensors
(``"kl_global"``, when present, a scalar). A ``"z"`` entry, when present, is the latent sample
``(cells, n_latent)``: it is not logged, and an :class:`Adversary` reads it. Minibatches come from two
callables that return fresh iterables each epoch, so the loop knows nothing of AnnData or of how
batches are built.
Metrics are summed on the device and read once per epoch: no per-step synchronisation.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from cellvi import distributed, distributions
from cellvi.nn import MLP


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs, with scvi-tools' names. ``plan_kwargs`` of a model's ``train`` set the
    first group (scvi-tools' ``TrainingPlan``), its other keyword arguments the second (``Trainer``)."""

    max_epochs: int
    # --- plan_kwargs
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01  # Adam epsilon (scvi-tools' default)
    optimizer: str = "Adam"  # "Adam" (L2 weight decay) or "AdamW" (decoupled weight decay)
    n_epochs_kl_warmup: int | None = 400  # KL weight rises linearly from min to max over these epochs
    n_steps_kl_warmup: int | None = None  # ... or over these steps, when n_epochs_kl_warmup is None
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    reduce_lr_on_plateau: bool = False  # multiply lr by lr_factor when lr_scheduler_metric stalls
    lr_factor: float = 0.6
    lr_patience: int = 30  # epochs without improvement before the lr is reduced
    lr_threshold: float = 0.0  # relative improvement that counts (as torch's ReduceLROnPlateau, mode "rel")
    lr_scheduler_metric: str = "elbo_validation"
    lr_min: float = 0.0
    compile_kernels: bool | None = None  # cellvi: torch.compile the likelihood kernels (None: for long runs)
    compile_cell_passes: int = 500_000  # cellvi: a long run, for compile_kernels=None: cells x epochs at least this
    adversarial_classifier: bool = False  # a batch classifier on z that the model learns to fool (Adversary)
    scale_adversarial_loss: float | str = "auto"  # weight of the adversarial terms; "auto": 1 - kl_weight
    # --- trainer kwargs
    early_stopping: bool = False
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    early_stopping_warmup_epochs: int = 0  # epochs before early stopping may trigger
    early_stopping_mode: str = "min"
    gradient_clip_val: float | None = None  # max global gradient norm (None: no clipping, as scvi-tools)
    check_val_every_n_epoch: int | None = None  # validation every n epochs (every epoch with early stopping)
    enable_progress_bar: bool = True

    def __post_init__(self):
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}.")
        if self.optimizer not in ("Adam", "AdamW"):
            raise ValueError(f"optimizer={self.optimizer!r} is not supported; use 'Adam' or 'AdamW'.")
        if self.min_kl_weight > self.max_kl_weight:
            raise ValueError(f"min_kl_weight={self.min_kl_weight} is larger than max_kl_weight={self.max_kl_weight}.")
        if self.early_stopping_mode not in ("min", "max"):
            raise ValueError(f"early_stopping_mode must be 'min' or 'max', got {self.early_stopping_mode!r}.")
        scale = self.scale_adversarial_loss
        if not (scale == "auto" or (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale >= 0)):
            raise ValueError(f"scale_adversarial_loss={scale!r}: use 'auto' (1 - kl_weight) or a number >= 0.")
        for name in ("early_stopping_monitor", "lr_scheduler_metric"):
            if getattr(self, name) not in MONITORS:
                raise ValueError(f"{name}={getattr(self, name)!r} is never logged; use one of {sorted(MONITORS)}.")

    def watched_metrics(self) -> list[str]:
        """The metrics early stopping and the lr schedule read (validation then runs every epoch)."""
        return [m for on, m in ((self.early_stopping, self.early_stopping_monitor),
                                (self.reduce_lr_on_plateau, self.lr_scheduler_metric)) if on]


# the per-epoch metrics every module logs (see _Totals.read); the names early stopping may monitor
MONITORS = frozenset({f"{m}_{split}" for m in ("elbo", "reconstruction_loss", "kl_local", "kl_global")
                      for split in ("train", "validation")} | {"train_loss", "validation_loss"})
PLAN_KEYS = ("lr", "weight_decay", "eps", "optimizer", "n_epochs_kl_warmup", "n_steps_kl_warmup", "max_kl_weight",
             "min_kl_weight", "reduce_lr_on_plateau", "lr_factor", "lr_patience", "lr_threshold",
             "lr_scheduler_metric", "lr_min", "compile_kernels", "compile_cell_passes", "adversarial_classifier",
             "scale_adversarial_loss")
TRAINER_KEYS = ("early_stopping_monitor", "early_stopping_patience", "early_stopping_min_delta",
                "early_stopping_warmup_epochs", "early_stopping_mode", "gradient_clip_val", "check_val_every_n_epoch",
                "enable_progress_bar")
# Lightning Trainer options that have no meaning without Lightning: accepted so ported calls run, and ignored
IGNORED_TRAINER_KEYS = ("logger", "log_every_n_steps", "enable_checkpointing", "checkpointing_monitor",
                        "enable_model_summary", "num_sanity_val_steps", "benchmark", "default_root_dir",
                        "progress_bar_refresh_rate", "simple_progress_bar", "learning_rate_monitor", "log_save_dir")


def make_train_config(*, max_epochs: int, early_stopping: bool, plan_kwargs: dict | None, trainer_kwargs: dict,
                      defaults: dict | None = None) -> TrainConfig:
    """Build the :class:`TrainConfig` of a ``train`` call, refusing names that would be silently ignored.

    Parameters
    ----------
    max_epochs, early_stopping
        As passed to ``train``.
    plan_kwargs
        scvi-tools' ``plan_kwargs`` (``lr``, ``weight_decay``, ``n_epochs_kl_warmup``, ...).
    trainer_kwargs
        The other keyword arguments of ``train``: scvi-tools' Trainer options; plan options are
        accepted here too, as a convenience (``train(lr=1e-3)``).
    defaults
        A model's own defaults for any field (e.g. MrVI's learning rate), overridden by the user's.
    """
    plan = dict(plan_kwargs or {})
    trainer = {k: v for k, v in trainer_kwargs.items() if k not in IGNORED_TRAINER_KEYS}
    unknown = sorted(set(plan) - set(PLAN_KEYS)) + sorted(set(trainer) - set(PLAN_KEYS) - set(TRAINER_KEYS))
    if unknown:
        raise ValueError(f"Unknown training option(s) {unknown}. plan_kwargs takes {list(PLAN_KEYS)}; train() also "
                         f"takes {list(TRAINER_KEYS)}.")
    both = sorted(set(plan) & set(trainer))
    if both:
        raise ValueError(f"{both} given both in plan_kwargs and as keyword arguments; give each once.")
    return TrainConfig(max_epochs=int(max_epochs), early_stopping=bool(early_stopping),
                       **{**(defaults or {}), **plan, **trainer})


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
        # step counts: one tensor (one add per step), handed to the kernel as per-parameter views
        self.step_counts = torch.zeros(len(self.params), dtype=torch.float32,
                                       device=self.params[0].device if self.params else None)
        self.steps = list(self.step_counts.unbind(0))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments and step counts, flat: ``"<param>.exp_avg"``, ``"<param>.exp_avg_sq"``, ``"<param>.step"``."""
        return {f"{i}.{name}": t for name, ts in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq),
                                                  ("step", self.steps)) for i, t in enumerate(ts)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`, in place (the learning rate is set separately)."""
        named = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.steps}
        expected = {key: t.shape for key, t in self.state_dict().items()}
        if {key: t.shape for key, t in state.items()} != expected:
            raise ValueError("The saved optimizer state does not match this model's parameters (a checkpoint of "
                             "another model configuration or of an earlier cellvi version); start a new training.")
        for key, t in state.items():
            i, name = key.split(".", 1)
            named[name][int(i)].copy_(t)

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> None:
        """One Adam step; with ``max_grad_norm``, the gradients are first scaled as
        ``torch.nn.utils.clip_grad_norm_`` does (by ``max_norm / (norm + 1e-6)`` when below 1), inside the
        fused kernel (its ``grad_scale``): one norm over all gradients and no separate multiply."""
        grads = [p.grad for p in self.params]
        params, exp_avg, exp_avg_sq, steps = self.params, self.exp_avg, self.exp_avg_sq, self.steps
        if any(g is None for g in grads):  # parameters that got no gradient this step are left as they are
            idx = [i for i, g in enumerate(grads) if g is not None]
            if not idx:
                return
            params, grads, exp_avg, exp_avg_sq, steps = ([seq[i] for i in idx] for seq in
                                                         (params, grads, exp_avg, exp_avg_sq, steps))
            self.step_counts[idx] += 1.0
        else:
            self.step_counts.add_(1.0)
        scale = None
        if max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            scale = torch.clamp((norm + 1e-6) / max_grad_norm, min=1.0)  # the kernel divides gradients by it
        self._kernel()(params, grads, exp_avg, exp_avg_sq, [], steps, lr=self.lr, beta1=self.betas[0],
                       beta2=self.betas[1], weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False,
                       grad_scale=scale)

    @staticmethod
    def _kernel():
        return torch._fused_adam_  # L2 weight decay: added to the gradient


class AdamW(Adam):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) on PyTorch's fused kernel; see :class:`Adam`."""

    @staticmethod
    def _kernel():
        return torch._fused_adamw_  # decoupled weight decay: p -= lr * wd * p, outside the moments


@functools.cache
def _fused_adam_runs_on(device_type: str) -> bool:
    """Whether this PyTorch has the fused Adam kernel for ``device_type`` (CPU needs torch >= 2.4): one tiny call."""
    if device_type not in ("cpu", "cuda") or not hasattr(torch, "_fused_adam_"):
        return False
    t = [torch.zeros(1, device=device_type)]
    try:
        torch._fused_adam_(t, [torch.ones(1, device=device_type)], [torch.zeros(1, device=device_type)],
                           [torch.zeros(1, device=device_type)], [], [torch.ones((), device=device_type)], lr=0.1,
                           beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def make_optimizer(params, config: TrainConfig):
    """Adam (L2 weight decay, our fused :class:`Adam` where PyTorch has the kernel) or AdamW."""
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "AdamW":  # decoupled weight decay: p -= lr * wd * p, outside the moments
        if params and all(_fused_adam_runs_on(p.device.type) for p in params):
            return AdamW(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
        return torch.optim.AdamW(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    if params and all(_fused_adam_runs_on(p.device.type) for p in params):
        return Adam(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of our :class:`Adam` or of a ``torch.optim`` optimizer."""
    if isinstance(optimizer, Adam):
        optimizer.lr = lr
    else:
        for group in optimizer.param_groups:
            group["lr"] = lr


def optimizer_state(optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors (moments, step counts), flat, keyed ``"<param>.<name>"``."""
    if isinstance(optimizer, Adam):
        return optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {f"{i}.{name}": torch.as_tensor(v) for i, p in enumerate(params)
            for name, v in optimizer.state.get(p, {}).items()}


def load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_state`, in place."""
    if isinstance(optimizer, Adam):
        optimizer.load_state_dict(tensors)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        optimizer.state[params[int(i)]][name] = t.clone()


class Plateau:
    """Counts epochs without improvement of a metric, as early stopping and ReduceLROnPlateau do.

    ``update(value)`` returns True when ``patience`` epochs in a row did not improve on the best value
    by more than ``min_delta`` (absolute) or ``threshold`` (relative to the best), then starts counting again.
    """

    def __init__(self, patience: int, *, mode: str = "min", min_delta: float = 0.0, threshold: float = 0.0):
        self.patience, self.sign, self.min_delta, self.threshold = patience, 1.0 if mode == "min" else -1.0, \
            min_delta, threshold
        self.best, self.bad = math.inf, 0

    def update(self, value: float) -> bool:
        v = self.sign * value
        if v < self.best - self.min_delta - self.threshold * abs(self.best if math.isfinite(self.best) else 0.0):
            self.best, self.bad = v, 0
            return False
        self.bad += 1
        if self.bad >= self.patience:
            self.bad = 0
            return True
        return False


def fool_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-cell cross-entropy of a classifier against the uniform distribution on the *other* classes,
    ``-1/(K-1) sum_{k != y} log softmax(logits)_k``: what the model minimises to fool the classifier.

    Parameters
    ----------
    logits
        ``(cells, K)`` classifier outputs, ``K >= 2``.
    labels
        ``(cells,)`` true class of each cell.
    """
    n_classes = logits.shape[-1]
    others = 1.0 - F.one_hot(labels, n_classes).to(logits.dtype)
    return -(logits.log_softmax(-1) * others).sum(-1) / (n_classes - 1)


class Adversary:
    """A classifier of each cell's batch from its latent z, trained against the model (scvi-tools'
    ``adversarial_classifier``, Gayoso et al. 2021).

    At every step the model's loss gets ``kappa * mean(fool_cross_entropy)`` (the model learns a z from
    which the batch cannot be told), then the classifier takes one step of its own optimizer on
    ``kappa * mean(cross_entropy(true batch))`` of the *detached* z. ``kappa`` is
    ``scale_adversarial_loss``, or ``1 - kl_weight`` for ``"auto"`` (the adversary fades out as the
    KL warm-up ends). The module's ``loss`` must return its latent sample as ``"z"``.
    """

    def __init__(self, classifier: nn.Module, optimizer, scale: float | str = "auto", target: str = "batch"):
        self.classifier, self.optimizer, self.scale, self.target = classifier, optimizer, scale, target

    @classmethod
    def for_batches(cls, n_latent: int, n_batches: int, config: TrainConfig, device: torch.device) -> Adversary:
        """scvi-tools' classifier (two hidden layers of 32 with BatchNorm, ReLU, dropout 0.1; logits) and
        optimizer (Adam, lr 1e-3, eps 0.01, the run's weight decay)."""
        classifier = nn.Sequential(MLP(n_latent, 32, n_hidden=32, n_layers=2, dropout_rate=0.1),
                                   nn.Linear(32, n_batches)).to(device)
        opt_config = TrainConfig(max_epochs=1, lr=1e-3, eps=0.01, weight_decay=config.weight_decay)
        return cls(classifier, make_optimizer(classifier.parameters(), opt_config), config.scale_adversarial_loss,
                   "batch")

    def weight(self, kl_weight: float) -> float:
        """``kappa``: the weight of both adversarial terms at this step."""
        return 1.0 - kl_weight if self.scale == "auto" else float(self.scale)

    @staticmethod
    def latent(out: dict[str, Tensor]) -> Tensor:
        """The latent sample ``"z"`` of a module's loss output."""
        if "z" not in out:
            raise ValueError("adversarial_classifier=True needs a model whose loss returns its latent sample 'z'; "
                             "this model's does not. Train with adversarial_classifier=False.")
        return out["z"]

    def fool_loss(self, z: Tensor, labels: Tensor) -> Tensor:
        """The term added to the model's loss (before ``kappa``): a scalar."""
        self.classifier.train()
        return fool_cross_entropy(self.classifier(z), labels).mean()

    def step(self, z: Tensor, labels: Tensor, kappa: float, n_ranks: int = 1) -> Tensor:
        """One optimizer step of the classifier on detached ``z``; returns its per-cell cross-entropy."""
        self.classifier.train()
        ce = F.cross_entropy(self.classifier(z.detach()), labels, reduction="none")
        self.optimizer.zero_grad(set_to_none=True)
        (kappa * ce.mean()).backward()
        if n_ranks > 1:
            distributed.average_gradients([p for p in self.classifier.parameters() if p.requires_grad], n_ranks)
        self.optimizer.step()
        return ce.detach()


class _Totals:
    """Per-epoch sums of the logged metrics, kept on the device until read (no per-step synchronisation).

    Each step only keeps its detached values; every ``FOLD_EVERY`` steps they are folded into running sums
    with one reduction per metric (a reduction per metric and step cost ~2 % of a step). Keeping every
    step's tensors until the epoch ends instead fragments the heap the steps' large buffers come from
    (peak memory grew ~1 GB per 2,000 steps).
    """

    FOLD_EVERY = 32

    def __init__(self):
        self.totals: dict[str, torch.Tensor] = {}
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.sizes: list[int] = []
        self.n_cells = 0
        self.n_steps = 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        n = out["reconstruction_loss"].numel()
        self.n_cells += n
        self.n_steps += 1
        self.sizes.append(n)
        for key, value in out.items():
            if key != "z":  # the latent sample, for an adversary: not a metric
                self.pending.setdefault(key, []).append(value.detach())
        if len(self.sizes) == self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        for key, parts in self.pending.items():
            if parts[0].dim():  # per-cell values
                total = torch.cat(parts).sum()
            else:  # one scalar per step; "loss" is a per-cell mean: weighted by the step's cells
                steps = torch.stack(parts)
                total = (steps * steps.new_tensor(self.sizes)).sum() if key == "loss" else steps.sum()
            self.totals[key] = self.totals[key] + total if key in self.totals else total
        self.pending, self.sizes = {}, []

    def sums(self) -> dict[str, torch.Tensor]:
        """Per-cell values summed over cells; scalars summed over steps (``loss``, a per-cell mean, times its cells)."""
        if self.sizes:
            self._fold()
        return dict(self.totals)

    def read(self, split: str, n_obs: int) -> dict[str, float]:
        """scvi-tools' history keys: ``elbo_<split>``, ``reconstruction_loss_<split>``, ... (summed over
        the processes of a data-parallel run first, so every rank reads the same values)."""
        sums = self.sums()
        if distributed.world()[1] > 1:
            sums = distributed.all_sum({**sums, "_cells": torch.tensor(float(self.n_cells)),
                                        "_steps": torch.tensor(float(self.n_steps))})
            self.n_cells, self.n_steps = int(sums.pop("_cells")), int(sums.pop("_steps"))
        vals = {k: float(v) for k, v in sums.items()}
        rec = vals["reconstruction_loss"] / self.n_cells
        kl_local = vals.get("kl_local", 0.0) / self.n_cells
        kl_global = vals.get("kl_global", 0.0) / max(self.n_steps, 1)
        loss = vals["loss"] / self.n_cells
        out = {
            f"elbo_{split}": rec + kl_local + kl_global / max(n_obs, 1),
            f"reconstruction_loss_{split}": rec,
            f"kl_local_{split}": kl_local,
            f"kl_global_{split}": kl_global,
            ("train_loss" if split == "train" else "validation_loss"): loss,
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


@dataclass
class TrainState:
    """Where a training run is: everything needed to continue it exactly (see :func:`save_state`).

    The module's weights, the optimizer's moments, the epoch and step counters (the KL warm-up
    position follows from them), the early-stopping and lr-plateau counters, the learning rate, the
    random generators (global torch RNG and the shuffling generator), the history so far, and the
    adversary's classifier and optimizer when there is one.
    """

    module: nn.Module
    optimizer: object
    generator: torch.Generator | None
    config: TrainConfig
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    lr: float = 0.0
    stopper: Plateau | None = None
    scheduler: Plateau | None = None
    stopped: bool = False  # early stopping fired
    history: dict[str, list[float]] = field(default_factory=dict)
    adversary: Adversary | None = None

    @classmethod
    def start(cls, module: nn.Module, config: TrainConfig, generator: torch.Generator | None = None,
              adversary: Adversary | None = None) -> TrainState:
        return cls(module, make_optimizer(module.parameters(), config), generator, config, lr=config.lr,
                   stopper=Plateau(config.early_stopping_patience, mode=config.early_stopping_mode,
                                   min_delta=config.early_stopping_min_delta),
                   scheduler=Plateau(config.lr_patience, threshold=config.lr_threshold), adversary=adversary)


STATE_TENSORS, STATE_JSON = "train_state.safetensors", "train_state.json"


def save_state(state: TrainState, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``state`` to ``directory`` as safetensors (weights, optimizer moments, RNG states) + JSON (the rest).

    Files are written under temporary names and renamed, so a run killed mid-write leaves the previous
    checkpoint intact. ``extra`` (JSON-able) is stored alongside, e.g. what identifies the model and data.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in state.module.state_dict().items()}
    tensors |= {f"optimizer.{k}": v.detach().cpu().contiguous() for k, v in optimizer_state(state.optimizer).items()}
    if state.adversary is not None:
        adv = state.adversary
        tensors |= {f"adversary.{k}": v.detach().cpu().contiguous() for k, v in adv.classifier.state_dict().items()}
        tensors |= {f"adversary_optimizer.{k}": v.detach().cpu().contiguous()
                    for k, v in optimizer_state(adv.optimizer).items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if state.generator is not None:
        tensors["rng.generator"] = state.generator.get_state()
    meta = {"format": "cellvi-train-state", "epoch": state.epoch, "step": state.step, "lr": state.lr,
            "stopped": state.stopped, "stopper": vars(state.stopper), "scheduler": vars(state.scheduler),
            "config": asdict(state.config), "history": state.history, "extra": extra or {}}
    save_file(tensors, str(path / (STATE_TENSORS + ".tmp")))
    (path / (STATE_JSON + ".tmp")).write_text(json.dumps(meta))
    os.replace(path / (STATE_TENSORS + ".tmp"), path / STATE_TENSORS)
    os.replace(path / (STATE_JSON + ".tmp"), path / STATE_JSON)


def read_state_meta(directory: str | os.PathLike) -> dict:
    """The JSON half of a checkpoint, with a clear error when ``directory`` holds none."""
    path = Path(directory)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        ok = meta.get("format") == "cellvi-train-state" and (path / STATE_TENSORS).exists()
    except (OSError, json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{path} holds no cellvi training checkpoint ({STATE_JSON} + {STATE_TENSORS}); "
                         "pass the checkpoint_dir of an earlier train() call.")
    return meta


def restore_state(state: TrainState, directory: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_state` into a freshly started ``state``; returns its ``extra``."""
    meta = read_state_meta(directory)
    try:
        tensors = load_file(str(Path(directory) / STATE_TENSORS))
    except Exception as err:  # safetensors has its own error types for damaged files
        raise ValueError(f"{Path(directory) / STATE_TENSORS} is damaged ({err}).") from err
    device = next(state.module.parameters()).device
    take = lambda prefix: {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    state.module.load_state_dict(take("module."), strict=True)
    load_optimizer_state(state.optimizer, take("optimizer."))
    saved_adversary = any(k.startswith("adversary.") for k in tensors)
    if saved_adversary != (state.adversary is not None):
        raise ValueError(f"The checkpoint in {directory} was written "
                         f"{'with' if saved_adversary else 'without'} an adversarial classifier; resume with "
                         f"adversarial_classifier={saved_adversary}, as the interrupted run.")
    if state.adversary is not None:
        state.adversary.classifier.load_state_dict(take("adversary."), strict=True)
        load_optimizer_state(state.adversary.optimizer, take("adversary_optimizer."))
    torch.set_rng_state(tensors["rng.torch"])
    if state.generator is not None and "rng.generator" in tensors:
        state.generator.set_state(tensors["rng.generator"])
    state.epoch, state.step, state.lr, state.stopped = meta["epoch"], meta["step"], meta["lr"], meta["stopped"]
    vars(state.stopper).update(meta["stopper"])
    vars(state.scheduler).update(meta["scheduler"])
    state.history = {k: list(v) for k, v in meta["history"].items()}
    set_lr(state.optimizer, state.lr)
    return meta["extra"]


def spare_core() -> bool:
    """Whether this process may run on more cores than PyTorch's intra-op threads use (one is left for
    :func:`prefetched`'s gather)."""
    return torch.get_num_threads() < distributed.available_cores()


def prefetched(batches: Iterable[dict]) -> Iterator[dict]:
    """The minibatches of ``batches``, each gathered in a background thread while the caller trains on the one
    before; the one after is not started until the caller asks for the next. The thread's operations run on the
    caller's number of intra-op threads (none is changed: no setting of the process moves).

    Worth it on a spare core (:func:`spare_core`; MrVI on 1 of 2 cores: epochs 3 % shorter eager, 4-10 % compiled).
    When the step's own threads fill every core, the two contend (PeakVI at 2 threads on 2 cores: level to 10 %
    slower), so :func:`fit` gathers in line there (``benchmarks/ab_epochs.py --compare gather``)."""
    items = iter(batches)
    with ThreadPoolExecutor(1, thread_name_prefix="cellvi-gather") as pool:
        ahead = pool.submit(next, items, None)
        while (batch := ahead.result()) is not None:
            ahead = pool.submit(next, items, None)
            yield batch


def fit(
    module: nn.Module,
    train_batches: Callable[[], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]] | None,
    config: TrainConfig,
    *,
    n_obs_train: int,
    n_obs_val: int = 0,
    state: TrainState | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 1,
    adversary: Adversary | None = None,
) -> dict[str, list[float]]:
    """Train ``module`` in place; returns the history, one value per epoch for each key.

    Validation runs every ``check_val_every_n_epoch`` epochs, and every epoch when early stopping or
    the lr schedule watch a validation metric; like scvi-tools, the validation loss uses the current
    KL weight (``elbo_validation`` does not depend on it). ``state`` continues a run (a restored
    checkpoint; default: a fresh start); ``checkpoint(state)`` is called every ``checkpoint_every`` epochs.
    ``adversary`` (of a fresh start; a ``state`` carries its own) trains a classifier against the
    model (:class:`Adversary`); its cross-entropy is logged as ``adversarial_classifier_loss_train``,
    while ``train_loss`` stays the module's own loss.
    """
    watched = config.watched_metrics()
    has_val = val_batches is not None and n_obs_val > 0
    needs_val = [m for m in watched if m.endswith("_validation") or m == "validation_loss"]
    if needs_val and not has_val:
        raise ValueError(f"{needs_val} need validation cells, but the validation set is empty. Lower train_size "
                         "(e.g. 0.9) or monitor a training metric (e.g. 'elbo_train').")
    keep_freed_memory()
    rank, n_ranks = distributed.world()
    if n_ranks > 1:  # data-parallel: same start everywhere, BatchNorm over the global minibatch
        distributed.broadcast_parameters(module)
        distributed.use_global_batch_norm(module)
    if state is not None and adversary is not None:
        raise ValueError("Give the adversary through `state` (TrainState.start(..., adversary=...)), not both.")
    state = TrainState.start(module, config, adversary=adversary) if state is None else state
    optimizer, history, adversary = state.optimizer, state.history, state.adversary
    if adversary is not None and n_ranks > 1:
        distributed.broadcast_parameters(adversary.classifier)
        distributed.use_global_batch_norm(adversary.classifier)
    params = [p for p in module.parameters() if p.requires_grad]
    checkpoint = checkpoint if rank == 0 else None  # only rank 0 writes files
    val_every = 1 if needs_val else config.check_val_every_n_epoch
    warm = dict(n_epochs_kl_warmup=config.n_epochs_kl_warmup, n_steps_kl_warmup=config.n_steps_kl_warmup,
                max_kl_weight=config.max_kl_weight, min_kl_weight=config.min_kl_weight)
    compiled = config.compile_kernels if config.compile_kernels is not None else \
        n_obs_train * (config.max_epochs - state.epoch) >= config.compile_cell_passes
    gather_ahead = spare_core()  # the next minibatch gathered on a spare core while this one trains
    with distributions.compiled_kernels(compiled):  # fused likelihood kernels for long runs
        bar = tqdm(range(state.epoch, config.max_epochs), desc="Epochs", leave=False, initial=state.epoch,
                   total=config.max_epochs, disable=not config.enable_progress_bar or rank != 0)
        for epoch in bar:
            if state.stopped:
                break
            module.train()
            totals = _Totals()
            started = time.perf_counter()
            for batch in (prefetched(train_batches()) if gather_ahead else train_batches()):
                weight = kl_weight(epoch, state.step, **warm)
                out = module.loss(batch, kl_weight=weight)
                loss = out["loss"]
                if adversary is not None:
                    z, labels, kappa = adversary.latent(out), batch[adversary.target], adversary.weight(weight)
                    if kappa > 0:  # the model learns to fool the batch classifier
                        loss = loss + kappa * adversary.fool_loss(z, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if n_ranks > 1:
                    distributed.average_gradients(params, n_ranks)
                if isinstance(optimizer, Adam):  # (clipping inside its fused kernel)
                    optimizer.step(max_grad_norm=config.gradient_clip_val)
                else:
                    if config.gradient_clip_val is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.gradient_clip_val, foreach=True)
                    optimizer.step()
                if adversary is not None:  # then the classifier learns from the detached z
                    out["adversarial_classifier_loss"] = adversary.step(z, labels, kappa, n_ranks)
                totals.add(out)
                state.step += 1
            metrics = totals.read("train", n_obs_train)
            metrics["epoch_seconds"] = time.perf_counter() - started  # training steps only (cellvi's own key)
            metrics["kl_weight"] = kl_weight(epoch, max(state.step - 1, 0), **warm)  # the weight of the last step
            _check_finite(metrics, epoch)
            if has_val and val_every and (epoch + 1) % val_every == 0:
                metrics.update(evaluate(module, val_batches(), "validation", n_obs_val, kl_weight=metrics["kl_weight"]))
            metrics["lr"] = state.lr
            for key, v in metrics.items():
                history.setdefault(key, []).append(v)
            bar.set_postfix(train_loss=f"{metrics['train_loss']:.1f}",
                            cells_per_s=f"{totals.n_cells / max(metrics['epoch_seconds'], 1e-9):.0f}")
            if config.reduce_lr_on_plateau and state.scheduler.update(metrics[config.lr_scheduler_metric]):
                state.lr = max(state.lr * config.lr_factor, config.lr_min)
                set_lr(optimizer, state.lr)
            if config.early_stopping and state.stopper.update(metrics[config.early_stopping_monitor]) \
                    and epoch >= config.early_stopping_warmup_epochs:
                state.stopped = True
            state.epoch = epoch + 1
            if checkpoint is not None and (state.epoch % checkpoint_every == 0 or state.stopped
                                           or state.epoch == config.max_epochs):
                checkpoint(state)
        bar.close()
    module.eval()
    return history


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[dict], split: str, n_obs: int,
             kl_weight: float = 1.0) -> dict[str, float]:
    """The history metrics of ``module`` over ``batches`` in eval mode; the loss at ``kl_weight``."""
    was_training = module.training
    module.eval()
    totals = _Totals()
    for batch in batches:
        totals.add(module.loss(batch, kl_weight=kl_weight))
    module.train(was_training)
    return totals.read(split, n_obs)
