"""Record what scvi-tools 1.4.2 returns for the calls of its SCVI, DE and contrastiveVI tutorials.

Run with a Python that has scvi-tools 1.4.2 (benchmark-only extra, never a cellvi dependency):

    python tests/data/make_scvi_tools_reference.py tests/data/scvi_tools_1.4.2_api.json

The data are cellvi's own simulator (written to h5ad by the cellvi environment first:
``python -c "import cellvi; cellvi.datasets.simulate(300, 60, n_cell_types=3, seed=0).write_h5ad('/tmp/ref.h5ad')"``).
Only names, types, shapes, dtypes and orderings are recorded, never values: tests/test_tutorial_replay.py
checks that cellvi gives the same structure for the same calls.
"""

import json
import sys

import anndata as ad
import numpy as np
import pandas as pd
import scvi


def describe(obj):
    """Structure of a result: type, shape, dtype, index/column names (not values)."""
    if isinstance(obj, pd.DataFrame):
        return {"type": "DataFrame", "shape": list(obj.shape), "columns": [str(c) for c in obj.columns],
                "dtypes": {str(c): str(t) for c, t in obj.dtypes.items()}, "index_name": obj.index.name}
    if isinstance(obj, dict):
        return {"type": "dict", "keys": sorted(obj), "values": {k: describe(v) for k, v in obj.items()}}
    if isinstance(obj, np.ndarray):
        return {"type": "ndarray", "shape": list(obj.shape), "dtype": str(obj.dtype)}
    if hasattr(obj, "todense"):
        return {"type": "sparse", "shape": list(obj.shape)}
    return {"type": type(obj).__name__}


def main(out: str) -> None:
    scvi.settings.seed = 0
    adata = ad.read_h5ad("/tmp/ref.h5ad")
    ref = {"scvi_tools_version": scvi.__version__}
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = scvi.model.SCVI(adata, n_latent=4)
    model.train(max_epochs=2, check_val_every_n_epoch=1)
    ref["history_keys"] = sorted(model.history)
    ref["history_elbo_train"] = describe(model.history["elbo_train"])
    ref["latent"] = describe(model.get_latent_representation())
    ref["latent_dist"] = [describe(a) for a in model.get_latent_representation(return_dist=True)]
    ref["normalized"] = describe(model.get_normalized_expression(library_size=1e4))
    genes = [adata.var_names[5], adata.var_names[2]]
    ref["normalized_gene_list_columns"] = list(model.get_normalized_expression(gene_list=genes).columns)
    ref["normalized_gene_list_asked"] = genes
    ref["normalized_samples"] = describe(model.get_normalized_expression(n_samples=3, return_mean=False))
    ref["normalized_batch_list"] = describe(model.get_normalized_expression(transform_batch=["batch_0", "batch_1"]))
    ref["pps"] = describe(model.posterior_predictive_sample())
    ref["pps_samples"] = describe(model.posterior_predictive_sample(n_samples=3))
    ref["elbo"] = describe(model.get_elbo())
    ref["reconstruction_error"] = describe(model.get_reconstruction_error())
    ref["marginal_ll"] = describe(model.get_marginal_ll(n_mc_samples=5))
    ref["de_vanilla"] = describe(model.differential_expression(groupby="cell_type", group1="type_0", group2="type_1"))
    change = model.differential_expression(groupby="cell_type", group1="type_0", group2="type_1", mode="change")
    ref["de_change"] = describe(change)
    ref["de_change_sorted_by"] = "proba_de" if change["proba_de"].is_monotonic_decreasing else "?"
    ovr = model.differential_expression(groupby="cell_type")
    ref["de_one_vs_rest"] = describe(ovr)
    ref["de_one_vs_rest_comparisons"] = sorted(ovr["comparison"].unique())
    ref["de_one_vs_rest_group1"] = sorted(map(str, ovr["group1"].unique()))
    ref["de_one_vs_rest_group2"] = sorted(map(str, ovr["group2"].unique()))

    adata2 = ad.read_h5ad("/tmp/ref.h5ad")
    scvi.external.ContrastiveVI.setup_anndata(adata2, batch_key="batch")
    cvi = scvi.external.ContrastiveVI(adata2, n_salient_latent=3, n_background_latent=4)
    bg = np.flatnonzero(adata2.obs["condition"] == "ctrl")
    tg = np.flatnonzero(adata2.obs["condition"] == "stim")
    cvi.train(bg, tg, max_epochs=2)
    ref["cvi_history_keys"] = sorted(cvi.history)
    ref["cvi_latent_salient"] = describe(cvi.get_latent_representation())
    ref["cvi_latent_background"] = describe(cvi.get_latent_representation(representation_kind="background"))
    ref["cvi_normalized"] = describe(cvi.get_normalized_expression())
    ref["cvi_salient_normalized"] = describe(cvi.get_salient_normalized_expression())
    ref["cvi_de"] = describe(cvi.differential_expression(groupby="cell_type", group1="type_0", group2="type_1"))
    with open(out, "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
