"""Per-cell linear regression of counterfactual states on sample covariates (MrVI's multivariate DE).

For cell n, the counterfactual states ``z_n(s)`` over samples s (standardized over samples) are
regressed on the sample design matrix X: ``z_n(s) = X_s beta_n + noise`` (Boyeau et al., 2025,
Methods, equation 3), with ridge penalty ``lambd`` and only the samples admissible for the cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor


def design_matrix(sample_info: pd.DataFrame, keys: list[str], normalize: bool = True) -> tuple[np.ndarray, list[str], list[str]]:
    """Design matrix of samples (rows) by covariate columns.

    Parameters
    ----------
    sample_info
        One row per sample.
    keys
        Columns to use. Categorical (or string) columns become indicator columns of every level but the
        first (the reference), named ``<key>_<level>``; numeric columns are used as they are.
    normalize
        Rescale each column to [0, 1] (``(x - min) / (1e-6 + max - min)``) so coefficients are comparable.

    Returns
    -------
    ``(X, names, key_of_column)``: X of shape ``(samples, columns)`` (float32).
    """
    cols, names, owners = [], [], []
    for key in keys:
        if key not in sample_info.columns:
            raise ValueError(f"sample covariate {key!r} is not a column of model.sample_info (columns: "
                             f"{list(sample_info.columns)}); it must be an .obs column constant within each sample.")
        col = sample_info[key]
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_string_dtype(col):
            cat = col.astype("category") if not isinstance(col.dtype, pd.CategoricalDtype) else col
            cat = cat.cat.remove_unused_categories()
            levels = list(cat.cat.categories)
            for level in levels[1:]:
                cols.append((cat == level).to_numpy(dtype=np.float64))
                names.append(f"{key}_{level}")
                owners.append(key)
        else:
            cols.append(col.to_numpy(dtype=np.float64))
            names.append(key)
            owners.append(key)
    if not cols:
        raise ValueError(f"The covariates {keys} give no column: each has a single level among these samples.")
    X = np.stack(cols, 1)
    if normalize:
        lo, hi = X.min(0), X.max(0)
        X = (X - lo) / (1e-6 + hi - lo)
    return X.astype(np.float32), names, owners


def regression_operators(X: Tensor, admissible: Tensor, lambd: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-cell least-squares operator and the square root of the Gram matrix.

    Parameters
    ----------
    X
        Design matrix ``(S, K)``.
    admissible
        ``(cells, S)`` 0/1 weights: which samples enter each cell's regression.
    lambd
        Ridge penalty.

    Returns
    -------
    ``A`` of shape ``(cells, K, S)`` with ``beta = A @ y`` (``A = (X^T W X + lambd I)^+ X^T W``), and
    ``R = (X^T W X + lambd I)^{1/2}``, shape ``(cells, K, K)``: under the null (y iid standard normal),
    ``R beta`` is standard normal, which is what the chi-squared statistic sums.
    """
    W = admissible.to(X.dtype)
    gram = torch.einsum("sk,ns,sl->nkl", X, W, X) + lambd * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    A = torch.linalg.pinv(gram, hermitian=True) @ (X.T[None] * W[:, None, :])
    evals, evecs = torch.linalg.eigh(gram)
    root = (evecs * evals.clamp_min(0).sqrt()[:, None, :]) @ evecs.transpose(-1, -2)
    return A, root


def chi2_sf(t: Tensor | np.ndarray, df: Tensor | np.ndarray) -> np.ndarray:
    """Upper tail ``P(chi2_df > t)`` (scipy's survival function: accurate for tiny p-values too)."""
    from scipy.stats import chi2

    return chi2.sf(np.asarray(t, dtype=np.float64), np.asarray(df, dtype=np.float64))


def standardize_over_samples(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z - mean) / (1e-6 + sd)`` over the sample axis (-2) of ``(..., S, L)``; returns (standardized, mean, sd)."""
    mean = z.mean(-2, keepdim=True)
    sd = z.std(-2, keepdim=True)
    return (z - mean) / (1e-6 + sd), mean, sd


def sample_batches(sample_codes: np.ndarray, batch_codes: np.ndarray, sample_names) -> np.ndarray:
    """The batch of each sample, from its cells' sample and batch codes.

    Parameters
    ----------
    sample_codes, batch_codes
        Per cell, shape ``(cells,)``.
    sample_names
        One name per sample code (used in the error message).

    Returns
    -------
    Batch code per sample, shape ``(samples,)``; ``-1`` for a sample without cells.

    Raises
    ------
    ValueError
        When the cells of a sample come from more than one batch: a sample then has no single
        batch offset.
    """
    names = np.asarray(sample_names, dtype=object)
    pairs = np.unique(np.stack([np.asarray(sample_codes), np.asarray(batch_codes)], 1).astype(np.int64), axis=0)
    n_batches_of = np.bincount(pairs[:, 0], minlength=len(names))
    spanning = np.flatnonzero(n_batches_of > 1)
    if spanning.size:
        raise ValueError(f"add_batch_specific_offsets=True needs every sample to come from a single batch, but the "
                         f"cells of samples {list(names[spanning][:10])} span several batches. Use "
                         "add_batch_specific_offsets=False (the decoder still corrects for batch), or leave these "
                         "samples out with sample_subset.")
    out = np.full(len(names), -1, dtype=np.int64)
    out[pairs[:, 0]] = pairs[:, 1]
    return out


def add_batch_offsets(X: np.ndarray, names: list[str], owners: list[str], batch_of_sample: np.ndarray
                      ) -> tuple[np.ndarray, list[str], list[str]]:
    """Prepend one indicator column per batch present among the samples (scvi-tools' batch-specific offsets).

    The indicators sum to one in every row, so they act as one intercept per batch: each covariate's
    coefficient is then a contrast between samples of the same batch, and a covariate that differs
    only between batches is no longer credited with the batch differences. Columns are named
    ``offset_batch_<batch code>`` (and so owned by no sample covariate); they are not rescaled.

    Parameters
    ----------
    X, names, owners
        A design matrix ``(samples, columns)`` and its column names and covariate keys, as returned
        by :func:`design_matrix`.
    batch_of_sample
        Batch code of each row's sample (:func:`sample_batches`), shape ``(samples,)``.

    Returns
    -------
    ``(X, names, key_of_column)`` with the offset columns first.
    """
    batches = np.unique(batch_of_sample)
    offsets = (np.asarray(batch_of_sample)[:, None] == batches[None, :]).astype(X.dtype)
    off_names = [f"offset_batch_{b}" for b in batches]
    return np.concatenate([offsets, X], 1), off_names + list(names), off_names + list(owners)
