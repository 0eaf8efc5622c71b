import numpy as np
import pytest
import torch
from torch import nn

from cellvi.train import Adam, TrainConfig, fit, kl_weight, make_optimizer, make_train_config


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
    assert {"elbo_train", "reconstruction_loss_train", "kl_local_train", "train_loss"} <= set(h)


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


class _Recorder(nn.Module):
    """rec = (w - t)^2 per cell plus a constant KL of 1 per cell; records the KL weight of each call."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.scale, self.weights = scale, []

    def loss(self, batch, kl_weight=1.0):
        self.weights.append(kl_weight)
        rec = self.scale * ((self.w - batch["t"]) ** 2).sum(-1)
        kl = torch.ones_like(rec)
        return {"loss": (rec + kl_weight * kl).mean(), "reconstruction_loss": rec, "kl_local": kl}


def test_step_based_kl_warmup_inside_fit():
    m = _Recorder()
    cfg = TrainConfig(max_epochs=3, n_epochs_kl_warmup=None, n_steps_kl_warmup=10, enable_progress_bar=False)
    fit(m, _batches, None, cfg, n_obs_train=20)  # 5 steps per epoch: weights 0, 0.1, ..., 0.9, then 1
    assert m.weights == pytest.approx([k / 10 for k in range(10)] + [1.0] * 5)


def test_validation_loss_uses_the_current_kl_weight():
    m = _Recorder()
    cfg = TrainConfig(max_epochs=4, n_epochs_kl_warmup=4, check_val_every_n_epoch=1, enable_progress_bar=False)
    h = fit(m, _batches, _batches, cfg, n_obs_train=20, n_obs_val=20)
    assert h["kl_weight"] == [0.0, 0.25, 0.5, 0.75]
    # KL is 1 per cell: the validation loss is reconstruction + current weight; the ELBO always counts it fully
    np.testing.assert_allclose(np.subtract(h["validation_loss"], h["reconstruction_loss_validation"]), h["kl_weight"],
                               atol=1e-6)
    np.testing.assert_allclose(np.subtract(h["elbo_validation"], h["reconstruction_loss_validation"]), 1.0, atol=1e-6)


def test_adam_clipping_inside_the_kernel_matches_clip_grad_norm_then_torch_adam():
    """``Adam.step(max_grad_norm=c)`` gives the parameters of ``clip_grad_norm_(c)`` + ``torch.optim.Adam``, with
    the norm above the bound (clipped) and below it (untouched); eps is large so that the scale matters."""
    for scale, clipped in ((50.0, True), (0.01, False)):
        torch.manual_seed(0)
        a = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
        b, c = ([t.detach().clone().requires_grad_() for t in a] for _ in range(2))
        ours, ref = Adam(a, lr=1e-2, eps=1.0, weight_decay=1e-3), torch.optim.Adam(b, lr=1e-2, eps=1.0, weight_decay=1e-3)
        unclipped = Adam(c, lr=1e-2, eps=1.0, weight_decay=1e-3)
        for step in range(4):
            for params, opt in ((a, ours), (b, ref), (c, unclipped)):
                opt.zero_grad()
                (scale * ((params[0] ** 2).sum() * (step + 1) + params[1].sin().sum())).backward()
                if opt is ours:
                    opt.step(max_grad_norm=1.0)
                else:
                    if opt is ref:
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
        for x, y, z in zip(a, b, c):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
            assert (not torch.allclose(x, z, rtol=1e-4, atol=1e-5)) == clipped


def test_gradient_clipping_in_fit_reaches_both_optimizers(monkeypatch):
    """fit passes gradient_clip_val to the fused Adam; with torch.optim's Adam (no fused kernel) the gradients
    it steps on have norm <= gradient_clip_val."""
    import cellvi.train as train_mod

    seen, passed = [], []
    real = train_mod.make_optimizer

    def recording(params, config):
        params = list(params)
        opt = real(params, config)
        step = opt.step

        def step_and_record(**kwargs):
            passed.append(kwargs.get("max_grad_norm"))
            seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
            step(**kwargs)

        opt.step = step_and_record
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", recording)
    for clip in (None, 0.5):
        passed.clear()
        fit(_Recorder(scale=100.0), _batches, None, TrainConfig(max_epochs=2, lr=1e-3, gradient_clip_val=clip,
                                                                enable_progress_bar=False), n_obs_train=20)
        assert passed and set(passed) == {clip}
    monkeypatch.setattr(train_mod, "_fused_adam_runs_on", lambda device_type: False)
    for clip in (None, 0.5):
        seen.clear()
        fit(_Recorder(scale=100.0), _batches, None, TrainConfig(max_epochs=2, lr=1e-3, gradient_clip_val=clip,
                                                                enable_progress_bar=False), n_obs_train=20)
        if clip is None:
            assert max(seen) > 100  # gradient of 100 * (w - 1)^2 at w ~ 0 is ~200 per coordinate
        else:
            assert max(seen) <= clip * (1 + 1e-5)


def test_reduce_lr_on_plateau_lowers_the_learning_rate():
    cfg = TrainConfig(max_epochs=7, lr=0.5, reduce_lr_on_plateau=True, lr_patience=2, lr_factor=0.5,
                      lr_scheduler_metric="elbo_train", lr_min=0.1, enable_progress_bar=False)
    h = fit(_Recorder(scale=0.0), _batches, None, cfg, n_obs_train=20)  # a constant loss: it never improves
    # best at epoch 0, two epochs without improvement -> halve (from epoch 3 on), again (epoch 5), then the floor
    assert h["lr"] == [0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


def test_watched_validation_metric_without_validation_cells_is_refused():
    cfg = TrainConfig(max_epochs=3, early_stopping=True, enable_progress_bar=False)
    with pytest.raises(ValueError, match="validation set is empty"):
        fit(_Quadratic(), _batches, None, cfg, n_obs_train=20)
    with pytest.raises(ValueError, match="never logged"):
        TrainConfig(max_epochs=3, early_stopping=True, early_stopping_monitor="elbo_val")


def test_make_train_config_routes_and_refuses_names():
    cfg = make_train_config(max_epochs=5, early_stopping=False, plan_kwargs={"lr": 0.01, "n_epochs_kl_warmup": 7},
                            trainer_kwargs={"gradient_clip_val": 2.0, "log_every_n_steps": 5},
                            defaults={"lr": 2e-3, "optimizer": "AdamW"})
    assert (cfg.lr, cfg.n_epochs_kl_warmup, cfg.gradient_clip_val, cfg.optimizer) == (0.01, 7, 2.0, "AdamW")
    assert make_train_config(max_epochs=5, early_stopping=False, plan_kwargs=None,
                             trainer_kwargs={"lr": 0.02}).lr == 0.02  # plan options as keywords: a convenience
    with pytest.raises(ValueError, match="Unknown training option.*'lrate'"):
        make_train_config(max_epochs=5, early_stopping=False, plan_kwargs={"lrate": 1}, trainer_kwargs={})
    with pytest.raises(ValueError, match="given both"):
        make_train_config(max_epochs=5, early_stopping=False, plan_kwargs={"lr": 1}, trainer_kwargs={"lr": 2})
    with pytest.raises(ValueError, match="min_kl_weight"):
        make_train_config(max_epochs=5, early_stopping=False, plan_kwargs={"min_kl_weight": 2.0}, trainer_kwargs={})


def test_adamw_decouples_weight_decay():
    cfg = TrainConfig(max_epochs=1, optimizer="AdamW", lr=0.1, weight_decay=0.5)
    p = nn.Parameter(torch.ones(2))
    opt = make_optimizer([p], cfg)
    p.grad = torch.zeros(2)
    opt.step()  # zero gradient: AdamW still shrinks the weight by lr * wd; L2-Adam would not move it
    torch.testing.assert_close(p.detach(), torch.full((2,), 1 - 0.1 * 0.5))


def test_adam_falls_back_to_torch_optim_without_the_fused_kernel(monkeypatch):
    import cellvi.train as train_mod

    probe = train_mod._fused_adam_runs_on.__wrapped__  # uncached: does this torch have the CPU kernel?
    assert probe("cpu") == (tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 4))
    monkeypatch.setattr(train_mod, "_fused_adam_runs_on", lambda device_type: False)  # as on torch < 2.4 (CPU)
    opt = make_optimizer([nn.Parameter(torch.ones(2))], TrainConfig(max_epochs=1))
    assert isinstance(opt, torch.optim.Adam)
    h = fit(_Quadratic(), _batches, None, TrainConfig(max_epochs=20, lr=0.1, enable_progress_bar=False), n_obs_train=20)
    assert h["elbo_train"][-1] < 0.1 * h["elbo_train"][0]


def test_adam_state_round_trip_continues_identically():
    torch.manual_seed(0)
    a = [torch.randn(4, 3, requires_grad=True)]
    b = [a[0].detach().clone().requires_grad_()]
    first = Adam(a, lr=1e-2, eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        first.zero_grad()
        (a[0] ** 2).sum().backward()
        first.step()
    b[0].data.copy_(a[0].detach())
    second = Adam(b, lr=1e-2, eps=1e-8, weight_decay=0.0)
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    assert second.state_dict()["0.step"].item() == 3.0
    for params, opt in ((a, first), (b, second)):  # one more step from the same state: the same result
        opt.zero_grad()
        (params[0] ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_epoch_totals_fold_in_blocks_and_match_direct_sums():
    """Metrics are folded every FOLD_EVERY steps; the sums (and the per-cell loss weighting) equal direct ones."""
    from cellvi.train import _Totals

    g = torch.Generator().manual_seed(0)
    totals, rec_all, kl_all, loss_cells = _Totals(), [], [], 0.0
    for step in range(_Totals.FOLD_EVERY * 2 + 5):  # two folds and a remainder
        n = 7 if step % 3 else 4  # steps of different sizes
        rec, kl = torch.rand(n, generator=g), torch.rand(n, generator=g)
        loss = (rec + kl).mean()
        totals.add({"loss": loss, "reconstruction_loss": rec, "kl_local": kl, "z": torch.zeros(n, 2)})
        rec_all.append(rec), kl_all.append(kl)
        loss_cells += float(loss) * n
    sums = totals.sums()
    assert set(sums) == {"loss", "reconstruction_loss", "kl_local"}  # "z" is not a metric
    torch.testing.assert_close(sums["reconstruction_loss"], torch.cat(rec_all).sum())
    torch.testing.assert_close(sums["kl_local"], torch.cat(kl_all).sum())
    torch.testing.assert_close(float(sums["loss"]), loss_cells, rtol=1e-5, atol=1e-4)
    assert totals.n_steps == _Totals.FOLD_EVERY * 2 + 5 and totals.n_cells == sum(r.numel() for r in rec_all)


def test_adam_state_of_other_parameters_is_refused():
    a = Adam([torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)], lr=0.1, eps=1e-8, weight_decay=0)
    b = Adam([torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)], lr=0.1, eps=1e-8, weight_decay=0)
    with pytest.raises(ValueError, match="does not match this model's parameters"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        Adam([torch.zeros(3, requires_grad=True)], lr=0.1, eps=1e-8, weight_decay=0).load_state_dict(a.state_dict())


def test_adam_leaves_parameters_without_a_gradient_untouched_as_torch_optim_does():
    torch.manual_seed(1)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    ours, ref = Adam(a, lr=1e-2, eps=0.01, weight_decay=1e-3), torch.optim.Adam(b, lr=1e-2, eps=0.01, weight_decay=1e-3)
    for step in range(4):
        for params, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            # every other step the second parameter gets no gradient (its moments and step count must not move)
            loss = (params[0] ** 2).sum() + (params[1].sin().sum() if step % 2 == 0 else 0.0)
            loss.backward()
            opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert float(ours.steps[0]) == 4 and float(ours.steps[1]) == 2


def test_prefetched_gathers_in_a_background_thread_in_order_and_passes_errors_on():
    import threading

    from cellvi.train import prefetched

    gathered_in = []

    def source(n):
        for i in range(n):
            gathered_in.append(threading.current_thread().name)
            yield {"i": torch.tensor(i)}

    assert [b["i"].item() for b in prefetched(source(7))] == list(range(7))
    assert len(gathered_in) == 7 and all(name.startswith("cellvi-gather") for name in gathered_in)
    assert list(prefetched([])) == []

    def failing():
        yield {"i": torch.tensor(0)}
        raise ValueError("bad chunk")

    with pytest.raises(ValueError, match="bad chunk"):
        list(prefetched(failing()))
    early = prefetched(source(5))
    next(early)  # abandoned after one batch (an interrupted training), then closed
    assert any(t.name.startswith("cellvi-gather") for t in threading.enumerate())
    early.close()  # the pending gather is awaited and the thread ends: nothing leaks
    assert not any(t.name.startswith("cellvi-gather") for t in threading.enumerate())


def test_spare_core_compares_torch_threads_with_the_cores_of_this_process():
    from cellvi.distributed import available_cores
    from cellvi.train import spare_core

    cores, threads = available_cores(), torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not spare_core()
        torch.set_num_threads(1)
        assert spare_core() == (cores > 1)
    finally:
        torch.set_num_threads(threads)


def test_training_with_the_gather_ahead_is_identical_to_gathering_in_line(gather_ahead):
    import cellvi

    adata = cellvi.datasets.simulate(300, 60, seed=1)
    cellvi.SCVI.setup_anndata(adata, batch_key="batch")
    weights = {}
    for ahead in (False, True):
        gather_ahead(ahead)
        cellvi.settings.seed = 3
        model = cellvi.SCVI(adata, n_latent=4)
        model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
        weights[ahead] = torch.cat([p.detach().flatten() for p in model.module.parameters()])
        assert gather_ahead.epochs == (3 if ahead else 0)  # fit gathered ahead in every epoch exactly when told to
    assert torch.equal(weights[False], weights[True])
