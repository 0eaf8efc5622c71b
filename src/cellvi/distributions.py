"""Count likelihoods: negative binomial (NB), zero-inflated NB (ZINB), Poisson.

Each is a small set of pure functions (``*_log_prob``) plus a thin class that holds the parameters
and offers ``log_prob`` / ``log_prob_sum`` / ``sample`` / ``mean`` / ``variance``.

``log_prob(x)`` is the plain, dense formula (one value per cell x gene). ``log_prob_sum(x)`` returns
the same quantity summed over genes, shape ``(cells,)``, but only evaluates the expensive terms
(``lgamma``) on the non-zero counts: with 85-96 % zeros in single-cell data this is where a training
step saves most of its likelihood time. Both are tested against ``scipy.stats``.

Parametrisation (as in scVI): ``mu`` is the mean, ``theta`` the inverse dispersion
(variance ``mu + mu**2 / theta``), ``zi_logits`` the logit of the zero-inflation probability.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8
S_UNDERFLOW = 1e-30  # below this, the ZINB zero term's one-log form has underflowed: use the softplus form

# --------------------------------------------------------------------------- compiled kernels (opt-in)

_COMPILED: dict = {}  # function -> its torch.compile'd version (or the function itself where compiling failed)
_USE_COMPILED = [False]


def kernel(fn, dynamic: bool = False, options: dict | None = None):
    """``fn`` itself, or its ``torch.compile``'d version inside :func:`compiled_kernels` (``True``).

    Large elementwise kernels go through here: compiling fuses their passes over the ``(cells, genes)``
    arrays (or over the non-zeros: ``dynamic=True``, their number changes every minibatch) into one; so
    does a model's whole network of many small ops (MrVI). ``options``: inductor's, as ``torch.compile``
    takes them. Where compilation fails (no C++ compiler, an old PyTorch) the eager function is used,
    once and for all, with a warning.
    """
    if not _USE_COMPILED[0]:
        return fn
    if fn not in _COMPILED:
        def first_call(*args, _fn=fn):
            try:
                compiled = torch.compile(_fn, dynamic=dynamic, options=options)
                out = compiled(*args)
            except Exception as err:  # any backend failure: stay eager
                import warnings

                warnings.warn(f"torch.compile of {_fn.__name__} failed ({type(err).__name__}); using eager "
                              "kernels.", RuntimeWarning, stacklevel=3)
                _COMPILED[_fn] = _fn
                return _fn(*args)
            _COMPILED[_fn] = compiled
            return out

        return first_call
    return _COMPILED[fn]


def compiling() -> bool:
    """Whether :func:`kernel` compiles (inside ``compiled_kernels(True)``)."""
    return _USE_COMPILED[0]


class compiled_kernels:
    """Context manager: use compiled likelihood kernels (``on=True``) or eager ones inside the block."""

    def __init__(self, on: bool):
        self.on, self.before = bool(on), None

    def __enter__(self):
        self.before, _USE_COMPILED[0] = _USE_COMPILED[0], self.on
        return self

    def __exit__(self, *exc):
        _USE_COMPILED[0] = self.before
        return False


def normal(loc: Tensor, scale: Tensor) -> torch.distributions.Normal:
    """A Normal without torch.distributions' per-construction argument checks (they cost a sync per step)."""
    return torch.distributions.Normal(loc, scale, validate_args=False)


def kl_standard_normal(q: torch.distributions.Normal) -> Tensor:
    """``KL(q || Normal(0, 1))`` elementwise, closed form: ``(mu^2 + sigma^2 - 1) / 2 - log sigma``."""
    return 0.5 * (q.loc.square() + q.scale.square() - 1.0) - torch.log(q.scale)


def nb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, eps: float = EPS) -> Tensor:
    """Negative binomial log-probability, elementwise.

    .. math::
        \\log p(x) = \\log\\Gamma(x+\\theta) - \\log\\Gamma(\\theta) - \\log\\Gamma(x+1)
        + \\theta \\log\\frac{\\theta}{\\theta+\\mu} + x \\log\\frac{\\mu}{\\theta+\\mu}
    """
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def zinb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor, eps: float = EPS) -> Tensor:
    """Zero-inflated NB log-probability, elementwise; ``sigmoid(zi_logits)`` is the extra zero mass.

    .. math::
        p(0) = \\pi + (1-\\pi)\\,\\mathrm{NB}(0), \\qquad p(x>0) = (1-\\pi)\\,\\mathrm{NB}(x)
    """
    nb0 = theta * (torch.log(theta + eps) - torch.log(theta + mu + eps))  # log NB(0)
    case_zero = F.softplus(nb0 - zi_logits) - F.softplus(-zi_logits)
    case_nonzero = -F.softplus(zi_logits) + nb_log_prob(x, mu, theta, eps)
    return torch.where(x > 0, case_nonzero, case_zero)


def poisson_log_prob(x: Tensor, rate: Tensor, eps: float = EPS) -> Tensor:
    """Poisson log-probability, elementwise: ``x log(rate) - rate - log(x!)``."""
    return x * torch.log(rate + eps) - rate - torch.lgamma(x + 1)


