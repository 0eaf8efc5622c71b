import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score

import cellvi
from cellvi.data.loader import CountData
from cellvi.datasets import simulate_contrastive
from cellvi.models.contrastivevi import ContrastiveVIModule, paired_batches
from conftest import silhouette


def sets(a):
    return np.flatnonzero(a.obs["condition"] == "ctrl"), np.flatnonzero(a.obs["condition"] == "stim")


@pytest.fixture(scope="module")
def trained():
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 0
    a = simulate_contrastive()
    cellvi.ContrastiveVI.setup_anndata(a, batch_key="batch")
    model = cellvi.ContrastiveVI(a)
    bg, tg = sets(a)
    model.train(bg, tg, max_epochs=60, n_epochs_kl_warmup=20, check_val_every_n_epoch=10, seed=0)
    return model


def accuracy(x, y) -> float:
    return float(cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5).mean())


# --------------------------------------------------------------------------- training


def test_training_decreases_the_loss_and_logs_history(trained):
    h = trained.history
    assert len(h["elbo_train"]) == 60 and len(h["elbo_validation"]) == 6
    for key in ("reconstruction_loss_train", "kl_local_train", "train_loss", "wasserstein_penalty_train",
                "validation_loss", "kl_weight"):
        assert key in h, key
    elbo = h["elbo_train"]["elbo_train"].to_numpy()
    assert elbo[-1] < 0.8 * elbo[0]
    val = h["elbo_validation"]["elbo_validation"].to_numpy()
    assert val[-1] < val[0] and np.all(np.isfinite(val))
    # per-cell elbo: reconstruction + local KL; the loss is per background/target pair, i.e. ~2 cells
    last = {k: v[-1] for k, v in trained.history_.items()}
    assert last["elbo_train"] == pytest.approx(last["reconstruction_loss_train"] + last["kl_local_train"])
    assert 1.8 * last["elbo_train"] < last["train_loss"] < 2.2 * last["elbo_train"]
    n_bg, n_tg = (len(s) for s in sets(trained.adata))
    assert len(trained.train_indices_) == np.ceil(0.9 * n_bg) + np.ceil(0.9 * n_tg)
    assert set(trained.train_indices_).isdisjoint(trained.validation_indices_)
    np.testing.assert_array_equal(trained.background_indices_, sets(trained.adata)[0])


def test_salient_latent_separates_the_target_program(trained):
    a = trained.adata
    _, tg = sets(a)
    program = a.obs["program"].to_numpy()[tg]
    s = trained.get_latent_representation(indices=tg)
    z = trained.get_latent_representation(indices=tg, representation_kind="background")
    # over simulation/training seeds 0-8: accuracy >= 0.997, silhouette of s 0.40-0.54, of z 0.00-0.08
    assert accuracy(s, program) > 0.95
    assert silhouette(s, program) > 0.3
    assert silhouette(z, program) < 0.15  # the background latent does not group cells by the program
    assert silhouette(s, program) > silhouette(z, program) + 0.2


def test_background_latent_carries_cell_type(trained):
    a = trained.adata
    ct = a.obs["cell_type"].to_numpy()
    z = trained.get_latent_representation(representation_kind="background")
    s = trained.get_latent_representation()
    assert accuracy(z, ct) > 0.95 and silhouette(z, ct) > 0.25
    assert silhouette(s, ct) < 0.1  # cell type is shared variation: not in the salient latent


def test_background_cells_salient_expression_is_their_background_expression(trained):
    a = trained.adata
    bg, tg = sets(a)
    rows = np.concatenate([bg[:40], tg[:40]])
    torch.manual_seed(3)
    expr = trained.get_normalized_expression(indices=rows, n_samples=3, return_mean=False)
    assert set(expr) == {"background", "salient"} and expr["salient"].shape == (3, 80, a.n_vars)
    np.testing.assert_array_equal(expr["salient"][:, :40], expr["background"][:, :40])  # s = 0: exactly equal
    assert not np.allclose(expr["salient"][:, 40:], expr["background"][:, 40:])
    np.testing.assert_allclose(expr["salient"].sum(-1), 1.0, rtol=1e-4)
    # salient expression of program cells shows the program; their background expression much less
    on = np.flatnonzero(a.obs["program"] == "on")
    genes = a.var["program"].to_numpy()
    df = trained.get_normalized_expression(indices=on)
    ratio = df["salient"].to_numpy()[:, genes].sum(1) / df["background"].to_numpy()[:, genes].sum(1)
    assert np.median(ratio) > 1.5
    torch.manual_seed(4)
    sal = trained.get_salient_normalized_expression(indices=rows, n_samples=3, return_mean=False)
    torch.manual_seed(4)
    np.testing.assert_allclose(sal, trained.get_normalized_expression(indices=rows, n_samples=3,
                                                                      return_mean=False)["salient"], rtol=1e-6)
    sub = trained.get_normalized_expression(indices=rows[:5], gene_list=["gene_3", "gene_0"], library_size=1e4)
    assert list(sub["background"].columns) == ["gene_0", "gene_3"]  # the model's gene order, as scvi-tools
    assert list(sub["salient"].index) == list(a.obs_names[rows[:5]])
    with pytest.raises(ValueError, match="transform_batch 'batch_9'"):
        trained.get_normalized_expression(indices=rows, transform_batch="batch_9")


