"""Counts on disk (backed .h5ad, zarr): same minibatches, same results, memory bounded by the buffer."""

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.data.backed import BackedCountData, read_rows, read_zarr_backed, row_runs
from cellvi.data.loader import CountData


@pytest.fixture
def files(tmp_path):
    adata = cellvi.datasets.simulate(500, 60, n_cell_types=3, seed=4)
    adata.write_h5ad(tmp_path / "a.h5ad")
    dense = adata.copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    return adata, tmp_path


def test_row_runs_and_reads_by_hand():
    assert row_runs(np.array([1, 2, 3, 10, 11, 500]), max_gap=16) == [(1, 12), (500, 501)]
    assert row_runs(np.array([], dtype=np.int64), max_gap=4) == []
    X = sp.random(50, 7, density=0.3, format="csr", random_state=0, dtype=np.float32)
    rows = np.array([0, 3, 4, 40, 49])
    np.testing.assert_array_equal(read_rows(X, rows, max_gap=2).toarray(), X[rows].toarray())


@pytest.mark.parametrize("name", ["a.h5ad", "dense.h5ad"])
def test_backed_minibatches_equal_in_memory_ones(files, name):
    adata, path = files
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    backed = ad.read_h5ad(path / name, backed="r")
    cellvi.SCVI.setup_anndata(backed, batch_key="batch")
    mem = CountData(adata, cellvi.data.get_spec(adata))
    disk = BackedCountData(backed, cellvi.data.get_spec(backed), chunk_size=32, buffer_chunks=3)
    torch.testing.assert_close(disk.library_log_stats(2), mem.library_log_stats(2))
    order = np.random.default_rng(0).permutation(500)[:333]  # unsorted rows come back in the order asked
    got = list(disk.batches(order, 50))
    assert [b["x"].shape[0] for b in got] == [50] * 6 + [33]
    want = mem.gather(torch.as_tensor(order))
    for key in ("x", "batch", "index"):
        torch.testing.assert_close(torch.cat([b[key] for b in got]), want[key])
    # shuffled: every selected row exactly once, in a different order, full batches except the last
    g = torch.Generator().manual_seed(1)
    seen = torch.cat([b["index"] for b in disk.batches(order, 64, shuffle=True, generator=g, min_size=3)])
    assert sorted(seen.tolist()) == sorted(order.tolist()) and seen.tolist() != order.tolist()
    for b in disk.batches(order, 64, shuffle=True, generator=g):  # each cell's counts travel with it
        torch.testing.assert_close(b["x"], mem.gather(b["index"])["x"])


def test_training_from_disk_matches_in_memory_quality(files):
    adata, path = files
    cellvi.settings.progress_bar = False
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    mem = cellvi.SCVI(adata, n_latent=4)
    mem.train(max_epochs=12, seed=0)
    backed = ad.read_h5ad(path / "a.h5ad", backed="r")
    cellvi.SCVI.setup_anndata(backed, batch_key="batch")
    disk = cellvi.SCVI(backed, n_latent=4)
    disk.train(max_epochs=12, seed=0)
    assert disk.history_["elbo_train"][-1] == pytest.approx(mem.history_["elbo_train"][-1], rel=0.03)
    # inference on the backed AnnData gives exactly the in-memory answer for the same weights
    np.testing.assert_allclose(mem.get_latent_representation(adata=backed), mem.get_latent_representation(),
                               rtol=1e-5, atol=1e-6)
    held = np.arange(450, 500)
    assert disk.get_elbo(indices=held) == pytest.approx(mem.get_elbo(indices=held), rel=0.05)


def test_zarr_store_trains_and_bad_stores_are_refused(files, tmp_path):
    adata, _ = files
    with warnings.catch_warnings():  # anndata's notice about the zarr format version it writes by default
        warnings.simplefilter("ignore", UserWarning)
        adata.write_zarr(tmp_path / "a.zarr")
    lazy = read_zarr_backed(tmp_path / "a.zarr")
    assert not isinstance(lazy.X, (np.ndarray, sp.spmatrix))  # the counts stayed on disk
    cellvi.SCVI.setup_anndata(lazy, batch_key="batch")
    m = cellvi.SCVI(lazy, n_latent=3)
    m.train(max_epochs=2)
    assert m.get_latent_representation().shape == (500, 3)
    import zarr

    zarr.open_group(str(tmp_path / "nocounts.zarr"), mode="w")
    with pytest.raises(ValueError, match="holds no counts"):
        read_zarr_backed(tmp_path / "nocounts.zarr")


def test_bad_counts_on_disk_are_found_chunk_by_chunk(tmp_path):
    adata = cellvi.datasets.simulate(300, 20, seed=1)
    X = adata.X.toarray()
    X[250, 3] = 0.5  # in the last chunk only
    adata.X = sp.csr_matrix(X)
    adata.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    import cellvi.data.setup as setup

    setup.VALIDATION_CHUNK, old = 64, setup.VALIDATION_CHUNK
    try:
        with pytest.raises(ValueError, match="non-integer"):
            cellvi.SCVI.setup_anndata(backed)
    finally:
        setup.VALIDATION_CHUNK = old


def test_training_from_disk_with_the_gather_ahead_is_identical(files, gather_ahead):
    """The next minibatch read from the file in a background thread (a spare core): the same weights."""
    _, path = files
    weights = {}
    for ahead in (False, True):
        gather_ahead(ahead)
        backed = ad.read_h5ad(path / "a.h5ad", backed="r")
        cellvi.SCVI.setup_anndata(backed, batch_key="batch")
        model = cellvi.SCVI(backed, n_latent=4)
        model.train(max_epochs=2, seed=0, enable_progress_bar=False)
        weights[ahead] = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    assert gather_ahead.epochs == 2  # the second run's two epochs were gathered ahead
    assert torch.equal(weights[False], weights[True])
