import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import average_precision_score

import cellvi
from cellvi import de

# --------------------------------------------------------------------------- pure statistics


def test_expected_fdr_calls_by_hand():
    p = np.array([0.6, 0.99, 0.1, 0.98])  # ranked efdr: 0.01, 0.015, 0.143, 0.333
    assert de.expected_fdr_calls(p, 0.05).tolist() == [False, True, False, True]
    assert de.expected_fdr_calls(p, 0.2).tolist() == [True, True, False, True]  # efdr of the top 3 = 0.143
    assert not de.expected_fdr_calls(np.array([0.5, 0.4]), 0.05).any()


def test_bayes_factor_is_the_log_odds():
    np.testing.assert_allclose(de.bayes_factor(np.array([0.5, 0.9, 0.1])), [0.0, np.log(9), -np.log(9)])
    assert np.isfinite(de.bayes_factor(np.array([0.0, 1.0]))).all()


def test_estimate_delta_finds_the_null_width():
    rng = np.random.default_rng(0)
    lfc = np.concatenate([rng.normal(0, 0.1, 900), rng.normal(2, 0.3, 50), rng.normal(-2, 0.3, 50)])
    assert 0.15 < de.estimate_delta(lfc) < 0.3  # |mean| + 2 sd of the null component ~ 0.2
    assert de.estimate_delta(rng.normal(0, 0.01, 500), min_delta=0.1) == 0.1
    with pytest.raises(ValueError, match="at least 10"):
        de.estimate_delta(np.zeros(3))


def test_pseudocounts_come_from_unobserved_features():
    scale1, scale2 = np.array([1e-3, 2e-5, 5e-4]), np.array([1e-3, 1e-3, 4e-6])
    nz1, nz2 = np.array([True, False, True]), np.array([True, True, False])
    assert de.estimate_pseudocounts(scale1, scale2, nz1, nz2, quantile=1.0) == 2e-5
    assert de.estimate_pseudocounts(scale1, scale2, nz1 | True, nz2 | True) == de.LOG_EPS
    # a pseudocount shrinks the LFC of a feature never seen in group 2 towards 0
    lfc_raw = de.lfc_draws(np.array([1e-5]), np.array([1e-9]), 0.0)
    lfc_pc = de.lfc_draws(np.array([1e-5]), np.array([1e-9]), 2e-5)
    assert abs(lfc_pc[0]) < 0.6 < abs(lfc_raw[0])


def test_model_slope_recovers_the_shrinkage_and_stays_1_without_a_contrast():
    rng = np.random.default_rng(8)
    G = 2000
    true = np.where(rng.random(G) < 0.2, rng.choice([-1.0, 1.0], G), 0.0)
    u = np.full(G, 0.04)
    observed = true + rng.normal(0, 0.2, G)  # noisy, unbiased
    model = 0.3 * true + rng.normal(0, 0.05, G)  # precise, shrunk to 30 %
    ok = np.ones(G, bool)
    assert abs(de.model_slope(model, observed, u, ok) - 0.3) < 0.03
    assert de.model_slope(model, rng.normal(0, 0.15, G), u, ok) == 1.0  # no contrast beyond the counts' noise
    assert de.model_slope(np.zeros(G), np.zeros(G), u, ok) == 1.0  # nothing to measure
    assert de.model_slope(model, observed, u, np.arange(G) < 10) == 1.0  # too few well-observed features
    assert de.model_slope(1e-4 * true, observed, u, ok) == de.MIN_MODEL_SLOPE  # clipped


def test_prob_positive_by_hand_and_for_a_zero_width_slab():
    w, mean, sd = np.array([1.0, 0.5, 0.8, 0.8, 0.0]), np.array([1.0, 0.0, 0.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(de.prob_positive(w, mean, sd), [0.841345, 0.5, 0.5, 0.1, 0.5], rtol=1e-5)


def test_effect_posterior_chains_the_update_centring_and_shrinkage():
    rng = np.random.default_rng(9)
    m, v = np.r_[rng.normal(0.3, 0.05, 180), np.full(20, 3.3)], np.full(200, 0.01)
    o, u = np.zeros(200), np.full(200, 0.01)
    w, mean, var, share = de.effect_posterior(m, v, observed=(o, u), center=True)
    c_mean, c_var, c_share = de.combine_moments(m, v, o, u)
    c_mean = c_mean - de.compositional_shift(c_mean, np.ones(200, bool))
    w2, a = de.spike_slab_posterior(c_mean, c_var)
    np.testing.assert_allclose(share, c_share)
    np.testing.assert_allclose(w, w2)
    np.testing.assert_allclose(mean, a * c_mean)
    np.testing.assert_allclose(var, a * c_var)
    assert (w[180:] > 0.99).all() and np.median(w[:180]) < 0.5  # the 20 real effects stand out
    w0, mean0, var0, share0 = de.effect_posterior(m, v, shrink=False)
    assert share0 is None and (w0 == 1).all() and np.array_equal(mean0, m) and np.array_equal(var0, v)


def test_tail_probability_by_hand():
    np.testing.assert_allclose(de.tail_probability(np.array([0.0, 1.0]), np.array([1.0, 1.0]), 1.0),
                               [2 * 0.158655, 0.5 + 0.0227501], rtol=1e-5)


def test_count_log_var_is_poissons_floor():
    np.testing.assert_allclose(de.count_log_var(np.array([99.5, 3.5, 0.0])), [0.01, 0.25, 2.0])  # 1 / (C + 0.5)


def test_model_error_sd_recovers_the_excess_spread():
    rng = np.random.default_rng(3)
    n = 4000
    true_lfc = rng.normal(0, 1, n)
    observed_var = rng.uniform(0.01, 0.05, n)
    observed = true_lfc + rng.normal(0, np.sqrt(observed_var))
    model = true_lfc + rng.normal(0, 0.3, n)
    everything = np.ones(n, bool)
    assert 0.27 < de.model_error_sd(model, observed, observed_var, everything) < 0.33
    assert de.model_error_sd(true_lfc, observed, observed_var, everything) < 0.05  # only observation noise
    assert de.model_error_sd(model, observed, observed_var, np.arange(n) < 19) == 0.0  # too few features


def test_group_count_stats_by_hand():
    X = sp.csr_matrix(np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]]))
    library = np.asarray(X.sum(1)).ravel()  # 1, 5, 4
    C, L, S2 = de.group_count_stats(X, np.array([0, 1]), library)
    # R = C / L = (2/3, 1/3); S2_0 = (1 - 2/3)^2 + (3 - 10/3)^2, S2_1 = (0 - 1/3)^2 + (2 - 5/3)^2
    np.testing.assert_allclose(C, [4.0, 2.0])
    assert L == 6.0
    np.testing.assert_allclose(S2, [2 / 9, 2 / 9])


