"""Aggregated-posterior densities in u space: differential abundance and admissibility.

The aggregated posterior of a set of cells M is the mixture ``q_M(u) = (1/|M|) sum_m N(u; mu_m, sigma_m^2)``
of their Gaussian posteriors q(u | x_m) (Boyeau et al., 2025, Methods).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def gaussian_log_density(u: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """``log N(u_b; loc_m, diag(scale_m^2))`` for every pair, shape ``(B, M)``, as three matrix products.

    Notes
    -----
    .. math::
        \\log N(u; \\mu, \\sigma^2) = -\\tfrac12 \\sum_l \\frac{u_l^2}{\\sigma_l^2} + \\sum_l \\frac{u_l \\mu_l}{\\sigma_l^2}
        - \\tfrac12 \\sum_l \\frac{\\mu_l^2}{\\sigma_l^2} - \\sum_l \\log \\sigma_l - \\tfrac{L}{2}\\log 2\\pi

    so the ``(B, M, L)`` array of differences is never built. Computed in float64 to keep the
    cancellation between the terms harmless.
    """
    u, loc, scale = u.double(), loc.double(), scale.double()
    prec = scale.pow(-2)  # (M, L)
    quad = -0.5 * (u.square() @ prec.T) + u @ (loc * prec).T  # (B, M)
    const = -0.5 * (loc.square() * prec).sum(-1) - scale.log().sum(-1) - 0.5 * u.shape[-1] * math.log(2 * math.pi)
    return quad + const


def segment_logsumexp(log_p: Tensor, segments: Tensor, n_segments: int) -> Tensor:
    """``logsumexp`` of the columns of ``log_p`` (``(B, M)``) within each segment, shape ``(B, n_segments)``.

    ``segments`` (``(M,)`` int64) gives each column's segment; an empty segment gives ``-inf``.
    """
    B = log_p.shape[0]
    index = segments.expand(B, -1)
    peak = torch.full((B, n_segments), -torch.inf, dtype=log_p.dtype, device=log_p.device)
    peak = peak.scatter_reduce(1, index, log_p, "amax", include_self=True)
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros_like(peak).scatter_add_(1, index, (log_p - safe.gather(1, index)).exp())
    return total.log() + safe


def aggregated_log_density(u: Tensor, loc: Tensor, scale: Tensor, segments: Tensor, n_segments: int) -> Tensor:
    """``log q_s(u_b)`` for each point ``u_b`` and each segment (sample) s: ``(B, n_segments)``.

    ``q_s`` is the equal-weight mixture of the Gaussians ``(loc_m, scale_m)`` with ``segments[m] == s``.
    """
    counts = torch.bincount(segments, minlength=n_segments).to(torch.float64)
    return segment_logsumexp(gaussian_log_density(u, loc, scale), segments, n_segments) - counts.log()


def mixture_over_groups(log_probs: np.ndarray, columns: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """``log((1/|A|) sum_{s in A} q_s(u))`` per cell for the samples ``columns`` of ``log_probs``.

    Parameters
    ----------
    log_probs
        ``(cells, samples)`` log densities ``log q_s(u_n)``.
    columns
        Indices of the samples in the group A.
    own
        Optional ``(cells,)`` sample index of each cell; a cell's own sample is left out of A for it
        (the cell would otherwise inflate its own sample's density). A cell whose only group sample
        is its own gets ``nan``.
    """
    from scipy.special import logsumexp

    lp = log_probs[:, columns].astype(np.float64)
    n = np.full(lp.shape[0], float(len(columns)))
    if own is not None:
        mine = own[:, None] == np.asarray(columns)[None, :]
        lp = np.where(mine, -np.inf, lp)
        n = n - mine.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = logsumexp(lp, axis=1) - np.log(n)
    return np.where(n > 0, out, np.nan)


def max_log_density_excluding_self(log_p: Tensor) -> Tensor:
    """Row-wise max of a square ``(M, M)`` matrix of log densities, ignoring the diagonal (the cell itself)."""
    eye = torch.eye(log_p.shape[0], dtype=torch.bool, device=log_p.device)
    return log_p.masked_fill(eye, -torch.inf).amax(1)
