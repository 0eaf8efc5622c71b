import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

import cellvi
from cellvi.data.loader import CountData
from cellvi.distributions import NegativeBinomialMixture, nb_mixture_log_prob
from cellvi.models.totalvi import fit_background_prior

KEY = "protein_expression"


def setup(a, **kwargs):
    cellvi.TotalVI.setup_anndata(a, protein_expression_obsm_key=KEY, batch_key="batch", **kwargs)
    return a


@pytest.fixture(scope="module")
def trained():
    """TotalVI on simulated CITE-seq with three proteins missing from batch_1's panel."""
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 0
    a = setup(cellvi.datasets.simulate_citeseq(800, 150, 20, missing_proteins={"batch_1": [0, 1, 2]}, seed=0))
    model = cellvi.TotalVI(a, n_latent=10)
    model.train(max_epochs=120, early_stopping=False, seed=0)
    return model


def marker_truth(a) -> np.ndarray:
    """(cells, proteins): whether the protein is a marker of the cell's type (simulated foreground)."""
    markers = a.uns["protein_markers"]
    return markers.loc[:, a.obs["cell_type"].astype(str)].T.to_numpy()


# --------------------------------------------------------------------------- likelihood and prior


@pytest.mark.parametrize("mu1, mu2, theta, pi", [(5.0, 40.0, 2.0, 0.3), (0.5, 3.0, 10.0, 0.9), (100.0, 800.0, 0.7, 0.5)])
def test_nb_mixture_log_prob_matches_scipy(mu1, mu2, theta, pi):
    x = np.arange(0, 300.0)
    nb = lambda mu: scipy.stats.nbinom.pmf(x, n=theta, p=theta / (theta + mu))  # noqa: E731
    ref = np.log(pi * nb(mu1) + (1 - pi) * nb(mu2))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    ours = nb_mixture_log_prob(t(x), t(mu1), t(mu2), t(theta), t(np.log(pi) - np.log1p(-pi))).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)  # EPS = 1e-8 inside the logs


def test_nb_mixture_mean_and_samples():
    torch.manual_seed(0)
    d = NegativeBinomialMixture(torch.full((20000, 1), 4.0), torch.full((20000, 1), 60.0), torch.tensor(5.0),
                                torch.full((20000, 1), 0.0))  # pi = 0.5
    assert float(d.mean[0, 0]) == pytest.approx(32.0)
    assert float(d.sample().mean()) == pytest.approx(32.0, rel=0.03)


def test_background_prior_recovers_lower_component():
    rng = np.random.default_rng(0)
    n = 4000
    fg = rng.random((n, 3)) < [0.2, 0.5, 0.0]  # foreground fraction per column; the last has none
    x = np.where(fg, rng.normal(6.0, 0.5, (n, 3)), rng.normal([2.0, 3.0, 1.0], 0.4, (n, 3)))
    mean, sd = fit_background_prior(x, np.ones_like(x, bool))
    np.testing.assert_allclose(mean[:2], [2.0, 3.0], atol=0.05)
    np.testing.assert_allclose(sd[:2], [0.4, 0.4], atol=0.05)
    assert mean[2] < 1.0  # one component only: the lower half of it
    measured = np.ones_like(x, bool)
    measured[:, 0] = False
    measured[0, 0] = True  # a single measured value is not enough
    assert np.isnan(fit_background_prior(x, measured)[0][0])


# --------------------------------------------------------------------------- set-up and minibatches


def test_setup_records_proteins_panels_and_minibatch_vocabulary():
    a = setup(cellvi.datasets.simulate_citeseq(200, 50, 12, missing_proteins={"batch_1": [3]}, seed=1))
    spec = cellvi.data.get_spec(a)
    assert spec.protein_names == tuple(f"prot_{i}" for i in range(12))
    assert spec.panel_categories == ("batch_0", "batch_1")
    assert spec.protein_missing == ((), (3,))
    data = CountData(a, spec)
    b = data.gather(torch.arange(200))
    assert b["proteins"].dtype == torch.float32 and b["proteins"].shape == (200, 12)
    in_b1 = (a.obs["batch"] == "batch_1").to_numpy()
    mask = b["protein_mask"].numpy()
    assert (mask[in_b1, 3] == 0).all() and (mask[~in_b1, 3] == 1).all() and mask[:, [0, 1, 2, 4]].all()
    np.testing.assert_array_equal(b["proteins"].numpy(), a.obsm[KEY].to_numpy())


