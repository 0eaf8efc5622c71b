"""`cellvi train` (early stopping, latent figure) and `cellvi de`, on tiny simulated data."""

import importlib.util
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellvi
from cellvi.cli import _embed_2d, _stop_reason, main


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "in.h5ad"
    cellvi.datasets.simulate(240, 50, n_cell_types=3, seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def train_dir(h5ad, tmp_path_factory):
    """The output folder of `cellvi train` (3 epochs)."""
    out = tmp_path_factory.mktemp("train") / "out"
    assert main(["train", str(h5ad), "--batch-key", "batch", "--max-epochs", "3", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_stop_reason_says_why_training_ended():
    hist = {"elbo_train": [5.0] * 30, "elbo_validation": [9.0, 8.0, 7.0] + [7.5] * 27}
    assert _stop_reason(hist, early_stopping=False, patience=20, cap=30) == "ran the 30 epochs asked for (--max-epochs)"
    assert "did not improve for 27 epochs after its best (7.00) at epoch 3" in \
        _stop_reason(hist, early_stopping=True, patience=27, cap=400)
    assert "reached the cap of 30 epochs" in _stop_reason(hist, early_stopping=True, patience=28, cap=30)


def test_train_stops_early_without_max_epochs(h5ad, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", str(h5ad), "--batch-key", "batch", "--patience", "2", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    val = cellvi.SCVI.load(out / "model", adata=ad.read_h5ad(out / "adata.h5ad")).history_["elbo_validation"]
    best = int(np.argmin(val)) + 1
    assert len(val) == best + 2 < 400  # stopped 2 epochs after the best, before the cap
    assert f"trained {len(val)} epochs" in text
    assert f"stopped early: elbo_validation did not improve for 2 epochs after its best ({min(val):.2f}) at epoch {best}" \
        in text


def test_train_latent_figure_falls_back_to_pca(h5ad, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` raises ImportError
    drawn = {}
    embedding = cellvi.pl.embedding
    monkeypatch.setattr(cellvi.pl, "embedding", lambda *a, **k: drawn.update(k) or embedding(*a, **k))
    out = tmp_path / "o"
    assert main(["train", str(h5ad), "--batch-key", "batch", "--max-epochs", "2", "--color", "cell_type",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "trained 2 epochs" in text and "ran the 2 epochs asked for" in text
    assert "latent.png (PCA of the latent)" in text and (out / "latent.png").stat().st_size > 1000
    assert drawn["basis"] == "PCA" and "PCA" in drawn["title"]
    a = ad.read_h5ad(out / "adata.h5ad")
    np.testing.assert_allclose(np.abs(a.obsm["X_scvi_pca"]).sum(0) > 0, True)
    assert a.obsm["X_scvi_pca"].shape == (240, 2) and "X_scvi_umap" not in a.obsm


def test_embedding_figure_names_its_basis():
    fig = cellvi.pl.embedding(np.random.default_rng(0).normal(size=(20, 2)), {"t": pd.Series(["a", "b"] * 10)},
                              basis="UMAP", title="SCVI latent, UMAP")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("UMAP 1", "UMAP 2")
    assert fig._suptitle.get_text() == "SCVI latent, UMAP"
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.skipif(importlib.util.find_spec("umap") is None, reason="umap-learn not installed (pip install 'cellvi[umap]')")
def test_embed_2d_uses_umap_when_installed():
    z = np.random.default_rng(0).normal(size=(60, 4))
    coords, basis = _embed_2d(z)
    assert basis == "UMAP" and coords.shape == (60, 2) and np.isfinite(coords).all()


def test_train_errors_name_the_columns(h5ad, tmp_path, capsys):
    for option in ["--batch-key", "--color"]:
        with pytest.raises(SystemExit) as e:
            main(["train", str(h5ad), option, "nope", "--out", str(tmp_path / "o"), "--no-progress"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"{option} 'nope' is not a column" in err and "(columns: cell_type, batch, donor" in err
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path / "missing.h5ad")])
    assert "is not a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_de_reads_the_train_folder(train_dir, tmp_path, capsys):
    out = tmp_path / "de"
    assert main(["de", str(train_dir), "--groupby", "cell_type", "--group1", "type_0", "--group2", "type_1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    res = pd.read_csv(out / "de.csv", index_col="gene")
    assert len(res) == 50 and set(res.index) == {f"gene_{i}" for i in range(50)}
    assert (res["comparison"] == "type_0 vs type_1").all() and (res["delta"] == 0.25).all()
    n_calls = int(res["is_de_fdr_0.05"].sum())
    assert f"{n_calls} genes called at a posterior expected FDR of 0.05" in text
    assert (out / "volcano.png").stat().st_size > 1000
    # vanilla mode and another FDR target reach the engine
    assert main(["de", str(train_dir), "--groupby", "cell_type", "--group1", "type_2", "--mode", "vanilla",
                 "--fdr-target", "0.1", "--out", str(out)]) == 0
    res = pd.read_csv(out / "de.csv", index_col="gene")
    assert "proba_m1" in res.columns and (res["group2"] == "Rest").all()
    assert not any(c.startswith("is_de_fdr") for c in res.columns)  # no calls in vanilla mode, as scvi-tools
    assert "top genes by bayes_factor" in capsys.readouterr().out


def test_de_reads_a_model_folder_and_trains_on_an_h5ad(h5ad, trained_scvi, tmp_path, capsys):
    trained_scvi.save(tmp_path / "m", save_anndata=True)
    assert main(["de", str(tmp_path / "m"), "--groupby", "cell_type", "--group1", "type_1", "--delta", "auto",
                 "--out", str(tmp_path / "d1")]) == 0
    assert len(pd.read_csv(tmp_path / "d1" / "de.csv")) == trained_scvi.adata.n_vars
    capsys.readouterr()
    assert main(["de", str(h5ad), "--batch-key", "batch", "--max-epochs", "2", "--groupby", "cell_type",
                 "--group1", "type_1", "--out", str(tmp_path / "d2"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "trained 2 epochs" in text and "DE (change mode" in text
    for name in ["de.csv", "volcano.png", "adata.h5ad", "model/model.json", "latent.png"]:
        assert (tmp_path / "d2" / name).exists(), name


@pytest.mark.parametrize("args, message", [
    (["--groupby", "nope", "--group1", "a"], "--groupby 'nope' is not a column of"),
    (["--groupby", "cell_type", "--group1", "type_9"],
     "--group1 'type_9' is not a group of 'cell_type' (groups: type_0, type_1, type_2)"),
    (["--groupby", "cell_type", "--group1", "type_0", "--group2", "x"], "--group2 'x' is not a group of 'cell_type'"),
    (["--groupby", "cell_type", "--group1", "type_0", "--group2", "type_0"], "are the same group ('type_0')"),
    (["--groupby", "cell_type", "--group1", "type_0", "--delta", "big"], "--delta must be a number or 'auto'"),
    (["--groupby", "cell_type", "--group1", "type_0", "--fdr-target", "5"], "--fdr-target must be in (0, 1)"),
])
def test_de_errors_name_the_valid_options(train_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["de", str(train_dir), *args, "--out", str(tmp_path / "d")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: cellvi de")
    if "nope" in args:
        assert "cell_type" in err and "batch" in err
    assert not (tmp_path / "d").exists()


def test_de_refuses_a_folder_without_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["de", str(tmp_path), "--groupby", "cell_type", "--group1", "a"])
    assert "neither the output folder of `cellvi train`" in capsys.readouterr().err


def test_train_backed_with_checkpoint_then_resume(h5ad, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["train", str(h5ad), "--batch-key", "batch", "--backed", "--max-epochs", "2", "--checkpoint-dir",
                 str(ckpt), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert (ckpt / "train_state.json").exists()
    assert main(["train", str(h5ad), "--batch-key", "batch", "--backed", "--max-epochs", "4", "--resume-from",
                 str(ckpt), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "trained 4 epochs" in capsys.readouterr().out  # epochs 1-2 from the checkpoint, 3-4 trained now
    out = ad.read_h5ad(tmp_path / "b" / "adata.h5ad")
    assert out.obsm["X_scvi"].shape == (240, 10)
    with pytest.raises(SystemExit):
        main(["train", str(h5ad), "--resume-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit):
        main(["train", str(h5ad), "--devices", "two", "--out", str(tmp_path / "c")])
