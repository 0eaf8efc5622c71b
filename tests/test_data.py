import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.data import DataSpec, get_spec
from cellvi.data.loader import CountData, split_indices


def _adata(X, **obs):
    n = X.shape[0]
    return ad.AnnData(X, obs=pd.DataFrame(obs or {"b": ["x"] * n}, index=[f"c{i}" for i in range(n)]))


@pytest.mark.parametrize(
    "value, message",
    [(-1.0, "negative"), (0.5, "non-integer"), (np.nan, "NaN"), (np.inf, "infinite")],
)
@pytest.mark.parametrize("fmt", [np.asarray, sp.csr_matrix])
def test_bad_counts_are_rejected_with_a_clear_error(value, message, fmt):
    X = np.ones((5, 4), dtype=np.float32)
    X[2, 1] = value
    with pytest.raises(ValueError, match=message):
        cellvi.SCVI.setup_anndata(_adata(fmt(X)))


def test_count_checks_run_in_blocks_and_count_every_bad_entry(monkeypatch):
    """The in-memory checks go over the values in blocks (no data-sized temporaries) and still count them all."""
    from cellvi.data import setup

    monkeypatch.setattr(setup, "VALUES_CHUNK", 7)
    X = np.ones((10, 6), dtype=np.float32)
    X[[0, 4, 9], [1, 2, 5]] = 0.5  # in three different blocks of 7 entries
    with pytest.raises(ValueError, match=r"contains 3 non-integer values \(e.g. 0.5\)"):
        cellvi.SCVI.setup_anndata(_adata(sp.csr_matrix(X)))


def test_empty_cells_are_counted_and_named():
    X = np.ones((6, 3), dtype=np.float32)
    X[[1, 4]] = 0
    with pytest.raises(ValueError, match=r"2 cells have zero total counts.*c1, c4.*filter_cells"):
        cellvi.SCVI.setup_anndata(_adata(sp.csr_matrix(X)))


def test_missing_keys_and_layers():
    a = _adata(np.ones((4, 3), np.float32), b=["x", "y", "x", "y"], t=[1.0, np.nan, 2.0, 3.0])
    with pytest.raises(ValueError, match="'nope' is not a column of adata.obs"):
        cellvi.SCVI.setup_anndata(a, batch_key="nope")
    with pytest.raises(ValueError, match="Layer 'counts' not found"):
        cellvi.SCVI.setup_anndata(a, layer="counts")
    with pytest.raises(ValueError, match="'t'.*NaN"):
        cellvi.SCVI.setup_anndata(a, continuous_covariate_keys=["t"])
    with pytest.raises(ValueError, match="has not been set up"):
        cellvi.SCVI(_adata(np.ones((4, 3), np.float32)))


