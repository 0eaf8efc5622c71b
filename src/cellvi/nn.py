"""Network blocks shared by all models: an MLP with covariate injection and a Gaussian encoder.

Categorical covariates (batch, extra categories) are "injected" into a layer as if their one-hot
codes were concatenated to its input. ``W @ [h, onehot(c)] = W_h @ h + W_c[:, c]``, so each
covariate is a learned row per category added after the linear map: same function and
initialisation as a concatenated one-hot, without building the one-hot.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from cellvi.distributions import normal


class Linear(nn.Linear):
    """``nn.Linear`` computed as a matrix product then a broadcast add of the bias.

    Same parameters, initialisation and result (to float round-off). On CPU, float32, the products of
    forward and backward run on oneDNN (:class:`_OneDNNLinear`) where this PyTorch has it: MKL's
    ``sgemm``, what ``torch.mm`` calls, takes a generic AVX2 path on AMD processors, about half
    oneDNN's speed there. Otherwise ``mm`` then an in-place add of the bias: ``addmm`` (what
    ``nn.Linear`` calls) first copies the broadcast bias into the output with a slow strided copy
    (about as long as the product itself for a 128 x 4,000 output). Without gradients (expression,
    DE, latent) always ``mm``: those calls decode minibatches of many sizes, and oneDNN builds its kernel
    for each new shape on first use (~5 ms at 2,000 x 128 x 2,000), which cost a first DE call 50 %.
    Small products (under :data:`SMALL_PRODUCT` multiply-adds) always take ``nn.Linear``'s ``addmm``.
    """

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() != 2 or self.bias is None:
            return super().forward(h)
        # (the size test after is_compiling: traced, it would tie the compiled graph to one range of batch sizes)
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and h.shape[0] * self.weight.numel() >= SMALL_PRODUCT and use_onednn(h, self.weight)):
            return _OneDNNLinear.apply(h, self.weight, self.bias)
        return bias_mm(self.bias, h, self.weight.t())


# Products of fewer multiply-adds (rows x in x out) than this stay on ``addmm``: oneDNN costs 20-45 us per call
# whatever the size, ``addmm`` 7-11 us on the small layers of a 128-cell step (128 x 128 x 10, 128 x 10 x 128), and
# they are level at 128 x 128 x 128 (25 vs 28 us; 2 threads here).
SMALL_PRODUCT = 2**21


def bias_mm(bias: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``bias + a @ b``: ``addmm`` for small products (the least overhead per call), else ``mm`` then an in-place
    add (``addmm`` first copies the broadcast bias into its output; see :class:`Linear`). ``addmm`` in code that
    ``torch.compile`` traces: no test of the size there, so the compiled graph serves every minibatch size."""
    if torch.compiler.is_compiling() or a.shape[0] * b.numel() < SMALL_PRODUCT:
        return torch.addmm(bias, a, b)
    return torch.mm(a, b).add_(bias)


