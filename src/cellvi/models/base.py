"""What every cellvi model shares: set-up, training, minibatch iteration, save and load.

A model holds an AnnData, its :class:`~cellvi.data.DataSpec`, a frozen config dataclass and a torch
``module`` (with ``loss(batch, kl_weight)``). Learned state ends in ``_`` (``history_``,
``is_trained_``). Nothing here is specific to one model: the methods that read a model's latent
space or expression live in that model's own file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from safetensors.torch import load_file, save_file
from torch import Tensor

from cellvi import distributed, settings
from cellvi.data import DataSpec, check_compatible, get_spec, setup_anndata
from cellvi.data.backed import BackedCountData, is_on_disk
from cellvi.data.loader import CountData, split_indices
from cellvi.data.setup import UNS_KEY, get_counts
from cellvi.train import (
    Adversary,
    TrainConfig,
    TrainState,
    fit,
    make_train_config,
    read_state_meta,
    restore_state,
    save_state,
)

FORMAT_VERSION = 1
WEIGHTS, META, ADATA = "model.safetensors", "model.json", "adata.h5ad"


def resolve_device(accelerator: str = "auto", device: int | str = "auto") -> torch.device:
    """The torch device of ``accelerator`` ("auto", "cpu", "gpu"/"cuda", "mps") and a device index ``device``."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"accelerator={accelerator!r} but no CUDA GPU is available; use accelerator='cpu'.")
        return torch.device("cuda", 0 if device == "auto" else int(device))
    if accelerator in ("cpu", "mps"):
        return torch.device(accelerator)
    raise ValueError(f"Unknown accelerator {accelerator!r}; use 'auto', 'cpu' or 'gpu'.")


def training_device(accelerator: str, devices) -> torch.device:
    """``devices`` with Lightning's meaning: a count (1, or -1 for all), a list of indices, or "auto"."""
    if isinstance(devices, (list, tuple)):
        if len(devices) != 1:
            raise ValueError(f"devices={devices!r}: training on several devices is not supported yet; name one.")
        return resolve_device(accelerator, int(devices[0]))
    if devices in ("auto", 1, -1, "1", "-1"):
        return resolve_device(accelerator, "auto")
    raise ValueError(f"devices={devices!r}: several devices run as several processes (see cellvi.distributed); "
                     "this process trains on one.")


def max_epochs_heuristic(n_obs: int) -> int:
    """scvi-tools' default: 400 epochs for <= 20k cells, fewer for more (at least 1)."""
    return max(int(np.round(min((20_000 / n_obs) * 400, 400))), 1)


