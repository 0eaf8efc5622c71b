"""Checkpoints: a run killed with SIGKILL resumes from its training state and ends where an
uninterrupted run ends; checkpoints of other models or data are refused."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import cellvi

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    import cellvi
    import cellvi.models.base as base
    torch.set_num_threads(int(sys.argv[3]))
    cellvi.settings.progress_bar = False
    adata = cellvi.datasets.simulate(300, 50, n_cell_types=2, seed=3)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata, n_latent=3)
    save = base.save_state
    def save_then_die(state, directory, extra=None):
        save(state, directory, extra)
        if state.epoch == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # as a killed job: no clean-up, no finally
    base.save_state = save_then_die
    model.train(max_epochs=6, checkpoint_dir=sys.argv[1], seed=0, check_val_every_n_epoch=1)
""")


def _model():
    adata = cellvi.datasets.simulate(300, 50, n_cell_types=2, seed=3)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    return cellvi.SCVI(adata, n_latent=3)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), str(ckpt), "3", str(torch.get_num_threads())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed by SIGKILL after the epoch-3 checkpoint
    meta = json.loads((ckpt / "train_state.json").read_text())
    assert meta["epoch"] == 3 and len(meta["history"]["elbo_train"]) == 3
    assert not list(ckpt.glob("*.tmp"))  # written atomically

    resumed = _model()
    resumed.train(max_epochs=6, resume_from=ckpt, seed=0, check_val_every_n_epoch=1)
    full = _model()
    full.train(max_epochs=6, seed=0, check_val_every_n_epoch=1)
    for key in ("elbo_train", "elbo_validation", "kl_weight"):
        np.testing.assert_allclose(resumed.history_[key], full.history_[key], rtol=1e-5)
    np.testing.assert_allclose(resumed.get_latent_representation(), full.get_latent_representation(), rtol=1e-4,
                               atol=1e-5)


def test_checkpoint_of_other_model_or_data_is_refused(tmp_path):
    m = _model()
    m.train(max_epochs=2, checkpoint_dir=tmp_path / "a", seed=0)
    other = cellvi.SCVI(m.adata, n_latent=4)  # another config
    with pytest.raises(ValueError, match="another model, other data or another split.*config"):
        other.train(max_epochs=3, resume_from=tmp_path / "a", seed=0)
    same = _model()
    with pytest.raises(ValueError, match="train_indices"):
        same.train(max_epochs=3, resume_from=tmp_path / "a", seed=1)  # another seed: another split
    with pytest.raises(ValueError, match="holds no cellvi training checkpoint"):
        same.train(max_epochs=3, resume_from=tmp_path / "missing")
    (tmp_path / "a" / "train_state.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="damaged"):
        same.train(max_epochs=3, resume_from=tmp_path / "a", seed=0)


def test_resume_restores_optimizer_and_counters(tmp_path):
    m = _model()
    m.train(max_epochs=3, checkpoint_dir=tmp_path, checkpoint_every=2, seed=0, n_epochs_kl_warmup=4)
    meta = json.loads((Path(tmp_path) / "train_state.json").read_text())
    assert meta["epoch"] == 3 and meta["step"] == 3 * 3  # 270 training cells, batch 128: 3 steps per epoch
    again = _model()
    again.train(max_epochs=5, resume_from=tmp_path, seed=0, n_epochs_kl_warmup=4)
    assert again.history_["kl_weight"] == [0.0, 0.25, 0.5, 0.75, 1.0]  # warm-up continues from epoch 3