def test_raw_stats_by_hand():
    X = sp.csr_matrix(np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]]))  # libraries 1, 5, 4
    r = de.raw_stats(X, np.array([0, 1]), np.array([2]))
    np.testing.assert_allclose(r["raw_mean1"], [2.0, 1.0])
    np.testing.assert_allclose(r["non_zeros_proportion1"], [1.0, 0.5])
    np.testing.assert_allclose(r["raw_normalized_mean1"], [(1e4 + 6e3) / 2, 4e3 / 2])
    np.testing.assert_allclose(r["raw_mean2"], [0.0, 4.0])
    np.testing.assert_allclose(r["non_zeros_proportion2"], [0.0, 1.0])
    np.testing.assert_allclose(r["raw_normalized_mean2"], [0.0, 1e4])


def test_log_ratio_var_is_poisson_or_the_cell_spread():
    # Poisson floor 1 / (C + 0.5) = 1 / 4.5 beats the spread 2 / 1 * (2/9) / 4.5^2 = 0.022
    np.testing.assert_allclose(de.log_ratio_var(np.array([4.0]), np.array([2 / 9]), 2), [1 / 4.5])
    # overdispersed: 11 / 10 * 50 / 10.5^2 = 0.4989 beats 1 / 10.5
    np.testing.assert_allclose(de.log_ratio_var(np.array([10.0]), np.array([50.0]), 11), [1.1 * 50 / 10.5**2])


def test_observed_lfc_combines_strata_by_precision():
    ln2sq = np.log(2) ** 2
    s0 = ((np.array([7.5]), 1.0, np.zeros(1), 10), (np.array([1.5]), 1.0, np.zeros(1), 10))  # o = 2, u = 0.625
    s1 = ((np.array([3.5]), 1.0, np.zeros(1), 10), (np.array([3.5]), 1.0, np.zeros(1), 10))  # o = 0, u = 0.5
    s2 = ((np.array([99.5]), 1.0, np.zeros(1), 10), None)  # group 2 absent from this stratum: ignored
    o, u = de.observed_lfc([s0[0], s1[0], s2[0]], [s0[1], s1[1], s2[1]])
    np.testing.assert_allclose(o, [2 * 1.6 / (1.6 + 2.0)])  # precisions 1 / 0.625, 1 / 0.5 (times ln2^2)
    np.testing.assert_allclose(u, [1 / (3.6 * ln2sq)])
    assert de.observed_lfc([s2[0]], [None]) is None


def test_compositional_shift_is_the_reference_features_median():
    rng = np.random.default_rng(4)
    lfc = rng.normal(-2.0, 0.05, 50)  # every feature's share dropped by 2 log2 ...
    lfc[:5] += 6.0  # ... because 5 features took over
    assert abs(de.compositional_shift(lfc, np.ones(50, bool)) + 2.0) < 0.05
    assert abs(np.median((lfc - de.compositional_shift(lfc, np.ones(50, bool)))[5:])) < 0.05
    few = np.zeros(50, bool)
    few[:3] = True  # fewer reference features than MIN_REFERENCE_FEATURES: all features are the reference
    assert de.compositional_shift(lfc, few) == float(np.median(lfc))


def test_spike_slab_shrinkage_stops_uninformative_features_from_scoring_as_de():
    rng = np.random.default_rng(0)
    G = 200
    h1, h2 = np.exp(rng.normal(np.log(1e-4), 0.01, (2, 1000, G)))  # precise model draws ...
    counts = np.array([0.0, 1.0, 5.0, 100.0] + [1000.0] * (G - 4))  # ... of features seen that often
    h1[:, 4:24] *= 4  # 20 real effects of 2 log2
    kw = dict(mode="change", delta=0.25, pseudocounts=0.0, counts=(counts, counts))
    pop1, pop2 = (h1.mean(0), h1.var(0)), (h2.mean(0), h2.var(0))  # each draw is a population-mean draw
    plain = de.summarize(pop1, pop2, **kw)["proba_de"].to_numpy()
    shrunk = de.summarize(pop1, pop2, shrink=True, **kw)["proba_de"].to_numpy()
    assert (plain[:3] > 0.7).all()  # wide posteriors around 0 look DE without shrinkage ...
    assert (shrunk[:4] < 0.15).all()  # ... and do not with it
    assert (shrunk[4:24] > 0.99).all()  # the real effects keep their evidence
    calls = de.expected_fdr_calls(shrunk)
    assert calls[4:24].all() and calls.sum() <= 21  # one weak null may fit in the 5 % expected FDR
    pi0, s2 = de.fit_spike_slab(np.r_[np.zeros(180), np.full(20, 2.0)], np.full(200, 0.01))
    assert 0.85 < pi0 < 0.95 and 2.0 < s2 < 6.0


def test_combine_moments_follows_counts_where_they_are_precise():
    m, v = np.array([1.0, 1.0]), np.array([0.04, 0.04])  # the model says log2 FC = 1 +- 0.2 for both features
    observed, observed_var = np.zeros(2), np.array([1e-6, 100.0])  # the counts say 0: precisely, then barely
    mean, var, share = de.combine_moments(m, v, observed, observed_var)
    assert abs(mean[0]) < 0.01 and var[0] <= 1e-6  # precise counts win
    assert abs(mean[1] - 1.0) < 0.01 and var[1] == 0.04  # vague counts: the model's estimate and precision stand
    assert share[0] < 1e-3 and share[1] > 0.99
    # equal precisions: the mean halfway, each source half of the evidence, but the variance is not
    # halved, since the model learned from the same counts (it would be for independent measurements)
    mean, var, share = de.combine_moments(m, v, observed, v.copy())
    np.testing.assert_allclose(mean, 0.5)
    np.testing.assert_allclose(var, v)
    np.testing.assert_allclose(share, 0.5)


