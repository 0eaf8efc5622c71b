import gzip

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

import cellvi
from conftest import shared_file


def test_simulate_design_and_truth():
    a = cellvi.datasets.simulate(1000, 200, n_batches=2, n_donors_per_batch=3, seed=4)
    assert a.shape == (1000, 200)
    assert set(a.obs.columns) >= {"cell_type", "batch", "donor", "condition", "sample"}
    # donors are nested in batches; each donor has both conditions
    assert (a.obs.groupby("donor", observed=True)["batch"].nunique() == 1).all()
    assert a.obs["sample"].nunique() == 12
    assert a.var["de_type_0"].sum() == 16 and not a.var["de_type_1"].any()
    assert not (a.var["de_type_0"] & a.var["batch_gene"]).any()
    X = a.X.toarray()
    assert (X == np.round(X)).all() and (X.sum(1) > 0).all()
    # the abundance shift is visible: type_0 is enriched in stim
    frac = a.obs.groupby("condition", observed=True)["cell_type"].apply(lambda s: (s == "type_0").mean())
    assert frac["stim"] > 1.25 * frac["ctrl"]  # expected 1.6x (0.40 vs 0.25)
    # the DE genes move in the direction of the truth in type_0
    t0 = (a.obs["cell_type"] == "type_0").to_numpy()
    stim = (a.obs["condition"] == "stim").to_numpy()
    norm = X / X.sum(1, keepdims=True)
    obs_lfc = np.log2(norm[t0 & stim].mean(0) + 1e-6) - np.log2(norm[t0 & ~stim].mean(0) + 1e-6)
    de = a.var["de_type_0"].to_numpy()
    assert np.corrcoef(obs_lfc[de], a.var["true_lfc_type_0"].to_numpy()[de])[0, 1] > 0.8
    b = cellvi.datasets.simulate(1000, 200, n_batches=2, n_donors_per_batch=3, seed=4)
    assert (a.X != b.X).nnz == 0


def _write_10x_h5(path, X, genes, barcodes):
    csc = sp.csc_matrix(X.T)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = csc.data, csc.indices, csc.indptr, csc.shape
        g["barcodes"] = np.array(barcodes, dtype="S")
        feat = g.create_group("features")
        feat["name"] = np.array(genes, dtype="S")
        feat["id"] = np.array([f"ENSG{i}" for i in range(len(genes))], dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")


def test_read_10x_h5_and_mtx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, (7, 5)).astype(np.float32)
    genes, barcodes = [f"G{i}" for i in range(5)], [f"AAAC-{i}" for i in range(7)]
    _write_10x_h5(tmp_path / "m.h5", X, genes, barcodes)
    a = cellvi.datasets.read_10x_h5(tmp_path / "m.h5")
    np.testing.assert_array_equal(a.X.toarray(), X)
    assert list(a.var_names) == genes and list(a.obs_names) == barcodes
    folder = tmp_path / "mtx"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(X.T))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"ENSG{i}\t{g}\tGene Expression\n" for i, g in enumerate(genes))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{b}\n" for b in barcodes)
    b = cellvi.datasets.read_10x_mtx(folder)
    np.testing.assert_array_equal(b.X.toarray(), X)
    assert list(b.var_names) == genes and list(b.var["gene_ids"]) == [f"ENSG{i}" for i in range(5)]
    with pytest.raises(ValueError, match="No such file"):
        cellvi.datasets.read_10x_h5(tmp_path / "missing.h5")


@pytest.mark.realdata
def test_scvi_on_kang_small_integrates_donors():
    a = cellvi.datasets.read_h5ad(shared_file("kang_ifnb_pbmc_small.h5ad"))
    cellvi.SCVI.setup_anndata(a, batch_key="donor")
    m = cellvi.SCVI(a)
    m.train(max_epochs=10)
    z = m.get_latent_representation()
    from conftest import silhouette

    assert silhouette(z, a.obs["predicted_cell_type"]) > silhouette(z, a.obs["donor"])


def test_simulate_atac_by_blocks_of_cells_is_the_same_draw(monkeypatch):
    """The matrix drawn block by block (bounded memory at 50,000+ regions) is the one drawn whole, for a seed."""
    whole = cellvi.datasets.simulate_atac(300, 400, seed=4)
    monkeypatch.setattr(cellvi.datasets, "SIMULATE_BLOCK_ENTRIES", 1000)  # 2 cells per block
    blocks = cellvi.datasets.simulate_atac(300, 400, seed=4)
    assert (whole.X != blocks.X).nnz == 0 and whole.X.nnz > 0
    assert whole.var.equals(blocks.var) and whole.obs.equals(blocks.obs)
