import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from conftest import silhouette


def test_shapes_and_history(trained_scvi):
    m = trained_scvi
    n, g = m.adata.shape
    assert m.get_latent_representation().shape == (n, 5)
    means, variances = m.get_latent_representation(return_dist=True)
    assert means.shape == variances.shape == (n, 5) and (variances > 0).all()
    assert m.get_latent_representation(indices=[3, 1]).shape == (2, 5)
    h = m.history
    assert list(h["elbo_train"].columns) == ["elbo_train"] and len(h["elbo_train"]) == 15
    assert h["elbo_train"]["elbo_train"].iloc[-1] < h["elbo_train"]["elbo_train"].iloc[0]


def test_normalized_expression_semantics(trained_scvi):
    m = trained_scvi
    df = m.get_normalized_expression(indices=np.arange(20))
    assert isinstance(df, pd.DataFrame) and df.shape == (20, m.adata.n_vars)
    assert list(df.index) == list(m.adata.obs_names[:20]) and list(df.columns) == list(m.adata.var_names)
    np.testing.assert_allclose(df.sum(1), 1.0, rtol=1e-4)  # library_size=1: proportions
    samples = m.get_normalized_expression(indices=np.arange(20), n_samples=4, return_mean=False)
    assert isinstance(samples, np.ndarray) and samples.shape == (4, 20, m.adata.n_vars)
    torch.manual_seed(3)
    sub = m.get_normalized_expression(indices=np.arange(20), gene_list=["gene_3", "gene_0"], library_size=1e4)
    assert list(sub.columns) == ["gene_0", "gene_3"]  # the model's gene order, as scvi-tools (var_names.isin)
    torch.manual_seed(3)
    full = m.get_normalized_expression(indices=np.arange(20), library_size=1e4)
    np.testing.assert_allclose(sub.to_numpy(), full[["gene_0", "gene_3"]].to_numpy(), rtol=1e-6)
    # transform_batch as a list = mean of decoding in each batch (same posterior draw via the seed)
    torch.manual_seed(0)
    both = m.get_normalized_expression(indices=np.arange(30), transform_batch=["batch_0", "batch_1"],
                                       return_numpy=True)
    each = []
    for b in ["batch_0", "batch_1"]:
        torch.manual_seed(0)
        each.append(m.get_normalized_expression(indices=np.arange(30), transform_batch=b, return_numpy=True))
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-9)
    assert not np.allclose(each[0], each[1])  # the batch changes the decoded expression
    with pytest.raises(ValueError, match="transform_batch 'batch_7'"):
        m.get_normalized_expression(transform_batch="batch_7")


def test_likelihoods_are_consistent(trained_scvi):
    m = trained_scvi
    idx = np.arange(60)
    elbo = m.get_elbo(indices=idx)
    rec = m.get_reconstruction_error(indices=idx)["reconstruction_loss"]
    mll = m.get_marginal_ll(indices=idx, n_mc_samples=200)
    assert elbo < 0 and rec > 0
    assert -rec > elbo  # ELBO = E[log p(x|z)] - KL, KL >= 0
    assert elbo <= mll <= elbo + 0.2 * abs(elbo)  # importance sampling tightens the bound
    per_cell = m.get_elbo(indices=idx, return_mean=False)
    assert per_cell.shape == (60,)


def test_posterior_predictive_sample(trained_scvi):
    m = trained_scvi
    sparse_x = m.posterior_predictive_sample(indices=np.arange(50), n_samples=3)
    assert sparse_x.shape == (50, m.adata.n_vars, 3)  # (cells, genes, samples), sparse as in scvi-tools
    x = sparse_x.todense()
    assert (x >= 0).all() and np.allclose(x, np.round(x)) and sparse_x.nnz == np.count_nonzero(x)
    one = m.posterior_predictive_sample(indices=np.arange(50), gene_list=["gene_5", "gene_2"])
    assert one.shape == (50, 2) and one.format == "csr"
    in_b1 = m.posterior_predictive_sample(indices=np.arange(50), transform_batch="batch_1", n_samples=2)
    assert in_b1.shape == (50, m.adata.n_vars, 2)
    obs_total = np.asarray(m.adata.X[:50].sum(1)).ravel()
    ratio = x.sum(1).mean(-1) / obs_total
    assert 0.5 < np.median(ratio) < 2.0  # draws keep each cell's depth


