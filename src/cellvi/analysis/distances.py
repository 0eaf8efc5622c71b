"""Distances between the counterfactual states of one cell under every sample."""

from __future__ import annotations

import torch
from torch import Tensor

NORMS = ("l2", "l1", "linf")


def sample_distances(reps: Tensor, norm: str = "l2") -> Tensor:
    """Pairwise distances between the rows of each ``(n_samples, n_latent)`` matrix in ``reps``.

    Parameters
    ----------
    reps
        Counterfactual states, shape ``(..., n_samples, n_latent)``.
    norm
        ``"l2"`` (Euclidean), ``"l1"`` or ``"linf"`` (largest absolute coordinate difference).

    Returns
    -------
    Shape ``(..., n_samples, n_samples)``: exactly symmetric, with an exactly zero diagonal.

    Notes
    -----
    ``torch.cdist`` forms the differences ``reps[i] - reps[j]`` inside its kernel (never the
    ``(..., S, S, L)`` array, and not the expansion ``|a|^2 + |b|^2 - 2 a.b``, which loses precision
    for nearby states), so memory is that of the output. The result is symmetrised by averaging with
    its transpose, so rounding cannot make ``d[i, j] != d[j, i]``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS}.")
    p = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}[norm]
    lead, (S, L) = reps.shape[:-2], reps.shape[-2:]
    flat = reps.reshape(-1, S, L)
    d = torch.cdist(flat, flat, p=p, compute_mode="donot_use_mm_for_euclid_dist").reshape(*lead, S, S)
    d = 0.5 * (d + d.transpose(-1, -2))
    return d * (1 - torch.eye(d.shape[-1], dtype=d.dtype, device=d.device))


def normalize_by_baseline(dists: Tensor, baseline_mean: Tensor, baseline_var: Tensor) -> Tensor:
    """``(d - m) / sqrt(v)`` averaged over Monte Carlo draws.

    Parameters
    ----------
    dists
        Sampled distances, shape ``(mc, cells, S, S)``.
    baseline_mean, baseline_var
        Mean and variance, per cell, of the distance between two draws of the cell's own state
        (shape ``(cells,)``): what a distance between indistinguishable samples looks like.
    """
    z = (dists - baseline_mean[None, :, None, None]) / baseline_var[None, :, None, None].sqrt()
    return z.mean(0)


def baseline_distances(z_draws: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``|z_a - z_b|`` over pairs of independent draws of a cell's state.

    Parameters
    ----------
    z_draws
        ``(2 * k, cells, n_latent)``; the first half is paired with the second.
    """
    k = z_draws.shape[0] // 2
    d = (z_draws[:k] - z_draws[k : 2 * k]).square().sum(-1).sqrt()  # (k, cells)
    return d.mean(0), d.var(0)