def test_importance_resample_by_hand():
    rng = np.random.default_rng(6)
    draws = np.broadcast_to(np.arange(4.0)[:, None, None], (4, 3, 2)).copy()  # draw k of every cell is k
    log_w = np.zeros((4, 3))  # cell 0: equal weights
    log_w[:, 1] = [-50.0, -50.0, 0.0, -50.0]  # cell 1: draw 2 dominates
    log_w[:, 2] = [0.0, 0.0, -np.inf, -np.inf]  # cell 2: half the weight on draws 0 and 1 each
    out = de.importance_resample(draws, log_w, rng)
    assert out.shape == draws.shape
    assert sorted(out[:, 0, 0]) == [0, 1, 2, 3]  # every draw once
    assert (out[:, 1] == 2).all()
    assert sorted(out[:, 2, 0]) == [0, 0, 1, 1]  # stratified: exactly the weights' proportions


def test_outlier_cells_flags_far_cells_only():
    rng = np.random.default_rng(7)
    z = rng.normal(0, 1, (300, 5))
    z[-3:] += 8.0  # three cells far from the rest
    flagged = de.outlier_cells(z)
    assert flagged[-3:].all() and flagged[:-3].sum() <= 1  # 0.999 quantile: ~0.3 of 297 by chance


# --------------------------------------------------------------------------- donor-level statistics


def test_bh_adjust_matches_scipy_and_skips_nan():
    from scipy.stats import false_discovery_control

    p = np.random.default_rng(10).uniform(0, 1, 200) ** 3
    np.testing.assert_allclose(de.bh_adjust(p), false_discovery_control(p), rtol=1e-12)
    by_hand = de.bh_adjust(np.array([0.01, np.nan, 0.04, 0.03]))  # m = 3: 0.03, 0.04, 0.04
    np.testing.assert_allclose(by_hand, [0.03, np.nan, 0.04, 0.04])


def test_treat_pvalue_by_hand():
    from scipy.stats import t

    # delta = 0: the two-sided t-test
    np.testing.assert_allclose(de.treat_pvalue(np.array([-2.0]), np.array([1.0]), 5.0), 2 * t(5).sf(2.0))
    # |b| = 1.5, se = 0.5, delta = 1: sf((1.5 - 1) / 0.5) + sf((1.5 + 1) / 0.5)
    np.testing.assert_allclose(de.treat_pvalue(np.array([1.5]), np.array([0.5]), 7.0, 1.0),
                               t(7).sf(1.0) + t(7).sf(5.0))
    assert de.treat_pvalue(np.array([0.0]), np.array([1e-6]), 3.0, 0.5)[0] == pytest.approx(1.0)


def test_trigamma_inverse_inverts_trigamma():
    from scipy.special import polygamma

    y = np.array([0.05, 0.7, 3.0, 40.0, 900.0])
    np.testing.assert_allclose(de.trigamma_inverse(polygamma(1, y)), y, rtol=1e-6)


@pytest.mark.parametrize("d0, s02, df", [(4.0, 0.2, 3.0), (20.0, 1.5, 6.0)])
def test_variance_prior_recovers_the_simulated_prior(d0, s02, df):
    rng = np.random.default_rng(int(d0))
    sigma2 = s02 * d0 / rng.chisquare(d0, 20000)  # scaled inverse chi-square
    s2 = sigma2 * rng.chisquare(df, 20000) / df
    d0_hat, s02_hat = de.fit_variance_prior(s2, df)
    assert d0_hat == pytest.approx(d0, rel=0.2) and s02_hat == pytest.approx(s02, rel=0.1)
    # no spread beyond sampling: d0 = inf, every feature gets s0^2
    d0_inf, s02_inf = de.fit_variance_prior(0.5 * rng.chisquare(df, 20000) / df, df)
    assert d0_inf > 200 and s02_inf == pytest.approx(0.5, rel=0.05)
    post, df_post = de.moderated_variance(np.array([1.0]), 3.0, 5.0, 0.2)
    assert post[0] == pytest.approx((5 * 0.2 + 3 * 1.0) / 8) and df_post == 8.0


def test_sample_level_test_is_the_textbook_t_test_without_moderation():
    from scipy.stats import ttest_ind, ttest_rel

    rng = np.random.default_rng(11)
    y1, y2 = rng.normal(0, 1, (5, 40)), rng.normal(0.5, 1, (5, 40))
    zero = np.zeros_like(y1)
    paired = de.sample_level_test(y1, zero, y2, zero, paired=True, moderate=False)
    np.testing.assert_allclose(paired["pvalue"], ttest_rel(y1, y2).pvalue, rtol=1e-10)
    unpaired = de.sample_level_test(y1, zero, y2[:4], zero[:4], paired=False, moderate=False)
    np.testing.assert_allclose(unpaired["pvalue"], ttest_ind(y1, y2[:4]).pvalue, rtol=1e-10)
    np.testing.assert_allclose(unpaired["effect"], y1.mean(0) - y2[:4].mean(0))
    # the within-sample uncertainty is a floor on the spread: samples that agree by chance are not certain
    agree = np.tile(np.array([[1.0], [1.01], [0.99]]), (1, 3))
    floored = de.sample_level_test(agree, np.full((3, 3), 0.5), np.zeros((3, 3)), np.zeros((3, 3)), paired=True,
                                   moderate=False)
    np.testing.assert_allclose(floored["se"], np.sqrt(0.5 / 3))


def test_center_samples_removes_each_samples_shift():
    y = np.array([[1.0, 2.0, 3.0, 9.0], [2.0, 3.0, 4.0, 0.0]])  # sample 2 = sample 1 + 1 on the reference features
    out = de.center_samples(y, np.array([True, True, True, False]))
    np.testing.assert_allclose(out[1, :3] - out[0, :3], 0.0, atol=1e-12)  # shift -0.5 / +0.5 removed


def test_jaccard_by_hand():
    a, b, c = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 0], bool)
    assert de.jaccard([a, b]) == pytest.approx(1 / 3)
    assert de.jaccard([a, c]) == 1.0 and de.jaccard([np.zeros(3, bool)] * 2) == 1.0
    assert de.jaccard([a, b, c]) == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)