def test_setup_with_array_and_names_in_uns_and_panel_key():
    a = cellvi.datasets.simulate_citeseq(200, 50, 12, seed=1)
    names = list(a.obsm[KEY].columns)
    a.obsm[KEY] = a.obsm[KEY].to_numpy()
    a.uns["prot_names"] = np.array([n.upper() for n in names])
    a.obs["panel"] = np.where(np.arange(200) < 50, "small", "full")
    a.obsm[KEY][:50, 6:] = 0
    cellvi.TotalVI.setup_anndata(a, protein_expression_obsm_key=KEY, protein_names_uns_key="prot_names",
                                 batch_key="batch", panel_key="panel")
    spec = cellvi.data.get_spec(a)
    assert spec.protein_names[0] == "PROT_0" and spec.panel_categories == ("full", "small")
    assert spec.protein_missing == ((), tuple(range(6, 12)))


def test_new_data_with_other_proteins_is_refused(trained):
    a = trained.adata.copy()
    a.obsm[KEY] = a.obsm[KEY].iloc[:, ::-1]
    with pytest.raises(ValueError, match="other proteins than the model"):
        trained.get_latent_representation(a)
    del a.obsm[KEY]
    with pytest.raises(ValueError, match="lacks"):
        trained.get_latent_representation(a)


def test_model_needs_proteins():
    a = cellvi.datasets.simulate(100, 30, seed=0)
    cellvi.SCVI.setup_anndata(a)
    with pytest.raises(ValueError, match="TotalVI.setup_anndata"):
        cellvi.TotalVI(a)
    cellvi.data.setup_anndata(a)  # a set-up for any model, without proteins
    with pytest.raises(ValueError, match="protein_expression_obsm_key"):
        cellvi.TotalVI(a)


# --------------------------------------------------------------------------- messy panels


def finite_history(model) -> bool:
    return all(np.isfinite(v).all() for v in model.history_.values())


def test_negative_protein_counts_are_refused_before_training():
    a = cellvi.datasets.simulate_citeseq(100, 30, 12, seed=0)
    a.obsm[KEY].iloc[7, 2] = -3
    with pytest.raises(ValueError, match="negative protein counts in 1 cells.*cell_7"):
        setup(a)


def test_fractional_and_infinite_protein_values_are_refused():
    a = cellvi.datasets.simulate_citeseq(100, 30, 12, seed=0)
    a.obsm[KEY].iloc[7, 2] = 0.5
    with pytest.raises(ValueError, match="non-integer"):
        setup(a)
    a.obsm[KEY].iloc[7, 2] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        setup(a)


def test_nan_protein_values_are_masked_not_zero_filled():
    a = cellvi.datasets.simulate_citeseq(300, 50, 12, seed=0)
    a.obsm[KEY].iloc[5, :] = np.nan  # a cell with no protein values
    a.obsm[KEY].iloc[9, [1, 4]] = np.nan
    setup(a)
    model = cellvi.TotalVI(a, n_latent=5)
    b = model._data().gather(torch.arange(300))
    assert b["protein_mask"][5].sum() == 0 and b["protein_mask"][9, [1, 4]].sum() == 0
    assert torch.isfinite(b["proteins"]).all()
    model.train(max_epochs=5, early_stopping=False)
    assert finite_history(model)


def test_likelihood_skips_masked_entries():
    a = setup(cellvi.datasets.simulate_citeseq(200, 40, 12, seed=0))
    model = cellvi.TotalVI(a, n_latent=5)
    model.module.eval()
    b = model._data().gather(torch.arange(200))
    gen = model.module.forward_batch(b)[1]
    full = gen["py"].log_prob(b["proteins"])
    b["protein_mask"][:, 0] = 0
    out_masked = -(gen["py"].log_prob(b["proteins"]) * b["protein_mask"]).sum(-1)
    torch.testing.assert_close(out_masked, -full[:, 1:].sum(-1))