def test_representation_kinds_and_shapes(trained):
    n = trained.adata.n_obs
    s = trained.get_latent_representation()
    z = trained.get_latent_representation(representation_kind="background")
    assert s.shape == (n, 10) and z.shape == (n, 10) and not np.allclose(s, z)
    assert trained.get_latent_representation(indices=[5, 2], give_mean=False).shape == (2, 10)
    with pytest.raises(ValueError, match="representation_kind='both'"):
        trained.get_latent_representation(representation_kind="both")
    draws = trained._de_draws(None, np.arange(7), 4, None, None, kind="background")
    assert draws.shape == (28, trained.adata.n_vars) and draws.dtype == np.float32
    assert np.all(draws > 0) and np.all(draws.sum(1) < 1.0)  # (1 - pi) * rho: below the proportions
    with pytest.raises(ValueError, match="kind='x'"):
        trained._de_draws(None, np.arange(7), 1, None, None, kind="x")


def test_query_data_uses_the_encoders_and_stays_untouched(trained):
    a = trained.adata
    query = a[:30].copy()
    del query.uns["_cellvi_setup"]
    np.testing.assert_allclose(trained.get_latent_representation(query),
                               trained.get_latent_representation(indices=np.arange(30)), rtol=1e-5, atol=1e-6)
    assert "_cellvi_setup" not in query.uns


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bg, tg, match",
    [
        (np.arange(0, 60), np.arange(50, 100), "10 cell\\(s\\) are both background and target"),
        (np.array([], dtype=int), np.arange(50), "background_indices is empty"),
        (np.arange(50), np.zeros(200, dtype=bool), "target_indices is empty"),
        (np.arange(50), np.array([60, 200]), "out of range"),
        (np.array([1, 2, 2]), np.arange(50, 60), "more than once"),
        (None, np.arange(50), "background_indices is required"),
        (np.arange(50), np.array([60.5]), "must be integers"),
    ],
)
def test_bad_index_sets_are_refused(bg, tg, match):
    a = cellvi.datasets.simulate(200, 40, seed=0)
    cellvi.ContrastiveVI.setup_anndata(a)
    m = cellvi.ContrastiveVI(a)
    with pytest.raises(ValueError, match=match):
        m.train(bg, tg, max_epochs=1)
    assert not m.is_trained


def test_bad_hyperparameters_are_refused():
    a = cellvi.datasets.simulate(100, 30, seed=0)
    cellvi.ContrastiveVI.setup_anndata(a)
    with pytest.raises(ValueError, match="n_salient_latent"):
        cellvi.ContrastiveVI(a, n_salient_latent=0)
    with pytest.raises(ValueError, match="wasserstein_penalty"):
        cellvi.ContrastiveVI(a, wasserstein_penalty=-1)


# --------------------------------------------------------------------------- module and minibatches


