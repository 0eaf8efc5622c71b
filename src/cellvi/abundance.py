"""Aggregated posteriors and differential abundance, streamed over cells (memory bounded by chunks).

The aggregated posterior of a set of cells S is the mixture of their posteriors,

.. math:: \\bar q_S(z) = \\frac{1}{|S|} \\sum_{j \\in S} q(z \\mid x_j),

with Normal or Student-t components (location and scale of each cell's posterior). The density of
a cell i under the aggregated posterior of each sample tells which samples are over-represented
near i: differential abundance without clusters. A cell's own component is left out of its own
sample's mixture (it would otherwise dominate that density: a cell must not vote for itself).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def component_log_prob(z: Tensor, loc: Tensor, scale: Tensor, dof: float | None) -> Tensor:
    """``log q_j(z_i)`` for every query ``i`` and component ``j``: ``(n_query, n_components)``.

    Components are independent over dimensions: Normal(loc, scale), or Student-t with ``dof``.
    """
    diff = (z[:, None, :] - loc[None]) / scale[None]  # (q, c, d)
    log_scale = torch.log(scale).sum(-1)[None]  # (1, c)
    d = z.shape[-1]
    if dof is None:
        return -0.5 * (diff * diff).sum(-1) - log_scale - 0.5 * d * math.log(2 * math.pi)
    const = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return (d * const - (dof + 1) / 2 * torch.log1p(diff * diff / dof).sum(-1)) - log_scale


def mixture_log_density(z: Tensor, loc: Tensor, scale: Tensor, *, dof: float | None = None,
                        query_ids: Tensor | None = None, component_ids: Tensor | None = None,
                        chunk: int = 4096) -> Tensor:
    """``log (1/n) sum_j q_j(z_i)`` for each query ``z_i``, over components in chunks of ``chunk``.

    Where ``query_ids[i] == component_ids[j]`` (the query cell is itself a component), that component
    is left out and the mixture is over the other ``n - 1``.

    Returns
    -------
    ``(n_query,)`` log densities (``-inf`` for a cell that is the only component).
    """
    total = torch.full((z.shape[0],), -math.inf, dtype=z.dtype, device=z.device)
    n_own = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for start in range(0, loc.shape[0], chunk):
        lp = component_log_prob(z, loc[start : start + chunk], scale[start : start + chunk], dof)
        if query_ids is not None and component_ids is not None:
            own = query_ids[:, None] == component_ids[None, start : start + chunk]
            lp = lp.masked_fill(own, -math.inf)
            n_own += own.sum(1)
        total = torch.logaddexp(total, torch.logsumexp(lp, 1))
    return total - torch.log(loc.shape[0] - n_own)


def sample_log_densities(z: np.ndarray, loc: np.ndarray, scale: np.ndarray, samples: np.ndarray,
                         names: list[str], *, dof: float | None = None, num_cells_posterior: int | None = None,
                         batch_size: int = 128, omit_own: bool = True, seed: int = 0,
                         device: str | torch.device = "cpu") -> np.ndarray:
    """Log density of every cell under each sample's aggregated posterior: ``(n_cells, n_samples)``.

    Parameters
    ----------
    z
        Query points, ``(n_cells, d)`` (posterior means).
    loc, scale
        Each cell's posterior, ``(n_cells, d)`` each.
    samples
        Sample name of each cell; ``names`` the samples (columns) in order.
    num_cells_posterior
        At most this many cells (drawn at random) make up a sample's mixture.
    batch_size
        Query cells per chunk.
    omit_own
        Leave a query cell's own component out of its sample's mixture (``z`` and ``loc`` must then be
        the same cells, in the same order).
    """
    rng = np.random.default_rng(seed)
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)  # noqa: E731
    out = np.empty((z.shape[0], len(names)), dtype=np.float32)
    ids = torch.arange(z.shape[0], device=device)
    for k, name in enumerate(names):
        members = np.flatnonzero(samples == name)
        if num_cells_posterior is not None and members.size > num_cells_posterior:
            members = np.sort(rng.choice(members, num_cells_posterior, replace=False))
        comp_loc, comp_scale, comp_ids = as_t(loc[members]), as_t(scale[members]), ids[members]
        for start in range(0, z.shape[0], batch_size):
            q = slice(start, start + batch_size)
            out[q, k] = mixture_log_density(as_t(z[q]), comp_loc, comp_scale, dof=dof,
                                            query_ids=ids[q] if omit_own else None,
                                            component_ids=comp_ids).cpu().numpy()
    return out