@pytest.mark.parametrize("series", [False, True])
@pytest.mark.parametrize("phi_per_cell", [False, True])
def test_protein_terms_derivatives_match_autograd_of_the_formula(series, phi_per_cell):
    """protein_terms (float64): values and hand-derived derivatives equal autograd through the written-out formula
    (nb_mixture_log_prob, torch's Normal KL), with masked entries, a cell with nothing measured and a log
    background above the clamp."""
    from torch.distributions import Normal, kl_divergence

    from cellvi.models.totalvi import protein_terms

    g = torch.Generator().manual_seed(0)
    B, P, d = 40, 7, torch.float64
    block = 2 * torch.randn(B, 4 * P, generator=g, dtype=d)
    block[0, :2] = 25.0  # back_mean above the clamp of log beta (20)
    eps = torch.randn(B, P, generator=g, dtype=d)
    phi = 0.1 + 5 * torch.rand((B, P) if phi_per_cell else (P,), generator=g, dtype=d)
    prior_mean, prior_log_scale = torch.randn(B, P, generator=g, dtype=d), 0.5 * torch.randn(B, P, generator=g, dtype=d)
    y = torch.poisson(torch.exp(3 * torch.rand(B, P, generator=g, dtype=d)), generator=g)
    y[1] = 0.0
    mask = (torch.rand(B, P, generator=g) > 0.2).to(d)
    mask[3] = 0.0  # a cell with no protein measured
    w_rec, w_kl = torch.rand(B, generator=g, dtype=d), torch.rand(B, generator=g, dtype=d)  # upstream gradients

    leaves = [t.clone().requires_grad_() for t in (block, phi, prior_mean, prior_log_scale)]
    mean, raw_sd, fore, mixing = leaves[0].split(P, -1)
    sd = F.softplus(raw_sd) + 1e-4
    rate_back = torch.exp((mean + eps * sd).clamp(max=20.0))
    rate_fore = rate_back * (1.0 + F.softplus(fore) + 1e-8)
    rec_ref = -(nb_mixture_log_prob(y, rate_back, rate_fore, leaves[1], mixing) * mask).sum(-1)
    kl_ref = (kl_divergence(Normal(mean, sd), Normal(leaves[2], torch.exp(leaves[3]))) * mask).sum(-1)
    grads_ref = torch.autograd.grad((w_rec * rec_ref).sum() + (w_kl * kl_ref).sum(), leaves)

    rec, kl, d_block, d_kl, d_phi, d_prior_ls = protein_terms(block, eps, phi, prior_mean, prior_log_scale, y, mask,
                                                              True, series)
    tol = dict(rtol=1e-8, atol=1e-7) if not series else dict(rtol=1e-7, atol=1e-6)  # series: error < 1e-9 each
    torch.testing.assert_close(rec, rec_ref.detach(), **tol)
    torch.testing.assert_close(kl, kl_ref.detach(), **tol)
    grad_block = d_block * w_rec[:, None, None]
    grad_block[:, :2] += d_kl * w_kl[:, None, None]
    d_phi = d_phi * w_rec[:, None]
    ours = [grad_block.reshape(B, 4 * P), d_phi if phi_per_cell else d_phi.sum(0), -d_kl[:, 0] * w_kl[:, None],
            d_prior_ls * w_kl[:, None]]
    for got, want in zip(ours, grads_ref):
        torch.testing.assert_close(got, want, **tol)
    assert (grad_block[3] == 0).all() and (grad_block[:, :, 1:][mask[:, None, 1:].expand(B, 4, -1) == 0] == 0).all()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("options", [{}, {"gene_likelihood": "zinb"},
                                     {"protein_dispersion": "protein-batch", "gene_dispersion": "gene-batch"},
                                     {"protein_dispersion": "protein-label", "gene_dispersion": "gene-label"}])