def test_count_sums_agree_with_the_per_group_statistics():
    rng = np.random.default_rng(12)
    X = sp.csr_matrix(rng.poisson(1.0, (50, 7)).astype(np.float32))
    library = np.asarray(X.sum(1), dtype=np.float64).ravel()
    labels = rng.integers(-1, 3, 50)  # three groups and cells of none
    sums = de.count_sums(X, labels, 3, library)
    for k in range(3):
        C, L, S2 = de.group_count_stats(X, np.flatnonzero(labels == k), library)
        C_, L_, S2_, n = de.stats_of(sums, [k])
        np.testing.assert_allclose(C_, C), np.testing.assert_allclose(S2_, S2, atol=1e-9)
        assert L_ == pytest.approx(L) and n == (labels == k).sum()
    union = de.stats_of(sums, [0, 2])
    np.testing.assert_allclose(union[2], de.group_count_stats(X, np.flatnonzero(np.isin(labels, [0, 2])), library)[2],
                               atol=1e-9)
    raw = de._raw_stats_of(sums, np.array([0]), np.array([1, 2]))
    ref = de.raw_stats(X, np.flatnonzero(labels == 0), np.flatnonzero(np.isin(labels, [1, 2])))
    for key in ref:
        np.testing.assert_allclose(raw[key], ref[key], rtol=1e-9)


def test_population_moments_give_the_standard_error_of_the_population_mean():
    # cells with true expression r_i; a calibrated posterior: centred at r_i + e_i with e_i ~ N(0, s^2), spread s
    rng = np.random.default_rng(21)
    n, k, s, reps = 200, 3, 0.5, 3000
    r = rng.gamma(2.0, 1.0, (reps, n))
    draws = r[:, None] + rng.normal(0, s, (reps, 1, n)) + rng.normal(0, s, (reps, k, n))  # (reps, k, n)
    moments = [de.population_moments(d[..., None]) for d in draws]
    means, variances = np.array([m[0] for m, _ in moments]), np.array([v[0] for _, v in moments])
    error = means - 2.0  # against the population's true mean, E[r] = 2
    assert abs(error.mean()) < 0.01
    assert abs(variances.mean() / error.var() - 1.0) < 0.06  # the reported variance is the estimator's
    # with one draw per cell it is what the population bootstrap (one draw per cell) estimates
    one = draws[0, :1, :, None].astype(np.float32)
    boot = one[0, rng.integers(0, one.shape[1], (4000, one.shape[1]))].mean(1)  # cells resampled: (4000, 1)
    np.testing.assert_allclose(np.sqrt(de.population_moments(one)[1]), boot.std(0), rtol=0.05)
    # given in chunks of cells (and an empty chunk), the same moments
    chunks = [one[:, :7], one[:, 7:7], one[:, 7:300], one[:, 300:]]
    np.testing.assert_allclose(de.population_moments_of(chunks), de.population_moments(one), rtol=1e-10)
    cells = draws[0].astype(np.float64)  # (k draws, n cells): the cells' estimates are the means over draws
    np.testing.assert_allclose(de.population_moments_of([draws[0][:, :50, None], draws[0][:, 50:, None]]),
                               ([cells.mean(0).mean()], [cells.mean(0).var(ddof=1) / n]), rtol=1e-10)
    mean_empty, var_empty = de.population_moments_of([one[:, :0]])
    assert np.isnan(mean_empty).all() and (var_empty == 0).all()
    # a population of parts: cell-weighted means, variances by squared weights
    m, v = de.mix_populations([(np.array([1.0]), np.array([0.4])), (np.array([4.0]), np.array([0.1]))], [100, 300])
    np.testing.assert_allclose([m[0], v[0]], [3.25, 0.0625 * 0.4 + 0.5625 * 0.1])


def test_lfc_moments_match_the_lfc_of_population_draws():
    rng = np.random.default_rng(22)
    h1 = rng.normal([1e-3, 5e-4, 2e-4], [2e-5, 1e-5, 1e-5], (200000, 3))
    h2 = rng.normal([1e-3, 1e-3, 1e-4], [3e-5, 1e-5, 5e-6], (200000, 3))
    mean, var = de.lfc_moments(h1.mean(0), h1.var(0), h2.mean(0), h2.var(0), 1e-5)
    lfc = de.lfc_draws(h1, h2, 1e-5)
    np.testing.assert_allclose(mean, lfc.mean(0), atol=2e-3)
    np.testing.assert_allclose(np.sqrt(var), lfc.std(0), rtol=0.03)


# --------------------------------------------------------------------------- choosing cells


def test_populations_from_masks_positions_and_queries(small_adata):
    a = small_adata
    q = de.cells_from(a, "cell_type == 'type_0' and condition == 'stim'", "idx1")
    expected = np.flatnonzero(((a.obs.cell_type == "type_0") & (a.obs.condition == "stim")).to_numpy())
    np.testing.assert_array_equal(q, expected)
    np.testing.assert_array_equal(de.cells_from(a, (a.obs.cell_type == "type_0").to_numpy(), "idx1"),
                                  np.flatnonzero(a.obs.cell_type == "type_0"))
    np.testing.assert_array_equal(de.cells_from(a, [5, 3, 3], "idx1"), [3, 5])
    with pytest.raises(ValueError, match="selects no cells"):
        de.cells_from(a, "cell_type == 'nope'", "idx1")
    with pytest.raises(ValueError, match="not a valid query"):
        de.cells_from(a, "cell_type ==", "idx1")
    with pytest.raises(ValueError, match="length 600"):
        de.cells_from(a, np.ones(3, bool), "idx1")
    with pytest.raises(ValueError, match="outside"):
        de.cells_from(a, [600], "idx1")
    with pytest.raises(ValueError, match="share 5 cells"):
        de.comparisons(a, None, None, None, [0, 1, 2, 3, 4], np.arange(10))
    with pytest.raises(ValueError, match="'type_9' is not in"):
        de.comparisons(a, "cell_type", "type_9", None, None, None)
    with pytest.raises(ValueError, match="same group"):
        de.comparisons(a, "cell_type", "type_1", "type_1", None, None)
    with pytest.raises(ValueError, match="not a column"):
        de.comparisons(a, "nope", None, None, None, None)
    pairs = de.comparisons(a, "cell_type", None, None, None, None)
    assert [p[:2] for p in pairs] == [("type_0", "Rest"), ("type_1", "Rest"), ("type_2", "Rest")]
    assert all(np.intersect1d(p[2], p[3]).size == 0 and p[2].size + p[3].size == 600 for p in pairs)


# --------------------------------------------------------------------------- on a trained model


@pytest.fixture(scope="module")
def de_model():
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 0
    adata = cellvi.datasets.simulate(2500, 400, n_cell_types=3, frac_de_genes=0.1, de_lfc=1.2, seed=11)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata)
    model.train(max_epochs=80, n_epochs_kl_warmup=20)
    return model


