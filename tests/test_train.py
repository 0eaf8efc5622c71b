import pytest
import torch
from torch import nn

from cellvi.train import Adam, TrainConfig, fit, kl_weight


def test_kl_weight_warms_up_linearly():
    assert kl_weight(0, 0, 400, None) == 0.0
    assert kl_weight(100, 0, 400, None) == 0.25
    assert kl_weight(400, 0, 400, None) == 1.0
    assert kl_weight(0, 50, None, 100) == 0.5
    assert kl_weight(3, 0, None, None) == 1.0


class _Quadratic(nn.Module):
    """loss = mean((w - target)^2) per cell; optionally NaN after some steps."""

    def __init__(self, nan_after=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.steps, self.nan_after = 0, nan_after

    def loss(self, batch, kl_weight=1.0):
        self.steps += 1
        rec = ((self.w - batch["t"]) ** 2).sum(-1)
        if self.nan_after is not None and self.steps > self.nan_after:
            rec = rec * float("nan")
        return {"loss": rec.mean(), "reconstruction_loss": rec, "kl_local": torch.zeros_like(rec)}


def _batches():
    return [{"t": torch.ones(4, 3)} for _ in range(5)]


def test_fit_decreases_the_loss_and_logs_scvi_keys():
    m = _Quadratic()
    h = fit(m, _batches, None, TrainConfig(max_epochs=20, lr=0.1, enable_progress_bar=False), n_obs_train=20)
    assert h["elbo_train"][-1] < 0.1 * h["elbo_train"][0]
    assert {"elbo_train", "reconstruction_loss_train", "kl_local_train", "train_loss_epoch"} <= set(h)


def test_nan_loss_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="diverged at epoch 1"):
        fit(_Quadratic(nan_after=7), _batches, None, TrainConfig(max_epochs=5, enable_progress_bar=False),
            n_obs_train=20)


def test_early_stopping_stops_when_validation_stalls():
    m = _Quadratic()
    cfg = TrainConfig(max_epochs=500, lr=0.5, early_stopping=True, early_stopping_patience=3,
                      early_stopping_min_delta=1e-3, enable_progress_bar=False)
    h = fit(m, _batches, _batches, cfg, n_obs_train=20, n_obs_val=20)
    assert len(h["elbo_train"]) < 100
    assert len(h["elbo_validation"]) == len(h["elbo_train"])


def test_adam_matches_torch_optim_adam():
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    ours = Adam(a, lr=1e-2, eps=0.01, weight_decay=1e-3)
    ref = torch.optim.Adam(b, lr=1e-2, eps=0.01, weight_decay=1e-3)
    for step in range(5):
        for params, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            loss = (params[0] ** 2).sum() * (step + 1) + params[1].sin().sum()
            loss.backward()
            opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
