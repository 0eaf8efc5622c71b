import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats
import torch
from sklearn.metrics import average_precision_score

import cellvi
from cellvi.distributions import Bernoulli, bernoulli_log_prob, nonzeros


@pytest.fixture(scope="module")
def trained():
    """PeakVI on simulated scATAC with known DA regions (network sizes for 800 regions, not 100k)."""
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 0
    a = cellvi.datasets.simulate_atac(800, 800, seed=0)
    cellvi.PeakVI.setup_anndata(a, batch_key="batch")
    model = cellvi.PEAKVI(a, n_hidden=128, n_latent=10)
    model.train(max_epochs=100, lr=1e-3, early_stopping=False, seed=0)
    return model


# --------------------------------------------------------------------------- likelihood


def test_bernoulli_log_prob_matches_scipy_and_sparse_sum_matches_dense():
    torch.manual_seed(0)
    p = torch.rand(50, 30, dtype=torch.float64) * 0.98 + 0.01
    y = torch.bernoulli(torch.full((50, 30), 0.2, dtype=torch.float64))
    ref = scipy.stats.bernoulli.logpmf(y.numpy(), p.numpy())
    np.testing.assert_allclose(bernoulli_log_prob(y, p).numpy(), ref, rtol=1e-6)
    d = Bernoulli(p)
    np.testing.assert_allclose(d.log_prob_sum(y).numpy(), ref.sum(1), rtol=1e-6)
    counts = y * 3  # count values are not read: only which entries are non-zero
    np.testing.assert_allclose(d.log_prob_sum(y, nonzeros(counts)).numpy(), ref.sum(1), rtol=1e-6)


def test_model_error_sd_by_hand():
    """The DA steps measure the decoder's error on accessibility differences with the DE engine's estimator."""
    from cellvi.de import model_error_sd

    rng = np.random.default_rng(0)
    observed = rng.normal(0, 1, 5000)
    model = observed + rng.normal(0, 0.3, 5000)  # tau = 0.3 beyond sampling variance 0.04
    every = np.ones(5000, bool)
    assert model_error_sd(model + rng.normal(0, 0.2, 5000), observed, np.full(5000, 0.04), every) == pytest.approx(0.3, abs=0.03)
    assert model_error_sd(model[:10], observed[:10], np.zeros(10), every[:10]) == 0.0


# --------------------------------------------------------------------------- set-up


def test_setup_refuses_cells_without_accessible_regions():
    a = cellvi.datasets.simulate_atac(50, 100, seed=1)
    X = a.X.toarray()
    X[3] = 0
    a.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match="1 cells have zero total counts.*cell_3"):
        cellvi.PeakVI.setup_anndata(a)


def test_counts_are_binarised_for_the_likelihood():
    a = cellvi.datasets.simulate_atac(100, 200, seed=1)
    cellvi.PeakVI.setup_anndata(a)
    model = cellvi.PeakVI(a, n_hidden=16, n_latent=4)
    model.module.eval()
    b = model._data().gather(torch.arange(100))
    torch.manual_seed(0)
    ref = model.module.loss(b)["reconstruction_loss"]
    b2 = model._data().gather(torch.arange(100))
    b2["x"] = b2["x"] * 7
    b2["nonzeros"] = b2["nonzeros"]._replace(values=b2["nonzeros"].values * 7)
    torch.manual_seed(0)
    torch.testing.assert_close(model.module.loss(b2)["reconstruction_loss"], ref)
    assert a.X.max() > 1  # the AnnData is left alone


def test_default_sizes_follow_scvi_tools():
    a = cellvi.datasets.simulate_atac(60, 400, seed=1)
    cellvi.PeakVI.setup_anndata(a)
    model = cellvi.PeakVI(a)
    assert model.module.head.weight_t.shape[0] == 20 and model.module.n_latent == 4  # sqrt(400), sqrt(20)


# --------------------------------------------------------------------------- results


