"""Aggregated posteriors and differential abundance: the math against torch.distributions, and recovery of
simulated abundance shifts."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import distributions as D

import cellvi
from cellvi.analysis.density import aggregated_log_density, segment_logsumexp, student_t_log_density


@pytest.mark.parametrize("dof", [None, 3.0])
def test_mixture_density_matches_torch_mixture(dof):
    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(37, 4, generator=g, dtype=torch.float64), torch.rand(37, 4, generator=g, dtype=torch.float64) + 0.3
    z = torch.randn(9, 4, generator=g, dtype=torch.float64)
    comp = D.Normal(loc, scale) if dof is None else D.StudentT(dof, loc, scale)
    ref = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(37, dtype=torch.float64)), D.Independent(comp, 1))
    one_segment = torch.zeros(37, dtype=torch.int64)
    torch.testing.assert_close(aggregated_log_density(z, loc, scale, one_segment, 1, dof=dof)[:, 0], ref.log_prob(z))
    if dof is not None:
        torch.testing.assert_close(student_t_log_density(z, loc, scale, dof), comp.log_prob(z[:, None]).sum(-1))


def test_own_component_is_left_out_by_hand():
    loc = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    scale = torch.ones(2, 1, dtype=torch.float64)
    z = torch.tensor([[0.0]], dtype=torch.float64)  # query = component 0
    seg = torch.zeros(2, dtype=torch.int64)
    with_own = aggregated_log_density(z, loc, scale, seg, 1)
    without = aggregated_log_density(z, loc, scale, seg, 1, query_ids=torch.tensor([0]), component_ids=torch.tensor([0, 1]))
    alone = aggregated_log_density(z, loc[:1], scale[:1], seg[:1], 1, query_ids=torch.tensor([0]),
                                   component_ids=torch.tensor([0]))
    assert alone.item() == -math.inf  # its own component was the only one
    # with its own component the density is ~ N(0; 0, 1) / 2; without, only N(0; 10, 1) remains (weight 1)
    assert with_own.item() == pytest.approx(-0.5 * math.log(2 * math.pi) - math.log(2), abs=1e-12)
    assert without.item() == pytest.approx(-0.5 * math.log(2 * math.pi) - 50.0, abs=1e-12)


@pytest.mark.parametrize("block_entries", [2**23, 40 * 3])  # all points in one block; blocks of 3 points
def test_own_components_left_out_match_the_brute_force_mixture(block_entries, monkeypatch):
    """Shuffled segments, component ids that are not positions, queries with and without a component of their own:
    each segment's mixture written out with scipy, the own component dropped, whatever the blocks of points;
    no points give no rows; repeated ids are refused."""
    import cellvi.analysis.density as density

    monkeypatch.setattr(density, "DENSITY_BLOCK_ENTRIES", block_entries)
    from scipy.special import logsumexp
    from scipy.stats import norm

    rng = np.random.default_rng(4)
    M, B, S = 40, 12, 5
    loc, scale = rng.normal(size=(M, 3)), rng.uniform(0.3, 1.5, (M, 3))
    seg = rng.integers(0, S - 1, M)  # the last segment has no component
    comp_ids = rng.permutation(1000)[:M]
    query_ids = np.concatenate([comp_ids[rng.choice(M, 8, replace=False)], [-5, 2000, 1001, 1002]])
    z = rng.normal(size=(B, 3))
    got = aggregated_log_density(*(torch.as_tensor(v) for v in (z, loc, scale, seg)), S,
                                 query_ids=torch.as_tensor(query_ids), component_ids=torch.as_tensor(comp_ids)).numpy()
    lp = np.array([[norm(loc[m], scale[m]).logpdf(z[b]).sum() for m in range(M)] for b in range(B)])
    for b in range(B):
        for s in range(S):
            keep = (seg == s) & (comp_ids != query_ids[b])
            want = logsumexp(lp[b, keep]) - np.log(keep.sum()) if keep.any() else -np.inf
            np.testing.assert_allclose(got[b, s], want, rtol=1e-10)
    assert aggregated_log_density(torch.zeros(0, 3, dtype=torch.float64), *(torch.as_tensor(v) for v in (loc, scale, seg)),
                                  S).shape == (0, S)
    # terms far below a segment's peak (raised to exp(-700) there: no effect in float64) and a segment left empty
    far = torch.tensor([[0.0, -800.0, -math.inf], [-math.inf, -math.inf, -math.inf]], dtype=torch.float64)
    assert segment_logsumexp(far, torch.zeros(3, dtype=torch.int64), 1).flatten().tolist() == [0.0, -math.inf]
    with pytest.raises(ValueError, match="component_ids must be distinct"):
        aggregated_log_density(torch.as_tensor(z), torch.as_tensor(loc), torch.as_tensor(scale), torch.as_tensor(seg), S,
                               query_ids=torch.as_tensor(query_ids), component_ids=torch.zeros(M, dtype=torch.int64))


@pytest.fixture(scope="module")
def shifted():
    """Type 0 three times as abundant in stim, type 2 three times less; types 1 and 3 in between."""
    adata = cellvi.datasets.simulate(2400, 200, n_cell_types=4, abundance_shift=[3.0, 1.0, 1 / 3, 1.0], seed=7)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata, n_latent=6)
    model.train(max_epochs=40, n_epochs_kl_warmup=10, seed=0)
    return model


def test_differential_abundance_ranks_up_and_down_shifted_types(shifted):
    model, adata = shifted, shifted.adata
    table = model.differential_abundance(sample_key="sample", num_cells_posterior=300)
    assert table.shape == (adata.n_obs, adata.obs["sample"].nunique()) and adata.obsm["da_log_probs"] is table
    assert np.isfinite(table.to_numpy()).all()
    sample_condition = adata.obs.groupby("sample", observed=True)["condition"].first()
    stim = [s for s in table.columns if sample_condition[s] == "stim"]
    ctrl = [s for s in table.columns if sample_condition[s] == "ctrl"]
    score = table[stim].mean(1) - table[ctrl].mean(1)  # log density ratio, stim vs ctrl
    ct = adata.obs["cell_type"].astype(str)
    up = roc_auc_score(ct == "type_0", score)  # the up-shifted type ranks first
    down = roc_auc_score(ct == "type_2", -score)  # the down-shifted type ranks last
    assert up > 0.8 and down > 0.8, (up, down)
    means = score.groupby(ct).mean()
    assert means["type_0"] > means["type_1"] > means["type_2"] and means["type_0"] > means["type_3"] > means["type_2"]


def test_aggregated_posterior_and_errors(shifted):
    model = shifted
    ap = model.get_aggregated_posterior(indices=np.arange(50))
    z = torch.as_tensor(model.get_latent_representation(indices=np.arange(5)))
    assert ap.log_prob(z).shape == (5,) and ap.event_shape == (6,)
    with pytest.raises(ValueError, match="sample_key='nope'"):
        model.differential_abundance(sample_key="nope")
    with pytest.raises(ValueError, match="No cells selected"):
        model.get_aggregated_posterior(indices=np.array([], dtype=int))
    own = model.differential_abundance(sample_key="sample", num_cells_posterior=None, omit_own_cell=False)
    loo = model.differential_abundance(sample_key="sample", num_cells_posterior=None)
    rows = np.arange(model.adata.n_obs)
    own_col = pd.Index(own.columns).get_indexer(model.adata.obs["sample"].astype(str))
    assert (own.to_numpy()[rows, own_col] > loo.to_numpy()[rows, own_col]).all()  # a cell's own term adds density