STIM0 = "cell_type == 'type_0' and condition == 'stim'"
CTRL0 = "cell_type == 'type_0' and condition == 'ctrl'"


def test_de_recovers_simulated_genes_with_bounded_false_discoveries(de_model):
    a = de_model.adata
    res = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change")
    assert res["comparison"].iloc[0] == "group1 vs group2"
    assert res["proba_de"].is_monotonic_decreasing
    res = res.loc[a.var_names]
    truth = a.var["de_type_0"].to_numpy()
    assert average_precision_score(truth, res["proba_de"]) > 0.6  # base rate 0.1
    calls = res["is_de_fdr_0.05"].to_numpy()
    fdp = (calls & ~truth).sum() / max(calls.sum(), 1)
    power = (calls & truth).sum() / truth.sum()
    # a small, briefly trained model (measured: FDP 0.0, power 0.85 with the count update, 0.35 without);
    # scvi-tools calls nothing on such data
    assert fdp <= 0.1 and power >= 0.6, (fdp, power)
    assert res["model_agreement"].iloc[0] > 0.75  # the model carries the contrast (measured 0.85)
    # the sign follows scvi-tools: positive lfc = higher in group1 (stim)
    called_true = calls & truth
    assert (np.sign(res["lfc_mean"].to_numpy()[called_true]) ==
            np.sign(a.var["true_lfc_type_0"].to_numpy()[called_true])).all()
    expected_cols = {"proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
                     "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2",
                     "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
                     "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2", "model_share",
                     "model_agreement"}
    assert expected_cols <= set(res.columns)


def test_batch_correction_removes_batch_only_genes(de_model):
    a = de_model.adata
    # type_1 has no DE genes; compare its stim cells of batch 0 with its ctrl cells of both batches,
    # so the two populations differ in batch composition only
    b0 = (a.obs["batch"] == "batch_0").to_numpy()
    t1 = (a.obs["cell_type"] == "type_1").to_numpy()
    stim = (a.obs["condition"] == "stim").to_numpy()
    idx1, idx2 = t1 & stim & b0, t1 & ~stim
    batch_genes = a.var["batch_gene"].to_numpy()
    raw = de_model.differential_expression(idx1=idx1, idx2=idx2, mode="change").loc[a.var_names]
    corrected = de_model.differential_expression(idx1=idx1, idx2=idx2, mode="change",
                                                 batch_correction=True).loc[a.var_names]
    assert raw["is_de_fdr_0.05"].to_numpy()[batch_genes].sum() >= 5  # the batch effect is visible...
    assert corrected["is_de_fdr_0.05"].to_numpy()[batch_genes].sum() == 0  # ...and corrected away
    assert corrected["is_de_fdr_0.05"].sum() <= 2


def test_batch_correction_warns_when_populations_sit_in_different_batches(de_model):
    a = de_model.adata
    b0 = (a.obs["batch"] == "batch_0").to_numpy()
    with pytest.warns(UserWarning, match="out of distribution"):
        de_model.differential_expression(idx1=b0, idx2=~b0, batch_correction=True, all_stats=False)
    with pytest.raises(ValueError, match="batchid"):
        de_model.differential_expression(idx1=b0, idx2=~b0, batchid1="batch_0")


def test_one_vs_rest_and_options(de_model):
    res = de_model.differential_expression(groupby="cell_type", mode="change", all_stats=False)
    assert set(res["comparison"]) == {"type_0 vs Rest", "type_1 vs Rest", "type_2 vs Rest"}
    assert len(res) == 3 * de_model.adata.n_vars and "raw_mean1" not in res.columns
    # markers are found: each type's top genes are mostly its markers (or, for type_0, its stim genes)
    var = de_model.adata.var
    for t in ["type_0", "type_1", "type_2"]:
        called = res[(res["group1"] == t) & res["is_de_fdr_0.05"]]
        top = called.nlargest(20, "lfc_mean").index
        assert (var.loc[top, f"marker_{t}"] | var.loc[top, f"de_{t}"]).mean() >= 0.8
    # sorted as scvi-tools sorts: change mode by proba_de, vanilla by bayes_factor; calls in change mode only
    assert all(block["proba_de"].is_monotonic_decreasing for _, block in res.groupby("comparison"))
    van = de_model.differential_expression(groupby="cell_type", group1="type_0", group2="type_1")
    assert van["bayes_factor"].is_monotonic_decreasing and not van.columns.str.startswith("is_de_fdr").any()
    assert {"proba_m1", "proba_m2"} <= set(van.columns) and van["delta"].isna().all()
    np.testing.assert_allclose(van["proba_m1"] + van["proba_m2"], 1.0)
    est = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", delta=None, pseudocounts=None)
    assert est["delta"].iloc[0] >= 0.1 and est["pseudocounts"].iloc[0] > 0
    a = de_model.adata
    truth = a.var["de_type_0"].to_numpy()
    imp = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", weights="importance")
    assert average_precision_score(truth, imp.loc[a.var_names, "proba_de"]) > 0.8  # measured 0.97
    counted = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", use_counts=True).loc[a.var_names]
    assert average_precision_score(truth, counted["proba_de"]) > 0.6
    with pytest.raises(ValueError, match="mode="):
        de_model.differential_expression(idx1=STIM0, mode="bogus")


def test_de_is_reproducible_and_stable_across_seeds(de_model):
    a = de_model.adata
    r1 = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", seed=1).loc[a.var_names]
    r1b = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", seed=1).loc[a.var_names]
    r2 = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", seed=2).loc[a.var_names]
    pd.testing.assert_frame_equal(r1, r1b)
    c1, c2 = r1["is_de_fdr_0.05"].to_numpy(), r2["is_de_fdr_0.05"].to_numpy()
    assert c1.sum() >= 20 and c2.sum() >= 20  # calls to compare (measured 34 and 34)
    # the evidence barely moves; only calls at the FDR boundary can 
    assert np.corrcoef(r1["proba_de"], r2["proba_de"])[0, 1] > 0.99
    assert (c1 & c2).sum() >= 0.8 * min(c1.sum(), c2.sum())
    assert np.corrcoef(r1["lfc_mean"], r2["lfc_mean"])[0, 1] > 0.99


