"""Counts that stay on disk: minibatches read in chunks of rows from a backed .h5ad or a zarr store.

The in-memory :class:`~cellvi.data.loader.CountData` and :class:`BackedCountData` are the two
minibatch sources behind one contract, which is all a model or the training loop uses:

``n_obs``, ``n_vars``, ``device``       sizes and the device minibatches are put on
``batches(indices, batch_size, *, shuffle, generator, min_size)``   minibatch dicts (vocabulary in ``loader.py``)
``library_log_stats(n_batches)``        per-batch mean and variance of log library size

Shuffling out of core: the selected rows are cut into chunks of ``chunk_size`` consecutive rows
(contiguous reads), the chunk order is shuffled, and the cells of ``buffer_chunks`` chunks at a
time are shuffled together; memory is bounded by the buffer, not by the file. Without shuffling,
rows come back in the order asked for (inference). Row numbers are 64-bit throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import Tensor

from cellvi.data.loader import CountData, _to_csr, library_log_stats, obs_arrays
from cellvi.data.setup import DataSpec, check_compatible, get_counts, validate_counts

IN_MEMORY = (np.ndarray, sp.spmatrix, sp.sparray, pd.DataFrame)


def is_on_disk(X) -> bool:
    """Whether a count matrix is read lazily from disk (h5py/zarr array or anndata's backed sparse dataset)."""
    return X is not None and not isinstance(X, IN_MEMORY) and hasattr(X, "shape") and hasattr(X, "__getitem__")


def row_runs(rows: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Cover sorted ``rows`` with ``[start, stop)`` ranges, starting a new range at gaps wider than ``max_gap``.

    >>> row_runs(np.array([1, 2, 3, 10, 11, 500]), max_gap=16)
    [(1, 12), (500, 501)]
    """
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


def read_rows(X, rows: np.ndarray, max_gap: int = 256) -> sp.csr_matrix:
    """Rows ``rows`` (sorted, unique) of an on-disk matrix as float32 CSR, read as a few contiguous ranges."""
    parts = []
    for start, stop in row_runs(rows, max_gap):
        block = _to_csr(X[start:stop])
        parts.append(block[rows[(rows >= start) & (rows < stop)] - start])
    if not parts:
        return sp.csr_matrix((0, X.shape[1]), dtype=np.float32)
    return sp.vstack(parts, format="csr", dtype=np.float32)


def iter_row_chunks(X, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    """``(start, CSR block)`` over all rows of an on-disk matrix, ``chunk_size`` rows at a time."""
    for start in range(0, X.shape[0], chunk_size):
        yield start, _to_csr(X[start : start + chunk_size])


def validate_on_disk(X, where: str, obs_names: pd.Index, chunk_size: int = 8192) -> np.ndarray:
    """:func:`~cellvi.data.setup.validate_counts` chunk by chunk; returns the total counts of each cell."""
    totals = np.empty(X.shape[0], dtype=np.float64)
    for start, block in iter_row_chunks(X, chunk_size):
        validate_counts(block, where, obs_names[start : start + block.shape[0]])
        totals[start : start + block.shape[0]] = np.asarray(block.sum(1)).ravel()
    return totals


class BackedCountData:
    """The minibatch source of an AnnData whose counts stay on disk (see the module docstring)."""

    def __init__(self, adata: AnnData, spec: DataSpec, device: str | torch.device = "cpu", *,
                 chunk_size: int = 1024, buffer_chunks: int = 16):
        check_compatible(spec, adata)
        self.X = get_counts(adata, spec.layer)
        if not is_on_disk(self.X):
            raise ValueError("BackedCountData reads counts from disk; this AnnData holds them in memory "
                             "(use CountData).")
        where = "adata.X" if spec.layer is None else f"adata.layers[{spec.layer!r}]"
        self.n_obs, self.n_vars = self.X.shape
        self.device = torch.device(device)
        self.chunk_size, self.buffer_chunks = int(chunk_size), int(buffer_chunks)
        self.obs = obs_arrays(adata, spec)
        self.totals = torch.as_tensor(validate_on_disk(self.X, where, adata.obs_names), dtype=torch.float32)

    def __len__(self) -> int:
        return self.n_obs

    def row_sums(self) -> Tensor:
        """Total counts per cell, shape ``(n_obs,)`` (computed in the validation pass)."""
        return self.totals

    def library_log_stats(self, n_batches: int) -> tuple[Tensor, Tensor]:
        return library_log_stats(self.totals, torch.as_tensor(self.obs["batch"]), n_batches)

    def _part(self, rows: np.ndarray) -> tuple[CountData, np.ndarray]:
        """An in-memory CountData of the (unique, sorted) rows needed, and each row's position in it."""
        needed = np.unique(rows)
        part = CountData.from_parts(read_rows(self.X, needed), {k: v[needed] for k, v in self.obs.items()}, needed,
                                    self.device)
        return part, np.searchsorted(needed, rows)

    def gather(self, idx: Tensor) -> dict[str, Tensor]:
        """The minibatch of rows ``idx`` in that order (a random read: prefer :meth:`batches`)."""
        part, local = self._part(np.asarray(idx.cpu(), dtype=np.int64))
        return part.gather(torch.as_tensor(local, device=self.device))

    def _windows(self, idx: np.ndarray, shuffle: bool, generator: torch.Generator | None) -> Iterator[np.ndarray]:
        """Rows in the order minibatches take them, one buffer at a time."""
        window = self.chunk_size * self.buffer_chunks
        if not shuffle:
            for start in range(0, idx.size, window):
                yield idx[start : start + window]
            return
        idx = np.sort(idx)
        n_chunks = -(-idx.size // self.chunk_size)
        order = torch.randperm(n_chunks, generator=generator).numpy()
        for start in range(0, n_chunks, self.buffer_chunks):
            rows = np.concatenate([idx[c * self.chunk_size : (c + 1) * self.chunk_size]
                                   for c in order[start : start + self.buffer_chunks]])
            yield rows[torch.randperm(rows.size, generator=generator).numpy()]

    def batches(self, indices, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                min_size: int = 1) -> Iterator[dict[str, Tensor]]:
        """Minibatches over ``indices`` (global rows), ``batch_size`` cells each; a last batch smaller than
        ``min_size`` is skipped. Cells left over at the end of a buffer start the next one."""
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        carry = np.zeros(0, dtype=np.int64)
        for window in self._windows(idx, shuffle, generator):
            rows = np.concatenate([carry, window])
            n_full = rows.size // batch_size * batch_size
            rows, carry = rows[:n_full], rows[n_full:]
            if rows.size:
                part, local = self._part(rows)
                local = torch.as_tensor(local, device=self.device)
                for start in range(0, rows.size, batch_size):
                    yield part.gather(local[start : start + batch_size])
        if carry.size >= min_size and carry.size:
            part, local = self._part(carry)
            yield part.gather(torch.as_tensor(local, device=self.device))


def read_zarr_backed(path: str | Path) -> AnnData:
    """An AnnData of a zarr store with ``obs``/``var`` in memory and the counts (``X`` and layers) left on disk.

    Train and run inference on it as on an in-memory AnnData; minibatches are read in chunks.
    """
    import zarr
    from anndata.io import read_elem, sparse_dataset

    try:
        group = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several error types for a missing or malformed store
        raise ValueError(f"{path} cannot be opened as a zarr store ({err}).") from err
    if "X" not in group and "layers" not in group:
        raise ValueError(f"The zarr store {path} holds no counts (neither X nor layers); write it with "
                         "adata.write_zarr(path).")

    def lazy(elem):
        return sparse_dataset(elem) if isinstance(elem, zarr.Group) else elem

    adata = anndata.AnnData(X=lazy(group["X"]) if "X" in group else None, obs=read_elem(group["obs"]),
                            var=read_elem(group["var"]), uns=read_elem(group["uns"]) if "uns" in group else None)
    for name in group["layers"] if "layers" in group else []:
        adata.layers[name] = lazy(group["layers"][name])
    return adata