def test_fused_training_terms_equal_the_written_out_ones(compiled, options):
    """TotalVIModule.terms with gradients (one fused function over the decoder's heads) gives the values and
    gradients of terms_reference (the distributions' formulas through autograd), with the same random draws;
    proteins missing from a panel and NaN protein values (masked) included."""
    from cellvi import distributions as dist
    from cellvi.models import totalvi

    a = setup(cellvi.datasets.simulate_citeseq(300, 60, 12, missing_proteins={"batch_1": [0, 1, 2]}, seed=0))
    a.obsm[KEY].iloc[4, :] = np.nan
    a.obsm[KEY].iloc[8, [4, 5]] = np.nan
    a.obs["label"] = a.obs["cell_type"]
    cellvi.TotalVI.setup_anndata(a, protein_expression_obsm_key=KEY, batch_key="batch")
    if "label" in str(options):
        cellvi.data.setup_anndata(a, batch_key="batch", labels_key="label", protein_expression_obsm_key=KEY,
                                  model_class="TotalVI")
    module = cellvi.TotalVI(a, n_latent=5, **options).module.train()
    with torch.no_grad():
        module.heads.bias[-4 * 12 : -3 * 12] += 3.0  # log background high: exercise the clamp region
    batch = CountData(a, cellvi.data.get_spec(a)).gather(torch.arange(0, 300, 2))
    assert batch["protein_mask"][2].sum() == 0 and batch["protein_mask"][4].sum() == 10  # cells 4 and 8: NaN
    results = []
    for fused in (True, False):
        totalvi.FUSED_TERMS[0] = fused
        try:
            with dist.compiled_kernels(compiled):
                torch.manual_seed(1)
                module.zero_grad(set_to_none=True)
                terms = module.terms(batch)
                ((terms["reconst_loss_gene"] + terms["reconst_loss_protein"]).mean()
                 + 0.3 * (terms["kl_div_z"] + terms["kl_div_back_pro"]).mean()).backward()
        finally:
            totalvi.FUSED_TERMS[0] = True
        results.append(({k: v.detach() for k, v in terms.items()},
                        {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}))
    (values, grads), (values_ref, grads_ref) = results
    for key in values_ref:
        assert torch.isfinite(values[key]).all()
        # float32 round-off; compiled, the protein lgamma is a series (as the compiled RNA kernels')
        torch.testing.assert_close(values[key], values_ref[key], rtol=1e-4 if compiled else 1e-5, atol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        if ".layers." in name and name.endswith("linear.bias"):
            continue  # a bias before batch norm: its gradient is zero up to round-off, both ways
        err = (grads[name] - ref).norm() / ref.norm()
        assert err < 1e-4, (name, float(err))  # round-off, amplified where cells' gradients cancel


def test_panel_missing_in_one_batch_trains_and_is_imputed(trained):
    a = trained.adata
    assert finite_history(trained)
    assert cellvi.data.get_spec(a).protein_missing == ((), (0, 1, 2))
    _, pro = trained.get_normalized_expression(n_samples=5)
    truth = marker_truth(a)
    in_b1 = (a.obs["batch"] == "batch_1").to_numpy()
    tested = [t for t in range(3) if truth[in_b1, t].any() and (~truth[in_b1, t]).any()]
    assert tested  # at least one of the missing proteins is a marker
    for t in tested:  # proteins never measured in batch_1: imputed from batch_0's RNA-protein relation
        assert roc_auc_score(truth[in_b1, t], pro.iloc[in_b1, t]) > 0.9


def test_protein_all_zero_in_a_batch_and_override():
    a = setup(cellvi.datasets.simulate_citeseq(300, 50, 12, missing_proteins={"batch_0": [5]}, seed=2))
    model = cellvi.TotalVI(a, n_latent=5)
    in_b0 = (a.obs["batch"] == "batch_0").to_numpy()
    mask = model._data().gather(torch.arange(300))["protein_mask"].numpy()
    assert (mask[in_b0, 5] == 0).all()
    model.train(max_epochs=5, early_stopping=False)
    assert finite_history(model)
    over = cellvi.TotalVI(a, n_latent=5, override_missing_proteins=True)
    assert over._data().gather(torch.arange(300))["protein_mask"].numpy().all()
    over.train(max_epochs=5, early_stopping=False)
    assert finite_history(over)


def test_fewer_than_ten_proteins_train_with_random_prior():
    a = setup(cellvi.datasets.simulate_citeseq(300, 50, 4, n_cell_types=2, markers_per_type=1, seed=3))
    model = cellvi.TotalVI(a, n_latent=5)
    empirical = cellvi.TotalVI(a, n_latent=5, empirical_protein_background_prior=True)
    assert not torch.allclose(model.module.prior_mean, empirical.module.prior_mean)
    truth = a.uns["protein_background"].to_numpy()  # simulated log background rate, (proteins, batches)
    fitted = empirical.module.prior_mean.detach().numpy()
    markers = a.uns["protein_markers"].any(axis=1).to_numpy()  # with a foreground the two components separate
    np.testing.assert_allclose(fitted[markers], truth[markers], atol=0.3)
    assert (fitted <= truth + 0.3).all()  # without one, the lower half of the background: never above it
    model.train(max_epochs=5, early_stopping=False)
    assert finite_history(model)
    single = setup(cellvi.datasets.simulate_citeseq(300, 50, 1, n_cell_types=2, markers_per_type=1, seed=3))
    one = cellvi.TotalVI(single, n_latent=5)
    one.train(max_epochs=3, early_stopping=False)
    assert finite_history(one)


def test_all_proteins_missing_everywhere_is_refused():
    a = cellvi.datasets.simulate_citeseq(100, 30, 5, seed=0)
    a.obsm[KEY].iloc[:, :] = 0
    setup(a)
    with pytest.raises(ValueError, match="No protein is measured"):
        cellvi.TotalVI(a)


# --------------------------------------------------------------------------- results


def test_output_names_shapes_and_semantics(trained):
    a = trained.adata
    z = trained.get_latent_representation()
    assert z.shape == (800, 10)
    mean, var = trained.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(mean, z) and (var > 0).all()
    rna, pro = trained.get_normalized_expression()
    assert isinstance(rna, pd.DataFrame) and list(rna.columns) == list(a.var_names)
    assert list(pro.columns) == list(a.obsm[KEY].columns) and list(pro.index) == list(a.obs_names)
    np.testing.assert_allclose(rna.sum(1), 1.0, rtol=1e-4)
    assert (pro.to_numpy() > 0).all()
    rna_l, _ = trained.get_normalized_expression(library_size=1e4, indices=[0, 1])
    np.testing.assert_allclose(rna_l.sum(1), 1e4, rtol=1e-3)
    _, scaled = trained.get_normalized_expression(scale_protein=True, indices=np.arange(10))
    np.testing.assert_allclose(scaled.sum(1), 1.0, rtol=1e-4)
    torch.manual_seed(0)
    _, fore = trained.get_normalized_expression(indices=np.arange(50), n_samples=20)
    torch.manual_seed(0)
    _, with_bg = trained.get_normalized_expression(indices=np.arange(50), n_samples=20, include_protein_background=True)
    assert (with_bg.to_numpy() > fore.to_numpy()).all()
    _, mixing = trained.get_normalized_expression(indices=np.arange(20), sample_protein_mixing=True)
    assert np.isfinite(mixing.to_numpy()).all()
    rna3, pro3 = trained.get_normalized_expression(indices=np.arange(7), n_samples=3, return_mean=False,
                                                   gene_list=["gene_5", "gene_2"], protein_list=["prot_3"])
    assert rna3.shape == (3, 7, 2) and pro3.shape == (3, 7, 1)
    rna_o, pro_o = trained.get_normalized_expression(n_samples_overall=11, transform_batch=["batch_0", "batch_1"])
    assert rna_o.shape == (11, 150) and pro_o.shape == (11, 20)
    fg = trained.get_protein_foreground_probability(protein_list=["prot_1", "prot_0"])
    assert list(fg.columns) == ["prot_0", "prot_1"] and ((fg >= 0) & (fg <= 1)).all().all()
    with pytest.raises(ValueError, match="protein_list has proteins"):
        trained.get_protein_foreground_probability(protein_list=["CD3"])


def test_foreground_probability_separates_marker_cells(trained):
    a = trained.adata
    fg = trained.get_protein_foreground_probability(n_samples=5).to_numpy()
    truth = marker_truth(a)
    measured = ~((a.obs["batch"] == "batch_1").to_numpy()[:, None] & (np.arange(20) < 3)[None])
    aucs = [roc_auc_score(truth[measured[:, t], t], fg[measured[:, t], t]) for t in range(20)
            if truth[:, t].any()]
    assert np.median(aucs) > 0.9, aucs


def test_de_recovers_protein_markers_in_one_table(trained):
    a = trained.adata
    res = trained.differential_expression(groupby="cell_type")
    assert set(res.index) == set(a.var_names) | {f"{p}_protein" for p in a.obsm[KEY].columns}  # scvi-tools' names
    for col in ("proba_de", "bayes_factor", "lfc_mean", "scale1", "raw_mean1", "is_de_fdr_0.05", "comparison"):
        assert col in res.columns
    markers = a.uns["protein_markers"].rename(index=lambda p: f"{p}_protein")  # DE names, as scvi-tools
    aps = []
    for ct in markers.columns:
        part = res[(res["group1"] == ct) & res.index.isin(markers.index)]
        assert len(part) == 20
        aps.append(average_precision_score(markers.loc[part.index, ct], part["proba_de"] * np.sign(part["lfc_mean"])))
    assert min(aps) > 0.8, aps
    only = trained.differential_expression(groupby="cell_type", group1="type_0", use_field=["protein"])
    assert set(only.index) == set(markers.index)  # the _protein names
    with pytest.raises(ValueError, match="use_field"):
        trained.differential_expression(groupby="cell_type", use_field=["atac"])


def test_save_load_round_trip_is_exact(trained, tmp_path):
    trained.save(tmp_path / "m", save_anndata=True)
    loaded = cellvi.TOTALVI.load(tmp_path / "m")
    assert isinstance(loaded, cellvi.TotalVI)
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    for name, t in trained.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[name], t, rtol=0, atol=0)
    torch.manual_seed(1)
    a1 = trained.get_protein_foreground_probability(indices=np.arange(30))
    torch.manual_seed(1)
    a2 = loaded.get_protein_foreground_probability(indices=np.arange(30))
    pd.testing.assert_frame_equal(a1, a2)
    assert loaded.spec == trained.spec