def test_latent_separates_cell_types_and_mixes_batches_better_than_pca():
    adata = cellvi.datasets.simulate(1500, 300, n_cell_types=4, seed=3, batch_lfc=2.0, batch_noise=0.5)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata)
    model.train(max_epochs=60, n_epochs_kl_warmup=20)
    z = model.get_latent_representation()
    from sklearn.decomposition import PCA

    X = adata.X.toarray()
    pca = PCA(10, random_state=0).fit_transform(np.log1p(X / X.sum(1, keepdims=True) * 1e4))
    ct, b = adata.obs["cell_type"].to_numpy(), adata.obs["batch"].to_numpy()

    def batch_asw_within_types(e):  # batch separation inside each cell type (0: mixed)
        return np.mean([silhouette(e[ct == t], b[ct == t]) for t in np.unique(ct)])

    assert silhouette(z, ct) > silhouette(pca, ct) + 0.05
    # ratio to PCA's batch separation over training seeds 0-4: 0.35-0.53 (mean 0.42); PCA is 1
    assert batch_asw_within_types(z) < 0.65 * batch_asw_within_types(pca)


def test_same_seed_same_model(small_adata):
    cellvi.SCVI.setup_anndata(small_adata, batch_key="batch")
    zs = []
    for _ in range(2):
        m = cellvi.SCVI(small_adata)
        m.train(max_epochs=3, seed=5)
        zs.append(m.get_latent_representation())
    np.testing.assert_array_equal(zs[0], zs[1])
    m = cellvi.SCVI(small_adata)
    m.train(max_epochs=3, seed=6)
    assert not np.array_equal(zs[0], m.get_latent_representation())


def test_save_load_round_trip_is_exact(tmp_path, trained_scvi):
    m = trained_scvi
    m.save(tmp_path / "m", save_anndata=True)
    with pytest.raises(ValueError, match="overwrite=True"):
        m.save(tmp_path / "m")
    assert not any(p.suffix in (".pkl", ".pt") for p in (tmp_path / "m").iterdir())
    for adata in (None, m.adata.copy()):
        m2 = cellvi.SCVI.load(tmp_path / "m", adata=adata)
        np.testing.assert_array_equal(m.get_latent_representation(), m2.get_latent_representation())
        torch.manual_seed(1)
        e1 = m.get_normalized_expression(indices=np.arange(40), return_numpy=True)
        torch.manual_seed(1)
        e2 = m2.get_normalized_expression(indices=np.arange(40), return_numpy=True)
        np.testing.assert_array_equal(e1, e2)
        assert m2.history_ == m.history_ and m2.is_trained
        np.testing.assert_array_equal(m2.train_indices_, m.train_indices_)


def test_load_refuses_mismatched_data(tmp_path, trained_scvi):
    m = trained_scvi
    m.save(tmp_path / "m")
    fewer = m.adata[:, 1:].copy()
    with pytest.raises(ValueError, match="genes differ.*1 missing"):
        cellvi.SCVI.load(tmp_path / "m", adata=fewer)
    shuffled = m.adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="another order"):
        cellvi.SCVI.load(tmp_path / "m", adata=shuffled)
    other = m.adata.copy()
    cellvi.SCVI.setup_anndata(other, batch_key="donor")
    with pytest.raises(ValueError, match="batch_key: model 'batch' vs adata 'donor'"):
        cellvi.SCVI.load(tmp_path / "m", adata=other)
    bad = m.adata.copy()
    del bad.uns["_cellvi_setup"]
    bad.obs["batch"] = pd.Categorical(["batch_5"] * bad.n_obs)
    with pytest.raises(ValueError, match="batch_5"):
        cellvi.SCVI.load(tmp_path / "m", adata=bad)
    with pytest.raises(ValueError, match="No adata given"):
        cellvi.SCVI.load(tmp_path / "m")