def test_latent_factors_and_accessibility_names_shapes(trained):
    a = trained.adata
    z = trained.get_latent_representation()
    assert z.shape == (800, 10)
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    # kNN accuracy over training seeds 0-4: 0.86-0.92 (4 types: chance 0.25)
    assert cross_val_score(KNeighborsClassifier(15), z, a.obs["cell_type"], cv=3).mean() > 0.8
    d = trained.get_library_size_factors()
    assert d.shape == (800,) and ((d > 0) & (d < 1)).all()
    assert np.corrcoef(d, a.obs["cell_factor"])[0, 1] > 0.7  # the simulated cell factor is recovered
    f = trained.get_region_factors()
    assert f.shape == (800,) and ((f > 0) & (f < 1)).all()
    acc = trained.get_normalized_accessibility()
    assert isinstance(acc, pd.DataFrame) and acc.shape == (800, 800) and list(acc.columns) == list(a.var_names)
    assert ((acc.to_numpy() > 0) & (acc.to_numpy() < 1)).all()
    # DA regions of a type are more accessible in its cells
    t0 = (a.obs["cell_type"] == "type_0").to_numpy()
    da0 = a.var["da_type_0"].to_numpy()
    assert acc.to_numpy()[np.ix_(t0, da0)].mean() > 2 * acc.to_numpy()[np.ix_(~t0, da0)].mean()
    regions = list(a.var_names[[5, 2]])
    part = trained.get_normalized_accessibility(indices=[0, 1, 2], region_list=regions, return_numpy=True)
    assert part.shape == (3, 2)
    np.testing.assert_allclose(part, acc.iloc[:3, [2, 5]].to_numpy(), rtol=1e-5)
    cells = trained.get_normalized_accessibility(indices=[0, 1], normalize_cells=True, return_numpy=True)
    np.testing.assert_allclose(cells, acc.iloc[:2].to_numpy() * d[:2, None], rtol=1e-5)
    both = trained.get_normalized_accessibility(indices=[0, 1], normalize_regions=True, return_numpy=True)
    np.testing.assert_allclose(both, acc.iloc[:2].to_numpy() * f[None], rtol=1e-5)
    sparse = trained.get_normalized_accessibility(indices=np.arange(20), threshold=0.5, return_numpy=True)
    assert sp.issparse(sparse) and sparse.nnz == int((acc.iloc[:20].to_numpy() >= 0.5).sum())
    frame = trained.get_accessibility_estimates(indices=np.arange(20), threshold=0.5)
    assert isinstance(frame.dtypes.iloc[0], pd.SparseDtype)
    assert trained.get_normalized_accessibility(n_samples_overall=7, transform_batch="batch_1").shape == (7, 800)
    with pytest.raises(ValueError, match="threshold"):
        trained.get_normalized_accessibility(threshold=2.0)


def test_da_recovers_known_regions_at_the_fdr_target(trained):
    a = trained.adata
    res = trained.differential_accessibility(groupby="cell_type", group1="type_0", group2="type_1")
    assert list(res.columns[:9]) == ["prob_da", "is_da_fdr", "bayes_factor", "effect_size", "emp_effect",
                                     "est_prob1", "est_prob2", "emp_prob1", "emp_prob2"]
    truth = (a.var["da_type_0"] | a.var["da_type_1"]).loc[res.index].to_numpy()
    assert average_precision_score(truth, res["prob_da"]) > 0.9
    calls = res["is_da_fdr"].to_numpy(dtype=bool)
    assert calls.sum() >= 0.7 * truth.sum()
    assert 1 - truth[calls].mean() <= 0.1  # observed FDP near the 5 % target
    np.testing.assert_allclose(res["effect_size"], res["est_prob2"] - res["est_prob1"])
    # effect = difference of accessibility, with the sign of the simulated truth (group2 - group1)
    true_sign = np.sign(a.var["accessibility_type_1"] - a.var["accessibility_type_0"]).loc[res.index].to_numpy()
    hits = calls & truth
    assert (np.sign(res["effect_size"].to_numpy()[hits]) == true_sign[hits]).mean() > 0.95
    vanilla = trained.differential_accessibility(groupby="cell_type", group1="type_0", group2="type_1",
                                                 mode="vanilla")
    assert vanilla["is_da_fdr"].isna().all() and vanilla["prob_da"].between(0, 1).all()
    everyone = trained.differential_accessibility(groupby="cell_type", all_stats=False)
    assert len(everyone) == 4 * 800 and "emp_prob1" not in everyone.columns
    with pytest.raises(ValueError, match="delta"):
        trained.differential_accessibility(groupby="cell_type", group1="type_0", delta=-1)


