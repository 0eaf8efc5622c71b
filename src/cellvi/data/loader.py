"""Model inputs as tensors on one device, and minibatches gathered from them by index.

The whole count matrix is kept as CSR (row pointers, column indices, values) on the training device;
a minibatch is a dense ``(cells, genes)`` float32 block built with a few vectorised gathers, with no
Python loop over cells and no per-step framework machinery. Per-cell covariates are plain tensors
indexed the same way. Keys of a minibatch (the one vocabulary all modules read):

``x``            float32 (B, G)   counts
``batch``        int64   (B,)     batch code
``label``        int64   (B,)     label code
``sample``       int64   (B,)     sample code (MrVI's ``sample_key``; all 0 when none was set up)
``cat_covs``     int64   (B, K)   extra categorical covariate codes (K may be 0)
``cont_covs``    float32 (B, C)   continuous covariates (C may be 0)
``size_factor``  float32 (B, 1)   present only when a size_factor_key was set up
``index``        int64   (B,)     row of each cell in the AnnData
``nonzeros``     Nonzeros         (rows, cols, values) of the non-zero entries of ``x``
``proteins``     float32 (B, P)   protein counts (TotalVI only; 0 where not measured)
``protein_mask`` float32 (B, P)   1 where the protein was measured in the cell: its value is not NaN and
                                  the protein is not missing from the cell's panel (or batch); the
                                  likelihood skips the 0 entries, it never reads them as zero counts
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import Tensor

from cellvi.data.setup import (
    DataSpec,
    _continuous,
    check_compatible,
    codes,
    get_counts,
    read_proteins,
    size_factors,
    validate_counts,
)
from cellvi.distributions import Nonzeros


def _to_csr(X) -> sp.csr_matrix:
    """``X`` as float32 CSR without explicit zeros (so that the minibatch ``nonzeros`` are the non-zero counts;
    the AnnData's own arrays are left alone)."""
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    if sp.issparse(X):
        csr = sp.csr_matrix(X, dtype=np.float32)
        if not csr.data.all():  # stored zeros: drop them from a copy
            csr = csr.copy()
            csr.eliminate_zeros()
        return csr
    return sp.csr_matrix(np.asarray(X, dtype=np.float32))


def csr_positions(indptr: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """For the CSR rows ``idx``: the minibatch row of each of their non-zeros, and its position in the
    CSR arrays (row start + rank within the row). All int64, so atlases past 2^31 non-zeros index safely.

    >>> csr_positions(torch.tensor([0, 2, 2, 5]), torch.tensor([2, 0]))
    (tensor([0, 0, 0, 1, 1]), tensor([2, 3, 4, 0, 1]))
    """
    start = indptr.index_select(0, idx)
    counts = indptr.index_select(0, idx + 1) - start
    ends = counts.cumsum(0)
    total = int(ends[-1]) if idx.numel() else 0
    rows = torch.repeat_interleave(torch.arange(idx.numel(), device=indptr.device), counts, output_size=total)
    # position = row start + rank within the row = arange(total) + (start - first position of the row's block)
    return rows, torch.arange(total, device=indptr.device).add_((start - (ends - counts)).index_select(0, rows))


def obs_arrays(adata: AnnData, spec: DataSpec) -> dict[str, np.ndarray]:
    """The per-cell covariates of the minibatch vocabulary (all keys but ``x``, ``index``, ``nonzeros``)."""
    n = adata.n_obs
    zeros = np.zeros(n, dtype=np.int64)
    obs = {
        "batch": zeros if spec.batch_key is None else codes(adata, spec.batch_key, spec.batch_categories),
        "label": zeros if spec.labels_key is None else codes(adata, spec.labels_key, spec.label_categories),
        "sample": zeros if spec.sample_key is None else codes(adata, spec.sample_key, spec.sample_categories),
        "cat_covs": np.stack([codes(adata, k, c) for k, c in zip(spec.categorical_covariate_keys,
                                                                spec.covariate_categories)], 1)
        if spec.categorical_covariate_keys else np.zeros((n, 0), dtype=np.int64),
        "cont_covs": np.stack([_continuous(adata, k) for k in spec.continuous_covariate_keys], 1).astype(np.float32)
        if spec.continuous_covariate_keys else np.zeros((n, 0), dtype=np.float32),
    }
    if spec.size_factor_key is not None:
        obs["size_factor"] = size_factors(adata, spec.size_factor_key)[:, None].astype(np.float32)
    for key, codes_arr in spec.extra.get("obs_codes", {}).items():  # model-specific integer columns
        obs[key] = codes(adata, codes_arr["key"], tuple(codes_arr["categories"]))
    if spec.protein_expression_obsm_key is not None:  # second modality, dense: panels are small
        panel = obs["batch"] if spec.panel_key is None else codes(adata, spec.panel_key, spec.panel_categories)
        obs["proteins"], obs["protein_mask"] = read_proteins(adata, spec, panel)
    return obs


def csr_storage(device: torch.device, nbytes: int, free_bytes: int | None) -> torch.device:
    """Where to keep a CSR of ``nbytes`` for minibatches on ``device``: on the device itself when it takes at
    most half of the device's free memory (``free_bytes``; ``None``: not a GPU), else in host memory."""
    if device.type != "cuda" or free_bytes is None or nbytes <= free_bytes // 2:
        return device
    return torch.device("cpu")


class CountData:
    """The tensors of one AnnData, read through a :class:`DataSpec`, for minibatches on ``device``.

    The CSR lives on ``device`` when it fits there (half of a GPU's free memory); otherwise it stays in
    host memory, minibatches are gathered there into pinned memory and copied to the GPU
    asynchronously (the copy overlaps the previous step).
    """

    def __init__(self, adata: AnnData, spec: DataSpec, device: str | torch.device = "cpu"):
        check_compatible(spec, adata)
        X = get_counts(adata, spec.layer)
        validate_counts(X, "adata.X" if spec.layer is None else f"adata.layers[{spec.layer!r}]", adata.obs_names)
        self._init(_to_csr(X), obs_arrays(adata, spec), np.arange(adata.n_obs), device)

    @classmethod
    def from_parts(cls, csr: sp.csr_matrix, obs: dict[str, np.ndarray], index: np.ndarray,
                   device: str | torch.device = "cpu") -> CountData:
        """A CountData of some rows of a larger data set: their counts, covariates and global row numbers."""
        data = cls.__new__(cls)
        data._init(csr, obs, index, device)
        return data

    def _init(self, csr: sp.csr_matrix, obs: dict[str, np.ndarray], index: np.ndarray, device) -> None:
        self.device = torch.device(device)  # where minibatches go
        self.n_obs, self.n_vars = csr.shape
        nbytes = csr.nnz * 12 + (self.n_obs + 1) * 8
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.storage = csr_storage(self.device, nbytes, free)  # where the CSR lives
        as_t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=self.storage)  # noqa: E731
        self.indptr = as_t(csr.indptr, torch.int64)  # 64-bit: row pointers pass 2^31 in atlases
        # column numbers fit 32 bits; with the values they share the AnnData's arrays on the CPU (no copy)
        self.indices = as_t(csr.indices, torch.int32)
        self.values = as_t(csr.data, torch.float32)
        self.obs: dict[str, Tensor] = {key: as_t(v, torch.float32 if v.dtype.kind == "f" else torch.int64)
                                       for key, v in obs.items()}
        self.obs["index"] = as_t(index, torch.int64)  # row of each cell in the AnnData

    def __len__(self) -> int:
        return self.n_obs

    def library_log_stats(self, n_batches: int) -> tuple[Tensor, Tensor]:
        return library_log_stats(self.row_sums(), self.obs["batch"], n_batches)

    def row_sums(self) -> Tensor:
        """Total counts per cell, shape ``(n_obs,)``: one segment sum per row, no array the size of the non-zeros."""
        return torch.segment_reduce(self.values, "sum", offsets=self.indptr)

    def gather(self, idx: Tensor) -> dict[str, Tensor]:
        """The minibatch of cells ``idx`` (int64 tensor on this device): dense counts + covariates."""
        idx = idx.to(self.storage)
        rows, pos = csr_positions(self.indptr, idx)
        # index_select, not t[idx]: the 1-D gather without advanced indexing's overhead (a dozen per step)
        cols, values = self.indices.index_select(0, pos).long(), self.values.index_select(0, pos)
        x = torch.zeros(idx.numel() * self.n_vars, device=self.storage)
        x.index_copy_(0, rows * self.n_vars + cols, values)  # positions are distinct: a copy, the fastest scatter
        batch = {key: t.index_select(0, idx) if t.shape[1:].numel() else t.new_empty((idx.numel(), *t.shape[1:]))
                 for key, t in self.obs.items()}  # (an empty covariate block needs no gather)
        batch["x"] = x.view(idx.numel(), self.n_vars)
        batch["nonzeros"] = Nonzeros(rows, cols, values)  # lets likelihoods skip the zeros
        if self.storage != self.device:  # host CSR, GPU model: pinned memory, asynchronous copy
            move = lambda t: t.pin_memory().to(self.device, non_blocking=True)  # noqa: E731
            batch = {k: Nonzeros(*map(move, v)) if isinstance(v, Nonzeros) else move(v) for k, v in batch.items()}
        return batch

    def batches(
        self,
        indices: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        min_size: int = 1,
    ) -> Iterator[dict[str, Tensor]]:
        """Minibatches over ``indices``; a last batch smaller than ``min_size`` is skipped."""
        if shuffle:
            indices = indices[torch.randperm(indices.numel(), generator=generator).to(indices.device)]
        for i in range(0, indices.numel(), batch_size):
            idx = indices[i : i + batch_size]
            if idx.numel() >= min_size:
                yield self.gather(idx)


def library_log_stats(totals: Tensor, batch: Tensor, n_batches: int) -> tuple[Tensor, Tensor]:
    """Mean and variance of log total counts per batch, shape ``(n_batches,)`` each (scVI's library prior)."""
    log_lib = torch.log(totals.double().cpu())
    batch = batch.cpu()
    n = torch.bincount(batch, minlength=n_batches).double()
    mean = torch.bincount(batch, log_lib, minlength=n_batches) / n.clamp_min(1)
    var = torch.bincount(batch, (log_lib - mean[batch]) ** 2, minlength=n_batches) / n.clamp_min(1)
    var = torch.where(n > 1, var, torch.ones_like(var))  # a batch of one cell: unit variance
    return mean.float(), var.float()


def split_indices(n: int, train_size: float | None, validation_size: float | None, *, shuffle: bool = True,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Train and validation rows of ``range(n)``, with scvi-tools' meaning of the two fractions.

    ``train_size`` (default 0.9) of the cells train, ``ceil(train_size * n)`` of them; ``validation_size``
    (default: the rest) validate, ``floor(validation_size * n)``. ``shuffle=False`` takes the rows in
    order, validation first, then training (as scvi-tools' ``shuffle_set_split=False``).
    """
    train_size = 0.9 if train_size is None else float(train_size)
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    if validation_size is not None and not 0.0 <= validation_size < 1.0:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    if validation_size is not None and train_size + validation_size > 1.0 + 1e-9:
        raise ValueError(f"train_size + validation_size must be <= 1, got {train_size} + {validation_size}.")
    n_train = int(np.ceil(train_size * n))
    n_val = n - n_train if validation_size is None else min(int(np.floor(validation_size * n + 1e-9)), n - n_train)
    if n_train == 0:
        raise ValueError(f"No training cells: {n} cells with train_size={train_size}.")
    if not shuffle:
        return torch.arange(n_val, n_val + n_train), torch.arange(n_val)
    perm = torch.randperm(n, generator=generator)
    return perm[:n_train].sort().values, perm[n_train : n_train + n_val].sort().values
