"""What every cellvi model shares: set-up, training, minibatch iteration, save and load.

A model holds an AnnData, its :class:`~cellvi.data.DataSpec`, a frozen config dataclass and a torch
``module`` (with ``loss(batch, kl_weight)``). Learned state ends in ``_`` (``history_``,
``is_trained_``). Nothing here is specific to one model: the methods that read a model's latent
space or expression live in that model's own file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from safetensors.torch import load_file, save_file

from cellvi import settings
from cellvi.data import DataSpec, check_compatible, get_spec, setup_anndata
from cellvi.data.loader import CountData, split_indices
from cellvi.data.setup import UNS_KEY
from cellvi.train import TrainConfig, fit

FORMAT_VERSION = 1
WEIGHTS, META, ADATA = "model.safetensors", "model.json", "adata.h5ad"


def resolve_device(accelerator: str = "auto", device: int | str = "auto") -> torch.device:
    """``accelerator`` in {"auto", "cpu", "gpu", "cuda", "mps"}; ``device`` an index or "auto"."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"accelerator={accelerator!r} but no CUDA GPU is available; use accelerator='cpu'.")
        return torch.device("cuda", 0 if device == "auto" else int(device))
    if accelerator in ("cpu", "mps"):
        return torch.device(accelerator)
    raise ValueError(f"Unknown accelerator {accelerator!r}; use 'auto', 'cpu' or 'gpu'.")


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

    def _data(self, adata: AnnData | None = None) -> CountData:
        """Tensors of ``adata`` (default: the model's) on the model's device; cached for the model's own."""
        adata = self.adata if adata is None else adata
        key = (id(adata), str(self.device))
        if adata is self.adata and self._data_cache is not None and self._data_cache[0] == key:
            return self._data_cache[1]
        data = CountData(adata, self.spec, self.device)
        if adata is self.adata:
            self._data_cache = (key, data)
        return data

    def _minibatches(self, adata: AnnData | None, indices, batch_size: int | None):
        data = self._data(adata)
        idx = torch.as_tensor(as_indices(indices, data.n_obs), device=data.device)
        return data.batches(idx, batch_size or settings.batch_size)

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
        if gene_list is None:
            return None
        names = pd.Index(self.spec.var_names)
        missing = [g for g in gene_list if g not in names]
        if missing:
            raise ValueError(f"gene_list has genes the model does not know: {missing[:10]}.")
        return names.get_indexer(gene_list)

    def _expression_rows(self, adata: AnnData | None, indices, n_samples_overall: int | None):
        """(the AnnData, the rows) an expression method reads; ``n_samples_overall`` resamples the rows."""
        adata_ = self.adata if adata is None else adata
        idx = as_indices(indices, adata_.n_obs)
        if n_samples_overall is not None:
            idx = np.random.default_rng(0).choice(idx, n_samples_overall)
        return adata_, idx

    def _expression_output(self, expr: np.ndarray, adata: AnnData, idx: np.ndarray, gene_list, return_mean: bool,
                           return_numpy: bool | None):
        """``(n_samples, cells, genes)`` draws -> scvi-tools' output: averaged over samples when ``return_mean``
        (or one sample), a DataFrame named by cells and genes unless numpy is asked for or the result is 3-D."""
        expr = expr.mean(0) if (return_mean or expr.shape[0] == 1) else expr
        if return_numpy or expr.ndim == 3:
            return expr
        names = list(self.spec.var_names) if gene_list is None else list(gene_list)
        return pd.DataFrame(expr, index=adata.obs_names[idx], columns=names)

    # ------------------------------------------------------------------ training

    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 1e-3,
        accelerator: str = "auto",
        devices: int | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_monitor: str = "elbo_validation",
        early_stopping_min_delta: float = 0.0,
        n_epochs_kl_warmup: int | None = 400,
        n_steps_kl_warmup: int | None = None,
        max_kl_weight: float = 1.0,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        gradient_clip_val: float | None = None,
        check_val_every_n_epoch: int | None = None,
        enable_progress_bar: bool | None = None,
        seed: int | None = None,
    ) -> None:
        """Train the model with Adam on minibatches of cells.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``min(400, 400 * 20000 / n_cells)`` as in scvi-tools.
        lr, weight_decay, eps
            Adam settings.
        accelerator, devices
            ``"auto"`` uses a CUDA GPU when present; ``"cpu"`` forces the CPU.
        train_size, validation_size
            Fractions of cells for training and validation (the rest is unused).
        shuffle_set_split
            Split cells at random (``False``: the first cells train, the next validate).
        batch_size
            Cells per minibatch.
        early_stopping, early_stopping_patience, early_stopping_monitor, early_stopping_min_delta
            Stop when ``early_stopping_monitor`` (default ``elbo_validation``) has not improved by
            ``min_delta`` for ``patience`` epochs.
        n_epochs_kl_warmup, n_steps_kl_warmup, max_kl_weight
            The KL term's weight rises linearly from 0 to ``max_kl_weight`` over these epochs (or steps).
        gradient_clip_val
            Clip the global gradient norm to this value (``None``, the default as in scvi-tools: no
            clipping). Set it (e.g. 50) for data that produce occasional huge gradients.
        check_val_every_n_epoch
            Compute validation metrics every n epochs (every epoch with early stopping).
        enable_progress_bar
            Show a progress bar (default ``cellvi.settings.progress_bar``).
        seed
            Seed of the split, shuffling and sampling (default ``cellvi.settings.seed``): same seed, same model.
        """
        data, config, generator = self._prepare_training(
            max_epochs, lr, accelerator, devices, early_stopping, early_stopping_patience, early_stopping_monitor,
            early_stopping_min_delta, n_epochs_kl_warmup, n_steps_kl_warmup, max_kl_weight, weight_decay, eps,
            gradient_clip_val, check_val_every_n_epoch, enable_progress_bar, seed, n_obs=self.adata.n_obs)
        if shuffle_set_split:
            train_idx, val_idx = split_indices(data.n_obs, train_size, validation_size, generator)
        else:
            n_train = int(np.ceil(train_size * data.n_obs))
            n_val = data.n_obs - n_train if validation_size is None else int(validation_size * data.n_obs)
            train_idx, val_idx = torch.arange(n_train), torch.arange(n_train, n_train + n_val)
        self.train_indices_, self.validation_indices_ = train_idx.numpy(), val_idx.numpy()
        train_idx, val_idx = train_idx.to(data.device), val_idx.to(data.device)
        history = fit(
            self.module,
            lambda: data.batches(train_idx, batch_size, shuffle=True, generator=generator, min_size=3),
            lambda: data.batches(val_idx, batch_size),
            config,
            n_obs_train=train_idx.numel(),
            n_obs_val=val_idx.numel(),
        )
        self._record(history)

    def _prepare_training(self, max_epochs, lr, accelerator, devices, early_stopping, early_stopping_patience,
                          early_stopping_monitor, early_stopping_min_delta, n_epochs_kl_warmup, n_steps_kl_warmup,
                          max_kl_weight, weight_decay, eps, gradient_clip_val, check_val_every_n_epoch,
                          enable_progress_bar, seed, *, n_obs: int):
        """Device, seeds and TrainConfig: the part of ``train`` every model shares."""
        seed = settings.seed if seed is None else seed
        torch.manual_seed(seed)  # dropout and reparameterised samples
        generator = torch.Generator().manual_seed(seed)  # split and shuffling
        self.module.to(resolve_device(accelerator, devices))
        config = TrainConfig(
            max_epochs=max_epochs_heuristic(n_obs) if max_epochs is None else int(max_epochs),
            lr=lr, weight_decay=weight_decay, eps=eps, n_epochs_kl_warmup=n_epochs_kl_warmup,
            n_steps_kl_warmup=n_steps_kl_warmup, max_kl_weight=max_kl_weight, early_stopping=early_stopping,
            early_stopping_monitor=early_stopping_monitor, early_stopping_patience=early_stopping_patience,
            early_stopping_min_delta=early_stopping_min_delta, gradient_clip_val=gradient_clip_val,
            check_val_every_n_epoch=check_val_every_n_epoch,
            enable_progress_bar=settings.progress_bar if enable_progress_bar is None else enable_progress_bar,
        )
        return self._data(), config, generator

    def _record(self, history: dict[str, list[float]]) -> None:
        """Append a training run's history (a second ``train`` call continues the curves)."""
        for key, values in history.items():
            self.history_.setdefault(key, []).extend(values)
        self.is_trained_ = True

    # ------------------------------------------------------------------ save / load

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Write ``model.safetensors`` (weights) and ``model.json`` (config, data set-up, history).

        Parameters
        ----------
        dir_path
            Folder to create (or overwrite, with ``overwrite=True``).
        save_anndata
            Also write the AnnData to ``adata.h5ad`` in the folder.
        """
        path = Path(dir_path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise ValueError(f"{path} already exists and is not empty; pass overwrite=True to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        from cellvi import __version__

        meta = {
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
        (path / META).write_text(json.dumps(meta))
        if save_anndata:
            self.adata.write_h5ad(path / ADATA)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None, accelerator: str = "auto",
             device: int | str = "auto"):
        """Load a model written by :meth:`save`; never unpickles anything.

        Parameters
        ----------
        adata
            Data with the same genes (same order) and known categories; ``None`` reads the saved
            ``adata.h5ad``.
        """
        path = Path(dir_path)
        if not (path / META).exists() or not (path / WEIGHTS).exists():
            raise ValueError(f"{path} does not hold a cellvi model ({META} and {WEIGHTS} expected).")
        meta = json.loads((path / META).read_text())
        if meta.get("format") != "cellvi-model" or meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path / META} is not a cellvi model file this version can read "
                             f"(format_version {meta.get('format_version')}, supported <= {FORMAT_VERSION}).")
        if meta["model_class"] != cls.__name__:
            raise ValueError(f"{path} holds a {meta['model_class']} model; load it with cellvi.{meta['model_class']}.load.")
        spec = DataSpec.from_json(json.dumps(meta["spec"]))
        if adata is None:
            if not (path / ADATA).exists():
                raise ValueError(f"No adata given and none saved in {path}; pass `adata=`.")
            import anndata

            adata = anndata.read_h5ad(path / ADATA)
        _adopt_spec(adata, spec)
        config_fields = {f.name for f in fields(cls.config_class)}
        model = cls(adata, **{k: v for k, v in meta["config"].items() if k in config_fields})
        model.module.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
        model.module.to(resolve_device(accelerator, device))
        model.module.eval()
        model.history_ = {k: list(v) for k, v in meta["history"].items()}
        model.is_trained_ = bool(meta["is_trained"])
        for name in ("train_indices", "validation_indices"):
            if meta.get(name) is not None:
                setattr(model, name + "_", np.asarray(meta[name], dtype=np.int64))
        return model

    def __repr__(self) -> str:
        state = "trained" if self.is_trained_ else "not trained"
        return (f"{type(self).__name__}({self.adata.n_obs} cells x {self.spec.n_genes} genes, "
                f"{self.spec.n_batches} batches; {state})")


def _adopt_spec(adata: AnnData, spec: DataSpec) -> None:
    """Give ``adata`` the model's set-up, refusing data set up with other keys or other genes."""
    check_compatible(spec, adata)
    if UNS_KEY in adata.uns:
        theirs = get_spec(adata)
        keys = ["layer", "batch_key", "labels_key", "sample_key", "size_factor_key", "categorical_covariate_keys",
                "continuous_covariate_keys"]
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