def test_save_load_round_trip_is_exact(trained, tmp_path):
    trained.save(tmp_path / "p", save_anndata=True)
    loaded = cellvi.PeakVI.load(tmp_path / "p")
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    np.testing.assert_array_equal(loaded.get_region_factors(), trained.get_region_factors())
    pd.testing.assert_frame_equal(loaded.get_normalized_accessibility(indices=np.arange(30)),
                                  trained.get_normalized_accessibility(indices=np.arange(30)))


def test_train_defaults_follow_scvi_tools():
    a = cellvi.datasets.simulate_atac(100, 100, seed=1)
    cellvi.PeakVI.setup_anndata(a)
    model = cellvi.PeakVI(a, n_hidden=16, n_latent=4)
    model.train(max_epochs=2)
    assert model.history_["lr"][0] == pytest.approx(1e-4)
    assert "elbo_validation" in model.history_  # early stopping on by default: validation every epoch


def test_batch_corrected_da(trained):
    res = trained.differential_accessibility(groupby="cell_type", group1="type_2", group2="type_3",
                                             batch_correction=True, batchid1=["batch_0"], batchid2=["batch_0"])
    truth = (trained.adata.var["da_type_2"] | trained.adata.var["da_type_3"]).loc[res.index]
    assert average_precision_score(truth, res["prob_da"]) > 0.85
    with pytest.raises(ValueError, match="batch_correction"):
        trained.differential_accessibility(groupby="cell_type", group1="type_2", batchid1=["batch_0"])


# --------------------------------------------------------------------------- evaluation


def test_elbo_and_reconstruction_error_match_the_loss(trained):
    idx = np.arange(30)
    torch.manual_seed(2)
    elbo = trained.get_elbo(indices=idx, batch_size=30, return_mean=False)
    torch.manual_seed(2)
    rec = trained.get_reconstruction_error(indices=idx, batch_size=30, return_mean=False)
    trained.module.eval()
    b = trained._data().gather(torch.as_tensor(idx))
    with torch.no_grad():
        torch.manual_seed(2)
        out = trained.module.loss(b, kl_weight=1.0)
    assert isinstance(elbo, np.ndarray) and elbo.shape == (30,)
    np.testing.assert_allclose(elbo, -(out["reconstruction_loss"] + out["kl_local"]).numpy(), rtol=1e-6)
    # the training loss weighs each cell's KL 1 / (cells in the minibatch), as scvi-tools' PEAKVI objective does
    expected = (out["reconstruction_loss"] + out["kl_local"] / 30).mean()
    np.testing.assert_allclose(float(out["loss"]), float(expected), rtol=1e-6)
    assert set(rec) == {"reconstruction_loss"}  # scvi-tools' key
    np.testing.assert_allclose(rec["reconstruction_loss"], out["reconstruction_loss"].numpy(), rtol=1e-6)
    mean_elbo = trained.get_elbo()
    assert isinstance(mean_elbo, float) and mean_elbo < 0
    assert isinstance(trained.get_reconstruction_error(indices=idx)["reconstruction_loss"], float)
    fresh = cellvi.PeakVI(trained.adata, n_hidden=128, n_latent=10)
    assert mean_elbo > fresh.get_elbo()  # training raised the bound
    with pytest.raises(NotImplementedError, match="get_elbo"):
        trained.get_marginal_ll()
    with pytest.raises(ValueError, match="No cells"):
        trained.get_elbo(indices=np.array([], dtype=int))