class Nonzeros(NamedTuple):
    """The non-zero entries of a dense ``(cells, genes)`` count block: row, column, value (1-D each)."""

    rows: Tensor
    cols: Tensor
    values: Tensor


def nonzeros(x: Tensor) -> Nonzeros:
    """Non-zero entries of ``x``, in row-major order (the minibatch loader provides them ready-made)."""
    rows, cols = torch.nonzero(x, as_tuple=True)
    return Nonzeros(rows, cols, x[rows, cols])


def log1p_dense(x: Tensor, nz: Nonzeros) -> Tensor:
    """``log1p(x)`` computed on the non-zeros only (``x`` is ``(cells, genes)``, ``nz`` its non-zeros)."""
    out = torch.zeros_like(x)
    out.view(-1).index_copy_(0, nz.rows * x.shape[1] + nz.cols, torch.log1p(nz.values))
    return out


def _row_sum_sparse(dense_zero_term: Tensor, correction: Tensor, rows: Tensor) -> Tensor:
    """Sum over genes of the zero-count term plus, at non-zero entries, (their term - the zero term)."""
    return dense_zero_term.sum(-1).index_add(0, rows, correction)


def digamma(z: Tensor) -> Tensor:
    r"""Digamma for z > 0 from plain arithmetic (``torch.digamma`` is not vectorised on CPU).

    .. math:: \psi(z) = \psi(z + 6) - \sum_{k=0}^{5} \frac{1}{z + k}, \quad
              \psi(w) \approx \log w - \frac{1}{2w} - \sum_{n=1}^{5} \frac{B_{2n}}{2n\, w^{2n}}

    Absolute error below 1e-10 (float64) for all z > 0.
    """
    shift = 1.0 / z
    for k in range(1, 6):
        shift = shift + 1.0 / (z + k)
    inv = 1.0 / (z + 6.0)
    inv2 = inv * inv
    tail = inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (1 / 240 - inv2 * (1 / 132)))))
    return torch.log(z + 6.0) - 0.5 * inv - tail - shift


def _zero_count_terms(mu: Tensor, theta: Tensor, log_theta: Tensor, logits: Tensor | None):
    """The x = 0 log-probability on every entry and its derivatives, in few elementwise passes.

    Returns ``(value, d/dmu, d/dtheta, d/dlogits, S)``, each shaped as ``mu`` (``d/dlogits`` and ``S``
    are None for NB). With ``t = theta + mu``: NB ``log NB(0) = theta (log theta - log t)``; ZINB
    ``log S`` with ``S = sigmoid(l) + sigmoid(-l) NB(0)`` (= softplus(nb0 - l) - softplus(-l), with one
    log and one exp instead of two softplus). Where ``S`` underflows (``S.min() <= 1e-30``) the caller
    uses :func:`_zero_count_terms_softplus` instead. No data-dependent branch: ``torch.compile`` fuses it.
    """
    t = mu + (theta + EPS)
    d = log_theta - torch.log(t)  # log theta - log t
    nb0 = d * theta
    w = theta / t  # -d nb0 / d mu
    if logits is None:
        return nb0, -w, d + theta / (theta + EPS) - w, None, None
    sn = torch.sigmoid(-logits)
    snr = torch.exp(nb0) * sn
    S = torch.sigmoid(logits) + snr
    a = snr / S  # sigmoid(nb0 - l): d value / d nb0
    return torch.log(S), -(w * a), (d + theta / (theta + EPS) - w) * a, sn - a, S


def _zero_terms_or_fallback(mu: Tensor, theta: Tensor, log_theta: Tensor, logits: Tensor | None):
    """:func:`_zero_count_terms` (through :func:`kernel`), or the softplus form where ``S`` underflowed."""
    value, grad_mu, grad_theta, grad_logits, S = kernel(_zero_count_terms)(mu, theta, log_theta, logits)
    if S is not None and not bool(S.min() > S_UNDERFLOW):
        value, grad_mu, grad_theta, grad_logits = _zero_count_terms_softplus(mu, theta, log_theta, logits)
    return value, grad_mu, grad_theta, grad_logits


def _zero_count_terms_softplus(mu: Tensor, theta: Tensor, log_theta: Tensor, logits: Tensor):
    """As :func:`_zero_count_terms` for ZINB, with softplus (no underflow; slower)."""
    t = mu + (theta + EPS)
    d = log_theta - torch.log(t)
    w = theta / t
    u = d * theta - logits
    a = torch.sigmoid(u)
    grad_theta = (d + theta / (theta + EPS) - w) * a
    return F.softplus(u) - F.softplus(-logits), -w * a, grad_theta, torch.sigmoid(-logits) - a