def test_train_signature_follows_scvi_tools(trained):
    a = setup(cellvi.datasets.simulate_citeseq(200, 40, 12, seed=0))
    model = cellvi.TotalVI(a, n_latent=5)
    with pytest.raises(ValueError, match="scale_adversarial_loss"):
        model.train(max_epochs=1, adversarial_classifier=True, plan_kwargs={"scale_adversarial_loss": -1})
    model.train(2, 1e-3, early_stopping=False)
    assert model.history_["lr"][0] == pytest.approx(1e-3)


def test_counts_on_disk_train_like_in_memory(tmp_path):
    import anndata

    a = setup(cellvi.datasets.simulate_citeseq(200, 40, 12, missing_proteins={"batch_1": [2]}, seed=4))
    a.write_h5ad(tmp_path / "cite.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cite.h5ad", backed="r")
    model = cellvi.TotalVI(backed, n_latent=5)
    model.train(max_epochs=2, early_stopping=False)
    assert finite_history(model)
    mem = cellvi.TotalVI(a, n_latent=5)
    mem.module.load_state_dict(model.module.state_dict())
    np.testing.assert_allclose(model.get_latent_representation(), mem.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_batch_corrected_de_and_scvi_tools_arguments(trained):
    res = trained.differential_expression(groupby="cell_type", group1="type_1", batch_correction=True,
                                          use_field=["protein"], silent=True)
    markers = trained.adata.uns["protein_markers"]["type_1"].rename(index=lambda p: f"{p}_protein")
    top = res.sort_values("lfc_mean", ascending=False).index[: markers.sum()]
    assert markers.loc[top].all()  # the type's markers are its most up-regulated proteins
    with pytest.raises(ValueError, match="importance"):
        trained.differential_expression(groupby="cell_type", weights="importance")
    rna, pro = trained.get_normalized_expression(indices=[0], silent=True)
    assert rna.shape == (1, 150) and pro.shape == (1, 20)


# --------------------------------------------------------------------------- MuData


def as_mudata(a):
    """The CITE-seq AnnData of the simulator as a MuData: modalities "rna" (with obs) and "protein"."""
    import anndata

    mudata = pytest.importorskip("mudata")
    rna = anndata.AnnData(a.X.copy(), obs=a.obs[["batch", "cell_type"]].copy(), var=pd.DataFrame(index=a.var_names))
    pro = anndata.AnnData(a.obsm[KEY].to_numpy(), obs=pd.DataFrame(index=a.obs_names),
                          var=pd.DataFrame(index=a.obsm[KEY].columns))
    with mudata.set_options(pull_on_update=False):
        return mudata.MuData({"rna": rna, "protein": pro})


MODS = {"rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"}


def test_mudata_trains_and_gives_what_anndata_gives(tmp_path):
    a = cellvi.datasets.simulate_citeseq(200, 40, 12, missing_proteins={"batch_1": [2]}, seed=5)
    md = as_mudata(a)
    setup(a)
    obsm_before = set(md.obsm)
    cellvi.TotalVI.setup_mudata(md, batch_key="batch", modalities=MODS)
    assert set(md.uns) == {"_cellvi_setup"} and set(md.obsm) == obsm_before  # nothing else written into it
    assert not md["rna"].uns and not md["protein"].uns
    from_ad, from_md = cellvi.TotalVI(a, n_latent=5), cellvi.TotalVI(md, n_latent=5)
    assert from_md.mdata is md and from_md.spec.protein_missing == from_ad.spec.protein_missing == ((), (2,))
    for m in (from_ad, from_md):
        m.train(max_epochs=3, early_stopping=False, seed=0)
    z = from_md.get_latent_representation()
    assert z.shape == (200, 5) and z.dtype == np.float32
    np.testing.assert_array_equal(z, from_ad.get_latent_representation())  # same seed, same values
    np.testing.assert_array_equal(from_md.get_latent_representation(md), z)
    other = as_mudata(a)  # another MuData with the same modalities, never set up
    np.testing.assert_allclose(from_md.get_latent_representation(other, indices=[3, 1]), z[[3, 1]], atol=1e-5)
    rna, pro = from_md.get_normalized_expression(md, indices=[0, 1])
    assert list(pro.columns) == list(md["protein"].var_names) and list(rna.index) == list(md.obs_names[:2])
    torch.manual_seed(0)
    e_md = from_md.get_elbo(md)
    torch.manual_seed(0)
    assert e_md == from_ad.get_elbo()
    res = from_md.differential_expression(md, groupby="batch", use_field=["protein"])
    assert set(res.index) == {f"{p}_protein" for p in md["protein"].var_names}
    from_md.save(tmp_path / "m")
    loaded = cellvi.TotalVI.load(tmp_path / "m", adata=md)
    assert loaded.mdata is md
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)