def test_query_data_with_known_batches_works(trained_scvi):
    m = trained_scvi
    query = ad.AnnData(m.adata.X[:25].copy(), obs=m.adata.obs.iloc[:25].copy(), var=m.adata.var.copy())
    z_query = m.get_latent_representation(query)
    np.testing.assert_allclose(z_query, m.get_latent_representation(indices=np.arange(25)), rtol=1e-5, atol=1e-6)
    assert "_cellvi_setup" not in query.uns  # reading a query does not write into it
    query.obs["batch"] = "batch_new"
    with pytest.raises(ValueError, match="batch_new"):
        m.get_latent_representation(query)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gene_likelihood="nb", dispersion="gene-batch"),
        dict(gene_likelihood="poisson"),
        dict(dispersion="gene-cell", latent_distribution="ln"),
        dict(dispersion="gene-label", use_observed_lib_size=False, n_layers=2),
        dict(encode_covariates=True),
    ],
)
def test_model_variants_train_and_decode(kwargs, small_adata):
    small_adata.obs["depth"] = np.log(np.asarray(small_adata.X.sum(1)).ravel())
    cellvi.SCVI.setup_anndata(small_adata, batch_key="batch", labels_key="cell_type",
                              categorical_covariate_keys=["donor"], continuous_covariate_keys=["depth"])
    m = cellvi.SCVI(small_adata, **kwargs)
    m.train(max_epochs=2)
    assert np.isfinite(m.history_["elbo_train"]).all()
    expr = m.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    assert np.isfinite(m.get_marginal_ll(indices=np.arange(10), n_mc_samples=10))


def test_bad_hyperparameters_are_rejected(small_adata):
    cellvi.SCVI.setup_anndata(small_adata)
    with pytest.raises(ValueError, match="gene_likelihood='zip'"):
        cellvi.SCVI(small_adata, gene_likelihood="zip")


def test_size_factors_replace_the_observed_library(small_adata):
    small_adata.obs["sf"] = np.asarray(small_adata.X.sum(1)).ravel() * 0.5
    cellvi.SCVI.setup_anndata(small_adata, batch_key="batch", size_factor_key="sf")
    m = cellvi.SCVI(small_adata)
    m.train(max_epochs=2)
    expected_counts = m.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(expected_counts.sum(1), small_adata.obs["sf"], rtol=1e-4)  # mu = sf * rho
    sub = m.get_normalized_expression(indices=np.arange(10), n_samples_overall=25)
    assert sub.shape == (25, small_adata.n_vars) and set(sub.index) <= set(small_adata.obs_names[:10])
    bad = small_adata.copy()
    bad.obs["sf"] = 0.0
    with pytest.raises(ValueError, match="must be positive"):
        cellvi.SCVI.setup_anndata(bad, size_factor_key="sf")