def _nonzero_correction(x, mu, theta, log_theta, lgamma_theta, digamma_theta, logits, lgamma=torch.lgamma):
    """At the non-zero counts ``x`` (1-D, with their ``mu``, ``theta``, ... gathered alongside):
    ``log p(x) - log p(0)`` and its derivatives w.r.t. mu, theta, logits (None for NB).

    ``log NB(x) - log NB(0) = x (log mu - log t) + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``; for
    ZINB the zero-inflation part adds ``-l - softplus(nb0 - l) + nb0`` = ``-softplus(l - nb0)``. ``lgamma``:
    ``torch.lgamma``, or :func:`lgamma_series` inside a compiled kernel.
    """
    t = mu + theta + EPS
    lt = torch.log(t)
    inv_t = 1.0 / t
    value = x * (torch.log(mu + EPS) - lt) + lgamma(x + theta) - lgamma_theta - lgamma(x + 1.0)
    grad_mu = x * (1.0 / (mu + EPS) - inv_t)
    grad_theta = digamma(x + theta) - digamma_theta - x * inv_t
    if logits is None:
        return value, grad_mu, grad_theta, None
    v = logits - theta * (log_theta - lt)  # l - nb0
    c = torch.sigmoid(v)  # d value / d nb0
    value = value - F.softplus(v)
    grad_mu = grad_mu - c * theta * inv_t
    grad_theta = grad_theta + c * (log_theta - lt + theta / (theta + EPS) - theta * inv_t)
    return value, grad_mu, grad_theta, -c


def nb_row_log_lik(mu: Tensor, theta: Tensor, logits: Tensor | None, nz: Nonzeros, need_grad: bool = True):
    """``sum_g log NB(x_g | mu, theta)`` (ZINB with ``logits``) per cell, and its derivatives.

    The x = 0 formula is evaluated on every entry (no ``lgamma``); the non-zero entries ``nz`` add
    their difference to it (``lgamma``/``digamma`` run there only, and on the gene vector when theta is
    per gene). Derivatives are computed in the same pass, where the intermediates are at hand.

    Parameters
    ----------
    mu
        Means, ``(cells, genes)``.
    theta
        Inverse dispersion, ``(genes,)`` or ``(cells, genes)``.
    logits
        Zero-inflation logits ``(cells, genes)``, or None (NB).
    nz
        Non-zero entries of the counts.
    need_grad
        Also return the derivatives (else they are None).

    Returns
    -------
    ``(value, d/dmu, d/dtheta, d/dlogits)``: value ``(cells,)``; derivatives of each cell's value with
    respect to its own entries, shaped as ``mu`` (``d/dlogits`` None for NB).
    """
    G = mu.shape[1]
    gene_theta = theta.dim() == 1
    flat = nz.rows * G + nz.cols
    log_theta = torch.log(theta + EPS)
    if gene_theta:
        th_nz, lth_nz = theta.index_select(0, nz.cols), log_theta.index_select(0, nz.cols)
        lgamma_theta = torch.lgamma(theta).index_select(0, nz.cols)
        digamma_theta = digamma(theta).index_select(0, nz.cols) if need_grad else None
    else:
        th_nz, lth_nz = theta.reshape(-1).index_select(0, flat), log_theta.reshape(-1).index_select(0, flat)
        lgamma_theta = torch.lgamma(th_nz)
        digamma_theta = digamma(th_nz) if need_grad else None
    value, grad_mu, grad_theta, grad_logits = _zero_terms_or_fallback(mu, theta, log_theta, logits)
    l_nz = None if logits is None else logits[nz.rows, nz.cols]  # logits may be a strided view: no copy
    nz_terms = _nonzero_correction(nz.values, mu.reshape(-1).index_select(0, flat), th_nz, lth_nz, lgamma_theta,
                                   digamma_theta if need_grad else torch.zeros_like(th_nz), l_nz)
    out = value.sum(-1).index_add_(0, nz.rows, nz_terms[0])
    if not need_grad:
        return out, None, None, None
    grad_mu.view(-1).index_add_(0, flat, nz_terms[1])
    if gene_theta:
        grad_theta = grad_theta.expand_as(mu).contiguous() if grad_theta.shape != mu.shape else grad_theta
    grad_theta.view(-1).index_add_(0, flat, nz_terms[2])
    if grad_logits is not None:
        grad_logits.view(-1).index_add_(0, flat, nz_terms[3])
    return out, grad_mu, grad_theta, grad_logits


class _NBRowLogLik(torch.autograd.Function):
    """:func:`nb_row_log_lik` as an autograd function: derivatives from the forward pass, scaled in backward."""

    @staticmethod
    def forward(ctx, mu, theta, logits, rows, cols, xv):
        out, grad_mu, grad_theta, grad_logits = nb_row_log_lik(mu, theta, logits, Nonzeros(rows, cols, xv))
        ctx.save_for_backward(grad_mu, grad_theta, grad_logits)
        ctx.gene_theta = theta.dim() == 1
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_mu, grad_theta, grad_logits = ctx.saved_tensors
        g = grad[:, None]  # (B, 1)
        # theta per gene: its derivative sums the cells' derivatives, weighted by their upstream gradient
        d_theta = torch.mv(grad_theta.t(), grad) if ctx.gene_theta else grad_theta * g
        return grad_mu * g, d_theta, None if grad_logits is None else grad_logits * g, None, None, None


_HALF_LOG_2PI = 0.9189385332046727


