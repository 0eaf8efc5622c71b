import pytest
import torch

from cellvi import nn as cnn


@pytest.mark.parametrize("shape", [(7, 5, 3), (64, 1030, 256), (256, 20, 1120)])
def test_onednn_linear_equals_mm(shape, monkeypatch):
    """Linear's oneDNN products (forward, gradients of input, weight and bias) give torch.mm's values."""
    if not cnn.onednn_available():
        pytest.skip("this PyTorch has no oneDNN linear")
    B, n_in, n_out = shape
    g = torch.Generator().manual_seed(0)
    layer = cnn.Linear(n_in, n_out)
    h = torch.randn(B, 2 * n_in, generator=g)[:, ::2]  # a strided input too
    upstream = torch.randn(B, n_out, generator=g)
    results = []
    for on in (True, False):
        monkeypatch.setattr(cnn, "_ONEDNN", [on])
        assert cnn.use_onednn(h, layer.weight) == on
        x = h.clone().requires_grad_()
        out = layer(x)
        grads = torch.autograd.grad(out, [x, layer.weight, layer.bias], upstream)
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_onednn_linear_only_for_float32_on_cpu():
    layer = cnn.Linear(4, 3).double()
    assert not cnn.use_onednn(torch.zeros(2, 4, dtype=torch.float64), layer.weight)
    out = layer(torch.ones(2, 4, dtype=torch.float64))  # the mm path
    torch.testing.assert_close(out, torch.ones(2, 4, dtype=torch.float64) @ layer.weight.t() + layer.bias)
    with torch.no_grad():  # no graph: mm (inference decodes many shapes; oneDNN would build a kernel for each)
        layer = cnn.Linear(4, 3)
        torch.testing.assert_close(layer(torch.ones(2, 4)), torch.ones(2, 4) @ layer.weight.t() + layer.bias)
    empty = torch.zeros(0, 4, requires_grad=True)  # an empty minibatch: the mm path
    layer = cnn.Linear(4, 3)
    layer(empty).sum().backward()
    assert layer.weight.grad.abs().sum() == 0


def test_small_products_take_addmm_and_large_ones_onednn(monkeypatch):
    """Below SMALL_PRODUCT multiply-adds a training layer calls addmm (oneDNN's fixed cost per call is larger
    there); above, oneDNN. Both give the same values."""
    if not cnn.onednn_available():
        pytest.skip("this PyTorch has no oneDNN linear")
    calls = []
    real = cnn._OneDNNLinear.apply
    monkeypatch.setattr(cnn._OneDNNLinear, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    small, large = cnn.Linear(128, 10), cnn.Linear(128, 4000)
    h = torch.randn(128, 128, requires_grad=True)
    out_small, out_large = small(h), large(h)
    assert 128 * 128 * 10 < cnn.SMALL_PRODUCT <= 128 * 128 * 4000
    assert calls == [torch.Size([128, 128])]  # the large layer only
    torch.testing.assert_close(out_small, h @ small.weight.t() + small.bias)
    torch.testing.assert_close(out_large, h @ large.weight.t() + large.bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_cols, width, block_bytes", [(300, 7, 2**21), (300, 7, 7 * 4 * 16), (3000, 4, 16)])
def test_binary_matmul_equals_the_dense_product(n_cols, width, block_bytes, monkeypatch):
    """``binary_matmul`` gives ``Y @ W`` and ``W``'s gradient ``Y^T @ grad`` from Y's ones alone: W read whole
    (fits the block size), by blocks of 16 rows, and by blocks of one row with more (block, row) keys than int16
    holds (the sort's wider key type); rows without ones give zeros."""
    monkeypatch.setattr(cnn, "BINARY_MATMUL_WHOLE_BYTES", block_bytes)
    monkeypatch.setattr(cnn, "BINARY_MATMUL_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(n_cols)
    n_rows = 20
    y = (torch.rand(n_rows, n_cols, generator=gen) < 0.1).float()
    y[3] = 0.0
    rows, cols = y.nonzero(as_tuple=True)
    w = torch.randn(n_cols, width, generator=gen, requires_grad=True)
    out = cnn.binary_matmul(w, rows, cols, n_rows)
    grad_out = torch.randn(n_rows, width, generator=gen)
    (grad_w,) = torch.autograd.grad(out, w, grad_out)
    torch.testing.assert_close(out, y @ w.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, y.t() @ grad_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[3], torch.zeros(width))