def _onednn_mm(a: Tensor, b_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b_t.T (+ bias)`` by oneDNN (``a`` and ``b_t`` 2-D float32 CPU tensors, any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch runs :func:`_onednn_mm` (built with oneDNN, op present) and it agrees with
    ``torch.mm`` on a small product: one tiny call, once."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(7, 5, generator=gen), torch.randn(3, 5, generator=gen)
        return bool(torch.allclose(_onednn_mm(a, b.t().contiguous().t()), a @ b.t(), atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_ONEDNN = [True]  # switch (tests compare both paths)


def use_onednn(h: Tensor, weight: Tensor) -> bool:
    """Products of a :class:`Linear` on oneDNN: CPU float32 and available (see :class:`Linear`); not in code that
    ``torch.compile`` traces (the autograd function would break its graph; inductor plans the products itself)."""
    return (_ONEDNN[0] and not torch.compiler.is_compiling() and h.device.type == "cpu"
            and h.dtype == torch.float32 and weight.dtype == torch.float32
            and h.numel() > 0 and weight.numel() > 0 and onednn_available())  # (no empty products: oneDNN refuses)


class _OneDNNLinear(torch.autograd.Function):
    """``h @ W.T + b`` with the three products (forward, gradient of ``h``, of ``W``) on oneDNN."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return _onednn_mm(h, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad
        grad = grad if grad.stride(-1) == 1 and grad.stride(0) >= grad.shape[-1] else grad.contiguous()
        return (_onednn_mm(grad, weight.t()) if need_h else None,
                _onednn_mm(grad.t(), h.t()) if need_w else None,  # (oneDNN copies the transposed grad first)
                grad.sum(0) if need_b else None)


class _BinaryMatmul(torch.autograd.Function):
    """``Y @ W`` for a 0/1 matrix ``Y`` (``n_rows x R``) given by its ones, and ``W`` (``R x H``); the gradient
    goes to ``W`` only (``Y`` is data). See :func:`binary_matmul`."""

    @staticmethod
    def forward(ctx, weight_t: Tensor, rows: Tensor, cols: Tensor, n_rows: int) -> Tensor:
        ctx.save_for_backward(rows, cols)
        ctx.n_cols = weight_t.shape[0]
        # W's rows summed per row of Y (detached: embedding_bag's forward-only kernel, no bookkeeping for its backward)
        w = weight_t.detach()
        row_bytes = max(w.stride(0) * w.element_size(), 1)
        if w.shape[0] * row_bytes <= BINARY_MATMUL_WHOLE_BYTES:
            return F.embedding_bag(cols, w, _bag_offsets(rows, n_rows), mode="sum")
        n_block = max(BINARY_MATMUL_BLOCK_BYTES // row_bytes, 1)  # rows of W per block
        # W larger than a cache: one bag per (block of W's rows, row of Y), so that consecutive bags read one block
        # of W (the ones regrouped by block, stable: a radix sort), then the blocks' partial sums added
        n_blocks = -(-w.shape[0] // n_block)
        key = torch.div(cols, n_block, rounding_mode="floor").mul_(n_rows).add_(rows)
        order = torch.argsort(key.to(_sort_dtype(n_blocks * n_rows)), stable=True)
        parts = F.embedding_bag(cols.index_select(0, order), w, _bag_offsets(key, n_blocks * n_rows), mode="sum")
        return parts.view(n_blocks, n_rows, -1).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, cols = ctx.saved_tensors
        # Y^T @ grad: the ones sorted by column (stable: a radix sort, the rows stay in order within a column),
        # then grad's rows summed per column of Y
        order = torch.argsort(cols.to(_sort_dtype(ctx.n_cols)), stable=True)
        offsets = _bag_offsets(cols, ctx.n_cols)
        grad_w = F.embedding_bag(rows.index_select(0, order), grad.contiguous(), offsets, mode="sum")
        return grad_w, None, None, None


# binary_matmul's forward reads a W of up to BINARY_MATMUL_WHOLE_BYTES in the order of Y's ones, a larger one by blocks
# of BINARY_MATMUL_BLOCK_BYTES of its rows (the sort by block costs ~3 us per 1,000 ones). Forward of 128 rows at
# ~10 % ones, 2 threads here: W 5,000 x 140 (2.8 MB) 0.31 ms whole, 0.7 ms by blocks; 20,000 x 282 (23 MB) 4.6 vs
# 5.2 ms; 30,000 x 346 (42 MB) 20.9 vs 12.3 ms; 50,000 x 446 (89 MB) 59 vs 20 ms; 100,000 x 632 (253 MB) 183 vs 50 ms.
BINARY_MATMUL_WHOLE_BYTES = 2**25
BINARY_MATMUL_BLOCK_BYTES = 2**22


def _sort_dtype(n_keys: int) -> torch.dtype:
    """The narrowest integer type for sort keys ``0 .. n_keys - 1``: radix sorts take a pass per byte."""
    return torch.int16 if n_keys <= torch.iinfo(torch.int16).max + 1 else torch.int32


def _bag_offsets(keys: Tensor, n_bags: int) -> Tensor:
    """Start of each bag when entries are grouped by ``keys`` in ``0 .. n_bags - 1`` (in ascending order)."""
    counts = torch.bincount(keys, minlength=n_bags)
    return counts.cumsum(0).sub_(counts)


def binary_matmul(weight_t: Tensor, rows: Tensor, cols: Tensor, n_rows: int) -> Tensor:
    """``Y @ weight_t`` for a 0/1 matrix ``Y`` of ``n_rows`` rows given by its ones at ``(rows, cols)`` (rows in
    ascending order, as :class:`~cellvi.distributions.Nonzeros` of a minibatch), without building ``Y``.

    Forward sums the rows of ``weight_t`` (``R x H``) at each row's ones (``embedding_bag``); backward gives
    ``weight_t`` the gradient ``Y^T @ grad`` the same way, over the ones sorted by column. Both cost
    ``nnz x H`` instead of the dense product's ``n_rows x R x H``: with 10 % ones, 128 x 5,000 x 140 takes
    0.84 ms forward + backward against 2.3 ms dense at 2 threads (1.6 against 4.9 ms at 1 thread). Dense
    wins above about 30 % ones (2 threads; 40 % at 1 thread). When ``weight_t`` is larger than a cache
    (:data:`BINARY_MATMUL_WHOLE_BYTES`), forward reads it by blocks of rows. No gradient for ``Y``.
    """
    return _BinaryMatmul.apply(weight_t, rows, cols, n_rows)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same distribution: each unit zeroed with probability ``p``, the rest scaled by
    ``1 / (1 - p)``) with the mask drawn from uniform floats: on the CPU that draw is vectorised,
    ``bernoulli_`` is not (115 vs 173 us for a 256 x 128 layer here)."""

    def forward(self, h: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return h
        return dropout(h, self.p)


def dropout(h: Tensor, p: float) -> Tensor:
    """Training-mode dropout of ``h`` with rate ``p`` (see :class:`Dropout`).

    The mask is ``floor(u + 1 - p)`` for uniform ``u``: 1 when ``u >= p`` (up to rounding within one float of
    ``p``), else 0, as floats. Not the comparison ``u >= p``: a compiled graph saves that comparison's boolean
    mask for backward, and writing booleans is slow in inductor's C++ kernels (MrVI's attention weights, 65,000
    per step: ~0.6 ms of a ~9 ms step; alone, compiled, 0.8-0.9 ms forward against 0.2 ms for this form).
    """
    keep = torch.rand_like(h).add_(1.0 - p).floor_().mul_(1.0 / (1.0 - p))
    return h * keep


class InjectedLinear(nn.Module):
    """``Linear([h, onehot(c_1), ..., onehot(c_k)])`` computed as ``Linear(h) + sum_j E_j[c_j]``."""

    def __init__(self, n_in: int, n_out: int, n_cats: list[int]):
        super().__init__()
        self.linear = Linear(n_in, n_out)
        self.n_cats = [n for n in n_cats if n > 1]  # a single category carries no information
        self.keep = [i for i, n in enumerate(n_cats) if n > 1]
        self.offsets = [sum(self.n_cats[:i]) for i in range(len(self.n_cats))]
        self.cat_weight = nn.Parameter(torch.empty(sum(self.n_cats), n_out)) if self.n_cats else None
        bound = 1.0 / math.sqrt(n_in + sum(self.n_cats))  # nn.Linear's default init, over the full input
        for p in [self.linear.weight, self.linear.bias] + ([self.cat_weight] if self.n_cats else []):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, h: Tensor, cats: list[Tensor]) -> Tensor:
        out = self.linear(h)
        for j, off in zip(self.keep, self.offsets):
            rows = cats[j] + off if off else cats[j]
            rows_weight = self.cat_weight.index_select(0, rows) if rows.dim() == 1 else self.cat_weight[rows]
            out = out.add_(rows_weight)  # in place: the linear map's output is not saved for its backward
        return out


class MLP(nn.Module):
    """``n_layers`` of Linear (+ injected covariates) -> BatchNorm -> ReLU -> Dropout.

    Parameters
    ----------
    n_in, n_out
        Input and output widths; hidden layers have width ``n_hidden``.
    n_cats
        Number of categories of each categorical covariate injected (empty: none).
    inject_all
        Inject covariates into every layer (scVI's decoder) or only the first.
    """

    def __init__(self, n_in: int, n_out: int, *, n_cats: list[int] = (), n_hidden: int = 128, n_layers: int = 1,
                 dropout_rate: float = 0.1, use_batch_norm: bool = True, use_layer_norm: bool = False,
                 inject_all: bool = True):
        super().__init__()
        dims = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.layers = nn.ModuleList(
            InjectedLinear(a, b, list(n_cats) if (i == 0 or inject_all) else []) for i, (a, b) in
            enumerate(zip(dims[:-1], dims[1:]))
        )
        self.post = nn.ModuleList(
            nn.Sequential(
                *([nn.BatchNorm1d(b, momentum=0.01, eps=1e-3)] if use_batch_norm else []),
                *([nn.LayerNorm(b, elementwise_affine=False)] if use_layer_norm else []),
                nn.ReLU(),
                *([Dropout(dropout_rate)] if dropout_rate > 0 else []),
            )
            for b in dims[1:]
        )

    def forward(self, h: Tensor, cats: list[Tensor] = ()) -> Tensor:
        for layer, post in zip(self.layers, self.post):
            h = post(layer(h, cats))
        return h


class GaussianEncoder(nn.Module):
    """``q(z | h) = Normal(mean, sqrt(exp(v) + 1e-4))`` from an MLP over the input."""

    def __init__(self, n_in: int, n_out: int, *, n_cats: list[int] = (), n_hidden: int = 128, n_layers: int = 1,
                 dropout_rate: float = 0.1, inject_all: bool = True, use_batch_norm: bool = True,
                 use_layer_norm: bool = False, var_eps: float = 1e-4):
        super().__init__()
        self.body = MLP(n_in, n_hidden, n_cats=n_cats, n_hidden=n_hidden, n_layers=n_layers,
                        dropout_rate=dropout_rate, inject_all=inject_all, use_batch_norm=use_batch_norm,
                        use_layer_norm=use_layer_norm)
        self.mean = Linear(n_hidden, n_out)
        self.log_var = Linear(n_hidden, n_out)
        self.var_eps = var_eps

    def forward(self, h: Tensor, cats: list[Tensor] = ()) -> Normal:
        q = self.body(h, cats)
        return normal(self.mean(q), torch.sqrt(torch.exp(self.log_var(q)) + self.var_eps))