def test_outlier_cells_are_not_decoded(de_model):
    a = de_model.adata
    rows1 = de.cells_from(a, STIM0, "idx1")
    far = rows1[:4]  # make four cells of population 1 latent outliers
    z = np.random.default_rng(8).normal(0, 1, (a.n_obs, 10))
    z[far] += 10.0
    decoded = []

    def draws_fn(rows, n, batch, batch_size):
        decoded.append(rows)
        return de_model._de_draws(None, rows, n, batch, batch_size)

    de.differential_expression(de_model, idx1=STIM0, idx2=CTRL0, mode="change", filter_outlier_cells=True,
                               draws_fn=draws_fn, latent_fn=lambda rows: z[rows], all_stats=False, n_samples=1)
    assert not np.isin(far, decoded[0]).any()
    assert decoded[0].size >= rows1.size - 5  # the others (at most one more by chance) are kept
    decoded.clear()
    de.differential_expression(de_model, idx1=STIM0, idx2=CTRL0, mode="change", draws_fn=draws_fn, all_stats=False,
                               n_samples=1)  # one draw per cell: every cell is decoded
    assert np.isin(far, decoded[0]).all()  # without the filter they are decoded


def test_de_on_an_anndata_other_than_the_models(de_model):
    a = de_model.adata
    before = a.obs.copy()
    same = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", seed=3)
    copied = de_model.differential_expression(a.copy(), idx1=STIM0, idx2=CTRL0, mode="change", seed=3)
    pd.testing.assert_frame_equal(same, copied)  # the rows, not the object, define the populations
    # only the type_0 cells, in another order: the cells are found by query and the answer stands
    sub = a[np.random.default_rng(9).permutation(np.flatnonzero(a.obs["cell_type"] == "type_0"))].copy()
    res = de_model.differential_expression(sub, idx1="condition == 'stim'", idx2="condition == 'ctrl'",
                                           mode="change").loc[a.var_names]
    assert average_precision_score(a.var["de_type_0"], res["proba_de"]) > 0.8
    np.testing.assert_allclose(res["raw_mean1"], np.asarray(a[a.obs.eval(STIM0).to_numpy()].X.mean(0)).ravel(),
                               rtol=1e-5)
    pd.testing.assert_frame_equal(a.obs, before)  # neither AnnData is written to
    with pytest.raises(ValueError):
        de_model.differential_expression(a[:, :100].copy(), idx1=STIM0, idx2=CTRL0)


def test_volcano_plot(tmp_path, de_model):
    res = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib font cache messages
        ax = cellvi.pl.volcano(res, save=str(tmp_path / "v.png"))
    assert (tmp_path / "v.png").stat().st_size > 1000
    assert ax is not None


# --------------------------------------------------------------------------- a model that learned little


@pytest.mark.parametrize("seed, n_cells, n_genes, de_lfc, epochs", [
    (0, 2500, 500, 0.8, 15),
    (2, 2500, 500, 0.6, 15),
    (4, 2000, 400, 0.7, 10),
])
def test_a_briefly_trained_model_gives_a_weaker_answer_not_a_constant_one(seed, n_cells, n_genes, de_lfc, epochs):
    """Issue 16: small affected populations (~180 vs ~180 cells), weak effects, short training.

    Before the count update every feature got ``proba_de = 0`` on these designs (a constant ranking,
    AUPRC = chance 0.08, no calls): the spike-and-slab fit took the model's uninformative LFCs for
    nulls. Measured with the model's shrinkage corrected (:func:`cellvi.de.model_slope`): seed 4 gives 17 calls,
    2 false, power 0.47 (Wilcoxon + BH on the same cells: 18 calls, 2 false, power 0.50).
    """
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = seed
    a = cellvi.datasets.simulate(n_cells, n_genes, n_cell_types=7, abundance_shift=1.0, de_lfc=de_lfc, seed=seed)
    cellvi.SCVI.setup_anndata(a, batch_key="batch")
    model = cellvi.SCVI(a)
    model.train(max_epochs=epochs)
    res = model.differential_expression(idx1=STIM0, idx2=CTRL0, mode="change", batch_correction=True)
    res = res.loc[a.var_names]
    truth = a.var["de_type_0"].to_numpy()
    assert np.unique(res["proba_de"]).size > 0.9 * n_genes  # a ranking, not a constant
    assert average_precision_score(truth, res["proba_de"]) > 0.5  # chance is 0.08
    calls = res["is_de_fdr_0.05"].to_numpy()
    # at a 5 % target a few false calls are expected: seed 4 gives 2 of 17, as Wilcoxon + BH does (2 of 18)
    assert calls.sum() >= 1 and (calls & ~truth).sum() / calls.sum() <= 0.15
    # the table says the model carried little of the contrast (measured 0.32 / 0.15 / 0.47; 0.85 for the
    # well-trained model of test_de_recovers_simulated_genes_with_bounded_false_discoveries)
    assert res["model_agreement"].iloc[0] < 0.6


def test_arguments_match_scvi_tools():
    """Names, order and defaults of scvi-tools 1.4.2's ``differential_expression`` (read with
    ``inspect.signature``); no name may mean something else here."""
    import inspect

    def params(fn):  # positional-or-keyword parameters: scvi-tools' own
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if k not in ("self", "kwargs") and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}

    common = {"adata": None, "groupby": None, "group1": None, "group2": None, "idx1": None, "idx2": None,
              "mode": "vanilla", "delta": 0.25, "batch_size": None, "all_stats": True, "batch_correction": False,
              "batchid1": None, "batchid2": None, "fdr_target": 0.05, "silent": False}
    scvi = {**common, "weights": "uniform", "filter_outlier_cells": False}  # less importance_weighting_kwargs
    assert list(params(cellvi.SCVI.differential_expression).items()) == list(scvi.items())
    contrastive = {**common, "mode": "change", "target_idx": None, "n_samples": 1}
    assert list(params(cellvi.ContrastiveVI.differential_expression).items()) == list(contrastive.items())
    engine = inspect.signature(de.differential_expression).parameters
    assert list(params(de.differential_expression).items())[1:len(scvi) + 1] == list(scvi.items())
    # get_bayes_factors' names with its defaults; cellvi's own options are keyword-only
    assert engine["pseudocounts"].default is None and engine["n_samples_overall"].default == 5000
    own = ("pseudocounts", "n_samples_overall", "n_samples", "seed", "use_counts", "sample_key",
           "condition_key", "condition1", "condition2")
    assert all(engine[k].kind is inspect.Parameter.KEYWORD_ONLY for k in own)
    scvi_own = inspect.signature(cellvi.SCVI.differential_expression).parameters
    assert all(scvi_own[k].kind is inspect.Parameter.KEYWORD_ONLY and scvi_own[k].default is None
               for k in ("sample_key", "condition_key", "condition1", "condition2"))


