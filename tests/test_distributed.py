"""Data-parallel training under torchrun (2 processes, gloo on the CPU) and its pure helpers."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import cellvi
from cellvi.distributed import GlobalBatchNorm1d, shard_rows

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    import cellvi
    torch.set_num_threads(1)
    cellvi.settings.progress_bar = False
    adata = cellvi.datasets.simulate(600, 60, n_cell_types=3, seed=5)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata, n_latent=4)
    seen = []
    loss = model.module.loss
    def recording_loss(batch, kl_weight=1.0):
        if model.module.training:
            seen.append(batch["index"].tolist())
        return loss(batch, kl_weight=kl_weight)
    model.module.loss = recording_loss
    model.train(max_epochs=6, batch_size=64, seed=0, check_val_every_n_epoch=1, accelerator="cpu",
                checkpoint_dir=sys.argv[1] + "/ckpt")
    rank = dist.get_rank()
    out = {"history": model.history_, "seen": seen, "world": dist.get_world_size(),
           "train": model.train_indices_.tolist(), "latent0": model.get_latent_representation()[:5].tolist()}
    json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
""")


def test_shard_rows_by_hand():
    perm = torch.arange(10)
    assert shard_rows(perm, 2, 0, 2).tolist() == [0, 1, 4, 5, 8]
    assert shard_rows(perm, 2, 1, 2).tolist() == [2, 3, 6, 7, 9]
    assert shard_rows(perm, 2, 1, 2, min_size=3).tolist() == [2, 3, 6, 7]  # tail of 1 per rank < min_size
    assert shard_rows(torch.arange(7), 4, 0, 2).tolist() == [0, 1, 2]  # no full global batch: 7 // 2 each


def test_global_batch_norm_equals_batch_norm_in_one_process():
    torch.manual_seed(0)
    bn, gbn = nn.BatchNorm1d(5), nn.BatchNorm1d(5)
    gbn.__class__ = GlobalBatchNorm1d
    x = torch.randn(16, 5) * 3 + 1
    torch.testing.assert_close(gbn(x), bn(x))  # no process group: plain BatchNorm


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_train_sharded_and_match_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # every epoch, the ranks see disjoint cells that together are all training cells (less a tiny tail)
    steps = len(r0["seen"]) // 6
    for epoch in range(6):
        a = {c for b in r0["seen"][epoch * steps : (epoch + 1) * steps] for c in b}
        b = {c for b in r1["seen"][epoch * steps : (epoch + 1) * steps] for c in b}
        assert not a & b and len(a | b) >= len(r0["train"]) - 2 and (a | b) <= set(r0["train"])
    # metrics are reduced: both ranks log the same history; weights stay identical
    np.testing.assert_allclose(r0["history"]["elbo_train"], r1["history"]["elbo_train"], rtol=1e-6)
    np.testing.assert_allclose(r0["latent0"], r1["latent0"], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "ckpt" / "train_state.json").exists()  # written by rank 0
    # one process with the global batch (2 x 64) follows the same loss curve, up to sampling noise
    cellvi.settings.progress_bar = False
    adata = cellvi.datasets.simulate(600, 60, n_cell_types=3, seed=5)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    single = cellvi.SCVI(adata, n_latent=4)
    single.train(max_epochs=6, batch_size=128, seed=0, check_val_every_n_epoch=1, accelerator="cpu")
    np.testing.assert_allclose(r0["history"]["elbo_train"], single.history_["elbo_train"], rtol=0.03)
    np.testing.assert_allclose(r0["history"]["elbo_validation"], single.history_["elbo_validation"], rtol=0.03)


def test_devices_n_launches_data_parallel_processes():
    cellvi.settings.progress_bar = False
    adata = cellvi.datasets.simulate(400, 40, n_cell_types=3, seed=6)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.SCVI(adata, n_latent=3)
    before = model.get_latent_representation()
    model.train(max_epochs=4, accelerator="cpu", devices=2, batch_size=64, check_val_every_n_epoch=1, seed=0)
    assert model.is_trained_ and len(model.history_["elbo_train"]) == 4
    assert not np.allclose(model.get_latent_representation(), before)  # the trained weights came back
    single = cellvi.SCVI(adata, n_latent=3)
    single.train(max_epochs=4, accelerator="cpu", batch_size=128, check_val_every_n_epoch=1, seed=0)
    np.testing.assert_allclose(model.history_["elbo_validation"], single.history_["elbo_validation"], rtol=0.03)
    assert np.array_equal(model.train_indices_, single.train_indices_)  # same seed, same split
    with pytest.raises(ValueError, match="positive count"):
        model.train(max_epochs=1, devices=0)