def test_pairs_follow_the_larger_set_and_cycle_the_smaller():
    a = cellvi.datasets.simulate(120, 20, seed=0)
    cellvi.ContrastiveVI.setup_anndata(a)
    data = CountData(a, cellvi.data.get_spec(a))
    bg, tg = torch.arange(0, 100), torch.arange(100, 120)
    steps = list(paired_batches(data, bg, tg, 16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 7  # ceil(100 / 16): the larger set sets the epoch
    part = lambda s, key, target: s[key][s["is_target"] == target]  # noqa: E731
    seen_bg = torch.cat([part(s, "index", False) for s in steps])
    assert sorted(seen_bg.tolist()) == list(range(100))  # each background cell once
    seen_tg = torch.cat([part(s, "index", True) for s in steps])
    assert set(seen_tg.tolist()) == set(range(100, 120))  # target cells cycled: every one, some repeated
    assert seen_tg.numel() > 20 and all(int(s["is_target"].sum()) <= 16 for s in steps)
    assert all(not s["is_target"][: int((~s["is_target"]).sum())].any() for s in steps)  # background rows first
    first_tg = part(steps[0], "index", True)
    torch.testing.assert_close(part(steps[0], "x", True), torch.as_tensor(a.X[first_tg.numpy()].toarray()))
    # min_size drops a tiny last batch of the larger set; without shuffling the order is kept
    steps = list(paired_batches(data, torch.arange(0, 33), tg, 16, min_size=3))
    assert len(steps) == 2 and part(steps[0], "index", False).tolist() == list(range(16))
    # the target set may be the larger one
    steps = list(paired_batches(data, torch.arange(0, 10), torch.arange(10, 120), 32))
    assert len(steps) == 4 and sum(int(s["is_target"].sum()) for s in steps) == 110


def test_background_reconstruction_ignores_the_salient_encoder():
    a = cellvi.datasets.simulate(64, 30, seed=0)
    cellvi.ContrastiveVI.setup_anndata(a, batch_key="batch")
    m = cellvi.ContrastiveVI(a, n_hidden=16, wasserstein_penalty=0.5)
    data = m._data()
    pair = data.gather(torch.arange(64))
    pair["is_target"] = torch.arange(64) >= 32
    module: ContrastiveVIModule = m.module
    module.eval()  # (in training mode the decoder's batch norm mixes the cells of a minibatch)
    out = module.loss(pair, kl_weight=0.7)
    assert out["reconstruction_loss"].shape == (64,) and out["kl_local"].shape == (64,)
    assert torch.all(out["wasserstein_penalty"][32:] == 0) and torch.all(out["wasserstein_penalty"][:32] > 0)
    s_params = list(module.s_encoder.parameters())
    grads = torch.autograd.grad(out["reconstruction_loss"][:32].sum(), s_params, allow_unused=True,
                                retain_graph=True)
    assert all(g is None or torch.all(g == 0) for g in grads)  # background cells are decoded with s = 0
    grads = torch.autograd.grad(out["reconstruction_loss"][32:].sum(), s_params, allow_unused=True)
    assert any(g is not None and torch.any(g != 0) for g in grads)
    # the scalar loss: per-set means of rec + w * (KL z + KL s + penalty * W2), summed over the pair
    per_cell = out["reconstruction_loss"] + 0.7 * (out["kl_local"] + 0.5 * out["wasserstein_penalty"])
    torch.testing.assert_close(out["loss"], per_cell[:32].mean() + per_cell[32:].mean())


def test_wasserstein_penalty_pulls_background_salient_posteriors_to_zero():
    a = simulate_contrastive(600, 80, n_program=8, seed=1)
    cellvi.ContrastiveVI.setup_anndata(a, batch_key="batch")
    bg, tg = sets(a)
    norms = []
    for penalty in (0.0, 5.0):
        m = cellvi.ContrastiveVI(a, n_hidden=64, wasserstein_penalty=penalty)
        m.train(bg, tg, max_epochs=25, n_epochs_kl_warmup=5, seed=0)
        assert np.isfinite(m.history_["wasserstein_penalty_train"]).all()
        norms.append(np.linalg.norm(m.get_latent_representation(indices=bg), axis=1).mean())
    assert norms[1] < 0.7 * norms[0]  # 0.31-0.44 over simulation seeds 1-3


def test_variants_train_and_decode():
    a = simulate_contrastive(300, 50, n_program=5, seed=2)
    a.obs["depth"] = np.log(np.asarray(a.X.sum(1)).ravel())
    cellvi.ContrastiveVI.setup_anndata(a, batch_key="batch", categorical_covariate_keys=["donor"],
                                       continuous_covariate_keys=["depth"])
    bg, tg = sets(a)
    m = cellvi.ContrastiveVI(a, use_observed_lib_size=False, n_layers=2, n_salient_latent=3)
    m.train(np.isin(np.arange(a.n_obs), bg), tg, max_epochs=3, train_size=1.0)
    assert np.isfinite(m.history_["elbo_train"]).all() and "elbo_validation" not in m.history_
    assert m.get_latent_representation().shape == (300, 3)
    expr = m.get_normalized_expression(library_size="latent", transform_batch=["batch_0", "batch_1"],
                                       return_numpy=True)
    assert expr["salient"].shape == (300, 50) and np.isfinite(expr["salient"]).all()


def test_same_seed_same_model():
    a = simulate_contrastive(200, 40, n_program=4, seed=3)
    cellvi.ContrastiveVI.setup_anndata(a)
    bg, tg = sets(a)
    out = []
    for seed in (5, 5, 6):
        m = cellvi.ContrastiveVI(a, n_hidden=32)
        m.train(bg, tg, max_epochs=2, seed=seed)
        out.append(m.get_latent_representation())
    np.testing.assert_array_equal(out[0], out[1])
    assert not np.array_equal(out[0], out[2])


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_exact(tmp_path, trained):
    m = trained
    m.save(tmp_path / "m", save_anndata=True)
    with pytest.raises(ValueError, match="overwrite=True"):
        m.save(tmp_path / "m")
    for adata in (None, m.adata.copy()):
        m2 = cellvi.ContrastiveVI.load(tmp_path / "m", adata=adata)
        assert m2.config == m.config and m2.history_ == m.history_ and m2.is_trained
        np.testing.assert_array_equal(m2.background_indices_, m.background_indices_)
        np.testing.assert_array_equal(m2.target_indices_, m.target_indices_)
        np.testing.assert_array_equal(m2.train_indices_, m.train_indices_)
        for kind in ("salient", "background"):
            np.testing.assert_array_equal(m.get_latent_representation(representation_kind=kind),
                                          m2.get_latent_representation(representation_kind=kind))
        rows = np.r_[0:20, 1480:1500]
        torch.manual_seed(1)
        e1 = m.get_normalized_expression(indices=rows, return_numpy=True)
        torch.manual_seed(1)
        e2 = m2.get_normalized_expression(indices=rows, return_numpy=True)
        for kind in e1:
            np.testing.assert_array_equal(e1[kind], e2[kind])
    with pytest.raises(ValueError, match="holds a ContrastiveVI model"):
        cellvi.SCVI.load(tmp_path / "m")


# --------------------------------------------------------------------------- differential expression


def test_de_uses_salient_expression_only_inside_the_target_set(trained, monkeypatch):
    """Which expression ``differential_expression`` hands the engine (the engine's driver is faked)."""
    from cellvi import de

    calls = []
    monkeypatch.setattr(de, "differential_expression", lambda model, **kw: calls.append(kw) or "table")
    a = trained.adata
    bg, tg = sets(a)
    on = np.flatnonzero(a.obs["program"] == "on")
    off_tg = np.setdiff1d(tg, on)
    assert trained.differential_expression(idx1=on, idx2=off_tg, target_idx=tg) == "table"
    assert trained.differential_expression(idx1=on, idx2=bg, target_idx=tg) == "table"
    assert trained.differential_expression(idx1=on, target_idx=tg) == "table"  # against all others
    mask = np.zeros(a.n_obs, bool)
    mask[tg] = True
    trained.differential_expression(idx1="program == 'on'", idx2=off_tg, target_idx=mask)
    trained.differential_expression(groupby="program", group1="on", group2="off", target_idx=tg)
    trained.differential_expression(groupby="program", group1="on", group2="off")
    kinds = [kw["draws_fn"].keywords["kind"] for kw in calls]
    assert kinds == ["salient", "background", "background", "salient", "background", "salient"]
    # scvi-tools' defaults: change mode, one posterior sample per cell
    assert calls[0]["idx1"] is on and calls[0]["mode"] == "change" and calls[0]["n_samples"] == 1
    # the observed counts carry the salient program, so background expression does not use them
    assert [kw.get("use_counts") for kw in calls] == [None, False, False, None, False, None]
    # the engine calls draws_fn(rows, n_samples, transform_batch, batch_size)
    torch.manual_seed(0)
    salient = calls[0]["draws_fn"](bg[:3], 2, None, None)
    torch.manual_seed(0)
    background = calls[1]["draws_fn"](bg[:3], 2, None, None)
    assert salient.shape == (6, a.n_vars)
    np.testing.assert_array_equal(salient, background)  # background cells: s = 0 in both kinds
    torch.manual_seed(0)
    assert not np.allclose(calls[0]["draws_fn"](on[:3], 2, None, None), calls[1]["draws_fn"](on[:3], 2, None, None))
    assert calls[1]["latent_fn"](bg[:4]).shape == (4, 10) and calls[0]["latent_fn"](bg[:4]).shape == (4, 20)
    with pytest.raises(ValueError, match="target_idx"):
        trained.differential_expression(idx1=on, idx2=off_tg, target_idx=np.array([], dtype=int))


def test_de_between_target_subgroups_recovers_the_program(trained):
    a = trained.adata
    _, tg = sets(a)
    on = np.flatnonzero(a.obs["program"] == "on")
    result = trained.differential_expression(idx1=on, idx2=np.setdiff1d(tg, on), target_idx=tg, mode="change",
                                             silent=True)
    truth = a.var["program"].reindex(result.index).to_numpy()
    ap = average_precision_score(truth, result["proba_de"].to_numpy() + 1e-3 * result["lfc_mean"].abs().to_numpy())
    assert ap > 0.8 and ap > 5 * truth.mean()
    top = result.index[: truth.sum()]  # the engine sorts by evidence
    assert a.var.loc[top, "program"].mean() > 0.7
    assert (result.loc[a.var_names[a.var["program"]], "lfc_mean"] > 0.5).mean() > 0.8  # switched on: up in group 1


def test_elbo_methods_are_refused_as_in_scvi_tools(trained):
    with pytest.raises(NotImplementedError, match="pairs"):
        trained.get_elbo()
    with pytest.raises(NotImplementedError, match="get_reconstruction_error"):
        trained.get_reconstruction_error()