def as_indices(indices, n_obs: int) -> np.ndarray:
    """Integer row indices from ``None`` (all), a boolean mask or integer positions."""
    if indices is None:
        return np.arange(n_obs)
    arr = np.asarray(indices)
    if arr.dtype == bool:
        if arr.shape != (n_obs,):
            raise ValueError(f"A boolean mask of indices must have length {n_obs}, got {arr.shape}.")
        return np.flatnonzero(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices must be integers or a boolean mask, got dtype {arr.dtype}.")
    arr = arr.ravel().astype(np.int64)
    if arr.size and (arr.min() < -n_obs or arr.max() >= n_obs):
        raise ValueError(f"indices out of range for {n_obs} cells.")
    return arr % n_obs if arr.size else arr


def importance_log_marginal(log_weights: Callable[[int], Tensor], n_mc_samples: int, chunk: int = 100) -> Tensor:
    """``log (1/K) sum_k exp(w_k)`` per cell from ``K = n_mc_samples`` importance log weights, drawn ``chunk`` at
    a time by ``log_weights(k) -> (k, cells)`` (memory bounded by ``chunk x cells x features``)."""
    if n_mc_samples < 1:
        raise ValueError(f"n_mc_samples={n_mc_samples}: use at least 1.")
    log_w = torch.cat([log_weights(min(chunk, n_mc_samples - start)) for start in range(0, n_mc_samples, chunk)])
    return torch.logsumexp(log_w, 0) - math.log(n_mc_samples)


def cell_mean(per_cell: np.ndarray) -> float:
    """Mean of a per-cell quantity; refuses an empty selection instead of returning NaN."""
    if per_cell.size == 0:
        raise ValueError("No cells selected (`indices` is empty); select at least one cell.")
    return float(per_cell.mean())


def check_library_size(library_size) -> None:
    """``library_size`` of the expression methods: a positive number or ``"latent"``."""
    if isinstance(library_size, str):
        if library_size != "latent":
            raise ValueError(f"library_size={library_size!r}: use a positive number (e.g. 1e4) or 'latent'.")
    elif not (np.isscalar(library_size) and np.isfinite(library_size) and library_size > 0):
        raise ValueError(f"library_size={library_size!r}: use a positive number (e.g. 1e4) or 'latent'.")


def expression_from(px, library: Tensor, library_size) -> Tensor:
    """What the expression methods report from p(x | z, l) (``library`` is log library size):

    ``"latent"``: expected counts at the cell's library (scvi-tools' ``mu``); a number ``L``: the
    normalized expression ``rho * L``; ``"mean"`` (DE): expected counts per unit library,
    ``(1 - pi) * rho`` for ZINB.
    """
    if library_size == "mean":  # px.mean / exp(library), without forming either
        zi = getattr(px, "zi_logits", None)
        return px.scale if zi is None else px.scale * torch.sigmoid(-zi)
    if library_size == "latent":
        return px.mu
    return px.scale * library_size


def average_over_batches(decode: Callable[[Tensor], Tensor], own_batch: Tensor, codes: list[int | None]) -> Tensor:
    """Mean of ``decode(batch codes)`` over ``codes`` (``None``: each cell's own batch): batch-corrected expression."""
    total = 0.0
    for code in codes:
        total = total + decode(own_batch if code is None else torch.full_like(own_batch, code))
    return total / len(codes)


def epoch_batches(data, rows: Tensor, batch_size: int, generator: torch.Generator, min_size: int):
    """One training epoch of minibatches over ``rows``, shuffled; under ``torchrun`` only this rank's shard
    of every global minibatch (see :func:`cellvi.distributed.shard_rows`)."""
    rank, size = distributed.world()
    if size == 1:
        return data.batches(rows, batch_size, shuffle=True, generator=generator, min_size=min_size)
    perm = rows[torch.randperm(rows.numel(), generator=generator).to(rows.device)]
    return data.batches(distributed.shard_rows(perm, batch_size, rank, size, min_size), batch_size)


def _last_batch_min_size(batch_size: int, datasplitter_kwargs: dict | None) -> int:
    """Smallest training minibatch kept: 3 (a batch of 1-2 cells breaks BatchNorm), or all with ``drop_last``."""
    kwargs = dict(datasplitter_kwargs or {})
    drop_last = kwargs.pop("drop_last", False)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pin_memory", "num_workers", "persistent_workers")}
    if kwargs:
        raise ValueError(f"datasplitter_kwargs {sorted(kwargs)} are not supported; cellvi takes 'drop_last'.")
    return batch_size if drop_last else 3


class Model:
    """Base of all models: ``setup_anndata`` -> ``Model(adata, ...)`` -> ``train`` -> results / ``save``."""

    config_class: type = None  # the model's frozen config dataclass

    def __init__(self, adata: AnnData, config):
        self.adata = adata
        self.spec: DataSpec = get_spec(adata)
        if self.spec.model_class not in (None, type(self).__name__):
            raise ValueError(f"adata was set up with {self.spec.model_class}.setup_anndata, not {type(self).__name__}'s; "
                             f"call cellvi.{type(self).__name__}.setup_anndata(adata, ...) first.")
        check_compatible(self.spec, adata)
        self.config = config
        self.history_: dict[str, list[float]] = {}
        self.is_trained_ = False
        self.train_indices_ = self.validation_indices_ = None
        self._data_cache: tuple | None = None
        self._sample_info: pd.DataFrame | None = None

    # ------------------------------------------------------------------ set-up

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Validate ``adata`` and record which layer and ``.obs`` columns the model reads.

        Parameters
        ----------
        adata
            Raw counts in ``X`` or in ``layers[layer]``; cells as rows.
        layer
            Layer with the raw counts; ``None`` reads ``adata.X``.
        batch_key
            ``.obs`` column of batches, corrected for.
        labels_key
            ``.obs`` column of cell labels (used by ``dispersion="gene-label"``).
        size_factor_key
            ``.obs`` column of positive size factors used instead of the observed library size.
        categorical_covariate_keys, continuous_covariate_keys
            Extra ``.obs`` columns the decoder is conditioned on.

        Returns
        -------
        None; the set-up is stored as JSON in ``adata.uns["_cellvi_setup"]``.
        """
        setup_anndata(adata, layer=layer, batch_key=batch_key, labels_key=labels_key,
                      size_factor_key=size_factor_key, categorical_covariate_keys=categorical_covariate_keys,
                      continuous_covariate_keys=continuous_covariate_keys, model_class=cls.__name__)

    # ------------------------------------------------------------------ data

    @property
    def device(self) -> torch.device:
        module = getattr(self, "module", None)  # before the module exists (in __init__): the CPU
        return torch.device("cpu") if module is None else next(module.parameters()).device

    @property
    def is_trained(self) -> bool:
        return self.is_trained_

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch training history, as in scvi-tools: ``history["elbo_train"]`` is a one-column DataFrame."""
        out = {}
        for key, values in self.history_.items():
            out[key] = pd.DataFrame({key: values}, index=pd.Index(np.arange(len(values)), name="epoch"))
        return out

    @property
    def sample_info(self) -> pd.DataFrame:
        """One row per sample (in the set-up's sample order): the ``.obs`` columns constant within every sample.

        Categorical dtypes are kept. Assign a DataFrame with the same rows to change it, e.g. after
        reordering a covariate's categories to choose the reference level of a contrast.
        """
        if self._sample_info is None:
            self._sample_info = sample_table(self.adata, self.spec)
        return self._sample_info

    @sample_info.setter
    def sample_info(self, value: pd.DataFrame) -> None:
        if not isinstance(value, pd.DataFrame) or len(value) != self.spec.n_samples:
            raise ValueError(f"sample_info must be a DataFrame with one row per sample ({self.spec.n_samples}).")
        self._sample_info = value

    def _data(self, adata: AnnData | None = None) -> CountData | BackedCountData:
        """The minibatch source of ``adata`` (default: the model's): in memory, or read in chunks when its
        counts stay on disk (backed .h5ad, zarr); cached for the model's own AnnData."""
        adata = self.adata if adata is None else adata
        key = (id(adata), str(self.device))
        if adata is self.adata and self._data_cache is not None and self._data_cache[0] == key:
            return self._data_cache[1]
        on_disk = is_on_disk(get_counts(adata, self.spec.layer))
        data = (BackedCountData if on_disk else CountData)(adata, self.spec, self.device)
        if adata is self.adata:
            self._data_cache = (key, data)
        return data

    def _minibatches(self, adata: AnnData | None, indices, batch_size: int | None):
        data = self._data(adata)
        idx = torch.as_tensor(as_indices(indices, data.n_obs), device=data.device)
        return data.batches(idx, batch_size or settings.batch_size)

    @torch.no_grad()
    def _per_cell(self, adata: AnnData | None, indices, batch_size: int | None,
                  fn: Callable[[dict[str, Tensor]], Tensor]) -> np.ndarray:
        """``fn(minibatch)``, a ``(cells, ...)`` tensor, over the selected cells in eval mode, concatenated over
        cells (an empty float32 array for no cells)."""
        self.module.eval()
        vals = [fn(b).cpu() for b in self._minibatches(adata, indices, batch_size)]
        return torch.cat(vals).numpy() if vals else np.zeros(0, np.float32)

    @torch.no_grad()
    def get_elbo(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None,
                 return_mean: bool = True):
        """The evidence lower bound of each cell (higher is better): ``-(reconstruction_loss + kl_local)`` of
        the model's loss at KL weight 1, one posterior draw (the terms the training loop averages into
        ``elbo_validation``), as scvi-tools.

        Returns
        -------
        A float (the mean over cells) or, with ``return_mean=False``, a ``(cells,)`` array.
        """
        def elbo(batch: dict) -> Tensor:
            out = self.module.loss(batch)
            return -(out["reconstruction_loss"] + out["kl_local"])

        per_cell = self._per_cell(adata, indices, batch_size, elbo)
        return cell_mean(per_cell) if return_mean else per_cell

    @torch.no_grad()
    def get_reconstruction_error(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None,
                                 return_mean: bool = True) -> dict:
        """``{"reconstruction_loss": -log p(x | z)}`` of each cell at one posterior draw (lower is better): a
        float (the mean over cells) or, with ``return_mean=False``, a ``(cells,)`` array."""
        per_cell = self._per_cell(adata, indices, batch_size, lambda b: self.module.loss(b)["reconstruction_loss"])
        return {"reconstruction_loss": cell_mean(per_cell) if return_mean else per_cell}

    def _batch_codes(self, transform_batch) -> list[int | None]:
        """Codes of the batches to decode as (``None``: each cell's own batch)."""
        if transform_batch is None:
            return [None]
        values = transform_batch if isinstance(transform_batch, (list, tuple, np.ndarray, pd.Index)) \
            else [transform_batch]
        cats = self.spec.batch_categories
        codes = []
        for v in values:
            if str(v) not in cats:
                raise ValueError(f"transform_batch {v!r} is not a batch the model knows ({list(cats)}).")
            codes.append(cats.index(str(v)))
        return codes

    def _gene_mask(self, gene_list) -> np.ndarray | None:
        """Positions of ``gene_list`` in the model's genes, in the model's gene order (as scvi-tools)."""
        if gene_list is None:
            return None
        names = pd.Index(self.spec.var_names)
        gene_list = [gene_list] if isinstance(gene_list, str) else list(gene_list)
        missing = [g for g in gene_list if g not in names]
        if missing:
            raise ValueError(f"gene_list has genes the model does not know: {missing[:10]}.")
        return np.flatnonzero(names.isin(gene_list))

    def _expression_rows(self, adata: AnnData | None, indices, n_samples_overall: int | None):
        """(the AnnData, the rows) an expression method reads; ``n_samples_overall`` draws that many rows
        at random, with replacement, from ``indices`` (each then decoded with its own posterior draw)."""
        adata_ = self.adata if adata is None else adata
        idx = as_indices(indices, adata_.n_obs)
        if n_samples_overall is not None:
            if idx.size == 0:
                raise ValueError("n_samples_overall needs at least one cell in `indices`.")
            idx = np.random.default_rng(settings.seed).choice(idx, int(n_samples_overall))
        return adata_, idx

    def _decode(self, adata: AnnData | None, idx: np.ndarray, batch_size: int | None, genes: np.ndarray | None,
                decode: Callable[[dict], dict[str, Tensor]], kinds: tuple[str, ...],
                n_samples: int) -> dict[str, np.ndarray]:
        """Run ``decode`` (minibatch -> {kind: (n_samples, cells, genes) tensor}, ``kinds``) over the rows ``idx``
        and gather each kind on the CPU, keeping only ``genes``; empty rows give ``(n_samples, 0, genes)``."""
        self.module.eval()
        chunks: dict[str, list[Tensor]] = {}
        gene_idx = None if genes is None else torch.as_tensor(genes, device=self.device)
        with torch.no_grad():
            for batch in self._minibatches(adata, idx, batch_size):
                for kind, expr in decode(batch).items():
                    chunks.setdefault(kind, []).append((expr if gene_idx is None else expr[..., gene_idx]).cpu())
        n_genes = self.spec.n_genes if genes is None else len(genes)
        if not chunks:
            return {kind: np.zeros((n_samples, 0, n_genes), np.float32) for kind in kinds}
        return {kind: torch.cat(v, 1).numpy() for kind, v in chunks.items()}

    @torch.no_grad()
    def _latent(self, adata: AnnData | None, indices, batch_size: int | None, infer: Callable[[dict], dict], *,
                n_latent: int, give_mean: bool = True, mc_samples: int = 5000, return_dist: bool = False,
                logistic_normal: bool = False):
        """The latent of each cell from ``infer(minibatch) -> {"qz": Normal, "z": sample}``: the posterior mean
        (``give_mean``; for a logistic-normal latent the mean of ``mc_samples`` softmaxed draws) or the sample,
        or with ``return_dist`` the tuple ``(means, variances)``; ``(0, n_latent)`` arrays for no cells."""
        self.module.eval()
        out, variances = [], []
        for batch in self._minibatches(adata, indices, batch_size):
            inf = infer(batch)
            qz = inf["qz"]
            if return_dist:
                out.append(qz.loc.cpu())
                variances.append(qz.variance.cpu())
            elif logistic_normal:
                out.append((torch.softmax(qz.sample((mc_samples,)), -1).mean(0) if give_mean else inf["z"]).cpu())
            else:
                out.append((qz.loc if give_mean else inf["z"]).cpu())
        empty = torch.zeros(0, n_latent)
        if return_dist:
            return torch.cat([empty, *out]).numpy(), torch.cat([empty, *variances]).numpy()
        return torch.cat([empty, *out]).numpy()

    def _expression_output(self, expr: np.ndarray, adata: AnnData, idx: np.ndarray, genes: np.ndarray | None,
                           return_mean: bool, return_numpy: bool | None):
        """``(n_samples, cells, genes)`` draws -> scvi-tools' output: averaged over samples when ``return_mean``
        (or one sample), a DataFrame named by cells and genes unless numpy is asked for or the result is 3-D."""
        expr = expr.mean(0) if (return_mean or expr.shape[0] == 1) else expr
        if return_numpy or expr.ndim == 3:
            return expr
        names = pd.Index(self.spec.var_names)
        return pd.DataFrame(expr, index=adata.obs_names[idx], columns=names if genes is None else names[genes])

    # ------------------------------------------------------------------ training

    @distributed.spawns_processes
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config: dict | None = None,
        *,
        seed: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        resume_from: str | os.PathLike | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the model with Adam on minibatches of cells (scvi-tools' arguments, in its order).

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``min(400, 400 * 20000 / n_cells)`` as in scvi-tools.
        accelerator, devices
            ``"auto"`` uses a CUDA GPU when present, ``"cpu"`` forces the CPU. ``devices``: a count, -1
            (every GPU) or a list of GPU indices, as in Lightning; more than one trains data-parallel in
            that many processes on this machine (as ``torchrun --nproc_per_node N`` would; see
            :mod:`cellvi.distributed`; ``batch_size`` is per process).
        train_size, validation_size
            Fractions of cells for training (default 0.9) and validation (default: the rest).
        shuffle_set_split
            Split cells at random (``False``: in order, validation cells first, as scvi-tools).
        load_sparse_tensor
            Accepted for compatibility and ignored: minibatches are always gathered from the sparse matrix.
        batch_size
            Cells per minibatch.
        early_stopping
            Stop when ``early_stopping_monitor`` (default ``"elbo_validation"``) has not improved by
            ``early_stopping_min_delta`` for ``early_stopping_patience`` (45) epochs. Refused when the
            monitored metric needs validation cells and there are none.
        datasplitter_kwargs
            ``{"drop_last": True}`` drops the last incomplete training minibatch of each epoch.
        plan_kwargs, plan_config
            scvi-tools' training-plan options: ``lr`` (1e-3), ``weight_decay`` (1e-6), ``eps`` (0.01),
            ``optimizer`` ("Adam" or "AdamW"), ``n_epochs_kl_warmup`` (400), ``n_steps_kl_warmup``,
            ``max_kl_weight``, ``min_kl_weight``, ``reduce_lr_on_plateau``, ``lr_factor``, ``lr_patience``,
            ``lr_threshold``, ``lr_scheduler_metric``, ``lr_min``, ``adversarial_classifier`` and
            ``scale_adversarial_loss`` (models whose loss returns its latent ``"z"``, e.g. TotalVI; see
            :class:`cellvi.train.Adversary`); cellvi's ``compile_kernels`` (fuse the
            likelihood's elementwise passes with ``torch.compile``: ~10 s once, then faster steps; MrVI compiles
            its whole network too) and ``compile_cell_passes`` (``compile_kernels=None``, the default, turns it on
            for runs of at least this many cells x epochs: 500,000; MrVI 2,000,000, its compilation takes
            longer). See
            :class:`cellvi.train.TrainConfig`.
        datamodule
            Not supported (cellvi reads the model's AnnData); must be ``None``.
        trainer_config, **trainer_kwargs
            scvi-tools' trainer options: ``early_stopping_monitor``, ``early_stopping_patience``,
            ``early_stopping_min_delta``, ``early_stopping_warmup_epochs``, ``early_stopping_mode``,
            ``gradient_clip_val`` (``None``: no clipping), ``check_val_every_n_epoch``,
            ``enable_progress_bar`` (default ``cellvi.settings.progress_bar``). Lightning-only options
            (``logger``, ``log_every_n_steps``, ...) are ignored; unknown names are refused. As a
            convenience, plan options may be given here too (``train(lr=1e-3)``).
        seed
            cellvi only: seed of the split, shuffling and sampling (default ``cellvi.settings.seed``).
        checkpoint_dir, checkpoint_every
            cellvi only: write the training state (weights, optimizer, counters, random generators,
            history; safetensors + JSON) to this folder every ``checkpoint_every`` epochs and at the end.
        resume_from
            cellvi only: a ``checkpoint_dir`` of an earlier run of this model on the same data (same
            seed and split): training continues from it and ends where an uninterrupted run ends.

        Returns
        -------
        None; ``history_`` (and ``history``) get scvi-tools' keys (``elbo_train``, ``elbo_validation``, ...).
        """
        config, generator = self._training_setup(
            max_epochs, accelerator, devices, early_stopping, datamodule,
            {**(plan_config or {}), **(plan_kwargs or {})}, {**(trainer_config or {}), **trainer_kwargs}, seed)
        data = self._data()
        train_idx, val_idx = split_indices(data.n_obs, train_size, validation_size, shuffle=shuffle_set_split,
                                           generator=generator)
        self.train_indices_, self.validation_indices_ = train_idx.numpy(), val_idx.numpy()
        train_idx, val_idx = train_idx.to(data.device), val_idx.to(data.device)
        min_size = _last_batch_min_size(batch_size, datasplitter_kwargs)
        self._fit(
            config, generator,
            lambda: epoch_batches(data, train_idx, batch_size, generator, min_size),
            lambda: data.batches(val_idx[distributed.world()[0] :: distributed.world()[1]], batch_size),
            n_obs_train=train_idx.numel(), n_obs_val=val_idx.numel(), checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, resume_from=resume_from,
        )

    def _fit(self, config: TrainConfig, generator: torch.Generator, train_batches, val_batches, *, n_obs_train: int,
             n_obs_val: int, checkpoint_dir=None, checkpoint_every: int = 1, resume_from=None) -> None:
        """Run :func:`cellvi.train.fit` from a fresh or a restored training state, checkpointing if asked."""
        state = TrainState.start(self.module, config, generator, adversary=self._adversary(config))
        identity = self._checkpoint_identity()
        if resume_from is not None:
            theirs = read_state_meta(resume_from)["extra"]
            diff = [k for k in identity if theirs.get(k) != identity[k]]
            if diff:
                raise ValueError(f"The checkpoint in {resume_from} is of another model, other data or another "
                                 f"split (differs in: {diff}); resume with the model, data and train() arguments "
                                 "(seed, train_size, validation_size) of the interrupted run.")
            restore_state(state, resume_from)
        save = None if checkpoint_dir is None else (lambda st: save_state(st, checkpoint_dir, identity))
        history = fit(self.module, train_batches, val_batches, config, n_obs_train=n_obs_train, n_obs_val=n_obs_val,
                      state=state, checkpoint=save, checkpoint_every=checkpoint_every)
        self._record(history)

    def _adversary(self, config: TrainConfig) -> Adversary | None:
        """scvi-tools' adversarial batch classifier on z when ``config.adversarial_classifier`` (see
        :class:`cellvi.train.Adversary`); with a single batch there is nothing to classify: a warning, and none."""
        if not config.adversarial_classifier:
            return None
        if self.spec.n_batches < 2:
            warnings.warn("adversarial_classifier=True with a single batch: nothing to classify; training without it.",
                          UserWarning, stacklevel=4)
            return None
        n_latent = getattr(self.module, "n_latent", None)
        if n_latent is None:
            raise ValueError(f"{type(self).__name__} does not support adversarial_classifier; train without it.")
        return Adversary.for_batches(n_latent, self.spec.n_batches, config, self.device)

    def _checkpoint_identity(self) -> dict:
        """What a checkpoint must share with the run that resumes it: class, data set-up, config, split."""
        digest = lambda a: hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()  # noqa: E731
        return {"model_class": type(self).__name__, "spec": self.spec.to_json(),
                "config": json.dumps(asdict(self.config), sort_keys=True),
                "train_indices": digest(self.train_indices_), "validation_indices": digest(self.validation_indices_)}

    train_defaults: dict = {}  # a model's own defaults for TrainConfig fields (e.g. MrVI's lr), as scvi-tools'

    def _training_setup(self, max_epochs, accelerator, devices, early_stopping, datamodule, plan_kwargs: dict,
                        trainer_kwargs: dict, seed: int | None) -> tuple[TrainConfig, torch.Generator]:
        """The part of ``train`` every model shares: the config (built once, here), the device and the seeds."""
        if datamodule is not None:
            raise ValueError("datamodule is not supported: cellvi trains on the model's AnnData; pass datamodule=None.")
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress_bar)
        config = make_train_config(
            max_epochs=max_epochs_heuristic(self.adata.n_obs) if max_epochs is None else max_epochs,
            early_stopping=early_stopping, plan_kwargs=plan_kwargs, trainer_kwargs=trainer_kwargs,
            defaults=self.train_defaults)
        seed = settings.seed if seed is None else seed
        torch.manual_seed(seed)  # dropout and reparameterised samples
        generator = torch.Generator().manual_seed(seed)  # split and shuffling
        device = distributed.local_device(training_device(accelerator, devices))
        self.module.to(device)
        distributed.init_from_env(device)  # under torchrun: join the process group
        return config, generator

    def _record(self, history: dict[str, list[float]]) -> None:
        """Append a training run's history (a second ``train`` call continues the curves)."""
        for key, values in history.items():
            self.history_.setdefault(key, []).extend(values)
        self.is_trained_ = True

    # ------------------------------------------------------------------ save / load

    def save(self, dir_path: str | os.PathLike, prefix: str | None = None, overwrite: bool = False,
             save_anndata: bool = False) -> None:
        """Write ``model.safetensors`` (weights) and ``model.json`` (config, data set-up, history).

        Parameters
        ----------
        dir_path
            Folder to create (or overwrite, with ``overwrite=True``).
        prefix
            Prefix of the file names (``<prefix>model.json``, ...), as in scvi-tools.
        overwrite
            Replace the model files in an existing folder; a stale ``adata.h5ad`` of an earlier save
            is removed unless ``save_anndata`` writes a new one.
        save_anndata
            Also write the AnnData to ``adata.h5ad`` in the folder.
        """
        path, names = Path(dir_path), _file_names(prefix)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise ValueError(f"{path} already exists and is not empty; pass overwrite=True to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(path / names[WEIGHTS]))
        (path / names[META]).write_text(json.dumps(self._meta()))
        if save_anndata:
            self.adata.write_h5ad(path / names[ADATA])
        else:
            (path / names[ADATA]).unlink(missing_ok=True)  # never leave an older AnnData that load() would read

    def _meta(self) -> dict:
        """What ``model.json`` holds: format, class, config, data set-up, history, split (models may add)."""
        from cellvi import __version__

        return {
            "format": "cellvi-model",
            "format_version": FORMAT_VERSION,
            "cellvi_version": __version__,
            "model_class": type(self).__name__,
            "config": asdict(self.config),
            "spec": json.loads(self.spec.to_json()),
            "history": self.history_,
            "is_trained": self.is_trained_,
            "train_indices": None if self.train_indices_ is None else self.train_indices_.tolist(),
            "validation_indices": None if self.validation_indices_ is None else self.validation_indices_.tolist(),
        }

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None, accelerator: str = "auto",
             device: int | str = "auto", prefix: str | None = None):
        """Load a model written by :meth:`save`; never unpickles anything.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Data with the same genes (same order) and known categories; ``None`` reads the saved
            ``adata.h5ad``.
        accelerator, device
            Where to put the model (``"auto"``: a CUDA GPU when present) and the GPU index.
        prefix
            Prefix the files were saved with.
        """
        path, names = Path(dir_path), _file_names(prefix)
        meta = _read_meta(path, names)
        if meta["model_class"] != cls.__name__:
            raise ValueError(f"{path} holds a {meta['model_class']} model; load it with cellvi.{meta['model_class']}.load.")
        spec = DataSpec.from_json(json.dumps(meta["spec"]))
        if adata is None:
            if not (path / names[ADATA]).exists():
                raise ValueError(f"No adata given and none saved in {path}; pass `adata=`.")
            import anndata

            adata = anndata.read_h5ad(path / names[ADATA])
        _adopt_spec(adata, spec)
        config_fields = {f.name for f in fields(cls.config_class)}
        saved = {**getattr(cls.config_class, "SAVED_BEFORE", {}), **meta["config"]}  # older files lack new fields
        model = cls(adata, **{k: v for k, v in saved.items() if k in config_fields})
        model.module.load_state_dict(_read_weights(path / names[WEIGHTS]), strict=True)
        model.module.to(resolve_device(accelerator, device))
        model.module.eval()
        model.history_ = {k: list(v) for k, v in meta["history"].items()}
        model.is_trained_ = bool(meta["is_trained"])
        for name in ("train_indices", "validation_indices"):
            if meta.get(name) is not None:
                setattr(model, name + "_", np.asarray(meta[name], dtype=np.int64))
        model._restore(meta)
        return model

    def _restore(self, meta: dict) -> None:
        """Model-specific state from ``model.json`` (see :meth:`_meta`); nothing in the base model."""

    def __repr__(self) -> str:
        state = "trained" if self.is_trained_ else "not trained"
        return (f"{type(self).__name__}({self.adata.n_obs} cells x {self.spec.n_genes} genes, "
                f"{self.spec.n_batches} batches; {state})")


def _file_names(prefix: str | None) -> dict[str, str]:
    return {name: f"{prefix or ''}{name}" for name in (WEIGHTS, META, ADATA)}


def _read_meta(path: Path, names: dict[str, str]) -> dict:
    """``model.json`` of a saved model, refusing folders, files and formats that are not cellvi's."""
    meta_file, weights = path / names[META], path / names[WEIGHTS]
    if not meta_file.exists() or not weights.exists():
        hint = " It looks like a scvi-tools model (model.pt, a pickle), which cellvi does not read." \
            if (path / "model.pt").exists() else ""
        raise ValueError(f"{path} does not hold a cellvi model ({names[META]} and {names[WEIGHTS]} expected).{hint}")
    try:
        meta = json.loads(meta_file.read_text())
        ok = isinstance(meta, dict) and meta.get("format") == "cellvi-model"
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{meta_file} is damaged or not a cellvi model file (not the JSON cellvi writes). "
                         "Save the model again.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{meta_file} was written by a newer cellvi (format_version {meta.get('format_version')}, "
                         f"this version reads <= {FORMAT_VERSION}); upgrade cellvi.")
    missing = [k for k in ("model_class", "config", "spec", "history", "is_trained") if k not in meta]
    if missing:
        raise ValueError(f"{meta_file} is damaged: it lacks {missing}. Save the model again.")
    return meta


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a clear error when it is truncated or not safetensors."""
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{file} is damaged or not a safetensors file ({err}). Save the model again.") from err


def _adopt_spec(adata: AnnData, spec: DataSpec) -> None:
    """Give ``adata`` the model's set-up, refusing data set up with other keys or other genes."""
    check_compatible(spec, adata)
    if UNS_KEY in adata.uns:
        theirs = get_spec(adata)
        keys = ["layer", "batch_key", "labels_key", "sample_key", "size_factor_key", "categorical_covariate_keys",
                "continuous_covariate_keys", "protein_expression_obsm_key", "panel_key"]
        diff = [f"{k}: model {getattr(spec, k)!r} vs adata {getattr(theirs, k)!r}"
                for k in keys if getattr(spec, k) != getattr(theirs, k)]
        if diff:
            raise ValueError("adata was set up differently from the model: " + "; ".join(diff)
                             + ". Set it up with the model's keys (or not at all).")
    adata.uns[UNS_KEY] = spec.to_json()


def sample_table(adata: AnnData, spec: DataSpec) -> pd.DataFrame:
    """One row per sample of ``spec`` with the ``.obs`` columns of ``adata`` constant within each sample.

    Rows follow ``spec.sample_categories``; a sample absent from ``adata`` gets missing values.
    """
    if spec.sample_key is None:
        raise ValueError("No sample_key was set up; call setup_anndata(adata, sample_key=...) first.")
    obs = adata.obs
    key = obs[spec.sample_key].astype(str)
    n_distinct = obs.groupby(key.to_numpy(), observed=True).nunique(dropna=False)  # (samples present, columns)
    constant = [c for c in obs.columns if c == spec.sample_key or bool((n_distinct[c] <= 1).all())]
    first = obs.loc[~key.duplicated().to_numpy(), constant]
    first.index = key[~key.duplicated()].to_numpy()
    table = first.reindex(list(spec.sample_categories))
    for c in constant:  # reindex may turn a categorical column into object when a sample is missing: restore it
        if isinstance(obs[c].dtype, pd.CategoricalDtype):
            table[c] = pd.Categorical(table[c], categories=obs[c].cat.categories, ordered=obs[c].cat.ordered)
    table.index = pd.RangeIndex(spec.n_samples, name="_sample_index")
    return table