def test_mudata_reads_obs_where_modalities_say():
    a = cellvi.datasets.simulate_citeseq(150, 30, 12, seed=6)
    md = as_mudata(a)
    md.obs["lane"] = np.where(np.arange(150) < 75, "L1", "L2")  # a top-level column
    md["rna"].obs["depth"] = np.log(np.asarray(a.X.sum(1)).ravel())
    md["rna"].layers["counts"], md["protein"].layers["counts"] = md["rna"].X.copy(), md["protein"].X.copy()
    md["rna"].X = md["rna"].X * 0.5  # not counts: only the layers may be read
    md["protein"].X = md["protein"].X * 0.5
    cellvi.TotalVI.setup_mudata(md, rna_layer="counts", protein_layer="counts", batch_key="lane",
                                continuous_covariate_keys=["depth"],
                                modalities={"rna_layer": "rna", "protein_layer": "protein",
                                            "continuous_covariate_keys": "rna"})
    model = cellvi.TotalVI(md, n_latent=4)
    assert model.spec.batch_categories == ("L1", "L2") and model.spec.layer == "counts"
    model.train(max_epochs=1, early_stopping=False)
    np.testing.assert_array_equal(model._data().gather(torch.arange(150))["proteins"].numpy(),
                                  a.obsm[KEY].to_numpy())
    b = model._data().gather(torch.arange(150))
    np.testing.assert_array_equal(b["batch"].numpy(), (np.arange(150) >= 75).astype(int))
    np.testing.assert_allclose(b["cont_covs"][:, 0].numpy(), md["rna"].obs["depth"].to_numpy(), rtol=1e-6)


