"""Replay the calls of scvi-tools' SCVI, DE and contrastiveVI tutorials with cellvi, and check that the
results have scvi-tools 1.4.2's structure: names, shapes, dtypes, index/column labels and orderings.

The reference (tests/data/scvi_tools_1.4.2_api.json, see tests/data/README.md) was recorded from scvi-tools
on the same simulated data. Differences kept on purpose are asserted here too, each with its reason.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cellvi

REF = json.loads((Path(__file__).parent / "data" / "scvi_tools_1.4.2_api.json").read_text())


def _kind(dtype: str) -> str:
    return {"float32": "f", "float64": "f", "bool": "b", "object": "O", "int64": "i"}.get(dtype, dtype)


def assert_like(ours, ref: dict, what: str) -> None:
    """``ours`` has the structure recorded in ``ref`` (type, shape, dtype kind, column names and order)."""
    if ref["type"] == "DataFrame":
        assert isinstance(ours, pd.DataFrame), what
        assert list(ours.shape) == ref["shape"], what
        shared = [c for c in ours.columns if c in ref["columns"]]
        assert shared == ref["columns"], f"{what}: columns {list(ours.columns)} vs scvi-tools {ref['columns']}"
        for col, dt in ref["dtypes"].items():
            if dt != "object" or ours[col].dtype == object:  # scvi-tools' object history column: we store floats
                assert _kind(str(ours[col].dtype)) == _kind(dt), f"{what}: {col} is {ours[col].dtype}, not {dt}"
    elif ref["type"] == "ndarray":
        assert isinstance(ours, np.ndarray) and list(ours.shape) == ref["shape"], what
        assert ours.dtype == np.dtype(ref["dtype"]), what
    elif ref["type"] == "sparse":
        assert hasattr(ours, "todense") and list(ours.shape) == ref["shape"], what
    elif ref["type"] == "dict":
        assert isinstance(ours, dict) and sorted(ours) == ref["keys"], what
        for key, sub in ref["values"].items():
            if "type" in sub and sub["type"] != "Tensor":
                assert_like(ours[key], sub, f"{what}[{key}]")


@pytest.fixture(scope="module")
def adata():
    return cellvi.datasets.simulate(300, 60, n_cell_types=3, seed=0)


@pytest.fixture(scope="module")
def scvi_model(adata):
    cellvi.settings.progress_bar = False
    a = adata.copy()
    cellvi.SCVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    model = cellvi.SCVI(a, n_latent=4)
    model.train(max_epochs=2, check_val_every_n_epoch=1)
    return model


def test_scvi_tutorial_calls(scvi_model):
    m, a = scvi_model, scvi_model.adata
    # history: every scvi-tools key, one row per epoch, an "epoch" index (cellvi adds kl_weight and lr)
    assert set(REF["history_keys"]) <= set(m.history)
    assert_like(m.history["elbo_train"], REF["history_elbo_train"], "history['elbo_train']")
    assert m.history["elbo_train"].index.name == "epoch"
    assert_like(m.get_latent_representation(), REF["latent"], "latent")
    for ours, ref in zip(m.get_latent_representation(return_dist=True), REF["latent_dist"]):
        assert_like(ours, ref, "latent (return_dist)")
    norm = m.get_normalized_expression(library_size=1e4)
    assert_like(norm, REF["normalized"], "normalized expression")
    assert list(norm.index) == list(a.obs_names) and list(norm.columns) == list(a.var_names)
    cols = m.get_normalized_expression(gene_list=REF["normalized_gene_list_asked"]).columns
    assert list(cols) == REF["normalized_gene_list_columns"]  # the model's gene order, not the list's
    assert_like(m.get_normalized_expression(n_samples=3, return_mean=False), REF["normalized_samples"], "n_samples")
    assert_like(m.get_normalized_expression(transform_batch=["batch_0", "batch_1"]), REF["normalized_batch_list"],
                "transform_batch list")
    assert_like(m.posterior_predictive_sample(), REF["pps"], "posterior_predictive_sample")
    assert_like(m.posterior_predictive_sample(n_samples=3), REF["pps_samples"], "posterior_predictive_sample(3)")
    # scvi-tools returns 0-d tensors for these; cellvi returns Python floats (same value, no torch needed)
    assert isinstance(m.get_elbo(), float) and isinstance(m.get_marginal_ll(n_mc_samples=5), float)
    assert sorted(m.get_reconstruction_error()) == REF["reconstruction_error"]["keys"]


def test_de_tutorial_calls(scvi_model):
    m = scvi_model
    vanilla = m.differential_expression(groupby="cell_type", group1="type_0", group2="type_1")
    assert_like(vanilla, REF["de_vanilla"] | {"shape": list(vanilla.shape)}, "DE vanilla")
    assert "is_de_fdr_0.05" not in vanilla  # vanilla proba_de is not a probability of a change
    assert vanilla["bayes_factor"].is_monotonic_decreasing
    change = m.differential_expression(groupby="cell_type", group1="type_0", group2="type_1", mode="change")
    assert_like(change, REF["de_change"] | {"shape": list(change.shape)}, "DE change")
    assert change["proba_de"].is_monotonic_decreasing and REF["de_change_sorted_by"] == "proba_de"
    assert change.shape[0] == m.adata.n_vars and set(change.index) == set(m.adata.var_names)
    ovr = m.differential_expression(groupby="cell_type")
    assert_like(ovr, REF["de_one_vs_rest"] | {"shape": list(ovr.shape)}, "DE one-vs-rest")
    assert sorted(ovr["comparison"].unique()) == REF["de_one_vs_rest_comparisons"]
    assert sorted(map(str, ovr["group1"].unique())) == REF["de_one_vs_rest_group1"]
    assert sorted(map(str, ovr["group2"].unique())) == REF["de_one_vs_rest_group2"]
    for _, table in ovr.groupby("comparison"):
        assert table["bayes_factor"].is_monotonic_decreasing and table.shape[0] == m.adata.n_vars


def test_contrastivevi_tutorial_calls(adata):
    a = adata.copy()
    cellvi.ContrastiveVI.setup_anndata(a, batch_key="batch")
    model = cellvi.ContrastiveVI(a, n_salient_latent=3, n_background_latent=4)
    bg = np.flatnonzero(a.obs["condition"] == "ctrl")
    tg = np.flatnonzero(a.obs["condition"] == "stim")
    model.train(bg, tg, max_epochs=2)
    # scvi-tools logs wasserstein_loss_sum_train; cellvi's penalty key is wasserstein_penalty_train (per cell)
    assert set(REF["cvi_history_keys"]) - {"wasserstein_loss_sum_train"} <= set(model.history)
    assert_like(model.get_latent_representation(), REF["cvi_latent_salient"], "salient latent")
    assert_like(model.get_latent_representation(representation_kind="background"), REF["cvi_latent_background"],
                "background latent")
    assert_like(model.get_normalized_expression(), REF["cvi_normalized"], "contrastiveVI expression")
    assert_like(model.get_salient_normalized_expression(), REF["cvi_salient_normalized"], "salient expression")
    de = model.differential_expression(groupby="cell_type", group1="type_0", group2="type_1")
    assert_like(de, REF["cvi_de"] | {"shape": list(de.shape)}, "contrastiveVI DE")  # change mode by default
    assert de["proba_de"].is_monotonic_decreasing
