"""Bayesian differential expression from a generative model's posterior, for every cellvi model.

The question asked of two populations of cells, A (``group1``) and B (``group2``): how does the
*population-level* normalized expression ``h_A`` of each feature compare with ``h_B``? The engine
answers it in five steps (:func:`differential_expression`):

1. **Cells**: each population is subsampled to a bounded number of cells (``n_samples_overall``
   decoded draws in all, ``n_samples`` per cell, so the cost does not grow with the population size).
2. **Posterior draws**: each chosen cell's latent is drawn from its posterior and decoded to
   normalized expression at library size 1 (in its own batch, or averaged over the batches of
   ``batchid1``/``batchid2`` with ``batch_correction=True``). With ``weights="importance"`` the
   draws of each cell are resampled by their importance weights ``p(x, z) / q(z | x)``.
3. **Population moments** (:func:`population_moments`): a cell's estimate is the mean of its draws,
   ``h_A`` the mean of the chosen cells' estimates, and its variance their squared standard error: the
   uncertainty about the population mean (finite cells + posterior uncertainty), not the spread of
   single cells. The LFC's mean and variance follow by the delta method (:func:`lfc_moments`); its
   variance is then widened to what the observed counts allow (:func:`count_log_var`): a feature is
   never known better than its counts say (Poisson).
4. **Effect and evidence** (:func:`summarize`): ``lfc = log2(h_A + pc) -
   log2(h_B + pc)``; ``mode="change"`` gives ``proba_de = P(|lfc| > delta)``, ``mode="vanilla"``
   gives ``proba_m1 = P(h_A > h_B)``; Bayes factors are their log-odds. The LFCs are first divided by
   the model's shrinkage slope, measured against the observed LFCs (:func:`model_slope`: a VAE shrinks a
   contrast it learned only partly), then carry the model's remaining error, measured on well-observed
   features (:func:`model_error_sd`), are centred on the
   well-observed features to remove compositional shifts (:func:`compositional_shift`), and are shrunk by an
   empirical-Bayes spike-and-slab prior (:func:`spike_slab_posterior`), so that a feature the data say little
   about keeps the prior's null weight. Before centring, the observed LFC of the counts (within
   batches with ``batch_correction=True``, :func:`observed_lfc`) pulls the model's LFCs towards it in
   proportion to their precisions (:func:`combine_moments`, ``use_counts=True``): where the model
   has learned little of the contrast (its measured error is large), the counts decide, so a weakly
   trained model gives a weaker answer rather than none; ``model_agreement`` in the table says how
   much of the observed contrast the model carries (:func:`model_agreement`). These steps act on each
   feature's mean and variance (:func:`summarize`); the probabilities are exact for that Gaussian.
5. **Calls** (:func:`expected_fdr_calls`): the largest top-ranked set whose posterior expected
   false discovery proportion is at most ``fdr_target``.

With ``sample_key`` (donor-aware DE, ``docs/de_donors.md``) a sixth step tests the effect across samples:
each group's decoded expression is averaged per sample, combined with the sample's pseudobulk counts
(:func:`combine_sample_values`), centred per sample (:func:`center_samples`) and compared with a
moderated paired or two-sample t-test (:func:`sample_level_test`, TREAT against ``delta`` in change
mode); ``padj`` (:func:`bh_adjust`) gives calls whose FDR holds with the samples as replicates.
Features with fewer than ``MIN_CALL_COUNTS`` counts in both groups are never called.

Each call decodes every population ("unit" of cells) once (:func:`plan`): one-vs-rest and
within-cluster comparisons reuse the units' draws, and the count statistics of all units come from
one pass over the CSR (:func:`count_sums`).

Why this calls more true effects than scvi-tools at the same FDR: scvi-tools compares *random
pairs of single cells*, so ``P(|lfc| > delta)`` measures how often two individual cells differ,
which stays well below 1 even for a clear population-level effect when cells are noisy; its
expected-FDR rule then admits few genes. Here the probability is about the population means,
which is the quantity a DE call is about (``docs/de.md``; measured in ``BENCHMARKS.md``).

A model plugs in by providing ``_de_draws(adata, indices, n_samples, transform_batch, batch_size)``
returning ``(n_samples * n_cells, n_features)`` draws, sample-major (row ``k * n_cells + i`` is draw
``k`` of cell ``i``); with a ``return_log_weights=True`` option (``transform_batch`` then a list of
batches decoded from the same z) it also supports importance weighting.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

LOG_EPS = 1e-8  # keeps log2 finite when no pseudocount is used
# A feature with at least this many counts in each group is "well observed": its observed log2 ratio is
# precise to about 0.3 (Poisson), enough to measure the model's error on and to centre the LFCs on.
MIN_COUNTS = 20.0
# Fewest well-observed features for a median or mean square over them (error, centring) to be trusted.
MIN_REFERENCE_FEATURES = 20
# Most posterior draws decoded per cell. A cell's estimate is the mean of its draws and the population's variance
# is the spread of those estimates over cells (:func:`population_moments`), so the Monte Carlo error of few draws is
# counted in the variance, never hidden; more draws shrink only that share (at most half of the posterior's with
# 2 draws) at a decoding cost that grows with them. 2: calls across DE seeds as stable as with 3, on designs
# not used to choose it and on Kang (benchmarks/check_de_draws.py, BENCHMARKS.md).
MAX_DRAWS_PER_CELL = 2
# Posterior draws per cell that importance resampling chooses among.
IMPORTANCE_DRAWS_PER_CELL = 10
# A feature with fewer counts than this in each of the two groups is never called: "never seen" is not DE.
MIN_CALL_COUNTS = 3.0
# Smallest shrinkage slope of the model's LFCs that is corrected (:func:`model_slope`): below it the model
# carries almost none of the contrast, its error measured after the correction is large and the counts decide.
MIN_MODEL_SLOPE = 0.05
# Decoded values held at once when ``batch_size`` is None: cells per decoding minibatch are this over (draws per
# cell x features), at least 128 (2,000 cells at 2 draws x 1,000 genes: few, large tensor operations).
DECODE_ELEMENTS = 4_000_000
# ``lfc_min`` / ``lfc_max`` are the LFC's 0.1 % / 99.9 % quantiles: its mean -/+ this many standard deviations.
LFC_EXTREME_SD = 3.090232306167813


# --------------------------------------------------------------------------- pure statistics


def expected_fdr_calls(p_de: np.ndarray, target: float = 0.05) -> np.ndarray:
    """Mark as DE the largest top-ranked set whose mean ``1 - p_de`` (expected FDR) is <= ``target``.

    Parameters
    ----------
    p_de
        Posterior probability that each feature is DE, shape ``(n_features,)``.
    target
        Posterior expected false discovery proportion to control.

    Returns
    -------
    Boolean mask in input order.
    """
    p_de = np.asarray(p_de, dtype=np.float64)
    order = np.argsort(-p_de, kind="stable")
    efdr = np.cumsum(1.0 - p_de[order]) / np.arange(1, p_de.size + 1)  # non-decreasing
    calls = np.zeros(p_de.size, dtype=bool)
    calls[order[: np.searchsorted(efdr, target + 1e-12, side="right")]] = True
    return calls


def bayes_factor(p: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Log Bayes factor (natural log posterior odds) ``log(p / (1 - p))``, clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def estimate_delta(lfc_mean: np.ndarray, min_delta: float = 0.1, seed: int = 0) -> float:
    """Data-driven LFC threshold: the half-width of the central component of a Gaussian mixture.

    A 3-component mixture is fitted to the per-feature mean LFCs; the component whose mean is
    closest to 0 models features that do not change. ``delta = |mean| + 2 sd`` of that component,
    at least ``min_delta``.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(lfc_mean, dtype=np.float64)
    x = x[np.isfinite(x)].reshape(-1, 1)
    if x.shape[0] < 10:
        raise ValueError("delta=None needs at least 10 features to estimate a threshold; pass a delta.")
    gmm = GaussianMixture(n_components=3, random_state=seed).fit(x)
    k = int(np.argmin(np.abs(gmm.means_.ravel())))
    sd = float(np.sqrt(gmm.covariances_.ravel()[k]))
    return max(float(abs(gmm.means_.ravel()[k]) + 2.0 * sd), min_delta)


def estimate_pseudocounts(scale1: np.ndarray, scale2: np.ndarray, nonzero1: np.ndarray, nonzero2: np.ndarray,
                          quantile: float = 0.9) -> float:
    """Pseudocount from features never observed in a group: the ``quantile`` of their expression there.

    Features with no counts in a population still get a decoded expression; a pseudocount of that
    size shrinks their LFCs towards 0, so that "expressed vs never seen" is not called from model
    extrapolation alone. Returns ``LOG_EPS`` when every feature was seen in both groups.
    """
    values = [s[~nz] for s, nz in ((scale1, nonzero1), (scale2, nonzero2)) if (~nz).any()]
    if not values:
        return LOG_EPS
    return float(max(np.quantile(v, quantile) for v in values))