def test_bad_mudata_and_modalities_get_clear_errors():
    a = cellvi.datasets.simulate_citeseq(100, 30, 12, seed=7)
    md = as_mudata(a)
    bad = {
        "modalities": dict(modalities=None),
        "protein_layer": dict(modalities={"rna_layer": "rna"}),
        "lacks": dict(modalities={"rna_layer": "rna", "protein_layer": "prot"}),
        "not arguments of setup_mudata": dict(modalities={**MODS, "labels_key": "rna"}),
        r"'batch' is not a column of mdata\.obs": dict(batch_key="batch", modalities={"rna_layer": "rna",
                                                                                       "protein_layer": "protein"}),
        r"'donor' is not a column of mdata\['rna'\]\.obs": dict(batch_key="donor", modalities=MODS),
        r"not found in mdata\['protein'\]\.layers": dict(protein_layer="counts", modalities=MODS),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message):
            cellvi.TotalVI.setup_mudata(md, **kwargs)
    with pytest.raises(ValueError, match="setup_mudata"):
        cellvi.TotalVI(md)  # never set up
    with pytest.raises(ValueError, match="takes a MuData"):
        cellvi.TotalVI.setup_mudata(a, modalities=MODS)
    mudata = pytest.importorskip("mudata")
    with mudata.set_options(pull_on_update=False):
        ragged = mudata.MuData({"rna": md["rna"].copy(), "protein": md["protein"][:80].copy()})
    with pytest.raises(ValueError, match="does not hold every cell"):
        cellvi.TotalVI.setup_mudata(ragged, modalities=MODS)