def test_adversarial_classifier_is_refused_without_a_latent_in_the_loss():
    a = cellvi.datasets.simulate_atac(60, 50, seed=1)
    cellvi.PeakVI.setup_anndata(a, batch_key="batch")
    model = cellvi.PeakVI(a)
    with pytest.raises(ValueError, match="latent sample 'z'"):  # scvi-tools' PEAKVI has no adversary either
        model.train(max_epochs=1, plan_kwargs={"adversarial_classifier": True})


def test_default_network_learns_the_types_and_calls_da_regions():
    """At scvi-tools' default sizes (sqrt-sized network, n_latent 5) the latent separates the cell types and
    the DA calls find true regions at the FDR target: the objective weighs each cell's KL 1/(minibatch size)
    as scvi-tools' PEAKVI does (with KL weight 1 this latent collapsed), and the decoder's shrinkage of the
    effects is corrected and the observed effects weigh in where the model learned little (without both: no
    call, AUPRC 0.13 on this seed; measured after: AUPRC 0.98, FDP 0.06-0.08 at the 5 % target on 4 seeds)."""
    from sklearn.metrics import average_precision_score, silhouette_score

    cellvi.settings.seed = 0
    a = cellvi.datasets.simulate_atac(1000, 1000, seed=3)
    cellvi.PeakVI.setup_anndata(a, batch_key="batch")
    model = cellvi.PeakVI(a)
    model.train(max_epochs=100, lr=1e-3, train_size=0.9, enable_progress_bar=False)
    assert silhouette_score(model.get_latent_representation(), a.obs["cell_type"]) > 0.1
    da = model.differential_accessibility(groupby="cell_type", group1="type_0", group2="type_1").loc[a.var_names]
    truth = a.var["da_type_0"].values | a.var["da_type_1"].values
    assert average_precision_score(truth, da["prob_da"]) > 0.7
    calls = da["is_da_fdr"].values
    assert calls.sum() >= 50 and (calls & ~truth).sum() / calls.sum() <= 0.12
    # the probabilities are closed-form: other seeds (posterior draws, subsampled cells) give the same calls
    for seed in (1, 2):
        other = model.differential_accessibility(groupby="cell_type", group1="type_0", group2="type_1",
                                                 n_samples=600, seed=seed).loc[a.var_names]["is_da_fdr"].values
        assert (calls & other).sum() / (calls | other).sum() >= 0.9