def importance_resample(draws: np.ndarray, log_w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stratified sampling importance resampling of each cell's posterior draws.

    Parameters
    ----------
    draws
        ``(n_draws, n_cells, n_features)`` draws from the encoder ``q(z | x)``, decoded.
    log_w
        ``(n_draws, n_cells)`` log importance weights ``log p(x, z) - log q(z | x)``.

    Returns
    -------
    Draws of the same shape that follow the weighted distribution: with normalised weights ``w`` of a
    cell, its draw ``k`` is replaced by the draw at cumulative weight ``(k + U) / n_draws``, ``U ~ U(0, 1)``.
    Equal weights give back every draw once; a dominant weight gives that draw every time.
    """
    n_draws, n_cells = log_w.shape
    w = np.exp(log_w - log_w.max(0, keepdims=True))
    cum = np.cumsum(w / w.sum(0, keepdims=True), 0)  # (n_draws, n_cells), per cell
    u = (rng.random((n_draws, n_cells)) + np.arange(n_draws)[:, None]) / n_draws
    pick = np.minimum((cum[None, :, :] < u[:, None, :]).sum(1), n_draws - 1)  # (n_draws, n_cells)
    return draws[pick, np.arange(n_cells)[None, :]]


def outlier_cells(z: np.ndarray, quantile: float = 0.999) -> np.ndarray:
    """Cells whose latent mean lies outside the population's robust ellipsoid (boolean, ``(n_cells,)``).

    Each dimension is centred on its median and scaled by its MAD (times 1.4826, the sd of a normal);
    a cell is an outlier when its squared distance exceeds the chi-square ``quantile`` with
    ``n_latent`` degrees of freedom.
    """
    from scipy.stats import chi2

    z = np.asarray(z, dtype=np.float64)
    center = np.median(z, 0)
    scale = 1.4826 * np.median(np.abs(z - center), 0) + 1e-8  # robust sd per dimension
    dist2 = (((z - center) / scale) ** 2).sum(1)
    return dist2 > chi2.ppf(quantile, df=z.shape[1])


def population_moments(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean expression of a population and the variance of that mean, from per-cell posterior draws.

    Parameters
    ----------
    draws
        ``(n_draws, n_cells, n_features)`` posterior draws of each cell's expression.

    Returns
    -------
    ``(mean, var)``, each ``(n_features,)`` float64. Each cell's estimate is the mean of its draws; the cells
    are the independent units, so the population mean is the mean of the cells' estimates and its variance
    the squared standard error, ``var_cells(estimates) / n_cells``. When the posterior is calibrated that
    spread holds all three sources of error: which cells were sampled, where each cell's posterior lies
    (its centre's error is as large as its spread) and the Monte Carlo error of its ``n_draws`` draws. In
    closed form: no resampling, no Monte Carlo error of its own.
    """
    return population_moments_of([draws])


def population_moments_of(chunks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`population_moments` of the draws of a population given in chunks of cells (each
    ``(n_draws, cells, n_features)``), holding one chunk at a time: sums of the cells' estimates and of
    their squares, shifted by the first chunk's mean (float64: no cancellation for bounded values)."""
    n, total, total_sq, shift, n_features = 0, None, None, None, 0
    for draws in chunks:
        n_features = draws.shape[-1]
        if not draws.shape[1]:
            continue
        cells = draws.mean(0, dtype=np.float64)
        if shift is None:
            shift = cells.mean(0)
            total, total_sq = np.zeros_like(shift), np.zeros_like(shift)
        d = cells - shift
        n, total, total_sq = n + cells.shape[0], total + d.sum(0), total_sq + np.square(d).sum(0)
    if n == 0:  # no cells: an unknown mean
        return np.full(n_features, np.nan), np.zeros(n_features)
    mean = total / n
    if n < 2:  # one cell: no spread to measure (the counts' floor on the variance still applies)
        return shift + mean, np.zeros_like(mean)
    return shift + mean, np.maximum(total_sq - n * np.square(mean), 0.0) / (n - 1) / n


def mix_populations(parts: list[tuple[np.ndarray, np.ndarray]], sizes) -> tuple[np.ndarray, np.ndarray]:
    """Moments ``(mean, var)`` of a population made of independent parts with ``sizes`` cells each: the
    cell-weighted mean of their means, and the sum of their variances times the squared weights."""
    w = np.asarray(sizes, dtype=np.float64) / float(np.sum(sizes))
    return sum(wi * m for wi, (m, _) in zip(w, parts)), sum(wi**2 * v for wi, (_, v) in zip(w, parts))


def count_log_var(counts: np.ndarray) -> np.ndarray:
    """Poisson's floor on the variance of a log mean (natural log) known from ``counts``: ``1 / (C + 0.5)``."""
    return 1.0 / (np.asarray(counts, dtype=np.float64) + 0.5)


def group_count_stats(X, rows: np.ndarray, library: np.ndarray, squares=None) -> tuple[np.ndarray, float, np.ndarray]:
    """Pooled counts of one group of cells and their spread across cells.

    Parameters
    ----------
    X
        CSR count matrix ``(cells, features)``.
    rows
        Row positions of the group's cells.
    library
        Observed total counts of every cell of ``X``.
    squares
        ``X`` squared elementwise, when the caller computed it once for many groups.

    Returns
    -------
    ``(C, L, S2)``: ``C_g = sum_i x_ig``, ``L = sum_i l_i`` and the residual sum of squares
    ``S2_g = sum_i (x_ig - R_g l_i)^2`` around the ratio ``R_g = C_g / L`` (shape ``(n_features,)``).
    """
    lib = library[rows].astype(np.float64)
    W = np.zeros((X.shape[0], 2))
    W[rows, 0], W[rows, 1] = 1.0, lib  # one pass over the CSR, no copy of the group's rows
    C, sum_xl = np.asarray(X.T @ W, dtype=np.float64).T
    sum_x2 = np.asarray(X.multiply(X).T @ W[:, 0] if squares is None else squares.T @ W[:, 0], dtype=np.float64)
    L = float(lib.sum())
    R = C / max(L, 1e-12)
    S2 = np.maximum(sum_x2 - 2.0 * R * sum_xl + R**2 * float(lib @ lib), 0.0)
    return C, L, S2


def log_ratio_var(C: np.ndarray, S2: np.ndarray, n_cells: int) -> np.ndarray:
    """Variance (natural log) of the log ratio ``log((C + 0.5) / L)`` estimated from ``n_cells`` cells.

    The ratio estimator's variance, ``n / (n - 1) * S2 / L^2``, divided by ``R^2`` (delta method),
    with ``C + 0.5`` for ``C``; never below Poisson's ``1 / (C + 0.5)``. ``S2`` (from
    :func:`group_count_stats`) carries the cell-to-cell spread (overdispersion, heterogeneous
    cells) that pooled Poisson counts ignore.
    """
    n = max(int(n_cells), 2)
    c = C + 0.5
    return np.maximum(n / (n - 1) * S2 / c**2, 1.0 / c)


def observed_lfc(stats1: list[tuple], stats2: list[tuple]) -> tuple[np.ndarray, np.ndarray] | None:
    """Log2 fold change of the observed counts, within strata, and its variance.

    Parameters
    ----------
    stats1, stats2
        For each stratum (a batch with ``batch_correction=True``, else one stratum of all cells), the
        ``(C, L, S2, n_cells)`` of each group (:func:`group_count_stats`); ``None`` where the group has
        fewer than 2 cells in that stratum.

    Returns
    -------
    ``(o, u)``, shape ``(n_features,)`` each: the inverse-variance weighted mean over strata of
    ``o_b = log2((C_1b + 0.5) / L_1b) - log2((C_2b + 0.5) / L_2b)`` and its variance ``u``;
    ``None`` when no stratum holds both groups. Comparing within a stratum removes what differs
    between strata (the batch effect) from the observed contrast.
    """
    num, prec = 0.0, 0.0
    for s1, s2 in zip(stats1, stats2):
        if s1 is None or s2 is None:
            continue
        (C1, L1, S1, n1), (C2, L2, S2_, n2) = s1, s2
        o_b = np.log2((C1 + 0.5) / L1) - np.log2((C2 + 0.5) / L2)
        u_b = (log_ratio_var(C1, S1, n1) + log_ratio_var(C2, S2_, n2)) / np.log(2) ** 2
        num, prec = num + o_b / u_b, prec + 1.0 / u_b
    if np.isscalar(prec):
        return None
    return num / prec, 1.0 / prec


def combine_moments(m: np.ndarray, v: np.ndarray, observed: np.ndarray, observed_var: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pull the model's LFC ``N(m_g, v_g)`` towards the observed LFC ``N(o_g, u_g)``: ``(mean, variance, model_share)``.

    The model's variance ``v_g`` holds its posterior uncertainty, its own error :func:`model_error_sd` and the
    counts' precision floor :func:`count_log_var`; the observed LFC (:func:`observed_lfc`) has variance ``u_g``.
    The two are weighed by precision, ``mean = (m / v + o / u) / (1 / v + 1 / u)``, but the variance is that of
    the better source, ``min(v, u)``, not the smaller variance of two independent measurements: the model
    learned its LFCs from the same counts, so adding their precisions would count the counts twice (it made
    false calls of low-count genes on a well-trained model). Where the model is precise and accurate it
    dominates (it shares strength across genes and cells); where it has learned little of the contrast (``v``
    large through its error), the counts do, so a weakly trained model gives a weaker answer, not an empty
    one. ``model_share`` is the weight ``(1/v) / (1/v + 1/u)`` of the model in each feature's mean.
    """
    share = (1.0 / v) / (1.0 / v + 1.0 / observed_var)
    return share * m + (1.0 - share) * observed, np.minimum(v, observed_var), share


def model_error_sd(model_lfc: np.ndarray, observed: np.ndarray, observed_var: np.ndarray,
                   well_observed: np.ndarray) -> float:
    """How far the model's LFCs (log2) stray from the observed ones beyond the observation noise.

    On the ``well_observed`` features (boolean mask) the observed LFC ``o_g`` (:func:`observed_lfc`) is
    precise, and ``model - observed`` has variance ``tau^2 + u_g``. ``tau`` is the model's own error on
    an LFC, which its posterior does not know about (VAE decoders shrink real effects, more so when
    briefly trained, and leak a little of them into other features). It is estimated from the mean
    square, not a robust spread: the few features the model gets badly wrong are exactly the false
    calls to guard against. 0 when fewer than ``MIN_REFERENCE_FEATURES`` features qualify.
    """
    ok = well_observed & np.isfinite(model_lfc)
    if ok.sum() < MIN_REFERENCE_FEATURES:
        return 0.0
    d = model_lfc[ok] - observed[ok]
    total_var = np.mean((d - np.median(d)) ** 2)
    return float(np.sqrt(max(total_var - np.median(observed_var[ok]), 0.0)))


def model_slope(model_lfc: np.ndarray, observed: np.ndarray, observed_var: np.ndarray,
                well_observed: np.ndarray) -> float:
    """How much the model shrinks effects: the slope ``b`` of its LFCs on the true ones, ``model ~ b * true``.

    Measured on the ``well_observed`` features (boolean mask) against the observed LFC ``o_g`` (variance
    ``u_g``, :func:`observed_lfc`): ``b = cov(model, o) / (var(o) - mean(u))``, the regression slope corrected
    for the noise of ``o`` (errors in variables). A VAE decoder shrinks a contrast it learned only partly
    (briefly trained, a small population, a weak effect; measured ``b`` 0.1-0.5 on such designs, about 1 on
    well-trained ones), and shrunk LFCs pulled the count-based estimates towards 0 in
    :func:`combine_moments`, losing power. Dividing the model's LFCs by ``b`` puts them on the counts' scale;
    what remains of their error is measured after that (:func:`model_error_sd`). 1 (no correction) when fewer
    than ``MIN_REFERENCE_FEATURES`` features qualify or when the counts show no contrast beyond their noise;
    clipped to ``[MIN_MODEL_SLOPE, 1 / MIN_MODEL_SLOPE]``.
    """
    ok = well_observed & np.isfinite(model_lfc) & np.isfinite(observed)
    if ok.sum() < MIN_REFERENCE_FEATURES:
        return 1.0
    signal = np.var(observed[ok]) - np.mean(observed_var[ok])  # variance of the true LFCs
    cov = np.cov(model_lfc[ok], observed[ok])[0, 1]
    if signal <= 0 or cov <= 0:
        return 1.0
    return float(np.clip(cov / signal, MIN_MODEL_SLOPE, 1.0 / MIN_MODEL_SLOPE))


def model_agreement(model_lfc: np.ndarray, observed: np.ndarray, well_observed: np.ndarray) -> float:
    """Pearson correlation of the model's LFCs with the observed ones over the ``well_observed`` features.

    How much of the observed contrast the model carries: near 1 when it learned the contrast, near 0
    when it learned little of it (a briefly trained model, a small population, a weak effect) and the
    observed counts decide (:func:`combine_moments`), or when there is no contrast to learn. NaN
    when fewer than ``MIN_REFERENCE_FEATURES`` features are well observed.
    """
    ok = well_observed & np.isfinite(model_lfc) & np.isfinite(observed)
    if ok.sum() < MIN_REFERENCE_FEATURES or model_lfc[ok].std() == 0 or observed[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(model_lfc[ok], observed[ok])[0, 1])


def lfc_draws(h1: np.ndarray, h2: np.ndarray, pseudocounts: float) -> np.ndarray:
    """``log2(h1 + pc) - log2(h2 + pc)``, elementwise over population draws."""
    pc = max(float(pseudocounts), LOG_EPS)
    return np.log2(h1 + pc) - np.log2(h2 + pc)


def lfc_moments(mean1: np.ndarray, var1: np.ndarray, mean2: np.ndarray, var2: np.ndarray,
                pseudocounts: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``lfc = log2(h1 + pc) - log2(h2 + pc)`` for independent population means ``h1``,
    ``h2`` with moments ``(mean1, var1)``, ``(mean2, var2)`` (:func:`population_moments`), by the delta method:
    ``var = (var1 / (mean1 + pc)^2 + var2 / (mean2 + pc)^2) / ln(2)^2``."""
    pc = max(float(pseudocounts), LOG_EPS)
    a1, a2 = mean1 + pc, mean2 + pc
    return np.log2(a1) - np.log2(a2), (var1 / a1**2 + var2 / a2**2) / np.log(2) ** 2


def compositional_shift(lfc_mean: np.ndarray, reference: np.ndarray) -> float:
    """Median of the mean LFCs over the ``reference`` features (boolean mask; all of them when fewer than
    ``MIN_REFERENCE_FEATURES``): the compositional shift the engine subtracts.

    Normalized expression is a composition: when a few genes take a large share of a population's
    counts (interferon genes in stimulated cells), every other gene's share drops although its
    absolute expression did not change. Assuming most well-observed features do not change, their
    median LFC is that compositional shift (as DESeq2's median-of-ratios size factors assume).
    """
    ref = reference if reference.sum() >= MIN_REFERENCE_FEATURES else np.ones_like(reference)
    return float(np.median(lfc_mean[ref]))


def fit_spike_slab(m: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Empirical-Bayes prior on true LFCs: a point mass at 0 (weight ``pi0``) plus ``N(0, s2)``.

    Each feature's LFC estimate is ``m_g`` with variance ``v_g``; its marginal likelihood is
    ``pi0 N(m; 0, v) + (1 - pi0) N(m; 0, v + s2)``. ``(pi0, s2)`` maximise the sum over features: for each
    ``s2`` of a grid (``[1e-3, 25]``, then a finer one around the best) the best ``pi0`` in ``[0, 0.999]``
    (:func:`_best_null_weight`; the sum is concave in ``pi0``). Features with wide posteriors barely inform
    the fit, so most features being null is learned from the well-measured ones.
    """
    m, v = np.asarray(m, dtype=np.float64), np.asarray(v, dtype=np.float64)
    l0 = _log_normal(m, v)

    def best(s2s: np.ndarray) -> tuple[int, float]:
        # log(pi e^l0 + (1 - pi) e^l1) = l0 + top + log(pi e^-top + (1 - pi) e^(d - top)), d = l1 - l0,
        # top = max(d, 0): one of the two exponentials is 1, so the mixture never underflows
        d = _log_normal(m[None, :], v[None, :] + s2s[:, None]) - l0
        top = np.maximum(d, 0.0)
        pis, ll = _best_null_weight(np.exp(-top), np.exp(d - top))
        j = int(np.argmax(ll + top.sum(-1)))
        return j, float(pis[j])

    s2s = np.geomspace(1e-3, 25.0, 21)
    j, _ = best(s2s)
    s2s = np.geomspace(s2s[max(j - 1, 0)], s2s[min(j + 1, s2s.size - 1)], 21)
    j, pi0 = best(s2s)
    return pi0, float(s2s[j])


def _best_null_weight(spike: np.ndarray, slab: np.ndarray, max_pi: float = 0.999,
                      n_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """For each row ``k`` of ``(S, G)`` arrays, the ``pi`` in ``[0, max_pi]`` maximising
    ``sum_g log(pi spike_kg + (1 - pi) slab_kg)`` (concave in ``pi``: Newton's method from 0.5, clipped to
    the interval), and that maximum. Rows where one of ``spike``, ``slab`` is 1 for every ``g``."""
    diff = spike - slab
    pi = np.full(spike.shape[0], 0.5)
    for _ in range(n_iter):
        r = diff / np.maximum(slab + pi[:, None] * diff, 1e-300)  # d/dpi of each log term
        step = r.sum(-1) / np.maximum((r * r).sum(-1), 1e-300)  # -f' / f''
        new = np.clip(pi + step, 0.0, max_pi)
        done = np.abs(new - pi).max() < 1e-7
        pi = new
        if done:
            break
    with np.errstate(divide="ignore"):
        return pi, np.log(slab + pi[:, None] * diff).sum(-1)


def _log_normal(x: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Log density of ``N(0, var)`` at ``x``, elementwise."""
    return -0.5 * (np.log(2 * np.pi * var) + x**2 / var)


def spike_slab_posterior(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(w, a)`` of each feature under the prior of :func:`fit_spike_slab` fitted to estimates ``m``, variances ``v``.

    ``w_g`` is the posterior probability that the feature is non-null (prior odds times the ratio of the two
    marginal likelihoods); given non-null, its LFC is ``N(a_g m_g, a_g v_g)`` with ``a_g = s2 / (s2 + v_g)``;
    with probability ``1 - w_g`` it is exactly 0. A feature the data say little about keeps the prior's null
    weight instead of scoring as DE because its wide posterior crosses ``delta`` (which it did without this
    step), and well-measured effects keep their size.
    """
    pi0, s2 = fit_spike_slab(m, v)
    with np.errstate(divide="ignore"):
        log_odds = np.log1p(-pi0) - np.log(pi0) + _log_normal(m, v + s2) - _log_normal(m, v) if pi0 > 0 else np.inf
    w = 1.0 / (1.0 + np.exp(-np.clip(log_odds, -700, 700)))  # P(non-null | data)
    return w, s2 / (s2 + v)


def effect_posterior(mean: np.ndarray, var: np.ndarray, *, observed: tuple[np.ndarray, np.ndarray] | None = None,
                     center: bool = False, reference: np.ndarray | None = None, shrink: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The steps a comparison's effect ``N(mean, var)`` per feature goes through once it is on the observed scale
    (slope and model error included), for LFCs (:func:`summarize`) and PeakVI's differences of accessibility:
    the update with the ``observed`` effect ``(o, u)`` (:func:`combine_moments`), centring on the ``reference``
    features (:func:`compositional_shift`; default all), spike-and-slab shrinkage (:func:`spike_slab_posterior`).

    Returns
    -------
    ``(w, mean, var, model_share)``: the effect is 0 with probability ``1 - w`` and ``N(mean, var)`` otherwise
    (``w = 1`` without shrinkage); ``model_share`` is None without ``observed``.
    """
    share = None
    if observed is not None:
        mean, var, share = combine_moments(mean, var, *observed)
    if center:
        mean = mean - compositional_shift(mean, np.ones(mean.size, bool) if reference is None else reference)
    w = np.ones(mean.size)  # P(non-null)
    if shrink:
        w, a = spike_slab_posterior(mean, var)
        mean, var = a * mean, a * var
    return w, mean, var, share


def prob_positive(w: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """``P(X > 0)`` for an effect ``X`` that is 0 with probability ``1 - w`` and ``N(mean, sd^2)`` otherwise; an
    effect of exactly 0 counts half (also a zero-width slab: spike-and-slab can shrink one to a point)."""
    from scipy.special import ndtr

    return w * ndtr(mean / np.maximum(sd, np.finfo(np.float64).tiny)) + 0.5 * (1.0 - w)


def tail_probability(mean: np.ndarray, sd: np.ndarray, delta: float) -> np.ndarray:
    """``P(|X| > delta)`` for ``X ~ N(mean, sd^2)``, elementwise (``delta = 0``: 1 unless ``sd`` is 0)."""
    from scipy.special import ndtr

    return ndtr((mean - delta) / sd) + ndtr((-mean - delta) / sd)


def summarize(pop1: tuple[np.ndarray, np.ndarray], pop2: tuple[np.ndarray, np.ndarray], *, mode: str,
              delta: float | None, pseudocounts: float, lfc_error_sd: float = 0.0, reference: np.ndarray | None = None,
              center: bool = True, shrink: bool = False, observed: tuple[np.ndarray, np.ndarray] | None = None,
              min_delta: float = 0.1, model_slope: float = 1.0,
              counts: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """Per-feature evidence from the two populations' expression moments ``pop = (mean, var)``
    (:func:`population_moments`, :func:`mix_populations`).

    The LFC's mean and variance (:func:`lfc_moments`) get, in order: the counts' precision floor (``counts``
    of each group, :func:`count_log_var`) added to the variance, division by the model's shrinkage slope
    ``model_slope`` (:func:`model_slope`; the variance by its square), the model's own error
    ``lfc_error_sd^2`` (:func:`model_error_sd`) added to the variance, the update with the ``observed`` LFC
    and its variance (:func:`combine_moments`, when given), centring on the ``reference`` features
    (:func:`compositional_shift`; default all features) and empirical-Bayes spike-and-slab shrinkage
    (:func:`spike_slab_posterior`). The result is a Gaussian per feature (times ``P(non-null)`` with
    shrinkage), whose probabilities are exact (no Monte Carlo error). ``lfc_median`` is its mean, and
    ``lfc_min`` / ``lfc_max`` its 0.1 % and 99.9 % quantiles (about the extremes of 1,000 draws of it).

    Returns the columns proba_de, proba_not_de, bayes_factor, scale1, scale2, pseudocounts, delta, lfc_mean,
    lfc_median, lfc_std, lfc_min, lfc_max (and proba_m1, proba_m2 in vanilla mode, from ``P(lfc > 0)``;
    ``model_share`` with ``observed``). With shrinkage, ``lfc_mean`` is the posterior mean (null mass
    included) and the other LFC summaries describe the LFC given that the feature changes.
    """
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode={mode!r} is not one of ('vanilla', 'change').")
    m, v0 = lfc_moments(*pop1, *pop2, pseudocounts)
    v0 = np.maximum(v0, 1e-24)
    if counts is not None:  # the model's LFC is never more precise than the counts allow ...
        v0 = v0 + (count_log_var(counts[0]) + count_log_var(counts[1])) / np.log(2) ** 2
    mean, var = m / model_slope, v0 / model_slope**2 + lfc_error_sd**2  # ... nor once divided by its slope
    w, mean, var, share = effect_posterior(mean, var, observed=observed, center=center, reference=reference,
                                           shrink=shrink)
    extra = {} if share is None else {"model_share": share}
    sd = np.sqrt(var)
    lfc_mean = w * mean
    if mode == "vanilla":
        p1 = prob_positive(w, mean, sd)  # P(lfc > 0)
        extra.update(proba_m1=p1, proba_m2=1.0 - p1)
        proba_de = np.maximum(p1, 1.0 - p1)  # probability of the more likely direction
        bf = bayes_factor(p1)
        used_delta = np.nan
    else:
        used_delta = estimate_delta(lfc_mean, min_delta) if delta is None else float(delta)
        if used_delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}.")
        proba_de = w * tail_probability(mean, sd, used_delta)
        bf = bayes_factor(proba_de)
    return pd.DataFrame({
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": bf,
        **{k: v for k, v in extra.items() if k != "model_share"},
        "scale1": pop1[0],
        "scale2": pop2[0],
        "pseudocounts": pseudocounts,
        "delta": used_delta,
        "lfc_mean": lfc_mean,
        "lfc_median": mean,
        "lfc_std": sd,
        "lfc_min": mean - LFC_EXTREME_SD * sd,
        "lfc_max": mean + LFC_EXTREME_SD * sd,
        **({"model_share": extra["model_share"]} if "model_share" in extra else {}),
    })


def raw_stats(X, idx1: np.ndarray, idx2: np.ndarray) -> dict[str, np.ndarray]:
    """Observed-count statistics of the two groups: raw means, fraction non-zero, means per 10^4 counts.

    Computed as products of the CSR with per-cell weight columns (two passes over ``X``, no copy of
    the groups' rows).
    """
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    library = np.asarray(X.sum(1), dtype=np.float64).ravel()
    W = np.zeros((X.shape[0], 4))  # mean and mean per 10^4 counts, for each group
    for j, idx in enumerate((idx1, idx2)):
        W[idx, 2 * j] = 1.0 / idx.size
        W[idx, 2 * j + 1] = 1e4 / np.maximum(library[idx], 1e-12) / idx.size
    means = np.asarray(X.T @ W, dtype=np.float64)
    nonzero = np.asarray((X > 0).T @ W[:, [0, 2]], dtype=np.float64)
    return {
        "raw_mean1": means[:, 0], "non_zeros_proportion1": nonzero[:, 0], "raw_normalized_mean1": means[:, 1],
        "raw_mean2": means[:, 2], "non_zeros_proportion2": nonzero[:, 1], "raw_normalized_mean2": means[:, 3],
    }




# --------------------------------------------------------------------------- donor-level (sample-level) statistics


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN and is not counted among the tests).

    ``padj_(i) = min_{j >= i} m p_(j) / j`` over the ``m`` finite p-values sorted increasingly, capped at 1.
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(p[ok], kind="stable")
    scaled = p[ok][order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(scaled[::-1])[::-1]
    vals = np.empty(m)
    vals[order] = np.minimum(adj, 1.0)
    out[ok] = vals
    return out


def trigamma_inverse(x: np.ndarray) -> np.ndarray:
    """The ``y`` with ``trigamma(y) = x`` (``x > 0``), by Newton's method on ``1 / trigamma`` (Smyth, 2004)."""
    from scipy.special import polygamma

    x = np.asarray(x, dtype=np.float64)
    y = np.where(x > 1e6, 1.0 / np.sqrt(np.maximum(x, 1e-300)), 0.5 + 1.0 / np.maximum(x, 1e-300))
    for _ in range(50):
        tri = polygamma(1, y)
        step = tri * (1.0 - tri / x) / polygamma(2, y)
        y = y + step
        if np.all(np.abs(step) < 1e-8 * y):
            break
    return np.where(x < 1e-6, 1.0 / np.maximum(x, 1e-300), y)


def fit_variance_prior(s2: np.ndarray, df: float) -> tuple[float, float]:
    """Empirical-Bayes prior on features' variances, ``sigma^2 ~ s0^2 d0 / chi2(d0)`` (Smyth, 2004).

    Each feature's sample variance ``s2_g`` has ``df`` degrees of freedom. With ``z = log s2``,
    ``E z = log s0^2 + digamma(df/2) - log(df/2) + ...`` and ``var z = trigamma(df/2) + trigamma(d0/2)``;
    the method of moments gives ``d0`` (``inf``: no spread beyond sampling, every feature shares
    ``s0^2``) and ``s0^2``. Returns ``(d0, s0^2)``.
    """
    from scipy.special import digamma, polygamma

    s2 = np.asarray(s2, dtype=np.float64)
    s2 = s2[np.isfinite(s2) & (s2 > 0)]
    if s2.size < 3:
        return 0.0, 0.0  # too few features to learn a prior: no moderation
    e = np.log(s2) - digamma(df / 2) + np.log(df / 2)
    excess = e.var(ddof=1) - polygamma(1, df / 2)
    if excess <= 0:
        return float("inf"), float(np.exp(e.mean()))
    d0 = float(2.0 * trigamma_inverse(np.array(excess)))
    return d0, float(np.exp(e.mean() + digamma(d0 / 2) - np.log(d0 / 2)))


def moderated_variance(s2: np.ndarray, df: float, d0: float, s02: float) -> tuple[np.ndarray, float]:
    """Posterior variance ``(d0 s0^2 + df s2) / (d0 + df)`` and its degrees of freedom ``d0 + df``.

    With few samples a feature's own variance is a poor estimate (4 donors: 3 degrees of freedom); pooling
    it with the prior of :func:`fit_variance_prior` gives t statistics with more degrees of freedom and
    no feature that looks certain because its few samples happened to agree. ``d0 = inf`` returns ``s0^2``.
    """
    s2 = np.asarray(s2, dtype=np.float64)
    if not np.isfinite(d0):
        return np.full(s2.shape, s02), float("inf")
    return (d0 * s02 + df * s2) / (d0 + df), float(d0 + df)


def treat_pvalue(effect: np.ndarray, se: np.ndarray, df: float, delta: float = 0.0) -> np.ndarray:
    """P-value of ``H0: |effect| <= delta`` from a t statistic (TREAT; McCarthy & Smyth, 2009).

    ``p = T_df.sf((|b| - delta) / se) + T_df.sf((|b| + delta) / se)``, the largest probability under the
    null of a statistic at least this far from the interval; ``delta = 0`` gives the two-sided t-test.
    """
    from scipy.stats import norm, t

    dist = norm if not np.isfinite(df) else t(df)
    b, se = np.abs(np.asarray(effect, dtype=np.float64)), np.asarray(se, dtype=np.float64)
    return np.minimum(dist.sf((b - delta) / se) + dist.sf((b + delta) / se), 1.0)


def center_samples(y: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample log expression ``y`` ``(n_samples, n_features)`` with each sample's compositional shift removed.

    A sample's shift is the median over the ``reference`` features of its difference from the mean of all
    samples (DESeq2's median-of-ratios size factor, on log2 expression).
    """
    ref = reference if reference.sum() >= MIN_REFERENCE_FEATURES else np.ones_like(reference)
    shift = np.median((y - y.mean(0))[:, ref], axis=1)
    return y - shift[:, None]


def sample_spread(y1: np.ndarray, y2: np.ndarray, *, paired: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(effect, s2, df, scale)`` of a paired or two-sample comparison of per-sample values ``(n_samples, n_features)``.

    Paired: ``effect = mean(y1 - y2)``, ``s2`` the sample variance of the differences, ``df = n - 1``,
    ``scale = 1 / n``. Unpaired: the difference of the group means, the pooled variance, ``n1 + n2 - 2`` and
    ``1 / n1 + 1 / n2``. The standard error of the effect is ``sqrt(s2 * scale)``.
    """
    if paired:
        d = y1 - y2
        return d.mean(0), d.var(0, ddof=1), d.shape[0] - 1.0, 1.0 / d.shape[0]
    n1, n2 = y1.shape[0], y2.shape[0]
    df = n1 + n2 - 2.0
    s2 = (((y1 - y1.mean(0)) ** 2).sum(0) + ((y2 - y2.mean(0)) ** 2).sum(0)) / df
    return y1.mean(0) - y2.mean(0), s2, df, 1.0 / n1 + 1.0 / n2


def sample_level_test(y1: np.ndarray, v1: np.ndarray, y2: np.ndarray, v2: np.ndarray, *, paired: bool,
                      delta: float = 0.0, moderate: bool = True) -> dict[str, np.ndarray]:
    """Test the difference in log2 expression between two groups of samples, with the samples as replicates.

    Parameters
    ----------
    y1, y2
        ``(n_samples, n_features)`` log2 expression of each sample in group 1 and group 2 (with
        ``paired=True``, row ``s`` of both is the same sample).
    v1, v2
        Their variances: how well each sample's value is known (posterior and finite-cell uncertainty,
        never below the counts' Poisson precision).
    paired
        Paired t-test on the per-sample differences ``y1 - y2``; otherwise a two-sample t-test with a
        pooled variance (:func:`sample_spread`).
    delta
        Smallest |log2 fold change| of interest (:func:`treat_pvalue`).
    moderate
        Moderate the variances across features (below); ``False`` with ``v = 0`` gives the textbook t-tests.

    Returns
    -------
    ``effect`` (mean difference), ``se``, ``df``, ``pvalue`` (shape ``(n_features,)`` each, ``df`` a float).

    Notes
    -----
    The between-sample variance ``s2`` is moderated across features (:func:`fit_variance_prior`,
    :func:`moderated_variance`) and never taken below the mean within-sample variance ``mean(v)``: the
    spread of donors is not known better than each donor's own value (posterior uncertainty propagated).
    """
    effect, s2, df, scale = sample_spread(y1, y2, paired=paired)
    floor = (v1 + v2).mean(0) if paired else np.concatenate([v1, v2]).mean(0)
    d0, s02 = fit_variance_prior(s2, df) if moderate else (0.0, 0.0)
    s2_post, df_post = moderated_variance(s2, df, d0, s02) if d0 > 0 else (s2, df)
    se = np.sqrt(np.maximum(s2_post, floor) * scale)
    return {"effect": effect, "se": se, "df": df_post, "pvalue": treat_pvalue(effect, se, df_post, delta)}


def combine_sample_values(y: np.ndarray, v: np.ndarray, o: np.ndarray, u: np.ndarray, reference: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's log2 expression from the model (``y``, variance ``v``) and from its counts (``o``, ``u``).

    All arrays are ``(n_samples, n_features)``. The model's own error ``tau^2`` is the mean square of
    ``y - o`` (around its median) beyond the counts' noise on the ``reference`` (well-observed) features;
    the two sources are then weighed by precision, ``1 / (v + tau^2)`` against ``1 / u``, and the result
    keeps the variance of the better source, ``min(v + tau^2, u)`` (both come from the same counts, as in
    :func:`combine_moments`). Where counts are plentiful they decide (a generative model smooths the
    differences between samples and shrinks effects, which made a test of its values alone lose power
    and, without a floor, call null features); where they are scarce, the model's denoised value does.

    Returns
    -------
    ``(values, variances)``, ``(n_samples, n_features)`` each.
    """
    ref = reference if reference.sum() >= MIN_REFERENCE_FEATURES else np.ones_like(reference)
    d = (y - o)[:, ref]
    tau2 = max(float(np.mean((d - np.median(d)) ** 2) - np.median(u[:, ref])), 0.0)
    vm = v + tau2
    share = (1.0 / vm) / (1.0 / vm + 1.0 / u)
    return share * y + (1.0 - share) * o, np.minimum(vm, u)


def jaccard(calls: list[np.ndarray]) -> float:
    """Mean pairwise Jaccard index ``|A & B| / |A | B|`` of boolean call masks (1 when both are empty)."""
    vals = []
    for i in range(len(calls)):
        for j in range(i + 1, len(calls)):
            a, b = np.asarray(calls[i], bool), np.asarray(calls[j], bool)
            union = (a | b).sum()
            vals.append(1.0 if union == 0 else (a & b).sum() / union)
    return float(np.mean(vals))


# --------------------------------------------------------------------------- observed counts of many groups at once


def count_sums(X, labels: np.ndarray, n_labels: int, library: np.ndarray) -> dict[str, np.ndarray]:
    """Additive count sums of every label (a group of cells) in one pass over the CSR.

    Parameters
    ----------
    X
        CSR count matrix ``(cells, features)``.
    labels
        Label of each cell in ``0..n_labels - 1``; -1 for cells of no group.
    library
        Observed total counts of each cell.

    Returns
    -------
    ``(n_labels, n_features)`` arrays ``x`` (sum of counts), ``xl`` (of counts times library), ``x2``
    (of squared counts), ``nz`` (non-zero cells), ``xn`` (of counts per unit library) and
    ``(n_labels,)`` arrays ``n`` (cells), ``l`` (sum of libraries), ``l2`` (of squared libraries).
    Every statistic of a union of labels is the sum of theirs (:func:`stats_of`).
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    rows, lab, lib = np.flatnonzero(keep), labels[keep], library[keep].astype(np.float64)
    K = n_labels
    if rows.size < X.shape[0]:  # only the labelled cells' rows are read (a pairwise call touches few of them)
        X, rows = X[rows], np.arange(rows.size)
    # one sparse weight matrix (cells, 3K): indicator, library, 1 / library
    cols = np.concatenate([lab, lab + K, lab + 2 * K])
    vals = np.concatenate([np.ones(rows.size), lib, 1.0 / np.maximum(lib, 1e-12)])
    W = sp.csr_matrix((vals, (np.tile(rows, 3), cols)), shape=(X.shape[0], 3 * K))
    WT = W.T.tocsr()
    first = np.asarray((WT @ X).todense(), dtype=np.float64)  # (3K, features); X is never transposed
    ind = WT[:K]
    sq = X.copy()
    sq.data = sq.data.astype(np.float64) ** 2
    x2 = np.asarray((ind @ sq).todense(), dtype=np.float64)
    sq.data[:] = 1.0
    nz = np.asarray((ind @ sq).todense(), dtype=np.float64)
    return {"x": first[:K], "xl": first[K:2 * K], "xn": first[2 * K:], "x2": x2, "nz": nz,
            "n": np.bincount(lab, minlength=K).astype(np.float64),
            "l": np.bincount(lab, lib, minlength=K), "l2": np.bincount(lab, lib**2, minlength=K)}


def stats_of(sums: dict[str, np.ndarray], which) -> tuple[np.ndarray, float, np.ndarray, int]:
    """``(C, L, S2, n_cells)`` of the union of labels ``which`` (as :func:`group_count_stats`)."""
    which = np.atleast_1d(np.asarray(which, dtype=np.int64))
    C, xl, x2 = (sums[k][which].sum(0) for k in ("x", "xl", "x2"))
    L, l2 = float(sums["l"][which].sum()), float(sums["l2"][which].sum())
    R = C / max(L, 1e-12)
    S2 = np.maximum(x2 - 2.0 * R * xl + R**2 * l2, 0.0)
    return C, L, S2, int(sums["n"][which].sum())


# --------------------------------------------------------------------------- choosing cells


def cells_from(adata, idx, what: str) -> np.ndarray:
    """Row positions from a boolean mask, integer positions, or a query string over ``adata.obs``."""
    n = adata.n_obs
    if isinstance(idx, str):
        try:
            names = adata.obs.query(idx).index
        except Exception as e:  # pandas raises many types for a bad expression
            raise ValueError(f"{what}={idx!r} is not a valid query over adata.obs: {e}") from e
        rows = adata.obs_names.get_indexer(names)
    else:
        arr = np.asarray(idx)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise ValueError(f"{what} is a boolean mask of length {arr.size}; it must have length {n}.")
            rows = np.flatnonzero(arr)
        elif arr.size == 0 or np.issubdtype(arr.dtype, np.integer):
            rows = arr.astype(np.int64).ravel()
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise ValueError(f"{what} has positions outside 0..{n - 1}.")
        else:
            raise ValueError(f"{what} must be a boolean mask, integer positions or a query string, got {arr.dtype}.")
    rows = np.unique(rows)
    if rows.size == 0:
        raise ValueError(f"{what} selects no cells.")
    return rows


def comparisons(adata, groupby, group1, group2, idx1, idx2) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """The (name1, name2, rows1, rows2) pairs a call asks for; clear errors for bad groups."""
    if idx1 is not None:
        rows1 = cells_from(adata, idx1, "idx1")
        if idx2 is None:
            rows2 = np.setdiff1d(np.arange(adata.n_obs), rows1)
            if rows2.size == 0:
                raise ValueError("idx1 selects every cell, so the rest (idx2=None) is empty.")
            return [("group1", "Rest", rows1, rows2)]
        rows2 = cells_from(adata, idx2, "idx2")
        overlap = np.intersect1d(rows1, rows2)
        if overlap.size:
            raise ValueError(f"idx1 and idx2 share {overlap.size} cells (e.g. {adata.obs_names[overlap[0]]}); "
                             "the populations must be disjoint.")
        return [("group1", "group2", rows1, rows2)]
    if groupby is None:
        raise ValueError("Give `groupby` (a column of adata.obs) with `group1`, or `idx1`, to say which cells to compare.")
    if groupby not in adata.obs.columns:
        raise ValueError(f"groupby={groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    col = adata.obs[groupby].astype(str).to_numpy()
    present = list(pd.unique(col)) if not isinstance(adata.obs[groupby].dtype, pd.CategoricalDtype) else \
        [str(c) for c in adata.obs[groupby].cat.categories if str(c) in set(col)]
    groups1 = present if group1 is None else ([str(group1)] if np.isscalar(group1) else [str(g) for g in group1])
    for g in groups1 + ([] if group2 is None else [str(group2)]):
        if g not in present:
            raise ValueError(f"Group {g!r} is not in adata.obs[{groupby!r}] (groups: {present[:20]}).")
    out = []
    for g in groups1:
        rows1 = np.flatnonzero(col == g)
        if group2 is None:
            rows2 = np.flatnonzero(col != g)
            if rows2.size == 0:
                raise ValueError(f"Every cell is in group {g!r}: there is no rest to compare with.")
            out.append((g, "Rest", rows1, rows2))
        else:
            if str(group2) == g:
                raise ValueError(f"group1 and group2 are the same group ({g!r}).")
            out.append((g, str(group2), rows1, np.flatnonzero(col == str(group2))))
    return out


# --------------------------------------------------------------------------- the driver


def _batch_list(model, batch_correction: bool, batchid) -> list | None:
    """Batches to decode a population in: None (own batch) or a list of batch names."""
    if not batch_correction:
        if batchid is not None:
            raise ValueError("batchid1/batchid2 are only used with batch_correction=True.")
        return None
    cats = list(model.spec.batch_categories)
    if batchid is None:
        return cats
    chosen = [batchid] if np.isscalar(batchid) else list(batchid)
    unknown = [b for b in chosen if str(b) not in cats]
    if unknown:
        raise ValueError(f"batchid {unknown} not among the model's batches {cats}.")
    return [str(b) for b in chosen]


def _warn_if_out_of_distribution(model, adata, rows1, rows2, batch_correction: bool) -> None:
    key = model.spec.batch_key
    if not batch_correction or key is None:
        return
    b1 = set(adata.obs[key].astype(str).to_numpy()[rows1])
    b2 = set(adata.obs[key].astype(str).to_numpy()[rows2])
    if len(b1) == 1 and len(b2) == 1 and b1 != b2:
        warnings.warn(
            f"Population 1 lies entirely in batch {b1.pop()!r} and population 2 in batch {b2.pop()!r}: with "
            "batch_correction=True their cells are decoded in batches they were never observed in, which is "
            "out of distribution, and biology cannot be told apart from the batch effect. Interpret with care.",
            UserWarning,
            stacklevel=3,
        )


def _draws_per_cell(n_rows: int, n_samples_overall: int, n_samples: int | None, weights: str) -> tuple[int, int]:
    """(posterior draws per cell, cells to decode) for a population of ``n_rows`` cells."""
    if n_samples is None:  # as many as the budget allows, spread over every cell of a small population
        n_samples = max(1, min(MAX_DRAWS_PER_CELL, -(-n_samples_overall // n_rows)))
    if weights == "importance":
        n_samples = max(n_samples, IMPORTANCE_DRAWS_PER_CELL)
    return n_samples, max(1, min(n_rows, n_samples_overall // n_samples))


def _cell_draws(draws_fn: Callable, rows: np.ndarray, batches: list | None, n_draws: int, n_cells: int,
                weights: str, batch_size: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen, draws)``: ``n_cells`` cells chosen from ``rows`` and their ``(n_draws, n_cells, n_features)``
    decoded draws."""
    chosen = np.sort(rng.choice(rows, n_cells, replace=False)) if n_cells < rows.size else rows
    if weights == "uniform":  # independent draws per batch are fine: their average is the batch mean
        per_batch = [np.asarray(draws_fn(chosen, n_draws, b, batch_size), dtype=np.float32)
                     .reshape(n_draws, chosen.size, -1) for b in (batches or [None])]
        return chosen, (per_batch[0] if len(per_batch) == 1 else np.mean(per_batch, axis=0))
    # importance: the same z decoded in every batch; weights from the cell's own batch
    flat, log_w = draws_fn(chosen, n_draws, batches, batch_size, return_log_weights=True)
    draws = np.asarray(flat, dtype=np.float32).reshape(n_draws, chosen.size, -1)
    return chosen, importance_resample(draws, np.asarray(log_w), rng)


def _strata(model, adata, batch_correction: bool) -> np.ndarray:
    """Stratum code of every cell for the observed contrast: its batch with batch correction, else 0."""
    key = model.spec.batch_key
    if not batch_correction or key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    codes = pd.Categorical(adata.obs[key].astype(str), categories=list(model.spec.batch_categories)).codes
    return np.asarray(codes, dtype=np.int64)  # pandas' codes are int8: label arithmetic would overflow


def _sample_codes(adata, sample_key: str | None) -> tuple[np.ndarray, list[str]]:
    """Sample code of every cell (-1: no sample) and the sample names; one sample of all cells without a key."""
    if sample_key is None:
        return np.zeros(adata.n_obs, dtype=np.int64), ["all"]
    if sample_key not in adata.obs.columns:
        raise ValueError(f"sample_key={sample_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}); "
                         "give the column that names each cell's sample (donor).")
    cat = pd.Categorical(adata.obs[sample_key])
    return np.asarray(cat.codes, dtype=np.int64), [str(c) for c in cat.categories]


def plan(adata, groupby, group1, group2, idx1, idx2, condition_key=None, condition1=None, condition2=None
         ) -> tuple[list[np.ndarray], list[dict]]:
    """Disjoint units of cells, and the comparisons a call asks for as unions of units on each side.

    Every unit is decoded once per call, so a unit shared by many comparisons (a group in one-vs-rest,
    where every other group is part of the "rest") costs nothing more. Returns ``(units, comparisons)``;
    a comparison is ``{"name1", "name2", "units1", "units2", "columns"}`` (``columns``: extra table
    columns, e.g. the cell type of a within-cluster comparison).
    """
    if condition_key is not None:
        return _condition_plan(adata, groupby, group1, group2, idx1, idx2, condition_key, condition1, condition2)
    if condition1 is not None or condition2 is not None:
        raise ValueError("condition1/condition2 need condition_key (the .obs column holding the conditions).")
    pairs = comparisons(adata, groupby, group1, group2, idx1, idx2)
    units: list[np.ndarray] = []
    if idx1 is None and group2 is None:  # one-vs-rest over groups: every group is a unit, the rest a union
        col = adata.obs[groupby].astype(str).to_numpy()
        names = list(dict.fromkeys(col[np.sort(np.unique(col, return_index=True)[1])]))
        ids = {g: i for i, g in enumerate(names)}
        units = [np.flatnonzero(col == g) for g in names]
        return units, [{"name1": n1, "name2": n2, "units1": [ids[n1]], "units2": [ids[g] for g in names if g != n1],
                        "columns": {}} for n1, n2, _, _ in pairs]
    seen: dict[bytes, int] = {}

    def unit(rows: np.ndarray) -> int:
        key = rows.tobytes()
        if key not in seen:
            seen[key] = len(units)
            units.append(rows)
        return seen[key]

    return units, [{"name1": n1, "name2": n2, "units1": [unit(r1)], "units2": [unit(r2)], "columns": {}}
                   for n1, n2, r1, r2 in pairs]


def _condition_plan(adata, groupby, group1, group2, idx1, idx2, condition_key, condition1, condition2):
    """Within-cluster case vs control: for each group of ``groupby``, its ``condition1`` vs ``condition2`` cells."""
    if idx1 is not None or idx2 is not None or group2 is not None:
        raise ValueError("condition_key compares conditions within each group of `groupby`; it does not combine "
                         "with idx1/idx2 or group2 (use group1 to choose groups).")
    if condition_key not in adata.obs.columns:
        raise ValueError(f"condition_key={condition_key!r} is not a column of adata.obs "
                         f"(columns: {list(adata.obs.columns)}).")
    cond = adata.obs[condition_key].astype(str).to_numpy()
    for name, value in (("condition1", condition1), ("condition2", condition2)):
        if value is None or str(value) not in set(cond):
            raise ValueError(f"{name}={value!r} is not a value of adata.obs[{condition_key!r}] "
                             f"(values: {list(pd.unique(cond))[:20]}).")
    if str(condition1) == str(condition2):
        raise ValueError(f"condition1 and condition2 are the same condition ({condition1!r}).")
    if groupby is None:
        groups, col = ["all"], np.full(adata.n_obs, "all", dtype=object)
    else:
        groups = [p[0] for p in comparisons(adata, groupby, group1, None, None, None)]
        col = adata.obs[groupby].astype(str).to_numpy()
    units, comps = [], []
    for g in groups:
        rows1 = np.flatnonzero((col == g) & (cond == str(condition1)))
        rows2 = np.flatnonzero((col == g) & (cond == str(condition2)))
        if rows1.size < 2 or rows2.size < 2:
            if group1 is not None:
                raise ValueError(f"Group {g!r} has {rows1.size} {condition1!r} and {rows2.size} {condition2!r} "
                                 "cells; at least 2 of each are needed.")
            continue  # a group not seen in both conditions has no within-group contrast
        units += [rows1, rows2]
        comps.append({"name1": str(condition1), "name2": str(condition2), "units1": [len(units) - 2],
                      "units2": [len(units) - 1], "columns": {} if groupby is None else {groupby: g}})
    if not comps:
        raise ValueError(f"No group of {groupby!r} has at least 2 cells in both {condition1!r} and {condition2!r}.")
    return units, comps


def _count_evidence(sums: dict, labels1: np.ndarray, labels2: np.ndarray, strata_of_label: np.ndarray) -> dict:
    """Pooled counts of each group and the observed LFC within strata (:func:`observed_lfc`).

    ``labels1``/``labels2``: the count-sum labels (:func:`count_sums`) of each group's cells. ``observed``
    is ``None`` when no stratum holds both groups; ``pooled`` is the observed LFC over all cells, which
    still carries what differs between strata, used only to measure the model's error then.
    """
    def per_stratum(labels):
        out = []
        for b in range(int(strata_of_label.max()) + 1):
            st = stats_of(sums, labels[strata_of_label[labels] == b])
            out.append(st if st[3] >= 2 else None)
        return out

    pooled1, pooled2 = stats_of(sums, labels1), stats_of(sums, labels2)
    pooled = observed_lfc([pooled1], [pooled2])
    one_stratum = strata_of_label.max() == 0 and pooled1[3] >= 2 and pooled2[3] >= 2
    observed = pooled if one_stratum else observed_lfc(per_stratum(labels1), per_stratum(labels2))
    return {"counts1": pooled1[0], "counts2": pooled2[0], "observed": observed, "pooled": pooled}


def _sort_table(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Sort as scvi-tools does, by ``proba_de`` (change) or ``bayes_factor`` (vanilla), descending; ties
    (common where ``proba_de`` saturates at 1) by ``|lfc_mean|``, descending. With a sample-level test,
    by its ``pvalue``, increasing (the calls come from it)."""
    if "pvalue" in table:
        order = np.lexsort((-table["lfc_mean"].abs().to_numpy(), table["pvalue"].fillna(2.0).to_numpy()))
        return table.iloc[order]
    key = table["proba_de" if mode == "change" else "bayes_factor"].to_numpy()
    order = np.lexsort((-table["lfc_mean"].abs().to_numpy(), -key))
    return table.iloc[order]


class _Decoded:
    """What one call decodes: per unit of cells, its expression moments and (with samples) per-sample sums."""

    def __init__(self, draws_fn, units, samples, n_samples_total, n_features, *, n_samples_overall, n_samples, weights,
                 batch_size, rng, latent_fn=None):
        self.draws_fn, self.units, self.samples, self.n_samples_total = draws_fn, units, samples, n_samples_total
        self.n_features = n_features
        self.opts = dict(n_samples_overall=n_samples_overall, n_samples=n_samples, weights=weights)
        self.batch_size, self.rng, self.latent_fn = batch_size, rng, latent_fn
        self.cache: dict = {}

    def unit(self, u: int, batches: list | None) -> dict:
        """Decode unit ``u`` in ``batches`` once: ``pop`` (its expression moments, :func:`population_moments`),
        ``n`` (its cells) and per-sample weighted sums ``sx``, ``sx2``, ``sw``, ``cells`` of the decoded draws."""
        key = (u, None if batches is None else tuple(batches))
        if key not in self.cache:
            rows = self.units[u]
            if self.latent_fn is not None:
                rows = _drop_outliers(self.latent_fn, rows)
            n_draws, n_cells = _draws_per_cell(rows.size, **self.opts)
            batch_size = self.batch_size or max(128, DECODE_ELEMENTS // (n_draws * self.n_features))
            chosen, draws = _cell_draws(self.draws_fn, rows, batches, n_draws, n_cells, self.opts["weights"],
                                        batch_size, self.rng)
            out = {"pop": population_moments(draws), "n": float(self.units[u].size)}
            if self.samples is not None:  # each decoded draw stands for rows.size / (draws) cell-draws
                s = self.samples[chosen]
                onehot = sp.csr_matrix((np.ones(s.size), (s, np.arange(s.size))), shape=(self.n_samples_total, s.size))
                w = rows.size / chosen.size / n_draws
                out.update(sx=w * sum(onehot @ d.astype(np.float64) for d in draws),
                           sx2=w * sum(onehot @ (d.astype(np.float64) ** 2) for d in draws),
                           sw=w * n_draws * np.bincount(s, minlength=self.n_samples_total),
                           cells=np.bincount(s, minlength=self.n_samples_total).astype(np.float64))
            self.cache[key] = out
        return self.cache[key]

    def side(self, units: list[int], batches: list | None) -> dict:
        """A population made of several units: their moments mixed by their numbers of cells
        (:func:`mix_populations`), their per-sample sums added."""
        parts = [self.unit(u, batches) for u in units]
        if len(parts) == 1:
            return parts[0]
        n = [p["n"] for p in parts]
        out = {"pop": mix_populations([p["pop"] for p in parts], n), "n": float(sum(n))}
        if self.samples is not None:
            out.update({k: sum(p[k] for p in parts) for k in ("sx", "sx2", "sw", "cells")})
        return out


def _sample_table(side1: dict, side2: dict, stats1: list[tuple], stats2: list[tuple], names: list[str], pc: float,
                  reference: np.ndarray, delta: float) -> pd.DataFrame:
    """The sample-level test of one comparison (:func:`sample_level_test`) from the decoded per-sample sums.

    ``stats1``/``stats2``: per sample, the ``(C, L, S2, n_cells)`` of each group's observed counts there
    (:func:`stats_of`). Paired on the samples with cells in both groups when there are at least 2 of them; otherwise unpaired.
    """
    counts1, counts2 = np.stack([st[0] for st in stats1]), np.stack([st[0] for st in stats2])

    def per_sample(side, counts, keep):
        mean = side["sx"][keep] / side["sw"][keep, None]
        var_cell = np.maximum(side["sx2"][keep] / side["sw"][keep, None] - mean**2, 0.0)
        y = np.log2(mean + pc)
        v = (var_cell / side["cells"][keep, None] / (mean + pc) ** 2 + 1.0 / (counts[keep] + 0.5)) / np.log(2) ** 2
        return y, v

    in1, in2 = side1["cells"] > 0, side2["cells"] > 0
    if in1.sum() < 2 or in2.sum() < 2:
        raise ValueError(f"The sample-level test needs at least 2 samples in each group; group 1 has "
                         f"{int(in1.sum())} ({[names[i] for i in np.flatnonzero(in1)][:8]}), group 2 has "
                         f"{int(in2.sum())} ({[names[i] for i in np.flatnonzero(in2)][:8]}). Choose groups "
                         "spanning several samples, or leave sample_key=None for a cell-level test.")
    paired = (in1 & in2).sum() >= 2
    keep1, keep2 = (in1 & in2, in1 & in2) if paired else (in1, in2)
    (y1, v1), (y2, v2) = per_sample(side1, counts1, keep1), per_sample(side2, counts2, keep2)
    y = center_samples(np.vstack([y1, y2]), reference)  # compositional shift of every sample
    y1, y2 = y[: y1.shape[0]], y[y1.shape[0]:]
    # each sample's observed pseudobulk value, and the model's and the counts' combined by precision
    obs = [[(st[0] + 0.5) / max(st[1], 1e-12) for st, k in zip(stats, keep) if k] for stats, keep in
           ((stats1, keep1), (stats2, keep2))]
    u = np.vstack([[log_ratio_var(st[0], st[2], st[3]) / np.log(2) ** 2 for st, k in zip(stats, keep) if k]
                   for stats, keep in ((stats1, keep1), (stats2, keep2))])
    o = center_samples(np.log2(np.vstack(obs[0] + obs[1])), reference)
    z, w = combine_sample_values(np.vstack([y1, y2]), np.vstack([v1, v2]), o, u, reference)
    n1 = y1.shape[0]
    test = sample_level_test(z[:n1], w[:n1], z[n1:], w[n1:], paired=bool(paired), delta=delta)
    return pd.DataFrame({"lfc_samples": test["effect"], "lfc_samples_se": test["se"], "pvalue": test["pvalue"],
                         "n_samples1": int(keep1.sum()), "n_samples2": int(keep2.sum()), "paired": bool(paired)})


def one_torch_thread(fn: Callable) -> Callable:
    """Run ``fn`` with one intra-op torch thread (then restore the setting), for code that decodes many small
    minibatches between numpy steps (PeakVI's DA): with two threads each small torch op waited for the other
    thread to wake up (a DE call over 128-cell minibatches ran 2x slower on 2 cores, BENCHMARKS.md). The DE
    engine no longer needs it: it decodes few, large minibatches (``DECODE_ELEMENTS``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        if before == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def differential_expression(
    model,
    adata=None,
    groupby: str | None = None,
    group1=None,
    group2: str | None = None,
    idx1=None,
    idx2=None,
    mode: str = "vanilla",
    delta: float | None = 0.25,
    batch_size: int | None = None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1=None,
    batchid2=None,
    fdr_target: float = 0.05,
    silent: bool = False,
    weights: str = "uniform",
    filter_outlier_cells: bool = False,
    *,
    pseudocounts: float | None = None,
    n_samples_overall: int = 5000,
    n_samples: int | None = None,
    seed: int | None = None,
    use_counts: bool = True,
    center_lfc: bool = True,
    shrink_lfc: bool = True,
    sample_key: str | None = None,
    condition_key: str | None = None,
    condition1=None,
    condition2=None,
    draws_fn: Callable | None = None,
    latent_fn: Callable | None = None,
    features: tuple | None = None,
) -> pd.DataFrame:
    """Bayesian DE between two populations of cells (see the module docstring for the method).

    The arguments up to ``filter_outlier_cells`` are those of scvi-tools' ``differential_expression``,
    with its defaults and meaning; the keyword-only ones after it are those scvi-tools passes on to its
    ``get_bayes_factors`` (``pseudocounts``, ``n_samples_overall``) or its expression function
    (``n_samples``), then cellvi's own.

    Parameters
    ----------
    model
        A trained cellvi model.
    adata
        Data to compare (default: the model's); genes and categories must match the model's.
    groupby, group1, group2
        ``.obs`` column and groups; without ``group2`` each group of ``group1`` (all groups when
        ``None``) is compared with the rest, in one table with a ``comparison`` column.
    idx1, idx2
        Instead of groups: boolean masks, integer positions or ``adata.obs.query`` strings
        (``"cell_type == 'B' and condition == 'stim'"``); ``idx2=None`` means all other cells.
    mode
        ``"vanilla"``: ``proba_m1 = P(h1 > h2)``, the table sorted by ``bayes_factor``. ``"change"``:
        ``proba_de = P(|lfc| > delta)``, sorted by ``proba_de``, with the calls ``is_de_fdr_<fdr_target>``.
    delta
        LFC threshold (log2) of the change mode; ``None`` estimates it (:func:`estimate_delta`).
    batch_size
        Cells decoded at once; ``None``: as many as keep ``DECODE_ELEMENTS`` decoded values in memory (at
        least 128).
    all_stats
        Add the observed-count statistics (:func:`raw_stats`).
    batch_correction, batchid1, batchid2
        Decode each population's cells as if from every batch (or those listed) and average, so batch
        effects do not enter the comparison; the observed counts are then compared within batches. Use
        it when batches are shared by both populations; when each population sits in its own batch the
        decoded expression is out of distribution (a warning says so). Default ``False``: each cell in
        its own batch.
    fdr_target
        Posterior expected FDR of the calls in ``is_de_fdr_<fdr_target>`` (change mode); with
        ``sample_key``, the Benjamini-Hochberg level of the sample-level test.
    silent
        Accepted for scvi-tools compatibility; the engine prints nothing (a call takes about a second).
    weights
        ``"uniform"``, or ``"importance"``: resample each cell's posterior draws by ``p(x, z) / q(z | x)``
        so that they follow the model's posterior rather than the encoder's approximation.
    filter_outlier_cells
        Drop cells whose latent mean is far from their population's (robust distance, 99.9 % chi-square).
    pseudocounts
        Added to expression before the log: a number, or ``None`` (default, as scvi-tools) for a
        data-driven value (:func:`estimate_pseudocounts`).
    n_samples_overall
        Decoded draws per population (cells x draws per cell); bounds the cost for large populations.
    n_samples
        Posterior draws decoded per chosen cell (scvi-tools passes it to the expression function).
        ``None``: as many as ``n_samples_overall`` allows over the population's cells, at most
        ``MAX_DRAWS_PER_CELL``.
    seed
        (cellvi only) Seed of the cell subsampling and posterior draws (default
        ``cellvi.settings.seed``).
    use_counts
        (cellvi only, on by default) Update the model's LFCs with the observed LFC of the counts
        (:func:`observed_lfc`, within batches with ``batch_correction=True``; :func:`combine_moments`).
        Each source is weighted by its precision, the model's including its measured error
        (:func:`model_error_sd`), so the counts decide where the model has learned little of the contrast;
        the column ``model_share`` says how much of each feature's evidence came from the model. ``False``:
        the counts only bound the precision (:func:`count_log_var`).
    center_lfc
        (cellvi only) Remove the compositional shift: subtract the median LFC of well-observed features
        (:func:`compositional_shift`). ``False`` compares the raw proportions, as scvi-tools does.
    shrink_lfc
        (cellvi only, on by default) Empirical-Bayes spike-and-slab shrinkage of the LFCs
        (:func:`spike_slab_posterior`): features the data say little about are not called. ``False`` keeps the
        unshrunk LFCs, at the cost of false calls on wide posteriors.
    sample_key
        (cellvi only) ``.obs`` column naming each cell's sample (donor). The model's decoded expression is
        averaged per sample within each group and the effect is tested across samples, paired when
        samples have cells in both groups (:func:`sample_level_test`, TREAT against ``delta`` in change
        mode), giving ``pvalue`` and Benjamini-Hochberg ``padj``; the calls ``is_de_fdr_<fdr_target>``
        are ``padj < fdr_target``, which controls the FDR with the samples as the replicates. Each
        group needs cells from at least 2 samples.
    condition_key, condition1, condition2
        (cellvi only) Within-cluster case vs control: for each group of ``groupby`` (those in ``group1``
        when given), its ``condition1`` cells against its ``condition2`` cells, all in one call that
        decodes each cell once; the table has a column named after ``groupby``. ``group1``/``group2``
        keep their scvi-tools meaning.
    draws_fn, latent_fn
        Overrides of the model's ``_de_draws`` and latent means (for models with several kinds of
        expression, e.g. ContrastiveVI).
    features
        ``(names, counts)`` of the features ``draws_fn`` decodes: their names and a ``(cells, features)``
        matrix of observed counts of ``adata``'s cells. Default: the model's genes and count matrix; a model
        with another modality passes its own (TotalVI's proteins).

    Returns
    -------
    DataFrame indexed by feature with the columns of scvi-tools (``proba_de``, ``bayes_factor``,
    ``scale1``, ``lfc_mean``, ..., ``is_de_fdr_<target>`` in change mode, ``comparison``, ``group1``,
    ``group2``), plus cellvi's ``model_agreement`` (one value per comparison, :func:`model_agreement`:
    low when the model carries little of the contrast and the counts decide) and, with ``use_counts``,
    ``model_share`` (per feature, :func:`combine_moments`); with ``sample_key`` also ``lfc_samples``,
    ``lfc_samples_se``, ``pvalue``, ``padj``, ``n_samples1``, ``n_samples2`` and ``paired``. One block per
    comparison, each sorted as scvi-tools sorts (``mode`` above), or by ``pvalue`` with ``sample_key``.
    Features with fewer than ``MIN_CALL_COUNTS`` counts in each group are never called (``padj`` NaN).
    """

    from cellvi import settings
    from cellvi.data.setup import get_counts

    # 1. options and the functions that decode expression
    _check_options(mode, weights, fdr_target, n_samples_overall, n_samples)
    adata = model.adata if adata is None else adata
    if weights == "importance" and (draws_fn is not None or not _supports_weights(model)):
        raise ValueError(f"weights='importance' is not available for this comparison with {type(model).__name__}; "
                         "use weights='uniform'.")
    draws_fn = draws_fn or (lambda rows, n, b, bs, **kw: model._de_draws(adata, rows, n, b, bs, **kw))
    if filter_outlier_cells and latent_fn is None:
        latent_fn = lambda rows: model.get_latent_representation(adata, indices=rows)  # noqa: E731
    seed = settings.seed if seed is None else seed
    rng = np.random.default_rng(seed)
    batches1 = _batch_list(model, batch_correction, batchid1)
    batches2 = _batch_list(model, batch_correction, batchid2)
    # 2. the cells: disjoint units, each decoded once, and the comparisons as unions of units
    units, comps = plan(adata, groupby, group1, group2, idx1, idx2, condition_key, condition1, condition2)
    samples, sample_names = _sample_codes(adata, sample_key)
    _check_samples(samples, units, sample_key, adata)
    # 3. observed counts of every unit x stratum x sample, in one pass over the CSR (the model's genes, unless
    #    `features` gives other names and counts, e.g. TotalVI's proteins or PeakVI's regions)
    if features is None:
        features = (model.spec.var_names, get_counts(adata, model.spec.layer))
    names, X = pd.Index(features[0]), features[1]
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
    library = np.asarray(X.sum(1), dtype=np.float64).ravel()
    strata = _strata(model, adata, batch_correction)
    n_strata, n_samp = int(strata.max()) + 1, len(sample_names)
    labels = np.full(adata.n_obs, -1, dtype=np.int64)
    for u, rows in enumerate(units):
        labels[rows] = (u * n_strata + strata[rows]) * n_samp + np.maximum(samples[rows], 0)
    sums = count_sums(X, labels, len(units) * n_strata * n_samp, library)
    label_grid = np.arange(len(units) * n_strata * n_samp).reshape(len(units), n_strata, n_samp)
    strata_of_label = np.broadcast_to(np.arange(n_strata)[None, :, None], label_grid.shape).ravel()
    decoded = _Decoded(draws_fn, units, samples if sample_key else None, n_samp, len(names),
                       n_samples_overall=n_samples_overall,
                       n_samples=n_samples, weights=weights, batch_size=batch_size, rng=rng,
                       latent_fn=latent_fn if filter_outlier_cells else None)

    tables = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for c in comps:
            rows1, rows2 = (np.concatenate([units[u] for u in c[k]]) for k in ("units1", "units2"))
            _warn_if_out_of_distribution(model, adata, rows1, rows2, batch_correction)
            lab1, lab2 = label_grid[c["units1"]].ravel(), label_grid[c["units2"]].ravel()
            # 4. population moments of normalized expression (each unit decoded once)
            side1, side2 = decoded.side(c["units1"], batches1), decoded.side(c["units2"], batches2)
            # 5. the observed counts: a precision floor, and (use_counts) an estimate of the LFC of their own
            counts = _count_evidence(sums, lab1, lab2, strata_of_label)
            observed = counts["observed"] if use_counts else None
            pop1, pop2 = side1["pop"], side2["pop"]
            # 6. effect sizes and evidence: model error, count update, centring, shrinkage
            pc = pseudocounts if pseudocounts is not None else estimate_pseudocounts(
                pop1[0], pop2[0], counts["counts1"] > 0, counts["counts2"] > 0)
            well_observed = (counts["counts1"] >= MIN_COUNTS) & (counts["counts2"] >= MIN_COUNTS)
            model_lfc = lfc_draws(pop1[0], pop2[0], pc)
            reference_lfc = counts["observed"] or counts["pooled"]
            slope = model_slope(model_lfc, *observed, well_observed) if observed is not None else 1.0
            tau = model_error_sd(model_lfc / slope, *reference_lfc, well_observed)
            table = summarize(pop1, pop2, mode=mode, delta=delta, pseudocounts=pc, lfc_error_sd=tau,
                              reference=well_observed, center=center_lfc, shrink=shrink_lfc, observed=observed,
                              model_slope=slope, counts=(counts["counts1"], counts["counts2"]))
            table["model_agreement"] = model_agreement(model_lfc, reference_lfc[0], well_observed)
            callable_ = np.maximum(counts["counts1"], counts["counts2"]) >= MIN_CALL_COUNTS
            # 7. the sample-level test: per-sample expression of each group, tested across samples
            if sample_key is not None:
                by_sample = [label_grid[c[k]].reshape(-1, n_samp).T for k in ("units1", "units2")]  # (samples, m)
                per_sample = [[stats_of(sums, lab) for lab in labs] for labs in by_sample]
                test_delta = 0.0 if mode == "vanilla" else float(table["delta"].iloc[0])
                st = _sample_table(side1, side2, *per_sample, sample_names, pc, well_observed, test_delta)
                st["padj"] = bh_adjust(np.where(callable_, st["pvalue"], np.nan))
                table = pd.concat([table, st], axis=1)
            # 8. the table: count statistics, calls (change mode), names, scvi-tools' order
            if all_stats:
                table = table.assign(**_raw_stats_of(sums, lab1, lab2))
            if mode == "change":
                evidence = (table["padj"].fillna(1.0).to_numpy() < fdr_target) if sample_key is not None else \
                    expected_fdr_calls(np.where(callable_, table["proba_de"].to_numpy(), 0.0), fdr_target)
                table[f"is_de_fdr_{fdr_target}"] = evidence & callable_
            table["comparison"] = f"{c['name1']} vs {c['name2']}"
            table["group1"], table["group2"] = c["name1"], c["name2"]
            table.index = names
            tables.append(_sort_table(_order_columns(table, mode).assign(**c["columns"]), mode))
    return pd.concat(tables)


def _check_samples(samples: np.ndarray, units: list[np.ndarray], sample_key: str | None, adata) -> None:
    """Every compared cell must belong to a sample."""
    if sample_key is None:
        return
    rows = np.concatenate(units)
    missing = rows[samples[rows] < 0]
    if missing.size:
        raise ValueError(f"{missing.size} compared cells (e.g. {adata.obs_names[missing[0]]!r}) have no value in "
                         f"adata.obs[{sample_key!r}], so they are in no sample; fill it in or leave them out.")


def _raw_stats_of(sums: dict, labels1: np.ndarray, labels2: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`raw_stats` of two groups from their count sums (:func:`count_sums`), without another pass."""
    out = {}
    for k, lab in (("1", labels1), ("2", labels2)):
        n = max(sums["n"][lab].sum(), 1.0)
        out.update({f"raw_mean{k}": sums["x"][lab].sum(0) / n, f"non_zeros_proportion{k}": sums["nz"][lab].sum(0) / n,
                    f"raw_normalized_mean{k}": 1e4 * sums["xn"][lab].sum(0) / n})
    return {k: out[k] for k in RAW_COLUMNS}


# scvi-tools 1.4.2's columns per mode, in its order (tests/data/scvi_tools_1.4.2_api.json); cellvi's own
# columns follow them, then the calls and the comparison names
SCVI_TOOLS_COLUMNS = {
    "vanilla": ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"],
    "change": ["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta", "lfc_mean",
               "lfc_median", "lfc_std", "lfc_min", "lfc_max"],
}
RAW_COLUMNS = ["raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
               "raw_normalized_mean2"]


def _order_columns(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    """scvi-tools' columns in scvi-tools' order, then cellvi's, then ``is_de_fdr_*``, comparison, groups."""
    last = [c for c in table.columns if c.startswith("is_de_fdr_")] + ["comparison", "group1", "group2"]
    first = [c for c in SCVI_TOOLS_COLUMNS[mode] + RAW_COLUMNS if c in table.columns]
    middle = [c for c in table.columns if c not in first and c not in last]
    return table[first + middle + [c for c in last if c in table.columns]]


def _check_options(mode: str, weights: str, fdr_target: float, n_samples_overall: int,
                   n_samples: int | None) -> None:
    if weights not in ("uniform", "importance"):
        raise ValueError(f"weights={weights!r} is not one of ('uniform', 'importance').")
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode={mode!r} is not one of ('vanilla', 'change').")
    if not 0.0 < fdr_target < 1.0:
        raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target}.")
    for name, value in (("n_samples_overall", n_samples_overall), ("n_samples", n_samples)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _supports_weights(model) -> bool:
    import inspect

    return "return_log_weights" in inspect.signature(model._de_draws).parameters


def _drop_outliers(latent_fn: Callable, rows: np.ndarray) -> np.ndarray:
    """Cells of ``rows`` that are not latent outliers (:func:`outlier_cells`); all of them when the
    population is too small to estimate its spread or fewer than 2 cells would remain."""
    z = np.asarray(latent_fn(rows), dtype=np.float64)
    if rows.size < 3 * z.shape[1]:
        return rows
    keep = ~outlier_cells(z)
    return rows[keep] if keep.sum() >= 2 else rows