# --------------------------------------------------------------------------- donor-aware DE


def _donor_data(seed: int, de_lfc: float = 1.0, donor_response_sd: float = 0.3):
    """Six donors (3 per batch), each with ctrl and stim cells; every donor responds to stim with noise of
    its own on every gene, so donors, not cells, are the replicates."""
    return cellvi.datasets.simulate(3000, 400, n_cell_types=3, n_donors_per_batch=3, frac_de_genes=0.1,
                                    de_lfc=de_lfc, donor_response_sd=donor_response_sd, seed=seed)


def _train(adata, seed: int, epochs: int = 50):
    cellvi.settings.seed = seed
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata)
    model.train(max_epochs=epochs)
    return model


WITHIN = dict(groupby="cell_type", condition_key="condition", condition1="stim", condition2="ctrl", mode="change")


@pytest.mark.parametrize("seed", [0, 3])
def test_donor_aware_calls_keep_the_fdr_where_cell_level_calls_do_not(seed):
    """Measured (seeds 0 / 3): cell-level FDP 0.16 / 0.28; donor-level FDP 0.00 / 0.00 at power 0.80 / 0.65
    (change mode, TREAT against delta = 0.25) and, in vanilla mode at padj < 0.1, 0.10 / 0.11 at power 0.88 / 0.82;
    null genes with p < 0.05: 0.044 / 0.042."""
    a = _donor_data(seed)
    model = _train(a, seed)
    truth = a.var["de_type_0"].to_numpy()

    def fdp_power(calls):
        return (calls & ~truth).sum() / max(calls.sum(), 1), (calls & truth).sum() / truth.sum()

    cell = model.differential_expression(**WITHIN)
    donor = model.differential_expression(**WITHIN, sample_key="donor")
    assert set(donor["cell_type"]) == {"type_0", "type_1", "type_2"} and len(donor) == 3 * a.n_vars
    assert {"pvalue", "padj", "lfc_samples", "lfc_samples_se"} <= set(donor.columns) and donor["paired"].all()
    c0 = cell[cell["cell_type"] == "type_0"].loc[a.var_names, "is_de_fdr_0.05"].to_numpy()
    d0 = donor[donor["cell_type"] == "type_0"].loc[a.var_names]
    assert fdp_power(c0)[0] > 0.1  # cells as replicates: false calls from the donors' own responses
    fdp, power = fdp_power(d0["is_de_fdr_0.05"].to_numpy())
    assert fdp <= 0.1 and power > 0.5, (fdp, power)
    np.testing.assert_array_equal(d0["is_de_fdr_0.05"], d0["padj"].fillna(1.0) < 0.05)
    # the null types: nothing called at the donor level
    assert not donor.loc[donor["cell_type"] != "type_0", "is_de_fdr_0.05"].any()
    # point null (vanilla): p-values of null genes are not too small, and the calls keep the FDR
    van = model.differential_expression(**{**WITHIN, "mode": "vanilla"}, sample_key="donor")
    v0 = van[van["cell_type"] == "type_0"].loc[a.var_names]
    assert (v0["pvalue"].to_numpy()[~truth] < 0.05).mean() < 0.08
    fdp, power = fdp_power(v0["padj"].fillna(1.0).to_numpy() < 0.1)
    assert fdp <= 0.15 and power > 0.5, (fdp, power)


def test_donor_aware_calls_are_stable_across_training_seeds():
    """Jaccard index of the donor-level calls of 3 models trained with different seeds (measured 0.96;
    cell-level calls 0.88)."""
    a = _donor_data(1, de_lfc=1.5, donor_response_sd=0.2)
    calls = []
    for seed in range(3):
        res = _train(a, seed).differential_expression(**WITHIN, group1="type_0", sample_key="donor", seed=0)
        calls.append(res.loc[a.var_names, "is_de_fdr_0.05"].to_numpy())
    assert min(c.sum() for c in calls) >= 20
    assert de.jaccard(calls) >= 0.85


def test_within_cluster_and_sample_errors(de_model):
    a = de_model.adata
    with pytest.raises(ValueError, match="sample_key='nope' is not a column"):
        de_model.differential_expression(idx1=STIM0, idx2=CTRL0, sample_key="nope")
    one_donor = "cell_type == 'type_0' and donor == 'donor_0_0'"
    with pytest.raises(ValueError, match="at least 2 samples in each group"):
        de_model.differential_expression(idx1=one_donor + " and condition == 'stim'", idx2=CTRL0, sample_key="donor")
    b = a.copy()
    b.obs["donor"] = b.obs["donor"].cat.add_categories([]).astype(object)
    b.obs.loc[b.obs_names[b.obs.eval(STIM0).to_numpy()][:3], "donor"] = None
    with pytest.raises(ValueError, match="in no sample"):
        de_model.differential_expression(b, idx1=STIM0, idx2=CTRL0, sample_key="donor")
    with pytest.raises(ValueError, match="condition1='bogus' is not a value"):
        de_model.differential_expression(groupby="cell_type", condition_key="condition", condition1="bogus",
                                         condition2="ctrl")
    with pytest.raises(ValueError, match="condition_key='nope' is not a column"):
        de_model.differential_expression(groupby="cell_type", condition_key="nope", condition1="stim", condition2="ctrl")
    with pytest.raises(ValueError, match="does not combine"):
        de_model.differential_expression(idx1=STIM0, condition_key="condition", condition1="stim", condition2="ctrl")
    with pytest.raises(ValueError, match="need condition_key"):
        de_model.differential_expression(groupby="cell_type", condition1="stim")
    # unpaired: group 1 and group 2 from different donors
    unpaired = de_model.differential_expression(idx1=STIM0 + " and batch == 'batch_0'",
                                                idx2=CTRL0 + " and batch == 'batch_1'", sample_key="donor",
                                                mode="change", all_stats=False)
    assert not unpaired["paired"].any() and (unpaired["n_samples1"] == 2).all()