def test_mudata_needs_mudata_installed(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mudata(name, *args, **kwargs):
        if name == "mudata":
            raise ImportError("No module named 'mudata'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mudata)
    with pytest.raises(ImportError, match="pip install mudata"):
        cellvi.TotalVI.setup_mudata(object(), modalities=MODS)


# --------------------------------------------------------------------------- adversarial classifier


def batch_accuracy(z: np.ndarray, batch: np.ndarray) -> float:
    """Cross-validated accuracy of a logistic regression predicting the batch from the latent."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(max_iter=2000), z, batch, cv=3).mean())


def test_adversarial_classifier_mixes_batches():
    """Strong batch effects on RNA and half the panel missing in one batch: the adversary's latent hides
    the batch better (a classifier trained afterwards does worse), and the cell types stay apart."""
    import scipy.sparse as sp

    a = cellvi.datasets.simulate_citeseq(600, 100, 20, missing_proteins={"batch_1": list(range(10))}, seed=8)
    b1 = (a.obs["batch"] == "batch_1").to_numpy()
    X = a.X.toarray()
    X[np.ix_(b1, np.arange(0, 100, 3))] *= 4  # a third of the genes 4-fold up in batch_1
    a.X = sp.csr_matrix(X)
    setup(a)
    acc, types = {}, {}
    for adversarial in (False, True):
        model = cellvi.TotalVI(a, n_latent=8)
        model.train(max_epochs=100, early_stopping=False, adversarial_classifier=adversarial, seed=0)
        z = model.get_latent_representation()
        acc[adversarial] = batch_accuracy(z, b1)
        types[adversarial] = batch_accuracy(z, a.obs["cell_type"].cat.codes.to_numpy())
    assert acc[True] < acc[False] - 0.05, acc
    assert types[True] > 0.9, types


def test_adversarial_default_rule_and_history():
    missing = setup(cellvi.datasets.simulate_citeseq(150, 30, 12, missing_proteins={"batch_1": [2]}, seed=4))
    complete = setup(cellvi.datasets.simulate_citeseq(150, 30, 12, seed=4))
    key = "adversarial_classifier_loss_train"

    def trained_with(a, override_missing_proteins=False, **kwargs):
        model = cellvi.TotalVI(a, n_latent=4, override_missing_proteins=override_missing_proteins)
        model.train(max_epochs=2, early_stopping=False, **kwargs)
        return key in model.history_, model

    on, model = trained_with(missing)  # default None: on, as a protein is missing from batch_1's panel
    assert on and len(model.history_[key]) == 2 and all(0 < v < 5 for v in model.history_[key])
    assert model.history_["train_loss"][0] > 0 and not any(k.startswith("z_") for k in model.history_)
    assert not trained_with(complete)[0]  # every protein measured everywhere: off
    assert not trained_with(missing, override_missing_proteins=True)[0]  # panels overridden: off
    assert not trained_with(missing, adversarial_classifier=False)[0]
    assert trained_with(complete, adversarial_classifier=True)[0]
    single = setup(cellvi.datasets.simulate_citeseq(150, 30, 12, n_batches=1, seed=4))
    with pytest.warns(UserWarning, match="single batch"):
        assert not trained_with(single, adversarial_classifier=True)[0]


def test_adversary_weight_and_fool_loss_by_hand():
    from cellvi.train import Adversary, fool_cross_entropy

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    labels = torch.tensor([0, 2])
    expected = [-(np.log(0.25) + np.log(0.25)) / 2, -(np.log(0.1) + np.log(0.6)) / 2]
    torch.testing.assert_close(fool_cross_entropy(logits, labels), torch.tensor(expected, dtype=torch.float32))
    adv = Adversary(torch.nn.Identity(), None, "auto")
    assert adv.weight(0.25) == 0.75 and Adversary(torch.nn.Identity(), None, 0.3).weight(0.25) == 0.3


def test_adversary_state_is_checkpointed_and_resumes_exactly(tmp_path):
    a = setup(cellvi.datasets.simulate_citeseq(150, 30, 12, missing_proteins={"batch_1": [2]}, seed=4))
    full = cellvi.TotalVI(a, n_latent=4)
    full.train(max_epochs=4, early_stopping=False, seed=0)
    part = cellvi.TotalVI(a, n_latent=4)
    part.train(max_epochs=2, early_stopping=False, seed=0, checkpoint_dir=tmp_path / "ck")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ck" / "train_state.safetensors"))
    assert any(k.startswith("adversary.") for k in saved) and any(k.startswith("adversary_optimizer.") for k in saved)
    resumed = cellvi.TotalVI(a, n_latent=4)
    resumed.train(max_epochs=4, early_stopping=False, seed=0, resume_from=tmp_path / "ck")
    np.testing.assert_array_equal(resumed.get_latent_representation(), full.get_latent_representation())
    with pytest.raises(ValueError, match="with an adversarial classifier"):
        cellvi.TotalVI(a, n_latent=4).train(max_epochs=4, early_stopping=False, seed=0, resume_from=tmp_path / "ck",
                                             adversarial_classifier=False)


# --------------------------------------------------------------------------- evaluation


def test_elbo_reconstruction_error_and_marginal_ll_match_the_loss(trained):
    idx = np.arange(40)
    model = trained.module
    torch.manual_seed(3)
    elbo = trained.get_elbo(indices=idx, batch_size=40, return_mean=False)
    torch.manual_seed(3)
    rec = trained.get_reconstruction_error(indices=idx, batch_size=40, return_mean=False)
    model.eval()
    b = trained._data().gather(torch.as_tensor(idx))
    with torch.no_grad():
        torch.manual_seed(3)
        out = model.loss(b, kl_weight=1.0)
        torch.manual_seed(3)
        terms = model.terms(b)
    assert elbo.shape == (40,) and isinstance(elbo, np.ndarray)
    np.testing.assert_allclose(elbo, -(out["reconstruction_loss"] + out["kl_local"]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(-elbo.mean(), float(out["loss"]), rtol=1e-5)  # the loss at kl_weight 1
    assert set(rec) == {"reconst_loss_gene", "reconst_loss_protein"}  # scvi-tools' keys
    for k in rec:
        np.testing.assert_allclose(rec[k], terms[k].numpy(), rtol=1e-6)
    np.testing.assert_allclose(rec["reconst_loss_gene"] + rec["reconst_loss_protein"],
                               out["reconstruction_loss"].numpy(), rtol=1e-5)
    assert isinstance(trained.get_elbo(indices=idx), float)
    assert all(isinstance(v, float) for v in trained.get_reconstruction_error(indices=idx).values())
    ll = trained.get_marginal_ll(indices=idx, n_mc_samples=150, return_mean=False)
    assert ll.shape == (40,) and np.isfinite(ll).all()
    assert isinstance(trained.get_marginal_ll(indices=idx, n_mc_samples=5), float)
    # one importance sample: E[log w] is the ELBO (same terms, KLs sampled instead of closed form); many: tighter
    torch.manual_seed(0)
    elbo_all = np.mean([trained.get_elbo() for _ in range(3)])
    ll_one = np.mean([trained.get_marginal_ll(n_mc_samples=1) for _ in range(3)])
    assert abs(ll_one - elbo_all) < 1.5, (ll_one, elbo_all)  # run-to-run sd ~0.5 nats
    assert trained.get_marginal_ll(n_mc_samples=100) > elbo_all + 3.0
    with pytest.raises(ValueError, match="No cells"):
        trained.get_elbo(indices=np.array([], dtype=int))