def lgamma_series(y: Tensor) -> Tensor:
    r"""``lgamma(y)`` for y > 0 from plain arithmetic, so that a compiled kernel vectorises it.

    Stirling's series at ``w = y`` (``w = y + 6`` below 7, undone with ``log(y (y+1) ... (y+5))``):
    :math:`\log\Gamma(w) \approx (w - \tfrac12)\log w - w + \tfrac12\log 2\pi + \sum_{n=1}^{4}
    \frac{B_{2n}}{2n(2n-1) w^{2n-1}}`. Absolute error below 1e-9 (float64) for all y > 0. In eager
    mode ``torch.lgamma`` is faster; this pays inside :func:`kernel`.
    """
    small = y < 7.0
    w = torch.where(small, y + 6.0, y)
    r = 1.0 / w
    r2 = r * r
    series = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 / 1680)))
    out = (w - 0.5) * torch.log(w) - w + _HALF_LOG_2PI + series
    shift = y * (y + 1.0) * (y + 2.0) * (y + 3.0) * (y + 4.0) * (y + 5.0)
    return torch.where(small, out - torch.log(shift), out)


def _zero_terms_from_logits(logits: Tensor, log_library: Tensor, theta: Tensor, log_theta: Tensor,
                            zero_inflated: bool):
    """Dense kernel of the fused likelihood: ``scale = softmax``, ``mu = exp(l) scale``, the x = 0 terms
    (:func:`_zero_count_terms`) and their row sums. ``logits`` is ``[scale logits | zero-inflation logits]``."""
    G = theta.shape[-1]
    scale = torch.softmax(logits[:, :G], -1)
    mu = torch.exp(log_library) * scale
    value, grad_mu, grad_theta, grad_zi, S = _zero_count_terms(mu, theta, log_theta, logits[:, G:] if zero_inflated
                                                               else None)
    return value.sum(-1), mu, scale, grad_mu, grad_theta, grad_zi, None if S is None else S.min()


def _nonzero_terms_from_logits(mu: Tensor, logits: Tensor, rows: Tensor, cols: Tensor, x: Tensor, theta: Tensor,
                               log_theta: Tensor, lgamma_theta: Tensor | None, digamma_theta: Tensor | None,
                               zero_inflated: bool, series: bool):
    """Non-zero kernel of the fused likelihood: gathers ``mu``, theta and the zero-inflation logit at the
    non-zeros ``(rows, cols, x)`` and returns their flat positions and :func:`_nonzero_correction`'s
    ``(value, d/dmu, d/dtheta, d/dlogit)`` there. Per-cell theta (``(cells, genes)``): its lgamma and digamma are
    computed here (``lgamma_theta`` None); per-gene theta: gathered from the given per-gene vectors.
    ``series``: lgamma as :func:`lgamma_series` (inside a compiled kernel) rather than ``torch.lgamma``."""
    G = mu.shape[1]
    flat = rows * G + cols
    # index_select, not advanced indexing: in eager mode a third of the time for these 1-D gathers
    mu_n = mu.reshape(-1).index_select(0, flat)
    if theta.dim() == 1:
        th_n, lth_n = theta.index_select(0, cols), log_theta.index_select(0, cols)
        lg_th, dg_th = lgamma_theta.index_select(0, cols), digamma_theta.index_select(0, cols)
    else:
        th_n, lth_n = theta.reshape(-1).index_select(0, flat), log_theta.reshape(-1).index_select(0, flat)
        lg_th = lgamma_series(th_n) if series else torch.lgamma(th_n)
        dg_th = digamma(th_n)
    l_n = None
    if zero_inflated:  # logits may be a column block of a wider matrix (TotalVI's heads): index by its row stride
        l_n = logits.reshape(-1)[rows * (2 * G) + G + cols] if logits.is_contiguous() else logits[rows, cols + G]
    return flat, *_nonzero_correction(x, mu_n, th_n, lth_n, lg_th, dg_th, l_n,
                                      lgamma_series if series else torch.lgamma)


def _logits_backward(grad_mu: Tensor, mu: Tensor, scale: Tensor, grad_zi: Tensor | None, g: Tensor,
                     extra: Tensor | None = None):
    """Derivatives w.r.t. ``[scale logits | zero-inflation logits]`` and the log library, from those w.r.t.
    ``mu`` and the zero-inflation logits, times the upstream per-cell gradient ``g`` ``(cells, 1)``: with
    ``q = d/dmu * mu``, ``d/dscale_logits = q - scale * sum(q)`` and ``d/dlog_library = sum(q)``. ``extra``:
    further columns appended to the logits' derivative (compiled, the concatenation is written in place)."""
    q = grad_mu * mu
    total = q.sum(-1, keepdim=True)
    parts = [(q - scale * total) * g] + ([] if grad_zi is None else [grad_zi * g]) + ([] if extra is None else [extra])
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0], total * g


def _logits_backward_eager(grad_mu: Tensor, mu: Tensor, scale: Tensor, grad_zi: Tensor | None, g: Tensor,
                           extra: Tensor | None = None):
    """:func:`_logits_backward` in eager mode: each block written in place into one output, no concatenation."""
    B, G = mu.shape
    n = G if grad_zi is None else 2 * G
    out = torch.empty(B, n + (0 if extra is None else extra.shape[-1]), dtype=mu.dtype, device=mu.device)
    q = grad_mu * mu
    total = q.sum(-1, keepdim=True)
    torch.mul(q.sub_(scale * total), g, out=out[:, :G])
    if grad_zi is not None:
        torch.mul(grad_zi, g, out=out[:, G:n])
    if extra is not None:
        out[:, n:] = extra
    return out, total * g