def test_within_cluster_block_is_the_pairwise_comparison(de_model):
    """The type_0 block of a within-cluster call answers what the pairwise call answers (batch-corrected, donors)."""
    a = de_model.adata
    kw = dict(mode="change", sample_key="donor", batch_correction=True, all_stats=False)
    pair = de_model.differential_expression(idx1=STIM0, idx2=CTRL0, **kw).loc[a.var_names]
    within = de_model.differential_expression(**{**WITHIN, **kw})
    block = within[within["cell_type"] == "type_0"].loc[a.var_names]
    assert np.corrcoef(np.log(pair["pvalue"]), np.log(block["pvalue"]))[0, 1] > 0.99
    assert de._strata(de_model, a, True).dtype == np.int64  # pandas' int8 codes overflowed the unit labels


def test_each_cell_is_decoded_once_per_call(de_model):
    """One-vs-rest and within-cluster comparisons decode every chosen cell once, not once per comparison."""
    decoded = []

    def draws_fn(rows, n, batch, batch_size):
        decoded.append(rows)
        return de_model._de_draws(None, rows, n, batch, batch_size)

    res = de.differential_expression(de_model, groupby="cell_type", mode="change", draws_fn=draws_fn, all_stats=False)
    rows = np.concatenate(decoded)
    assert len(decoded) == 3 and np.unique(rows).size == rows.size  # three units, no cell twice
    assert set(res["comparison"]) == {"type_0 vs Rest", "type_1 vs Rest", "type_2 vs Rest"}
    decoded.clear()
    de.differential_expression(de_model, draws_fn=draws_fn, all_stats=False, **WITHIN)
    assert len(decoded) == 6 and np.unique(np.concatenate(decoded)).size == np.concatenate(decoded).size


def test_features_without_counts_are_never_called(de_model):
    """A decoder may give a feature unseen in both groups any expression; it is never called."""
    a = de_model.adata
    rows1, rows2 = de.cells_from(a, STIM0, "idx1"), de.cells_from(a, CTRL0, "idx2")
    b = a.copy()
    X = b.X.toarray()
    X[np.concatenate([rows1, rows2]), :5] = 0  # five features with no counts in either group
    b.X = sp.csr_matrix(X)
    group1 = set(rows1.tolist())

    def draws_fn(rows, n, batch, batch_size):  # the decoder invents a 16-fold change for them
        out = de_model._de_draws(None, rows, n, batch, batch_size).reshape(n, rows.size, -1)
        out[:, np.isin(rows, list(group1)), :5] *= 16.0
        return out.reshape(n * rows.size, -1)

    for kw in ({}, {"sample_key": "donor"}):
        res = de.differential_expression(de_model, b, idx1=STIM0, idx2=CTRL0, mode="change", draws_fn=draws_fn,
                                         use_counts=False, shrink_lfc=False, pseudocounts=0.0, **kw).loc[a.var_names]
        assert res["lfc_mean"].iloc[:5].abs().min() > 1.0  # the invented effect is there...
        assert not res["is_de_fdr_0.05"].iloc[:5].any()  # ...and not called
        assert res["is_de_fdr_0.05"].sum() >= 10


def test_contrastivevi_passes_donor_aware_options_to_the_engine():
    a = cellvi.datasets.simulate(1200, 150, n_cell_types=3, seed=1)
    cellvi.ContrastiveVI.setup_anndata(a, batch_key="batch")
    model = cellvi.ContrastiveVI(a)
    cond = a.obs["condition"].to_numpy()
    model.train(np.flatnonzero(cond == "ctrl"), np.flatnonzero(cond == "stim"), max_epochs=3)
    res = model.differential_expression(groupby="cell_type", condition_key="condition", condition1="stim",
                                        condition2="ctrl", sample_key="donor")
    assert set(res["cell_type"]) == {"type_0", "type_1", "type_2"} and {"pvalue", "padj"} <= set(res.columns)
    assert res.loc[res["cell_type"] == "type_0", "padj"].min() < 0.05  # type_0 responds to stim


def _wilcoxon_bh(X, rows1, rows2):
    """BH-adjusted two-sided Wilcoxon rank-sum p-values of log1p(counts per 10^4) between two groups of cells."""
    from scipy.stats import mannwhitneyu

    X = sp.csr_matrix(X)
    lib = np.asarray(X.sum(1)).ravel()
    norm = lambda rows: np.log1p(np.asarray(X[rows].todense()) / lib[rows, None] * 1e4)  # noqa: E731
    return de.bh_adjust(np.nan_to_num(mannwhitneyu(norm(rows1), norm(rows2), axis=0).pvalue, nan=1.0))


def test_cell_level_calls_have_the_power_of_wilcoxon_at_the_fdr_target():
    """Issue 16: on a simulation never used to build the engine (weak effect, small populations, briefly trained
    model), cell-level calls at a 5 % target keep the FDR and call as many true genes as Wilcoxon + BH on the
    same cells. Before the model's shrinkage was corrected (:func:`cellvi.de.model_slope`) the count-based
    evidence was pulled towards the model's shrunk LFCs: measured power 0.31 vs Wilcoxon's 0.61 (design D of
    ``bench_de.py --part calibration``). Measured here: FDP 0.065, power 0.72 vs Wilcoxon's 0.65 (before the
    correction: FDP 0, power 0.47, which fails)."""
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 61
    a = cellvi.datasets.simulate(2500, 400, n_cell_types=5, abundance_shift=1.0, de_lfc=0.8, frac_de_genes=0.1,
                                 seed=61)
    cellvi.SCVI.setup_anndata(a, batch_key="batch")
    model = cellvi.SCVI(a)
    model.train(max_epochs=30)
    rows1, rows2 = (np.flatnonzero(((a.obs.cell_type == "type_0") & (a.obs.condition == c)).to_numpy())
                    for c in ("stim", "ctrl"))
    truth = a.var["de_type_0"].to_numpy()
    res = model.differential_expression(idx1=rows1, idx2=rows2, mode="change", batch_correction=True).loc[a.var_names]
    calls, wil = res["is_de_fdr_0.05"].to_numpy(), _wilcoxon_bh(a.X, rows1, rows2) < 0.05
    fdp, power = (calls & ~truth).sum() / max(calls.sum(), 1), (calls & truth).sum() / truth.sum()
    power_wil = (wil & truth).sum() / truth.sum()
    assert fdp <= 0.1 and power >= power_wil - 0.05, (fdp, power, power_wil)


def test_one_torch_thread_runs_with_one_thread_and_restores_the_setting():
    from cellvi.de import one_torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = one_torch_thread(lambda: torch.get_num_threads())()
        assert seen == 1 and torch.get_num_threads() == 2

        @one_torch_thread
        def fails():
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fails()
        assert torch.get_num_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(before)
