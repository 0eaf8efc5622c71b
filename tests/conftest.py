from pathlib import Path

import numpy as np
import pytest

import cellvi

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _quiet():
    cellvi.settings.progress_bar = False
    cellvi.settings.seed = 0
    yield


@pytest.fixture
def small_adata():
    """600 cells x 120 genes, 2 batches, 3 cell types."""
    return cellvi.datasets.simulate(600, 120, n_cell_types=3, seed=1)


@pytest.fixture(scope="session")
def trained_scvi():
    """An SCVI trained briefly on simulated data; shared by read-only tests."""
    cellvi.settings.progress_bar = False
    adata = cellvi.datasets.simulate(800, 150, n_cell_types=3, seed=2)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata, n_latent=5)
    model.train(max_epochs=15, seed=0)
    return model


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def silhouette(x: np.ndarray, labels) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(x, np.asarray(labels).astype(str)))


@pytest.fixture
def gather_ahead(monkeypatch):
    """``gather_ahead(on)`` makes ``fit`` gather the next minibatch in a background thread or in line, whatever
    the machine's cores; ``gather_ahead.epochs`` counts the epochs it gathered ahead (calls of ``prefetched``)."""
    import cellvi.train

    original = cellvi.train.prefetched

    def switch(on: bool) -> None:
        monkeypatch.setattr(cellvi.train, "spare_core", lambda: on)

    def counted(batches):
        switch.epochs += 1
        return original(batches)

    switch.epochs = 0
    monkeypatch.setattr(cellvi.train, "prefetched", counted)
    return switch