def nb_logits_forward(logits: Tensor, log_library: Tensor, theta: Tensor, nz: Nonzeros, zero_inflated: bool):
    """Forward pass of :class:`_NBFromLogits` on plain (detached) tensors: ``(value, saved)``, with ``value``
    the per-cell log-likelihood and ``saved`` what :func:`nb_logits_backward` needs. ``logits`` may be a
    column block of a wider matrix (a view with unit column stride): it is read, never copied."""
    log_theta = torch.log(theta + EPS)
    out, mu, scale, grad_mu, grad_theta, grad_zi, s_min = kernel(_zero_terms_from_logits)(
        logits, log_library, theta, log_theta, zero_inflated)
    if zero_inflated and not bool(s_min > S_UNDERFLOW):  # the one-log form underflowed somewhere
        G = theta.shape[-1]
        value, grad_mu, grad_theta, grad_zi = _zero_count_terms_softplus(mu, theta, log_theta, logits[:, G:])
        out = value.sum(-1)
    gene_theta = theta.dim() == 1
    # per-gene theta: its lgamma/digamma once per step over the genes (one op each: no series for a vector this short)
    lg_th, dg_th = (torch.lgamma(theta), torch.digamma(theta)) if gene_theta else (None, None)
    flat, value, g_mu, g_th, g_zi = kernel(_nonzero_terms_from_logits, dynamic=True)(
        mu, logits, nz.rows, nz.cols, nz.values, theta, log_theta, lg_th, dg_th, zero_inflated, _USE_COMPILED[0])
    out = out.index_add_(0, nz.rows, value)
    grad_mu.view(-1).index_add_(0, flat, g_mu)
    grad_theta.view(-1).index_add_(0, flat, g_th)
    if zero_inflated:
        grad_zi.view(-1).index_add_(0, flat, g_zi)
    return out, (grad_mu, mu, scale, grad_zi, grad_theta, gene_theta)


def nb_logits_backward(saved: tuple, grad: Tensor, extra: Tensor | None = None):
    """Backward pass of :class:`_NBFromLogits`: derivatives w.r.t. the logits block, the log library and theta,
    for the upstream per-cell gradient ``grad``. ``extra``: columns to append to the logits' derivative (the
    derivative of a wider block the logits are the first columns of), written in place, not concatenated."""
    grad_mu, mu, scale, grad_zi, grad_theta, gene_theta = saved
    g = grad[:, None]
    d_logits, d_lib = (kernel(_logits_backward) if compiling() else _logits_backward_eager)(
        grad_mu, mu, scale, grad_zi, g, extra)
    # theta per gene: its derivative sums the cells' derivatives, weighted by their upstream gradient
    d_theta = torch.mv(grad_theta.t(), grad) if gene_theta else grad_theta * g
    return d_logits, d_lib, d_theta


