"""Aggregated-posterior densities: differential abundance (SCVI, MrVI) and admissibility (MrVI).

The aggregated posterior of a set of cells M is the mixture ``q_M(u) = (1/|M|) sum_m N(u; mu_m, sigma_m^2)``
of their posteriors q(u | x_m) (Boyeau et al., 2025, Methods), with Normal or Student-t components. The
density of a cell under each sample's mixture tells which samples are over-represented near it. A cell's
own component can be left out of its own sample's mixture: it would otherwise dominate that density
(a cell must not vote for itself).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

EXP_FLOOR = 700.0  # segment_logsumexp: differences from the peak below -EXP_FLOOR count as -EXP_FLOOR
DENSITY_BLOCK_ENTRIES = 2**23  # aggregated_log_density: log densities held at once (64 MB of float64)


def gaussian_log_density(u: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """``log N(u_b; loc_m, diag(scale_m^2))`` for every pair, shape ``(B, M)``, as one matrix product.

    Notes
    -----
    .. math::
        \\log N(u; \\mu, \\sigma^2) = -\\tfrac12 \\sum_l \\frac{u_l^2}{\\sigma_l^2} + \\sum_l \\frac{u_l \\mu_l}{\\sigma_l^2}
        - \\tfrac12 \\sum_l \\frac{\\mu_l^2}{\\sigma_l^2} - \\sum_l \\log \\sigma_l - \\tfrac{L}{2}\\log 2\\pi

    is ``[u^2, u, 1] @ [-prec / 2, mu prec, c]^T`` (``prec = sigma^-2``, ``c`` the terms free of u), so the ``(B, M, L)``
    array of differences is never built. Computed in float64 to keep the cancellation between the terms harmless.
    """
    u, loc, scale = u.double(), loc.double(), scale.double()
    prec = scale.pow(-2)  # (M, L)
    const = -0.5 * (loc.square() * prec).sum(-1) - scale.log().sum(-1) - 0.5 * u.shape[-1] * math.log(2 * math.pi)
    rows = torch.cat([u.square(), u, torch.ones_like(u[:, :1])], 1)  # (B, 2L + 1)
    return rows @ torch.cat([-0.5 * prec, loc * prec, const[:, None]], 1).T


def segment_logsumexp(log_p: Tensor, segments: Tensor, n_segments: int) -> Tensor:
    """``logsumexp`` of the columns of ``log_p`` (``(B, M)``) within each segment, shape ``(B, n_segments)``.

    ``segments`` (``(M,)`` int64) gives each column's segment; an empty segment gives ``-inf``. The columns are
    grouped by segment (no copy when ``segments`` is already sorted, as :func:`aggregated_log_density` makes it),
    then each segment is a contiguous block of columns: its row-wise peak, then ``exp`` of the differences.
    Differences below ``-EXP_FLOOR`` are raised to it: ``exp`` takes a slow path where its result underflows
    (4x slower over a block of peaked posteriors' densities, as ``torch.logsumexp``), and ``exp(-700)`` is
    ~1e-304 of the peak's term, far below float64's resolution.
    """
    if segments.numel() > 1 and bool((segments[1:] < segments[:-1]).any()):
        order = torch.argsort(segments, stable=True)
        log_p, segments = log_p[:, order], segments[order]
    bounds = torch.searchsorted(segments, torch.arange(n_segments + 1, device=segments.device)).tolist()
    out = log_p.new_full((log_p.shape[0], n_segments), -torch.inf)
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            block = log_p[:, start:end]
            peak = block.amax(1)
            finite = torch.isfinite(peak)  # a row whose components were all left out: -inf
            safe = torch.where(finite, peak, torch.zeros_like(peak))
            total = (block - safe[:, None]).clamp_(min=-EXP_FLOOR).exp_().sum(1)
            out[:, s] = torch.where(finite, total.log() + safe, peak)
    return out


def student_t_log_density(u: Tensor, loc: Tensor, scale: Tensor, dof: float) -> Tensor:
    """``log t_dof(u_b; loc_m, scale_m)`` (independent dimensions) for every pair, shape ``(B, M)``."""
    u, loc, scale = u.double(), loc.double(), scale.double()
    z = (u[:, None, :] - loc[None]) / scale[None]  # (B, M, L)
    const = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return u.shape[-1] * const - (dof + 1) / 2 * torch.log1p(z * z / dof).sum(-1) - scale.log().sum(-1)[None]


def aggregated_log_density(u: Tensor, loc: Tensor, scale: Tensor, segments: Tensor, n_segments: int, *,
                           dof: float | None = None, query_ids: Tensor | None = None,
                           component_ids: Tensor | None = None) -> Tensor:
    """``log q_s(u_b)`` for each point ``u_b`` and each segment (sample) s: ``(B, n_segments)``.

    ``q_s`` is the equal-weight mixture of the components ``(loc_m, scale_m)`` with ``segments[m] == s``:
    Gaussian, or Student-t with ``dof`` degrees of freedom. Where ``query_ids[b] == component_ids[m]``
    (the point is that component's own cell; ``component_ids`` are distinct) the component is left out, and
    its segment's mixture is over the others (``-inf`` when none is left).

    The points are taken by blocks that hold at most ``DENSITY_BLOCK_ENTRIES`` log densities (the Student-t's
    ``(points, components, L)`` array counted in full): bounded memory for any number of points, and blocks larger
    than a minibatch (at 8,000 cells, blocks of 128 points took 1.15 s where 512 took 0.70 s).
    """
    per_point = loc.shape[0] * (loc.shape[1] if dof is not None else 1)
    step = max(1, DENSITY_BLOCK_ENTRIES // max(per_point, 1))
    order = torch.argsort(segments, stable=True)  # components grouped by segment (see segment_logsumexp)
    loc, scale, segments = loc[order], scale[order], segments[order]
    own = query_ids is not None and component_ids is not None
    component_ids = component_ids[order] if own else None
    blocks = [_aggregated_block(u[i : i + step], loc, scale, segments, n_segments, dof,
                                query_ids[i : i + step] if own else None, component_ids)
              for i in range(0, u.shape[0], step)]
    return torch.cat(blocks) if blocks else torch.zeros((0, n_segments), dtype=torch.float64, device=u.device)


def _aggregated_block(u: Tensor, loc: Tensor, scale: Tensor, segments: Tensor, n_segments: int, dof: float | None,
                      query_ids: Tensor | None, component_ids: Tensor | None) -> Tensor:
    """:func:`aggregated_log_density` of one block of points, the components sorted by segment."""
    log_p = gaussian_log_density(u, loc, scale) if dof is None else student_t_log_density(u, loc, scale, dof)
    counts = torch.bincount(segments, minlength=n_segments).to(torch.float64).repeat(u.shape[0], 1)
    if query_ids is not None and component_ids is not None:
        rows, cols = _own_components(query_ids, component_ids)
        log_p[rows, cols] = -torch.inf
        counts[rows, segments[cols]] -= 1.0
    out = segment_logsumexp(log_p, segments, n_segments) - counts.log()
    return out.masked_fill(counts == 0, -torch.inf)


def _own_components(query_ids: Tensor, component_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` where ``query_ids[row] == component_ids[col]``: the point and its own component (a binary
    search in the sorted component ids, not a ``(B, M)`` comparison). ``component_ids`` must be distinct."""
    ids, perm = torch.sort(component_ids)
    if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
        raise ValueError("component_ids must be distinct (one id per component cell).")
    pos = torch.searchsorted(ids, query_ids).clamp_(max=max(ids.numel() - 1, 0))
    found = ids[pos] == query_ids if ids.numel() else torch.zeros_like(query_ids, dtype=torch.bool)
    rows = torch.nonzero(found).view(-1)
    return rows, perm[pos[rows]]


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
