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
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import Tensor

from cellvi.data.setup import DataSpec, _continuous, check_compatible, codes, get_counts, size_factors, validate_counts
from cellvi.distributions import Nonzeros


def _to_csr(X) -> sp.csr_matrix:
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    return sp.csr_matrix(np.asarray(X, dtype=np.float32))


class CountData:
    """The tensors of one AnnData, read through a :class:`DataSpec`, on ``device``."""

    def __init__(self, adata: AnnData, spec: DataSpec, device: str | torch.device = "cpu"):
        check_compatible(spec, adata)
        X = get_counts(adata, spec.layer)
        validate_counts(X, "adata.X" if spec.layer is None else f"adata.layers[{spec.layer!r}]", adata.obs_names)
        csr = _to_csr(X)
        self.device = torch.device(device)
        self.n_obs, self.n_vars = csr.shape
        as_t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=self.device)  # noqa: E731
        self.indptr = as_t(csr.indptr, torch.int64)
        self.indices = as_t(csr.indices, torch.int64)
        self.values = as_t(csr.data, torch.float32)
        n = self.n_obs
        zeros = np.zeros(n, dtype=np.int64)
        self.obs: dict[str, Tensor] = {
            "batch": as_t(zeros if spec.batch_key is None else codes(adata, spec.batch_key, spec.batch_categories),
                          torch.int64),
            "label": as_t(zeros if spec.labels_key is None else codes(adata, spec.labels_key, spec.label_categories),
                          torch.int64),
            "sample": as_t(zeros if spec.sample_key is None else codes(adata, spec.sample_key, spec.sample_categories),
                           torch.int64),
            "cat_covs": as_t(np.stack([codes(adata, k, c) for k, c in
                                       zip(spec.categorical_covariate_keys, spec.covariate_categories)], 1)
                             if spec.categorical_covariate_keys else np.zeros((n, 0)), torch.int64),
            "cont_covs": as_t(np.stack([_continuous(adata, k) for k in spec.continuous_covariate_keys], 1)
                              if spec.continuous_covariate_keys else np.zeros((n, 0)), torch.float32),
            "index": torch.arange(n, device=self.device),
        }
        if spec.size_factor_key is not None:
            self.obs["size_factor"] = as_t(size_factors(adata, spec.size_factor_key)[:, None], torch.float32)
        for key, codes_arr in spec.extra.get("obs_codes", {}).items():  # model-specific integer columns
            self.obs[key] = as_t(codes(adata, codes_arr["key"], tuple(codes_arr["categories"])), torch.int64)

    def __len__(self) -> int:
        return self.n_obs

    def library_log_stats(self, n_batches: int) -> tuple[Tensor, Tensor]:
        """Mean and variance of log total counts per batch, shape ``(n_batches,)`` each (scVI's library prior)."""
        log_lib = torch.log(self.row_sums()).double().cpu()
        batch = self.obs["batch"].cpu()
        n = torch.bincount(batch, minlength=n_batches).double()
        mean = torch.bincount(batch, log_lib, minlength=n_batches) / n.clamp_min(1)
        var = torch.bincount(batch, (log_lib - mean[batch]) ** 2, minlength=n_batches) / n.clamp_min(1)
        var = torch.where(n > 1, var, torch.ones_like(var))  # a batch of one cell: unit variance
        return mean.float(), var.float()

    def row_sums(self) -> Tensor:
        """Total counts per cell, shape ``(n_obs,)``."""
        rows = torch.repeat_interleave(torch.arange(self.n_obs, device=self.device), self.indptr.diff())
        return torch.zeros(self.n_obs, device=self.device).index_add_(0, rows, self.values)

    def gather(self, idx: Tensor) -> dict[str, Tensor]:
        """The minibatch of cells ``idx`` (int64 tensor on this device): dense counts + covariates."""
        start = self.indptr[idx]
        counts = self.indptr[idx + 1] - start
        total = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(idx.numel(), device=self.device), counts, output_size=total)
        # position of each gathered non-zero in the CSR arrays: row start + rank within the row
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts, output_size=total)
        pos = start[rows] + torch.arange(total, device=self.device) - first
        cols, values = self.indices[pos], self.values[pos]
        x = torch.zeros(idx.numel() * self.n_vars, device=self.device)
        x.scatter_(0, rows * self.n_vars + cols, values)
        batch = {key: t[idx] for key, t in self.obs.items()}
        batch["x"] = x.view(idx.numel(), self.n_vars)
        batch["nonzeros"] = Nonzeros(rows, cols, values)  # lets likelihoods skip the zeros
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


def split_indices(n: int, train_size: float, validation_size: float | None, generator: torch.Generator
                  ) -> tuple[Tensor, Tensor]:
    """Random train / validation split of ``range(n)`` (scvi-tools semantics for the two fractions)."""
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    if validation_size is not None and (validation_size < 0 or train_size + validation_size > 1.0 + 1e-9):
        raise ValueError(f"train_size + validation_size must be <= 1, got {train_size} + {validation_size}.")
    n_train = int(np.ceil(train_size * n))
    n_val = n - n_train if validation_size is None else min(int(np.floor(validation_size * n + 1e-9)), n - n_train)
    perm = torch.randperm(n, generator=generator)
    return perm[:n_train].sort().values, perm[n_train : n_train + n_val].sort().values