class _NBFromLogits(torch.autograd.Function):
    """``sum_g log NB(x | exp(l) softmax(h), theta[, zero-inflation logits])`` per cell, with ``logits`` the
    decoder's one output block ``[h | zero-inflation logits]``; its gradient is one block too (no split, no
    concatenation in autograd). Three kernels: dense (softmax, x = 0 terms, their derivatives), non-zeros
    (the correction, where lgamma/digamma run) and, in backward, the softmax derivative; each compiled for
    long runs (:func:`kernel`). Derivatives come from the forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, logits, log_library, theta, rows, cols, xv, zero_inflated):
        # the kernels see plain tensors (compiling them must not look at autograd attributes)
        out, saved = nb_logits_forward(logits.detach(), log_library.detach(), theta.detach(), Nonzeros(rows, cols, xv),
                                       zero_inflated)
        ctx.save_for_backward(*saved[:5])
        ctx.gene_theta = saved[5]
        return out

    @staticmethod
    def backward(ctx, grad):
        d_logits, d_lib, d_theta = nb_logits_backward((*ctx.saved_tensors, ctx.gene_theta), grad)
        return d_logits, d_lib, d_theta, None, None, None, None


class NegativeBinomial:
    """NB (``zi_logits=None``) or zero-inflated NB over a ``(cells, genes)`` matrix of counts.

    Parameters
    ----------
    mu
        Mean, shape ``(cells, genes)``.
    theta
        Inverse dispersion, broadcastable to ``mu`` (``(genes,)`` or ``(cells, genes)``).
    zi_logits
        Logits of the zero-inflation probability (ZINB), broadcastable to ``mu``; ``None`` for NB.
    scale
        Normalized expression (``mu`` divided by library size), kept for downstream use.
    """

    def __init__(self, mu: Tensor, theta: Tensor, zi_logits: Tensor | None = None, scale: Tensor | None = None):
        self._mu, self.theta, self.zi_logits, self._scale = mu, theta, zi_logits, scale
        self.logits = self.log_library = None

    @classmethod
    def from_logits(cls, logits: Tensor, log_library: Tensor, theta: Tensor,
                    zero_inflated: bool = False) -> NegativeBinomial:
        """scVI's decoder output: ``mu = exp(log_library) * softmax(h)``, computed only when read
        (:meth:`log_prob_sum` fuses the softmax into the likelihood instead).

        ``logits`` is ``h`` ``(cells, genes)``, or for ZINB (``zero_inflated=True``) one block
        ``[h | zero-inflation logits]`` ``(cells, 2 * genes)``, as one linear layer outputs them.
        """
        G = theta.shape[-1]
        if logits.shape[-1] != (2 * G if zero_inflated else G):
            raise ValueError(f"logits have {logits.shape[-1]} columns; expected {(2 if zero_inflated else 1) * G} "
                             f"for {G} genes ({'[scale | zero-inflation] logits' if zero_inflated else 'scale logits'}).")
        d = cls(None, theta, logits[:, G:] if zero_inflated else None)
        d.logits, d.log_library = logits, log_library
        return d

    @property
    def scale(self) -> Tensor | None:
        if self._scale is None and self.logits is not None:
            self._scale = torch.softmax(self.logits[:, : self.theta.shape[-1]], -1)
        return self._scale

    @property
    def mu(self) -> Tensor:
        if self._mu is None:
            self._mu = torch.exp(self.log_library) * self.scale
        return self._mu

    @property
    def mean(self) -> Tensor:
        if self.zi_logits is None:
            return self.mu
        return self.mu * torch.sigmoid(-self.zi_logits)

    @property
    def variance(self) -> Tensor:
        nb_var = self.mu + self.mu**2 / self.theta
        if self.zi_logits is None:
            return nb_var
        pi = torch.sigmoid(self.zi_logits)
        return (1 - pi) * (nb_var + pi * self.mu**2)

    def log_prob(self, x: Tensor) -> Tensor:
        if self.zi_logits is None:
            return nb_log_prob(x, self.mu, self.theta)
        return zinb_log_prob(x, self.mu, self.theta, self.zi_logits)

    def log_prob_sum(self, x: Tensor, nz: Nonzeros | None = None) -> Tensor:
        """``log_prob(x).sum(-1)``, shape ``(cells,)``, computed sparsely (see :class:`_NBRowLogLik`).

        ``nz`` are the non-zero entries of ``x`` when already known (the loader provides them).
        """
        nz = nonzeros(x) if nz is None else nz
        if not torch.is_grad_enabled():
            return nb_row_log_lik(self.mu, self.theta, self.zi_logits, nz, need_grad=False)[0]
        if self.logits is not None and self._mu is None:  # training: softmax fused with the likelihood
            return _NBFromLogits.apply(self.logits.contiguous(), self.log_library, self.theta, nz.rows, nz.cols,
                                       nz.values, self.zi_logits is not None)
        return _NBRowLogLik.apply(self.mu, self.theta, self.zi_logits, nz.rows, nz.cols, nz.values)

    @torch.no_grad()
    def sample(self, n: int | None = None) -> Tensor:
        """Counts drawn as Gamma-Poisson (and zeroed with probability ``sigmoid(zi_logits)``)."""
        mu, theta = self.mu, self.theta.expand_as(self.mu)
        if n is not None:
            mu, theta = mu.expand(n, *mu.shape), theta.expand(n, *theta.shape)
        rate = torch.distributions.Gamma(theta, theta / mu.clamp_min(EPS)).sample()
        counts = torch.poisson(rate)
        if self.zi_logits is not None:
            zero = torch.rand_like(counts) < torch.sigmoid(self.zi_logits).expand_as(counts)
            counts = counts.masked_fill(zero, 0.0)
        return counts


class Poisson:
    """Poisson over a ``(cells, genes)`` matrix, same interface as :class:`NegativeBinomial`."""

    def __init__(self, rate: Tensor, scale: Tensor | None = None):
        self.mu, self.scale = rate, scale

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def variance(self) -> Tensor:
        return self.mu

    def log_prob(self, x: Tensor) -> Tensor:
        return poisson_log_prob(x, self.mu)

    def log_prob_sum(self, x: Tensor, nz: Nonzeros | None = None) -> Tensor:
        """``log_prob(x).sum(-1)``: ``-rate`` everywhere, the rest on the non-zero counts only."""
        rows, cols, xv = nonzeros(x) if nz is None else nz
        extra = xv * torch.log(self.mu[rows, cols] + EPS) - torch.lgamma(xv + 1)
        return _row_sum_sparse(-self.mu, extra, rows)

    @torch.no_grad()
    def sample(self, n: int | None = None) -> Tensor:
        rate = self.mu if n is None else self.mu.expand(n, *self.mu.shape)
        return torch.poisson(rate)


# --------------------------------------------------------------------------- second modalities


def nb_mixture_log_prob(x: Tensor, mu1: Tensor, mu2: Tensor, theta: Tensor, mixture_logits: Tensor,
                        eps: float = EPS) -> Tensor:
    """Log-probability of a two-component NB mixture (totalVI's proteins), elementwise.

    .. math::
        p(x) = \\pi\\,\\mathrm{NB}(x; \\mu_1, \\theta) + (1 - \\pi)\\,\\mathrm{NB}(x; \\mu_2, \\theta),
        \\qquad \\pi = \\mathrm{sigmoid}(\\text{mixture\\_logits})

    computed as a log-sum-exp of the two log terms (``log sigmoid(l)``, ``log sigmoid(-l)``).
    """
    a = nb_log_prob(x, mu1, theta, eps) - F.softplus(-mixture_logits)  # log pi + log NB_1
    b = nb_log_prob(x, mu2, theta, eps) - F.softplus(mixture_logits)  # log (1 - pi) + log NB_2
    return torch.logaddexp(a, b)


class NegativeBinomialMixture:
    """Background/foreground NB mixture over a ``(cells, proteins)`` matrix (Gayoso et al., 2021).

    Parameters
    ----------
    mu1
        Mean of the first component (totalVI: background), shape ``(cells, proteins)``.
    mu2
        Mean of the second component (foreground), same shape.
    theta
        Inverse dispersion shared by both components, broadcastable to ``mu1``.
    mixture_logits
        Logit of the probability of the first component.
    """

    def __init__(self, mu1: Tensor, mu2: Tensor, theta: Tensor, mixture_logits: Tensor):
        self.mu1, self.mu2, self.theta, self.mixture_logits = mu1, mu2, theta, mixture_logits

    @property
    def mixture_probs(self) -> Tensor:
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self) -> Tensor:
        pi = self.mixture_probs
        return pi * self.mu1 + (1.0 - pi) * self.mu2

    def log_prob(self, x: Tensor) -> Tensor:
        return nb_mixture_log_prob(x, self.mu1, self.mu2, self.theta, self.mixture_logits)

    @torch.no_grad()
    def sample(self) -> Tensor:
        """Counts: pick a component with probability ``pi``, then draw Gamma-Poisson from it."""
        first = torch.rand_like(self.mu1) < self.mixture_probs
        mu = torch.where(first, self.mu1, self.mu2)
        theta = self.theta.expand_as(mu)
        return torch.poisson(torch.distributions.Gamma(theta, theta / mu.clamp_min(EPS)).sample())


def bernoulli_log_prob(x: Tensor, probs: Tensor, eps: float = EPS) -> Tensor:
    """Bernoulli log-probability of 0/1 data, elementwise: ``x log p + (1 - x) log(1 - p)``."""
    return x * torch.log(probs + eps) + (1.0 - x) * torch.log(1.0 - probs + eps)


def _bernoulli_terms(logits: Tensor, bias: Tensor | float, y: Tensor, cell_factor: Tensor,
                     region_factor: Tensor | float):
    """Dense kernel of :class:`_BernoulliHead`: with ``s = sigmoid(logits + bias)`` and ``p = s d f``, the
    log-likelihood of 0/1 ``y`` (read as ``y > 0``) summed per cell, and its derivatives: w.r.t. the logits
    ``(cells, regions)``, the cell factor ``(cells, 1)`` and, per entry, the region factor (``(cells, regions)``,
    summed over cells by the caller with the upstream gradient). One pass over the block, one log and one
    division per entry (of ``q = p`` or ``1 - p``, as y is 1 or 0), no gather or scatter of the ones: for a
    Bernoulli both terms cost the same, so the sparse split of the count likelihoods buys nothing here."""
    s = torch.sigmoid(logits + bias)
    sf = s * region_factor
    p = sf * cell_factor
    one = y > 0
    q = torch.where(one, p, 1.0 - p) + EPS  # the probability of what was observed
    g = torch.where(one, 1.0, -1.0) / q  # d log q / dp
    return torch.log(q).sum(-1), g * p * (1.0 - s), (g * sf).sum(-1, keepdim=True), g * s * cell_factor


def _mm_t(a: Tensor, b_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b_t.T (+ bias)`` where :class:`cellvi.nn.Linear` computes its products: oneDNN on the CPU (AVX-512
    on AMD processors, where ``torch.mm``'s MKL takes an AVX2 path at half the speed), else ``torch.mm``."""
    from cellvi.nn import _onednn_mm, use_onednn  # (cellvi.nn imports this module)

    if use_onednn(a, b_t):
        return _onednn_mm(a, b_t, bias)
    out = torch.mm(a, b_t.t())
    return out if bias is None else out.add_(bias)


class _BernoulliHead(torch.autograd.Function):
    """``sum_r log Bernoulli(y_r | sigmoid(h W^T + b)_r d f_r)`` per cell for 0/1 ``y``: the decoder's last
    linear layer and the likelihood in one function (PeakVI; ``weight`` None: ``h`` are the logits, ``bias``
    optional). The logits ``h W^T + b`` (one matrix product, on oneDNN where :class:`cellvi.nn.Linear` uses it),
    then value and derivatives in one compiled pass (:func:`_bernoulli_terms`). Backward scales the small operands by the upstream
    per-cell gradient ``w`` instead of the ``(cells, regions)`` block: ``dh = w * (G W)``,
    ``dW = G^T (w * h)``, ``db = G^T w`` with ``G`` the derivative w.r.t. the logits. No autograd pass over
    the block at all (scvi-tools: ~20)."""

    @staticmethod
    def forward(ctx, h, weight, bias, cell_factor, region_factor, y):
        f_is_tensor = isinstance(region_factor, Tensor)
        f = region_factor.detach() if f_is_tensor else 1.0
        b = bias.detach() if isinstance(bias, Tensor) else None
        if weight is None:
            logits, b = h.detach(), 0.0 if b is None else b
        else:  # the bias goes into the product (oneDNN adds it as it writes the output)
            logits, b = _mm_t(h.detach(), weight.detach(), b), 0.0
        out, g_logits, g_d, g_f = kernel(_bernoulli_terms)(logits, b, y, cell_factor.detach(), f)
        ctx.save_for_backward(h, weight, g_logits, g_d, g_f if f_is_tensor else None)
        ctx.f_is_tensor, ctx.has_bias = f_is_tensor, isinstance(bias, Tensor)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, g_logits, g_d, g_f = ctx.saved_tensors
        w = grad[:, None]
        need = ctx.needs_input_grad
        if weight is None:  # h was the logits
            d_h, d_weight = (g_logits * w if need[0] else None), None
        else:
            # both products as their transposes, (W^T G^T)^T and ((h w)^T G)^T: oneDNN's fast layouts when the
            # weight is the transposed view of a contiguous (hidden, regions) parameter (PeakVI's RegionHead),
            # whose gradient is then written in place with no transposing copy
            d_h = _mm_t(weight.t(), g_logits).t().mul(w) if need[0] else None
            d_weight = _mm_t((h * w).t(), g_logits.t()).t() if need[1] else None
        d_bias = torch.mv(g_logits.t(), grad) if ctx.has_bias and need[2] else None
        d_f = torch.mv(g_f.t(), grad) if ctx.f_is_tensor and need[4] else None
        return d_h, d_weight, d_bias, g_d * w, d_f, None


class Bernoulli:
    """Bernoulli over a ``(cells, regions)`` 0/1 matrix (PeakVI), same interface as :class:`NegativeBinomial`."""

    def __init__(self, probs: Tensor | None):
        self._probs = probs
        self._logits = self.cell_factor = self.region_factor = None
        self._linear: tuple | None = None

    @classmethod
    def from_logits(cls, logits: Tensor, cell_factor: Tensor, region_factor: Tensor | float = 1.0) -> Bernoulli:
        """``p = sigmoid(logits) * cell_factor * region_factor`` (PeakVI), computed only when read."""
        d = cls(None)
        d._logits, d.cell_factor, d.region_factor = logits, cell_factor, region_factor
        return d

    @classmethod
    def from_linear(cls, h: Tensor, weight: Tensor, bias: Tensor | None, cell_factor: Tensor,
                    region_factor: Tensor | float = 1.0) -> Bernoulli:
        """As :meth:`from_logits` with ``logits = h @ weight.T + bias`` (a linear layer's output), computed only
        when read: in training, :meth:`log_prob_sum` fuses the layer into the likelihood (:class:`_BernoulliHead`)."""
        d = cls(None)
        d._linear, d.cell_factor, d.region_factor = (h, weight, bias), cell_factor, region_factor
        return d

    @property
    def logits(self) -> Tensor | None:
        if self._logits is None and self._linear is not None:
            h, weight, bias = self._linear  # as cellvi.nn.Linear: a product, then the bias added in place
            self._logits = torch.mm(h, weight.t()) if bias is None else torch.mm(h, weight.t()).add_(bias)
        return self._logits

    @property
    def probs(self) -> Tensor:
        if self._probs is None:
            self._probs = torch.sigmoid(self.logits) * self.cell_factor * self.region_factor
        return self._probs

    @property
    def mean(self) -> Tensor:
        return self.probs

    def log_prob(self, x: Tensor) -> Tensor:
        return bernoulli_log_prob(x, self.probs)

    def log_prob_sum(self, x: Tensor, nz: Nonzeros | None = None) -> Tensor:
        """``log_prob(x).sum(-1)`` for 0/1 ``x`` (any non-zero reads as 1). Training with compiled kernels: one
        fused dense pass (:class:`_BernoulliHead`). Otherwise ``log(1 - p)`` everywhere (dense, the x = 0 term),
        plus ``log p - log(1 - p)`` at the ones only (``nz``: the non-zero entries, values ignored)."""
        if self._probs is None and torch.is_grad_enabled() and compiling() and x.dim() == 2:
            # long trainings: one compiled kernel (eager, its ~15 dense ops are slower than autograd's path)
            h, weight, bias = self._linear if self._logits is None else (self._logits, None, None)
            return _BernoulliHead.apply(h, weight, bias, self.cell_factor, self.region_factor, x)
        rows, cols, _ = nonzeros(x) if nz is None else nz
        p_nz = self.probs[rows, cols]
        correction = torch.log(p_nz + EPS) - torch.log(1.0 - p_nz + EPS)
        return _row_sum_sparse(torch.log(1.0 - self.probs + EPS), correction, rows)

    @torch.no_grad()
    def sample(self) -> Tensor:
        return torch.bernoulli(self.probs)