def test_split_options_reach_the_model(small_adata):
    cellvi.SCVI.setup_anndata(small_adata, batch_key="batch")
    m = cellvi.SCVI(small_adata, n_latent=3)
    m.train(max_epochs=1, train_size=0.5, validation_size=0.25, check_val_every_n_epoch=1)
    assert (len(m.train_indices_), len(m.validation_indices_)) == (300, 150)
    assert not set(m.train_indices_) & set(m.validation_indices_) and "elbo_validation" in m.history_
    m.train(max_epochs=1, train_size=0.8, shuffle_set_split=False)  # in order: the first 20 % validate
    assert m.validation_indices_.tolist() == list(range(120)) and m.train_indices_.tolist() == list(range(120, 600))
    with pytest.raises(ValueError, match="train_size \\+ validation_size"):
        m.train(max_epochs=1, train_size=0.8, validation_size=0.3, shuffle_set_split=False)
    with pytest.raises(ValueError, match="validation set is empty"):
        m.train(max_epochs=2, train_size=1.0, early_stopping=True)
    with pytest.raises(ValueError, match="never logged"):
        m.train(max_epochs=2, early_stopping=True, early_stopping_monitor="elbo_valid")
    with pytest.raises(ValueError, match="Unknown training option"):
        m.train(max_epochs=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="devices=-2: give a positive count"):
        m.train(max_epochs=1, accelerator="cpu", devices=-2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available; use accelerator='cpu'"):
            m.train(max_epochs=1, accelerator="gpu")


def test_plan_kwargs_match_keyword_conveniences(small_adata):
    cellvi.SCVI.setup_anndata(small_adata, batch_key="batch")
    a, b = cellvi.SCVI(small_adata, n_latent=3), cellvi.SCVI(small_adata, n_latent=3)
    a.train(2, "cpu", 1, 0.9, None, True, False, 64, plan_kwargs={"lr": 5e-3, "n_epochs_kl_warmup": 1})
    b.train(max_epochs=2, accelerator="cpu", batch_size=64, lr=5e-3, n_epochs_kl_warmup=1)
    np.testing.assert_allclose(a.history_["elbo_train"], b.history_["elbo_train"], rtol=1e-6)
    assert a.history_["kl_weight"] == [0.0, 1.0]


def test_empty_selections_and_bad_library_size(trained_scvi):
    m = trained_scvi
    none = np.array([], dtype=int)
    assert m.get_latent_representation(indices=none).shape == (0, 5)
    assert m.get_normalized_expression(indices=none).shape == (0, m.adata.n_vars)
    assert m.get_elbo(indices=none, return_mean=False).shape == (0,)
    assert m.posterior_predictive_sample(indices=none).shape == (0, m.adata.n_vars)
    with pytest.raises(ValueError, match="No cells selected"):
        m.get_elbo(indices=none)
    with pytest.raises(ValueError, match="No cells selected"):
        m.get_marginal_ll(indices=none, n_mc_samples=5)
    for bad in (0, -1.0, float("nan"), "observed"):
        with pytest.raises(ValueError, match="library_size"):
            m.get_normalized_expression(indices=[0], library_size=bad)


def test_damaged_model_files_are_refused_by_name(trained_scvi, tmp_path):
    m = trained_scvi
    m.save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="model.safetensors is damaged"):
        cellvi.SCVI.load(tmp_path / "m", adata=m.adata)
    m.save(tmp_path / "m", overwrite=True)
    (tmp_path / "m" / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json is damaged or not a cellvi model"):
        cellvi.SCVI.load(tmp_path / "m", adata=m.adata)
    (tmp_path / "scvi").mkdir()
    (tmp_path / "scvi" / "model.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="scvi-tools model"):
        cellvi.SCVI.load(tmp_path / "scvi", adata=m.adata)


def test_overwrite_without_anndata_removes_the_stale_copy(trained_scvi, tmp_path):
    m = trained_scvi
    m.save(tmp_path / "m", save_anndata=True)
    assert (tmp_path / "m" / "adata.h5ad").exists()
    m.save(tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "adata.h5ad").exists()
    with pytest.raises(ValueError, match="No adata given"):
        cellvi.SCVI.load(tmp_path / "m")
    m.save(tmp_path / "p", prefix="run1_")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["run1_model.json", "run1_model.safetensors"]
    again = cellvi.SCVI.load(tmp_path / "p", adata=m.adata, prefix="run1_")
    np.testing.assert_array_equal(again.get_latent_representation(), m.get_latent_representation())