def test_setup_is_recorded_and_survives_h5ad(tmp_path, small_adata):
    before_x = small_adata.X.copy()
    before_obs = small_adata.obs.copy()
    cellvi.SCVI.setup_anndata(small_adata, batch_key="batch", labels_key="cell_type",
                              categorical_covariate_keys=["donor"])
    spec = get_spec(small_adata)
    assert spec.batch_categories == ("batch_0", "batch_1")
    assert spec.label_categories == ("type_0", "type_1", "type_2")
    assert spec.n_cats_per_cov == [4]
    assert spec.var_names == tuple(small_adata.var_names)
    assert DataSpec.from_json(spec.to_json()) == spec
    small_adata.write_h5ad(tmp_path / "a.h5ad")
    assert get_spec(ad.read_h5ad(tmp_path / "a.h5ad")) == spec
    # only the set-up record was added to the user's AnnData
    assert (small_adata.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(small_adata.obs, before_obs)
    assert list(small_adata.uns.keys()) == ["truth", "_cellvi_setup"]


@pytest.mark.parametrize("fmt", [np.asarray, sp.csr_matrix, sp.csc_matrix])
def test_minibatches_are_the_same_rows_for_dense_and_sparse(fmt, small_adata):
    dense = small_adata.X.toarray()
    a = ad.AnnData(fmt(dense), obs=small_adata.obs)
    cellvi.SCVI.setup_anndata(a, batch_key="batch")
    data = CountData(a, get_spec(a))
    idx = torch.tensor([5, 0, 599, 5, 17])
    batch = data.gather(idx)
    np.testing.assert_array_equal(batch["x"].numpy(), dense[idx.numpy()])
    np.testing.assert_array_equal(batch["batch"].numpy(), a.obs["batch"].cat.codes.to_numpy()[idx.numpy()])
    seen = torch.cat([b["index"] for b in data.batches(torch.arange(600), 128, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(600))


def test_unknown_category_in_new_data_is_an_error(small_adata):
    cellvi.SCVI.setup_anndata(small_adata, batch_key="batch")
    spec = get_spec(small_adata)
    query = small_adata[:10].copy()
    query.obs["batch"] = pd.Categorical(["batch_9"] * 10)
    with pytest.raises(ValueError, match=r"categories the model was not set up with: \['batch_9'\]"):
        CountData(query, spec)


def test_split_is_seeded_and_disjoint():
    t1, v1 = split_indices(100, 0.9, None, generator=torch.Generator().manual_seed(3))
    t2, v2 = split_indices(100, 0.9, None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and torch.equal(v1, v2)
    assert len(t1) == 90 and len(v1) == 10 and not set(t1.tolist()) & set(v1.tolist())
    with pytest.raises(ValueError, match="train_size"):
        split_indices(100, 1.5, None)


def test_split_sizes_follow_scvi_tools():
    t, v = split_indices(101, None, None)  # train_size None means 0.9: ceil(90.9) = 91 train, the rest validates
    assert (len(t), len(v)) == (91, 10)
    t, v = split_indices(101, 0.5, 0.25)  # validation_size: floor(25.25) = 25; 25 cells unused
    assert (len(t), len(v)) == (51, 25) and not set(t.tolist()) & set(v.tolist())
    t, v = split_indices(10, 0.7, 0.2, shuffle=False)  # in order: validation first, then training
    assert v.tolist() == [0, 1] and t.tolist() == list(range(2, 9))
    for train_size, validation_size in [(0.8, 0.3), (0.5, 1.0), (0.5, -0.1), (0.0, None)]:
        for shuffle in (True, False):
            with pytest.raises(ValueError, match="train_size|validation_size"):
                split_indices(10, train_size, validation_size, shuffle=shuffle)


def test_csr_positions_past_2_to_the_31_nonzeros():
    from cellvi.data.loader import csr_positions

    assert [t.tolist() for t in csr_positions(torch.tensor([0, 2, 2, 5]), torch.tensor([2, 0]))] == \
        [[0, 0, 0, 1, 1], [2, 3, 4, 0, 1]]
    # an atlas whose row pointers pass 2^31 (and 2^32): positions stay exact in int64, no wrap-around
    big = 2**31 + 5
    indptr = torch.tensor([0, big, big + 3, 2 * big, 2 * big + 2], dtype=torch.int64)
    rows, pos = csr_positions(indptr, torch.tensor([1, 3]))
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert pos.tolist() == [big, big + 1, big + 2, 2 * big, 2 * big + 1] and pos.dtype == torch.int64


def test_csr_stays_on_the_host_when_it_does_not_fit_the_gpu():
    from cellvi.data.loader import csr_storage

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert csr_storage(gpu, nbytes=4 * 2**30, free_bytes=80 * 2**30) == gpu  # fits: gathered on the GPU
    assert csr_storage(gpu, nbytes=60 * 2**30, free_bytes=80 * 2**30) == cpu  # > half the free memory: host
    assert csr_storage(cpu, nbytes=60 * 2**40, free_bytes=None) == cpu