@pytest.mark.parametrize("with_region_factor", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_bernoulli_likelihood_equals_the_dense_formula(with_region_factor, compiled, monkeypatch):
    """Bernoulli.from_logits (sigmoid, cell and region factors fused into the sparse likelihood, hand-written
    derivatives) against the dense formula through autograd: values and gradients, non-uniform upstream weights."""
    from cellvi import distributions as dist

    g = torch.Generator().manual_seed(3)
    y = (torch.rand(9, 13, generator=g) < 0.3).double()
    logits = torch.randn(9, 13, generator=g, dtype=torch.float64).requires_grad_()
    d = torch.rand(9, 1, generator=g, dtype=torch.float64).add(0.2).requires_grad_()
    f = torch.rand(13, generator=g, dtype=torch.float64).add(0.2).requires_grad_() if with_region_factor else 1.0
    params = [logits, d] + ([f] if with_region_factor else [])
    w = torch.rand(9, generator=g, dtype=torch.float64)
    if not compiled:  # the fused path's eager kernel (training uses it only with compiled kernels)
        monkeypatch.setattr(dist, "kernel", lambda fn, dynamic=False: fn)
    with dist.compiled_kernels(True):
        fused = dist.Bernoulli.from_logits(logits, d, f).log_prob_sum(y)
    dense = dist.bernoulli_log_prob(y, torch.sigmoid(logits) * d * f).sum(-1)
    torch.testing.assert_close(fused, dense, rtol=1e-9, atol=1e-9)
    for a, b in zip(torch.autograd.grad((fused * w).sum(), params), torch.autograd.grad((dense * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("with_region_factor", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_head_and_bernoulli_likelihood_equal_the_dense_formula(with_region_factor, compiled, transposed,
                                                                      monkeypatch):
    """Bernoulli.from_linear (the decoder head's product and bias fused into the likelihood, the upstream weights
    applied to the small operands in backward) against linear layer + dense formula through autograd; the weight
    a contiguous (regions, hidden) leaf or the transposed view of a (hidden, regions) one (RegionHead)."""
    from cellvi import distributions as dist

    g = torch.Generator().manual_seed(4)
    y = (torch.rand(9, 13, generator=g) < 0.3).double() * 2  # counts: any non-zero is a one
    h = torch.randn(9, 5, generator=g, dtype=torch.float64).requires_grad_()
    leaf = torch.randn(13, 5, generator=g, dtype=torch.float64)
    leaf = (leaf.t().contiguous() if transposed else leaf).requires_grad_()
    weight = leaf.t() if transposed else leaf
    bias = torch.randn(13, generator=g, dtype=torch.float64).requires_grad_()
    d = torch.rand(9, 1, generator=g, dtype=torch.float64).mul(0.8).add(0.1).requires_grad_()  # p stays < 1
    f = torch.rand(13, generator=g, dtype=torch.float64).mul(0.8).add(0.1).requires_grad_() if with_region_factor else 1.0
    params = [h, leaf, bias, d] + ([f] if with_region_factor else [])
    w = torch.rand(9, generator=g, dtype=torch.float64)
    if not compiled:
        monkeypatch.setattr(dist, "kernel", lambda fn, dynamic=False: fn)
    with dist.compiled_kernels(True):
        fused = dist.Bernoulli.from_linear(h, weight, bias, d, f).log_prob_sum(y)
    dense = dist.bernoulli_log_prob((y > 0).double(), torch.sigmoid(h @ weight.T + bias) * d * f).sum(-1)
    torch.testing.assert_close(fused, dense, rtol=1e-9, atol=1e-9)
    for a, b in zip(torch.autograd.grad((fused * w).sum(), params), torch.autograd.grad((dense * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    eager = dist.Bernoulli.from_linear(h, weight, bias, d, f).log_prob_sum(y)  # outside: the autograd path
    torch.testing.assert_close(eager, dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("onednn", [False, True])
def test_fused_head_in_float32_matches_float64(onednn, monkeypatch):
    """The fused head in float32, its products on oneDNN (as in training on a CPU) or torch.mm, with RegionHead's
    layout: value and gradients equal the float64 formula to float32 round-off."""
    from cellvi import distributions as dist
    from cellvi import nn as cnn

    monkeypatch.setattr(cnn, "_ONEDNN", [onednn])
    monkeypatch.setattr(dist, "kernel", lambda fn, dynamic=False: fn)
    g = torch.Generator().manual_seed(5)
    y = (torch.rand(16, 300, generator=g) < 0.1).float()
    h64, wt64 = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randn(12, 300, generator=g, dtype=torch.float64) / 4
    b64, d64 = torch.randn(300, generator=g, dtype=torch.float64), torch.rand(16, 1, generator=g, dtype=torch.float64) * 0.9
    f64 = torch.rand(300, generator=g, dtype=torch.float64) * 0.9 + 0.05
    grads = {}
    for dtype in (torch.float64, torch.float32):
        params = [t.to(dtype).requires_grad_() for t in (h64, wt64, b64, d64, f64)]
        h, wt, b, d, f = params
        with dist.compiled_kernels(True):
            out = dist.Bernoulli.from_linear(h, wt.t(), b, d, f).log_prob_sum(y.to(dtype))
        grads[dtype] = [out.detach().double()] + [t.double() for t in torch.autograd.grad(out.sum(), params)]
    for a, b in zip(grads[torch.float32], grads[torch.float64]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_region_head_initialises_as_a_linear_layer_and_loads_its_weights():
    """RegionHead starts from the weights nn.Linear(n_hidden, n_regions) draws with the same seed (stored
    transposed), computes h W^T + b, and a state dict with the old ``head.weight`` loads into it."""
    from cellvi.models.peakvi import RegionHead

    torch.manual_seed(0)
    head = RegionHead(7, 30)
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 30)
    assert torch.equal(head.weight, lin.weight) and torch.equal(head.bias, lin.bias)
    h = torch.randn(4, 7)
    torch.testing.assert_close(head(h), lin(h))
    a = cellvi.datasets.simulate_atac(40, 100, seed=3)
    cellvi.PeakVI.setup_anndata(a)
    module = cellvi.PeakVI(a).module
    state = module.state_dict()
    state["head.weight"] = state.pop("head.weight_t").t() + 1.0  # as saved by nn.Linear, changed
    module.load_state_dict(state, strict=True)
    torch.testing.assert_close(module.head.weight, state["head.weight"])


def test_encoder_input_reads_y_sparsely_or_densely_alike():
    """The fused first encoder layers give the same outputs and gradients from the minibatch's non-zeros
    (sparse rule) as from the dense binarised block, and explicit zeros of the CSR read as inaccessible."""
    from cellvi.data.loader import CountData

    a = cellvi.datasets.simulate_atac(64, 300, seed=2)
    X = a.X.tocsr().copy()
    X.data[::7] = 0.0  # explicit zeros stored in the CSR
    a.X = X
    cellvi.PeakVI.setup_anndata(a)
    model = cellvi.PeakVI(a)
    enc = model.module.encoder_input
    batch = CountData(a, model.spec).gather(torch.arange(64))
    assert enc.reads_sparse(batch)
    out_sparse = torch.cat(enc(batch), 1)
    (g_sparse,) = torch.autograd.grad(out_sparse.square().sum(), enc.weight_t)
    out_dense = torch.cat(enc({k: v for k, v in batch.items() if k != "nonzeros"}), 1)  # no non-zeros: dense
    (g_dense,) = torch.autograd.grad(out_dense.square().sum(), enc.weight_t)
    torch.testing.assert_close(out_sparse, out_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-4)
    y = (torch.as_tensor(X.toarray()) > 0).float()
    torch.testing.assert_close(out_dense, y @ enc.weight_t + enc.bias, rtol=1e-5, atol=1e-5)


def test_weights_saved_before_the_fused_encoder_input_load(tmp_path):
    """A state dict with each encoder's first layer on its own (saved before EncoderInput) loads into the fused
    layer exactly; the initial fused weight is the two layers' initial weights, side by side."""
    a = cellvi.datasets.simulate_atac(50, 120, seed=3)
    cellvi.PeakVI.setup_anndata(a, batch_key="batch")
    module = cellvi.PeakVI(a).module
    state = module.state_dict()
    H = module.encoder_input.widths[0]
    w, b = state.pop("encoder_input.weight_t"), state.pop("encoder_input.bias")
    state["z_encoder.body.layers.0.linear.weight"], state["d_body.layers.0.linear.weight"] = w[:, :H].t(), w[:, H:].t()
    state["z_encoder.body.layers.0.linear.bias"], state["d_body.layers.0.linear.bias"] = b[:H], b[H:]
    fresh = cellvi.PeakVI(a, n_hidden=module.encoder_input.widths[0]).module
    torch.nn.init.zeros_(fresh.encoder_input.weight_t)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.encoder_input.weight_t, w) and torch.equal(fresh.encoder_input.bias, b)
