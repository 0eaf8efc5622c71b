"""MrVI: the sample_key set-up, the model, its analyses (and their pure functions), recovery on a simulation."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from scipy.spatial.distance import cdist

import cellvi
from cellvi.analysis import density, distances, explore, regression
from cellvi.data import DataSpec, get_spec
from cellvi.data.loader import CountData
from cellvi.train import TrainConfig, make_optimizer


def _cohort(n=400, g=60, seed=0, **kw):
    return cellvi.datasets.simulate_cohort(n, g, n_samples_per_subgroup=2, seed=seed, **kw)  # 8 samples


@pytest.fixture(scope="module")
def trained():
    """A briefly trained MrVI on a small cohort with a nuisance batch; read-only."""
    cellvi.settings.progress_bar = False
    a = _cohort()
    a.obs["site"] = pd.Categorical(np.where(a.obs["cov1"] == "group_0", "s0", "s1"))
    cellvi.MrVI.setup_anndata(a, sample_key="sample", batch_key="site")
    m = cellvi.MrVI(a, n_latent=8, n_latent_u=4)
    m.train(max_epochs=4, seed=0)
    return m


# --------------------------------------------------------------------------- set-up (base additions)


def test_sample_key_is_recorded_checked_and_loaded():
    a = _cohort()
    cellvi.MrVI.setup_anndata(a, sample_key="sample")
    spec = get_spec(a)
    assert spec.sample_key == "sample" and spec.n_samples == 8 and spec.model_class == "MrVI"
    assert spec.sample_categories == tuple(a.obs["sample"].cat.categories)
    assert DataSpec.from_json(spec.to_json()) == spec
    codes = CountData(a, spec).obs["sample"]
    assert codes.dtype == torch.int64
    np.testing.assert_array_equal(codes.numpy(), a.obs["sample"].cat.codes.to_numpy())
    b = a.copy()
    b.obs["sample"] = b.obs["sample"].cat.rename_categories({"sample_00": "new_sample"})
    with pytest.raises(ValueError, match="categories the model was not set up with.*new_sample"):
        CountData(b, spec)


def test_set_ups_written_before_sample_key_still_load():
    a = _cohort()
    cellvi.SCVI.setup_anndata(a)
    raw = json.loads(get_spec(a).to_json())
    for key in ("sample_key", "sample_categories", "model_class"):
        raw.pop(key)
    spec = DataSpec.from_json(json.dumps(raw))
    assert spec.sample_key is None and spec.n_samples == 1 and spec.model_class is None
    assert (CountData(a, spec).obs["sample"] == 0).all()


def test_setup_errors_name_the_problem():
    a = _cohort()
    with pytest.raises(ValueError, match="'nope' is not a column"):
        cellvi.MrVI.setup_anndata(a, sample_key="nope")
    with pytest.raises(ValueError, match="needs sample_key"):
        cellvi.MrVI.setup_anndata(a)
    one = a[a.obs["sample"] == "sample_00"].copy()
    with pytest.raises(ValueError, match="single sample.*at least two"):
        cellvi.MrVI.setup_anndata(one, sample_key="sample")
    with pytest.raises(ValueError, match="Unsupported setup_anndata arguments"):
        cellvi.MrVI.setup_anndata(a, sample_key="sample", size_factor_key="x")


def test_a_set_up_is_refused_by_another_model_class():
    a = _cohort()
    cellvi.SCVI.setup_anndata(a)
    with pytest.raises(ValueError, match=r"set up with SCVI.setup_anndata.*cellvi.MrVI.setup_anndata"):
        cellvi.MrVI(a)
    cellvi.MRVI.setup_anndata(a, sample_key="sample", backend="torch")
    with pytest.raises(ValueError, match="set up with MrVI.setup_anndata"):
        cellvi.SCVI(a)
    assert cellvi.MRVI is cellvi.MrVI
    cellvi.MRVI(a, backend="torch")  # the alias and the ignored backend argument


def test_sample_info_keeps_constant_columns_with_their_dtypes_and_is_assignable():
    a = _cohort()
    a.obs["age"] = a.obs["sample"].cat.codes.astype(float) * 10  # numeric, constant per sample
    cellvi.MrVI.setup_anndata(a, sample_key="sample")
    m = cellvi.MrVI(a, n_latent=4, n_latent_u=4)
    info = m.sample_info
    assert list(info["sample"]) == list(m.sample_order)
    assert "cell_type" not in info.columns  # varies within a sample
    assert {"cov1", "cov1_sub", "cov2", "age"} <= set(info.columns)
    assert isinstance(info["cov2"].dtype, pd.CategoricalDtype) and list(info["cov2"].cat.categories) == ["low", "high"]
    assert info["age"].tolist() == [10.0 * i for i in range(8)]
    flipped = info.copy()
    flipped["cov2"] = flipped["cov2"].cat.reorder_categories(["high", "low"])
    m.sample_info = flipped
    assert list(m.sample_info["cov2"].cat.categories) == ["high", "low"]
    with pytest.raises(ValueError, match="one row per sample"):
        m.sample_info = info.iloc[:3]


def test_adamw_decays_weights_outside_the_moments_like_torch():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(4)]
    ours = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0.clone())
    opt = make_optimizer([ours], TrainConfig(max_epochs=1, lr=0.1, eps=1e-8, weight_decay=0.5, optimizer="AdamW"))
    ref_opt = torch.optim.AdamW([ref], lr=0.1, eps=1e-8, weight_decay=0.5)
    adam = torch.nn.Parameter(w0.clone())
    adam_opt = make_optimizer([adam], TrainConfig(max_epochs=1, lr=0.1, eps=1e-8, weight_decay=0.5))
    for g in grads:
        for p, o in ((ours, opt), (ref, ref_opt), (adam, adam_opt)):
            p.grad = g.clone()
            o.step()
    torch.testing.assert_close(ours.data, ref.data, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adam.data, ref.data, atol=1e-3)  # Adam's coupled decay differs
    with pytest.raises(ValueError, match="optimizer='SGD' is not supported"):
        make_optimizer([ours], TrainConfig(max_epochs=1, optimizer="SGD"))


# --------------------------------------------------------------------------- training and the model


def test_train_defaults_match_a_bare_scvi_tools_call(monkeypatch):
    import cellvi.models.base as base

    seen = {}
    real_fit = base.fit

    def spy(module, train_batches, val_batches, config, **kw):
        seen["config"] = config
        seen["batch"] = next(iter(train_batches()))["x"].shape[0]
        return real_fit(module, train_batches, val_batches, config, **kw) if config.max_epochs < 10 else {}

    monkeypatch.setattr(base, "fit", spy)
    a = _cohort(n=300)
    cellvi.MrVI.setup_anndata(a, sample_key="sample")
    m = cellvi.MrVI(a, n_latent=4, n_latent_u=4)
    m.train(max_epochs=2)
    c = seen["config"]
    assert (c.lr, c.eps, c.weight_decay, c.optimizer) == (2e-3, 1e-8, 1e-8, "Adam")
    assert (c.n_epochs_kl_warmup, c.gradient_clip_val, c.check_val_every_n_epoch) == (20, 40.0, 1)
    assert not c.early_stopping and c.early_stopping_patience == 15 and seen["batch"] == 128
    assert c.compile_kernels is None and c.compile_cell_passes == 2_000_000  # cellvi: when to compile the network
    assert len(m.history["elbo_validation"]) == 2 and len(m.validation_indices_) == 30
    m.train(max_epochs=1, plan_kwargs={"lr": 1e-3, "optimizer": "AdamW"}, early_stopping_patience=3)
    assert (seen["config"].lr, seen["config"].optimizer, seen["config"].early_stopping_patience) == (1e-3, "AdamW", 3)
    with pytest.raises(ValueError, match=r"Unknown training option\(s\) \['nope'\]"):
        m.train(max_epochs=1, plan_kwargs={"nope": 1})
    m2 = cellvi.MrVI(a, n_latent=4, n_latent_u=4)
    m2.train()  # not run by the spy: only the epoch heuristic is checked (400 for <= 20k cells)
    assert seen["config"].max_epochs == 400


def test_latent_shapes_and_save_load_round_trip(trained, tmp_path):
    m = trained
    u, z = m.get_latent_representation(), m.get_latent_representation(give_z=True)
    assert u.shape == (400, 4) and z.shape == (400, 8)
    assert m.get_latent_representation(indices=[3, 1], use_mean=True).shape == (2, 4)
    m.save(tmp_path / "m")
    m2 = cellvi.MrVI.load(tmp_path / "m", adata=m.adata.copy())
    np.testing.assert_array_equal(m2.get_latent_representation(give_z=True), z)
    d1 = m.get_local_sample_distances(keep_cell=True)["cell"].values
    np.testing.assert_array_equal(m2.get_local_sample_distances()["cell"].values, d1)
    assert m2.history["elbo_validation"].shape == (4, 1)


def test_weights_saved_before_the_fused_layers_load_to_the_same_function(trained):
    """A state dict in the layout of earlier versions (ResBlock fc1 and skip apart, q(u)'s per-sample norms,
    offset and two heads apart) loads into the fused layers and gives the same latent and distances."""
    import copy

    m = copy.deepcopy(trained)  # (its parameters are zeroed below; the fixture is shared)
    state = {k: v.clone() for k, v in m.module.state_dict().items()}
    H = m.module.qu_fc2.weight.shape[0]
    old = {}
    for k, v in state.items():
        if k == "qu_per_sample":
            for i, name in enumerate(["qu_norm1.gamma", "qu_norm1.beta", "qu_norm2.gamma", "qu_norm2.beta", "qu_sample"]):
                old[name] = v[:, i * H : (i + 1) * H]
        elif k.startswith("qu_head."):
            old["qu_mean." + k[8:]], old["qu_scale." + k[8:]] = v.chunk(2, 0)
        elif k.endswith(".fc1.weight") and m.module.get_submodule(k[:-11]).linear_skip:
            old[k], old[k[:-10] + "skip.weight"] = v.chunk(2, 0)
            old[k[:-6] + "bias"], old[k[:-10] + "skip.bias"] = state[k[:-6] + "bias"].chunk(2, 0)
        elif k.endswith(".fc1.bias") and k[:-8] + "skip.bias" in old:
            continue
        else:
            old[k] = v
    assert any(k.endswith("skip.weight") for k in old) and "qu_mean.weight" in old
    expected = m.get_local_sample_distances()["cell"].values
    z = m.get_latent_representation(give_z=True)
    with torch.no_grad():
        for p in m.module.parameters():
            p.zero_()
    m.module.load_state_dict(old)
    np.testing.assert_array_equal(m.get_latent_representation(give_z=True), z)
    np.testing.assert_array_equal(m.get_local_sample_distances()["cell"].values, expected)


def test_file_saved_before_mlp_inner_width_loads_with_the_width_it_was_trained_with(tmp_path):
    """Files of earlier versions lack ``mlp_inner_width`` (their attention MLPs were 32 wide inside): they load
    with that width, not the current default, and give the same latents."""
    import json

    a = _cohort(n=120, g=20)
    cellvi.MrVI.setup_anndata(a, sample_key="sample")
    m = cellvi.MrVI(a, n_latent=6, n_latent_u=4, mlp_inner_width=32)
    m.train(max_epochs=1, seed=0)
    assert m.module.qz_attention.mlp_tokens.blocks[0].fc2.weight.shape[1] == 32
    m.save(tmp_path / "m")
    meta_file = tmp_path / "m" / "model.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["mlp_inner_width"]
    meta_file.write_text(json.dumps(meta))
    m2 = cellvi.MrVI.load(tmp_path / "m", adata=a)
    assert m2.config.mlp_inner_width == 32
    np.testing.assert_array_equal(m2.get_latent_representation(give_z=True), m.get_latent_representation(give_z=True))
    assert cellvi.MrVI(a).module.qz_attention.mlp_tokens.blocks[0].fc2.weight.shape[1] == 128  # today's default


@pytest.mark.parametrize("kwargs", [
    {"u_prior_mixture": False, "z_u_prior": False},
    {"qz_kwargs": {"use_map": False}, "px_kwargs": {"low_dim_batch": False}, "learn_z_u_prior_scale": True},
    {"scale_observations": True, "n_latent": 6, "n_latent_u": 6},
])
def test_model_options_train(kwargs):
    a = _cohort(n=200, g=30)
    a.obs["site"] = pd.Categorical(np.where(a.obs["cov2"] == "low", "s0", "s1"))
    cellvi.MrVI.setup_anndata(a, sample_key="sample", batch_key="site")
    m = cellvi.MrVI(a, **kwargs)
    m.train(max_epochs=1)
    assert np.isfinite(m.history["elbo_train"].to_numpy()).all()
    assert m.get_local_sample_distances()["cell"].shape == (200, 8, 8)
    with pytest.raises(ValueError, match=r"px_kwargs has unsupported keys \['nope'\]"):
        cellvi.MrVI(a, px_kwargs={"nope": 1})


def test_label_informed_prior_has_one_component_per_label():
    a = _cohort()
    cellvi.MrVI.setup_anndata(a, sample_key="sample", labels_key="cell_type")
    m = cellvi.MrVI(a, n_latent=4, n_latent_u=4)
    assert m.module.u_prior_logits.shape == (5,)
    u = torch.zeros(2, 4)
    p = m.module.log_prior_u(u, torch.tensor([0, 1]))
    comp = torch.distributions.Normal(m.module.u_prior_means, 1.0).log_prob(u[:1]).sum(-1)  # scales start at 1
    w = torch.log_softmax(torch.tensor([10.0, 0, 0, 0, 0]), 0)
    torch.testing.assert_close(p[0], torch.logsumexp(w + comp, 0))


@pytest.mark.parametrize("n_inner, n_layers", [(128, 1), (32, 1), (64, 2), (128, 0)])
def test_token_attention_is_multi_head_attention_on_scalar_tokens(n_inner, n_layers):
    """The scalar reduction in TokenAttention.forward equals plain multi-head attention on the tokens, and the
    folded products of mlp_tokens (identity skip at 128 = tokens x channels, linear skip otherwise, no block)
    equal its plain forward on the formed tokens."""
    import torch.nn.functional as F

    from cellvi.models.mrvi import TokenAttention

    torch.manual_seed(0)
    att = TokenAttention(10, 16, 30, n_tokens=16, n_channels=4, n_heads=2, n_inner=n_inner, n_layers=n_layers).eval()
    with torch.no_grad():
        att.token_bias.normal_()  # non-zero biases, so every term of the reduction is exercised
    query, kv = torch.randn(64, 10), torch.randn(64, 16)

    def heads(x):
        return x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)

    q = att.query_proj(query)[..., None] * att.token_weight[0] + att.token_bias[0]  # (N, T, E) tokens
    k_scalar = att.kv_proj(kv)[..., None]
    k, v = (k_scalar * att.token_weight[i] + att.token_bias[i] for i in (1, 2))
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    o = att.out_proj(o.transpose(1, 2).flatten(2))
    expected = att.mlp_out(torch.cat([query, att.mlp_tokens(o.flatten(1))], -1))
    keys = att.kv_tokens(kv[:40])  # 64 x 40 rows: the analyses' large products (mm + add) as well as small ones
    pairs = att(query.repeat_interleave(40, 0), keys.repeat(64, 1)).view(64, 40, -1)
    for grad in (True, False):  # the training path (softmax) and the evaluation one (exp2, key axis first)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(att(query, att.kv_tokens(kv)), expected, rtol=1e-5, atol=1e-5)
            # every query on every key at once equals the pairs one by one
            torch.testing.assert_close(att.attend_all(query, keys), pairs, rtol=1e-5, atol=1e-5)


def test_training_loss_is_the_textbook_objective_draw_for_draw():
    """The streamlined loss (explicit eps, softmax fused into the NB, folded attention) equals the objective
    written with torch.distributions, with the same random draws (dropout on, batches and labels set up)."""
    from torch import distributions as D

    from cellvi.distributions import nb_log_prob

    a = _cohort(n=64, g=40)
    a.obs["site"] = pd.Categorical(np.where(a.obs["cov1"] == "group_0", "s0", "s1"))
    cellvi.MrVI.setup_anndata(a, sample_key="sample", batch_key="site", labels_key="cell_type")
    m = cellvi.MrVI(a, n_latent=6, n_latent_u=4, z_u_prior_scale=0.3)
    mod = m.module.train()
    b = next(iter(m._data().batches(torch.arange(64), 64)))
    torch.manual_seed(0)
    out = mod.loss(b, kl_weight=0.7)
    torch.manual_seed(0)
    qu = mod.qu(b["x"], b["sample"])
    u = qu.rsample()
    z, g = mod.z_from_u(u, b["sample"], use_mean=False)
    h = mod.decode(z, b["batch"])
    rec = -nb_log_prob(b["x"], b["x"].sum(-1, keepdim=True) * h, mod.log_theta.exp()).sum(-1)
    logits = mod.u_prior_logits + 10.0 * torch.nn.functional.one_hot(b["label"], mod.n_labels)
    pu = D.MixtureSameFamily(D.Categorical(logits=logits),
                             D.Independent(D.Normal(mod.u_prior_means, mod.u_prior_log_scales.exp()), 1))
    kl = qu.log_prob(u).sum(-1) - pu.log_prob(u) - D.Normal(0.0, np.exp(0.3)).log_prob(g).sum(-1)
    torch.testing.assert_close(out["reconstruction_loss"], rec, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out["kl_local"], kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["loss"], (rec + 0.7 * kl).mean(), rtol=1e-5, atol=0.0)


def test_compiled_networks_equal_eager_ones_and_train():
    """Long trainings compile the loss's networks (:func:`network_terms`, one graph forward and backward): the same
    loss and gradients as eager (dropout on: the same masks and draw of u from the same seed), and a training run."""
    from cellvi import distributions as dist
    from cellvi.models import mrvi

    a = _cohort(n=64, g=40)
    a.obs["site"] = pd.Categorical(np.where(a.obs["cov1"] == "group_0", "s0", "s1"))
    cellvi.MrVI.setup_anndata(a, sample_key="sample", batch_key="site", labels_key="cell_type")
    m = cellvi.MrVI(a, n_latent=6, n_latent_u=4)
    mod = m.module.train()
    assert mod.qz_attention.dropout_rate > 0
    b = next(iter(m._data().batches(torch.arange(64), 64)))
    results = []
    for on in (False, True):
        mod.zero_grad()
        torch.manual_seed(0)
        with dist.compiled_kernels(on):
            loss = mod.loss(b, kl_weight=0.7)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in mod.parameters() if p.grad is not None]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert dist._COMPILED[mrvi.network_terms] is not mrvi.network_terms  # compiled, not the eager fallback
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-3)
    assert len(compiled_grads) == len(eager_grads) > 20
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3)
    m.train(max_epochs=3, compile_kernels=True, seed=0)
    elbo = m.history["elbo_train"].to_numpy().ravel()
    assert np.isfinite(elbo).all() and elbo[-1] < elbo[0]


# --------------------------------------------------------------------------- sample distances


def test_local_sample_distances_names_symmetry_and_group_means(trained):
    m = trained
    ds = m.get_local_sample_distances(groupby=["cell_type", "cov2"])
    cell = ds["cell"]
    assert cell.dims == ("cell_name", "sample_x", "sample_y") and cell.shape == (400, 8, 8)
    assert list(cell.sample_x.values) == list(m.sample_order)
    d = cell.values
    assert (d == d.transpose(0, 2, 1)).all() and (np.diagonal(d, axis1=1, axis2=2) == 0).all() and d.max() > 0
    assert ds["cell_type"].dims == ("cell_type_name", "sample_x", "sample_y")
    t1 = (m.adata.obs["cell_type"] == "type_1").to_numpy()
    np.testing.assert_allclose(ds["cell_type"].sel(cell_type_name="type_1").values, d[t1].mean(0), rtol=1e-5)
    only = m.get_local_sample_distances(groupby="cell_type", keep_cell=False)
    assert set(only.data_vars) == {"cell_type"}
    np.testing.assert_allclose(only["cell_type"].values, ds["cell_type"].values)
    # counterfactual z of the cell's own sample is its z
    reps = m.get_local_sample_representation()
    own = m.adata.obs["sample"].cat.codes.to_numpy()
    np.testing.assert_allclose(reps.values[np.arange(400), own], m.get_latent_representation(give_z=True), atol=1e-5)
    np.testing.assert_allclose(distances.sample_distances(torch.as_tensor(reps.values[:5])).numpy(), d[:5], atol=1e-5)


def test_sampled_and_normalized_distances(trained):
    m = trained
    ds = m.get_local_sample_distances(use_mean=False, mc_samples=3, norm="l1")
    assert ds["cell"].shape == (400, 8, 8)
    with pytest.warns(UserWarning, match="use_mean is ignored"):
        nd = m.get_local_sample_distances(normalize_distances=True, mc_samples=3)["cell"].values
    assert np.isfinite(nd).all() and (nd == nd.transpose(0, 2, 1)).all()
    with pytest.raises(ValueError, match="nothing to return"):
        m.get_local_sample_distances(keep_cell=False)
    with pytest.raises(ValueError, match="norm='nope' is not supported"):
        m.get_local_sample_distances(norm="nope")


def test_sample_distances_match_scipy():
    reps = torch.randn(3, 6, 4, dtype=torch.float64)
    for norm, metric in (("l2", "euclidean"), ("l1", "cityblock"), ("linf", "chebyshev")):
        d = distances.sample_distances(reps, norm).numpy()
        for i in range(3):
            np.testing.assert_allclose(d[i], cdist(reps[i], reps[i], metric), atol=1e-12)


def test_baseline_normalization_by_hand():
    z = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[3.0, 4.0]], [[0.0, 1.0]]])  # draws 0-2 and 1-3 pair up; 1 cell
    mean, var = distances.baseline_distances(z)
    torch.testing.assert_close(mean, torch.tensor([3.0]))  # pair distances 5 and 1
    torch.testing.assert_close(var, torch.tensor([8.0]))
    d = torch.full((2, 1, 2, 2), 7.0)
    torch.testing.assert_close(distances.normalize_by_baseline(d, mean, var), torch.full((1, 2, 2), 4.0 / 8**0.5))


# --------------------------------------------------------------------------- differential abundance


def test_gaussian_density_and_segment_logsumexp_by_hand():
    rng = np.random.default_rng(0)
    u, loc, scale = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), rng.uniform(0.3, 2, (5, 3))
    lp = density.gaussian_log_density(*(torch.as_tensor(v) for v in (u, loc, scale))).numpy()
    ref = np.array([[scipy.stats.norm(loc[m], scale[m]).logpdf(u[b]).sum() for m in range(5)] for b in range(4)])
    np.testing.assert_allclose(lp, ref, rtol=1e-10)
    seg = torch.tensor([1, 0, 1, 1, 0])
    got = density.segment_logsumexp(torch.as_tensor(ref), seg, 3).numpy()
    np.testing.assert_allclose(got[:, 0], scipy.special.logsumexp(ref[:, [1, 4]], 1))
    np.testing.assert_allclose(got[:, 1], scipy.special.logsumexp(ref[:, [0, 2, 3]], 1))
    assert np.isneginf(got[:, 2]).all()
    far = torch.tensor([[-2000.0, -2001.0]])  # no underflow to -inf
    np.testing.assert_allclose(density.segment_logsumexp(far, torch.tensor([0, 0]), 1).numpy(),
                               [[-2000 + np.log1p(np.exp(-1))]])


def test_mixture_over_groups_leaves_out_the_own_sample():
    lp = np.log(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    np.testing.assert_allclose(density.mixture_over_groups(lp, np.array([0, 2])), np.log([2.0, 5.0]))
    np.testing.assert_allclose(density.mixture_over_groups(lp, np.array([0, 2]), own=np.array([0, 1])), np.log([3.0, 5.0]))
    assert np.isnan(density.mixture_over_groups(lp, np.array([1]), own=np.array([1, 0]))[0])
    assert density.max_log_density_excluding_self(torch.tensor([[9.0, 1.0], [2.0, 9.0]])).tolist() == [1.0, 2.0]


def test_differential_abundance_values_and_names(trained):
    m = trained
    da = m.differential_abundance(sample_cov_keys=["cov2"], compute_log_enrichment=True)
    assert da["log_probs"].dims == ("cell_name", "sample") and da["log_probs"].shape == (400, 8)
    assert da["cov2_log_probs"].dims == ("cell_name", "cov2") and set(da.cov2.values) == {"low", "high"}
    u = torch.as_tensor(m.get_latent_representation())
    ap = m.get_aggregated_posterior(sample="sample_03")
    np.testing.assert_allclose(da["log_probs"].sel(sample="sample_03").values, ap.log_prob(u).numpy(), rtol=1e-4,
                               atol=1e-4)
    assert np.isfinite(da["cov2_log_enrichs"].values).all()
    with pytest.raises(ValueError, match="'cell_type' is not a column of model.sample_info"):
        m.differential_abundance(sample_cov_keys=["cell_type"])


def test_outlier_cell_sample_pairs(trained):
    o = trained.get_outlier_cell_sample_pairs(subsample_size=30)
    assert set(o.data_vars) == {"log_probs", "log_ratios", "is_admissible"}
    assert o["is_admissible"].shape == (400, 8) and o["is_admissible"].dtype == bool
    own = trained.adata.obs["sample"].cat.codes.to_numpy()
    assert o["is_admissible"].values[np.arange(400), own].mean() > 0.9  # a cell is admissible in its own sample


# --------------------------------------------------------------------------- differential expression


def test_design_matrix_by_hand():
    info = pd.DataFrame({"g": pd.Categorical(["a", "b", "c", "a"]), "age": [20.0, 40.0, 30.0, 20.0]})
    X, names, owners = regression.design_matrix(info, ["g", "age"], normalize=False)
    assert names == ["g_b", "g_c", "age"] and owners == ["g", "g", "age"]
    np.testing.assert_array_equal(X, [[0, 0, 20], [1, 0, 40], [0, 1, 30], [0, 0, 20]])
    Xn, _, _ = regression.design_matrix(info, ["age"])
    np.testing.assert_allclose(Xn[:, 0], [0, 1, 0.5, 0], atol=1e-6)
    with pytest.raises(ValueError, match="constant within each sample"):
        regression.design_matrix(info, ["nope"])


def test_regression_operators_are_least_squares_and_gram_root():
    rng = np.random.default_rng(1)
    X = torch.as_tensor(rng.normal(size=(7, 2)))
    W = torch.tensor([[1.0] * 7, [1, 1, 1, 0, 1, 1, 0]], dtype=torch.float64)
    A, R = regression.regression_operators(X, W, lambd=0.0)
    y = rng.normal(size=7)
    for n in range(2):
        keep = W[n].numpy() > 0
        beta = np.linalg.lstsq(X.numpy()[keep], y[keep], rcond=None)[0]
        np.testing.assert_allclose(A[n].numpy() @ y, beta, rtol=1e-8)
        G = X.numpy()[keep].T @ X.numpy()[keep]
        np.testing.assert_allclose(R[n].numpy() @ R[n].numpy(), G, rtol=1e-8)
    assert regression.chi2_sf(np.array([3.841458820694124]), np.array([1.0])) == pytest.approx(0.05)


def test_differential_expression_names_shapes_and_lfc(trained):
    m = trained
    de = m.differential_expression(sample_cov_keys=["cov1", "cov2"], mc_samples=4, store_lfc=True)
    assert list(de.covariate.values) == ["cov1_group_1", "cov2_high"]
    assert de["beta"].dims == ("cell_name", "covariate", "latent_dim") and de["beta"].shape == (400, 2, 8)
    for k in ("effect_size", "pvalue", "padj"):
        assert de[k].dims == ("cell_name", "covariate")
    p = de["pvalue"].values
    assert ((p >= 0) & (p <= 1)).all() and (de["padj"].values >= p - 1e-12).all()
    assert de["lfc"].dims == ("cell_name", "covariate", "gene") and de["lfc"].shape == (400, 2, 60)
    assert np.isfinite(de["lfc"].values).all() and ((de["pde"].values >= 0) & (de["pde"].values <= 1)).all()
    sub = m.differential_expression(sample_cov_keys=["cov1", "cov2"], mc_samples=2, store_lfc=True,
                                    store_lfc_metadata_subset=["cov2"], sample_subset=list(m.sample_order[:6]),
                                    filter_inadmissible_samples=True, subsample_size=50)
    assert list(sub.covariate_sub.values) == ["cov2_high"] and sub["lfc"].shape == (400, 1, 60)
    assert sub["n_samples"].shape == (400,) and sub["n_samples"].values.max() <= 6
    with pytest.raises(ValueError, match="needs sample_cov_keys"):
        m.differential_expression()
    with pytest.raises(ValueError, match="constant within each sample"):
        m.differential_expression(sample_cov_keys=["cell_type"])


def test_batch_offsets_by_hand():
    batch_of = regression.sample_batches(np.array([0, 0, 2, 2, 1]), np.array([1, 1, 0, 0, 1]), ["a", "b", "c", "d"])
    assert batch_of.tolist() == [1, 1, 0, -1]  # d has no cells
    with pytest.raises(ValueError, match=r"samples \['b'\] span several batches.*sample_subset"):
        regression.sample_batches(np.array([0, 1, 1]), np.array([0, 0, 1]), ["a", "b"])
    X = np.array([[0.0], [1.0], [1.0]], dtype=np.float32)
    Xo, names, owners = regression.add_batch_offsets(X, ["g_b"], ["g"], np.array([2, 0, 2]))
    assert names == ["offset_batch_0", "offset_batch_2", "g_b"] and owners == ["offset_batch_0", "offset_batch_2", "g"]
    np.testing.assert_array_equal(Xo, [[0, 1, 0], [1, 0, 1], [0, 1, 1]])
    assert Xo.dtype == np.float32


def _planted_de_model(monkeypatch, site_shift: float, cond_effect: float, batch_key: str | None = "site"):
    """An (untrained) MrVI whose counterfactual states are planted: z(s) = site_shift * [site(s) = s1] e_0
    + cond_effect * [cond(s) = t] e_1 + tiny noise. Sites hold samples 0-3 and 4-7; cond is t in samples
    3, 5, 6, 7: confounded with the site, but not fully."""
    a = _cohort(n=160, g=30)
    code = a.obs["sample"].cat.codes.to_numpy()
    a.obs["site"] = pd.Categorical(np.where(code < 4, "s0", "s1"))
    a.obs["cond"] = pd.Categorical(np.where(np.isin(code, [3, 5, 6, 7]), "t", "c"), categories=["c", "t"])
    cellvi.MrVI.setup_anndata(a, sample_key="sample", batch_key=batch_key)
    m = cellvi.MrVI(a, n_latent=4, n_latent_u=4)
    S = 8
    z = 0.01 * torch.as_tensor(np.random.default_rng(0).normal(size=(S, 4)), dtype=torch.float32)
    z[4:, 0] += site_shift
    z[[3, 5, 6, 7], 1] += cond_effect

    def planted(u, samples, use_mean=True):
        return z[samples].expand(*u.shape[:-1], len(samples), 4)

    monkeypatch.setattr(m.module, "counterfactual_z", planted)
    return m


def test_batch_offsets_compare_covariates_within_batches(monkeypatch):
    m = _planted_de_model(monkeypatch, site_shift=3.0, cond_effect=1.0)
    plain = m.differential_expression(sample_cov_keys=["cond"], mc_samples=2)
    off = m.differential_expression(sample_cov_keys=["cond"], mc_samples=2, add_batch_specific_offsets=True,
                                    store_lfc=True)
    assert list(plain.covariate.values) == ["cond_t"]
    # scvi-tools reports the offsets as covariates (first), and gives them no LFC
    assert list(off.covariate.values) == ["offset_batch_0", "offset_batch_1", "cond_t"]
    assert off["beta"].shape == (160, 3, 4) and off["pvalue"].shape == (160, 3)
    assert off["lfc"].dims == ("cell_name", "covariate_sub", "gene") and list(off.covariate_sub.values) == ["cond_t"]
    assert off["lfc"].shape == (160, 1, 30) and np.isfinite(off["lfc"].values).all()
    # without offsets the site shift leaks into cond (t is mostly in site s1); with them, cond is compared
    # within sites and recovers its planted effect exactly, and the offsets recover the sites
    b_plain = plain["beta"].sel(covariate="cond_t").values.mean(0)
    b_off = off["beta"].sel(covariate="cond_t").values.mean(0)
    assert b_plain[0] > 0.5
    np.testing.assert_allclose(b_off, [0.0, 1.0, 0.0, 0.0], atol=0.05)
    site = (off["beta"].sel(covariate="offset_batch_1") - off["beta"].sel(covariate="offset_batch_0")).values.mean(0)
    np.testing.assert_allclose(site, [3.0, 0.0, 0.0, 0.0], atol=0.05)
    # LFC by hand (the planted states do not depend on the draw): each site decoded around its own fitted
    # state (mean + offset), the two sites weighted by their 4 samples each
    beta = torch.as_tensor(off["beta"].values[0])  # (3, 4): the offsets, then cond
    z_mean = m.module.counterfactual_z(torch.zeros(1, 4), torch.arange(8))[0].double().mean(0)
    expected = 0.0
    for site_code in (0, 1):
        ref = (z_mean + beta[site_code]).float()[None]
        h0, h1 = (m.module.decode(r, torch.tensor([site_code])) for r in (ref, ref + beta[2].float()[None]))
        expected = expected + 0.5 * (torch.log2(h1 + 1e-4) - torch.log2(h0 + 1e-4))
    np.testing.assert_allclose(off["lfc"].values[0, 0], expected[0].detach().numpy(), rtol=1e-4, atol=1e-5)


def test_batch_offsets_without_a_batch_are_an_intercept(monkeypatch):
    """One batch: the single offset is a column of ones, so cond's beta becomes the difference of means (1.0)
    instead of the no-intercept fit on standardized states (1 - fraction of t samples = 0.5)."""
    m = _planted_de_model(monkeypatch, site_shift=0.0, cond_effect=1.0, batch_key=None)
    plain = m.differential_expression(sample_cov_keys=["cond"], mc_samples=2)
    off = m.differential_expression(sample_cov_keys=["cond"], mc_samples=2, add_batch_specific_offsets=True)
    assert list(off.covariate.values) == ["offset_batch_0", "cond_t"]
    assert plain["beta"].sel(covariate="cond_t").values.mean(0)[1] == pytest.approx(0.5, abs=0.03)
    assert off["beta"].sel(covariate="cond_t").values.mean(0)[1] == pytest.approx(1.0, abs=0.03)


def test_batch_offsets_refuse_a_sample_spanning_batches(tmp_path):
    a = _cohort(n=160, g=30)
    a.obs["site"] = pd.Categorical(np.where(np.arange(a.n_obs) % 2 == 0, "s0", "s1"))  # every sample in both
    cellvi.MrVI.setup_anndata(a, sample_key="sample", batch_key="site")
    m = cellvi.MrVI(a, n_latent=4, n_latent_u=4)
    with pytest.raises(ValueError, match="span several batches"):
        m.differential_expression(sample_cov_keys=["cov1"], mc_samples=2, add_batch_specific_offsets=True)
    b = _cohort(n=160, g=30)
    cellvi.MrVI.setup_anndata(b, sample_key="sample", batch_key="cov1")
    cellvi.MrVI(b, n_latent=4, n_latent_u=4).save(tmp_path / "m")
    m = cellvi.MrVI.load(tmp_path / "m", adata=b[b.obs["sample"] != "sample_07"].copy())  # batch of sample_07 unknown
    with pytest.raises(ValueError, match=r"\['sample_07'\] have no cells in the model's data"):
        m.differential_expression(sample_cov_keys=["cov2"], mc_samples=2, add_batch_specific_offsets=True)


def test_analyses_on_new_data_with_a_subset_of_samples(trained):
    m = trained
    sub = m.adata[m.adata.obs["sample"].isin(["sample_00", "sample_01", "sample_05"])].copy()
    n = sub.n_obs
    d = m.get_local_sample_distances(sub)["cell"]
    assert d.shape == (n, 8, 8) and list(d.cell_name.values) == list(sub.obs_names)
    np.testing.assert_allclose(d.values, m.get_local_sample_distances()["cell"].sel(cell_name=sub.obs_names).values,
                               rtol=1e-5, atol=1e-6)
    da = m.differential_abundance(sub)
    assert list(da.sample.values) == ["sample_00", "sample_01", "sample_05"]  # samples with cells in sub
    de = m.differential_expression(sub, sample_cov_keys=["cov2"], mc_samples=2)
    assert de["pvalue"].shape == (n, 1)
    expr = m.get_normalized_expression(sub, library_size=1e4)
    assert expr.shape == (n, 60) and np.allclose(expr.to_numpy().sum(1), 1e4, rtol=1e-4)


# --------------------------------------------------------------------------- likelihoods


def test_elbo_is_minus_the_validation_elbo_of_training(trained):
    m = trained
    val = m.validation_indices_
    torch.manual_seed(0)
    elbo = m.get_elbo(indices=val)
    assert isinstance(elbo, float) and np.isfinite(elbo)
    assert elbo == pytest.approx(-m.history["elbo_validation"].iloc[-1, 0], rel=0.005)  # one draw of u per cell
    per_cell = m.get_elbo(indices=val, return_mean=False)
    assert per_cell.shape == (len(val),) and np.isfinite(per_cell).all()
    rec = m.get_reconstruction_error(indices=val)
    assert list(rec) == ["reconstruction_loss"] and rec["reconstruction_loss"] > 0
    assert -rec["reconstruction_loss"] > elbo  # the KL of u and the penalty on z - u' are positive on average
    assert m.get_reconstruction_error(return_mean=False)["reconstruction_loss"].shape == (m.adata.n_obs,)
    with pytest.raises(ValueError, match="No cells selected"):
        m.get_elbo(indices=np.array([], dtype=int))
    with pytest.raises(NotImplementedError, match="get_elbo"):
        m.get_marginal_ll()


# --------------------------------------------------------------------------- exploration


def test_exploration_helpers_find_planted_structure():
    rng = np.random.default_rng(0)
    block = np.kron(np.array([[0, 1], [1, 0]]), np.ones((3, 3)))  # samples {0,1,2} vs {3,4,5}
    d = np.concatenate([block[None] * 2 + rng.uniform(0, 0.05, (20, 6, 6)),
                        rng.uniform(0, 0.05, (20, 6, 6))])
    d = 0.5 * (d + d.transpose(0, 2, 1))
    labels = explore.cluster_distance_matrices(d, 2)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[-1]
    means = explore.average_by_cluster(d, labels)
    groups = explore.sample_clusters(means[labels[0]], 2)
    assert len(set(groups[:3])) == 1 and len(set(groups[3:])) == 1 and groups[0] != groups[3]


def test_sample_distance_heatmap_draws_and_saves(trained, tmp_path):
    d = trained.get_local_sample_distances(groupby="cell_type", keep_cell=False)["cell_type"]
    fig = cellvi.pl.sample_distance_heatmap(d.sel(cell_type_name="type_0"), trained.sample_info,
                                            color_by=["cov1", "cov2"], save=str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 1000
    heat = fig.axes[3]  # dendrogram, two strips, heatmap, colour bar
    assert sorted(t.get_text() for t in heat.get_xticklabels()) == sorted(trained.sample_order)
    import matplotlib.pyplot as plt

    plt.close(fig)


# --------------------------------------------------------------------------- recovery


def test_recovery_on_a_simulated_cohort():
    """Distances recover the hierarchy in the DE subset only; DA log ratios find the DA subsets."""
    from sklearn.metrics import average_precision_score

    # de_lfc 2.5 (default 1.5): at 1,200 cells x 100 genes and 60 epochs, the default effect is recovered on only
    # about half of the seeds (Spearman < 0.45 on seeds 4, 5, 6, 8, 9; 0.79-0.89 after 200 epochs); this one is,
    # on each of seeds 0-7 (Spearman 0.63-0.93, other subsets <= 0.22 of type_0's distance;
    # benchmarks/check_mrvi_recovery.py --seeds 0-7 --de-lfc 2.5)
    a = cellvi.datasets.simulate_cohort(1200, 100, de_lfc=2.5, seed=0)
    cellvi.MrVI.setup_anndata(a, sample_key="sample")
    m = cellvi.MrVI(a)
    m.train(max_epochs=60, seed=0)  # ~15 s on one CPU core; at 40 epochs the hierarchy is not yet learned
    avg = m.get_local_sample_distances(groupby="cell_type", keep_cell=False)["cell_type"]
    truth = a.uns["truth"]["sample_distances"]
    iu = np.triu_indices(truth.shape[0], 1)
    de_subset = avg.sel(cell_type_name="type_0").values[iu]
    assert scipy.stats.spearmanr(de_subset, truth[iu])[0] > 0.5
    for other in ("type_1", "type_2", "type_3", "type_4"):
        assert avg.sel(cell_type_name=other).values[iu].mean() < 0.3 * de_subset.mean()
    da = m.differential_abundance(sample_cov_keys=["cov2"])
    ratio = (da["cov2_log_probs"].sel(cov2="high") - da["cov2_log_probs"].sel(cov2="low")).values
    ct = a.obs["cell_type"].astype(str).to_numpy()
    assert ratio[ct == "type_1"].mean() > 0.5 and ratio[ct == "type_2"].mean() < -0.5
    is_da = np.isin(ct, ["type_1", "type_2"])
    assert average_precision_score(is_da, np.abs(ratio)) > is_da.mean() + 0.25
