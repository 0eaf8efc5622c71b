import subprocess
import sys

import anndata as ad
import numpy as np

import cellvi
from cellvi.cli import main


def test_import_is_light():
    code = "import sys, cellvi; assert 'torch' not in sys.modules and 'anndata' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    assert cellvi.SCVI.__name__ == "SCVI"
    for name in ["setup_anndata", "train", "get_latent_representation", "get_normalized_expression", "get_elbo",
                 "get_reconstruction_error", "get_marginal_ll", "posterior_predictive_sample", "save", "load"]:
        assert callable(getattr(cellvi.SCVI, name))


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--n-cells", "300", "--n-genes", "80", "--max-epochs", "3", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "trained 3 epochs" in text and "silhouette of latent by cell_type" in text
    a = ad.read_h5ad(out / "adata.h5ad")
    assert a.obsm["X_scvi"].shape == (300, 10)
    assert (out / "training_curves.png").stat().st_size > 1000 and (out / "latent.png").stat().st_size > 1000
    m = cellvi.SCVI.load(out / "model", adata=a)
    np.testing.assert_allclose(m.get_latent_representation(), a.obsm["X_scvi"], rtol=1e-5, atol=1e-6)


def test_train_command_and_its_errors(tmp_path, capsys):
    a = cellvi.datasets.simulate(200, 60, seed=0)
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["train", str(tmp_path / "in.h5ad"), "--batch-key", "batch", "--max-epochs", "2",
                 "--out", str(tmp_path / "o"), "--no-progress", "--color", "cell_type"]) == 0
    assert (tmp_path / "o" / "latent.png").exists()
    assert main(["train", str(tmp_path / "in.h5ad"), "--layer", "nope", "--out", str(tmp_path / "o2"),
                 "--no-progress"]) == 2  # data errors (ValueError) print one line, exit 2, and write nothing
    assert "cellvi: error: Layer 'nope' not found in adata.layers" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
