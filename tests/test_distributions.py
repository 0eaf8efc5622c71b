import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from cellvi import distributions as dist
from cellvi.distributions import NegativeBinomial, Poisson, digamma, nb_log_prob, poisson_log_prob, zinb_log_prob

f64 = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("mu, theta", [(0.5, 2.0), (10.0, 0.3), (200.0, 50.0)])
def test_nb_log_prob_matches_scipy(mu, theta):
    x = np.arange(60.0)
    ours = nb_log_prob(f64(x), f64(mu), f64(theta), eps=0.0).numpy()
    ref = scipy.stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


@pytest.mark.parametrize("mu, theta, pi", [(0.5, 2.0, 0.1), (10.0, 0.3, 0.5), (50.0, 5.0, 0.9)])
def test_zinb_log_prob_matches_mixture(mu, theta, pi):
    x = np.arange(40.0)
    logit = np.log(pi / (1 - pi))
    ours = zinb_log_prob(f64(x), f64(mu), f64(theta), f64(logit), eps=0.0).numpy()
    nb = scipy.stats.nbinom.pmf(x, n=theta, p=theta / (theta + mu))
    ref = np.log(pi * (x == 0) + (1 - pi) * nb)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_poisson_log_prob_matches_scipy():
    x, rate = np.arange(30.0), 4.2
    np.testing.assert_allclose(poisson_log_prob(f64(x), f64(rate), eps=0.0).numpy(),
                               scipy.stats.poisson.logpmf(x, rate), rtol=1e-10)


@pytest.mark.parametrize("zi", [False, True])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
def test_sparse_row_sum_equals_dense_sum(zi, theta_shape):
    g = torch.Generator().manual_seed(0)
    B, G = 17, 31
    x = torch.poisson(torch.rand(B, G, generator=g, dtype=torch.float64) * 2) * (torch.rand(B, G, generator=g) < 0.4)
    mu = torch.rand(B, G, generator=g, dtype=torch.float64) * 5 + 0.01
    theta = torch.rand(G if theta_shape == "gene" else (B, G), generator=g, dtype=torch.float64) * 3 + 0.1
    logits = torch.randn(B, G, generator=g, dtype=torch.float64) if zi else None
    d = NegativeBinomial(mu, theta, logits)
    torch.testing.assert_close(d.log_prob_sum(x), d.log_prob(x).sum(-1), rtol=1e-10, atol=1e-10)
    p = Poisson(mu)
    torch.testing.assert_close(p.log_prob_sum(x), p.log_prob(x).sum(-1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("zi", [False, True])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
def test_sparse_row_sum_gradients_match_dense(zi, theta_shape):
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(8, 20, generator=g, dtype=torch.float64) * 3)
    mu = (torch.rand(8, 20, generator=g, dtype=torch.float64) * 4 + 0.1).requires_grad_()
    theta = (torch.rand(20 if theta_shape == "gene" else (8, 20), generator=g, dtype=torch.float64) + 0.5)
    theta.requires_grad_()
    logits = torch.randn(8, 20, generator=g, dtype=torch.float64).requires_grad_() if zi else None
    params = [mu, theta] + ([logits] if zi else [])
    weights = torch.rand(8, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    grads = []
    for fn in ("log_prob_sum", "log_prob"):
        d = NegativeBinomial(mu, theta, logits)
        out = getattr(d, fn)(x)
        out = out if out.dim() == 1 else out.sum(-1)
        grads.append(torch.autograd.grad((out * weights).sum(), params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_zinb_zero_term_falls_back_to_softplus_when_its_sum_underflows():
    # float32: sigmoid(logit) and NB(0) both below 1e-38 at one entry -> the one-log form would give -inf
    x = torch.tensor([[0.0, 3.0, 0.0]])
    mu = torch.tensor([[5e4, 2.0, 1.0]], requires_grad=True)
    theta = torch.tensor([40.0, 1.5, 0.7], requires_grad=True)
    logits = torch.tensor([[-120.0, 0.3, -1.0]], requires_grad=True)
    assert dist._zero_count_terms(mu, theta, torch.log(theta), logits)[4].min() <= 1e-30  # S underflowed
    out = NegativeBinomial(mu, theta, logits).log_prob_sum(x)
    grads = torch.autograd.grad(out.sum(), [mu, theta, logits])
    ref_params = [p.detach().double().requires_grad_() for p in (mu, theta, logits)]
    ref = zinb_log_prob(x.double(), *ref_params).sum(-1)
    ref_grads = torch.autograd.grad(ref.sum(), ref_params)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zi", [False, True])
def test_sparse_row_sum_without_gradients_equals_with(zi):
    g = torch.Generator().manual_seed(2)
    x = torch.poisson(torch.rand(6, 9, generator=g, dtype=torch.float64) * 2)
    mu = torch.rand(6, 9, generator=g, dtype=torch.float64) * 3 + 0.1
    theta = torch.rand(9, generator=g, dtype=torch.float64) + 0.2
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64) if zi else None
    d = NegativeBinomial(mu, theta, logits)
    with torch.no_grad():
        plain = d.log_prob_sum(x)
    torch.testing.assert_close(plain, d.log_prob(x).sum(-1), rtol=1e-10, atol=1e-10)


def test_samples_have_the_stated_moments():
    torch.manual_seed(0)
    mu, theta, logits = torch.full((1, 3), 6.0), torch.tensor([0.5, 2.0, 20.0]), torch.full((1, 3), -1.0)
    d = NegativeBinomial(mu, theta, logits)
    s = d.sample(40_000)[:, 0]  # (n, 3)
    np.testing.assert_allclose(s.mean(0).numpy(), d.mean[0].numpy(), rtol=0.05)
    np.testing.assert_allclose(s.var(0).numpy(), d.variance[0].numpy(), rtol=0.1)


def test_fast_digamma_matches_scipy():
    z = np.concatenate([np.geomspace(1e-4, 1e5, 400), np.arange(1, 50) + 0.37])
    np.testing.assert_allclose(digamma(f64(z)).numpy(), scipy.special.digamma(z), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("zi", [False, True])
@pytest.mark.parametrize("gene_theta", [False, True])
def test_softmax_fused_likelihood_equals_the_dense_formula(zi, gene_theta):
    """NegativeBinomial.from_logits (softmax fused into the sparse likelihood) against the plain formula."""
    g = torch.Generator().manual_seed(4)
    x = torch.poisson(torch.rand(7, 11, generator=g, dtype=torch.float64) * 3)
    h = torch.randn(7, 11, generator=g, dtype=torch.float64).requires_grad_()
    lib = (torch.rand(7, 1, generator=g, dtype=torch.float64) * 3 + 2).requires_grad_()
    theta = (torch.rand(11 if gene_theta else (7, 11), generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64).requires_grad_() if zi else None
    params = [h, lib, theta] + ([logits] if zi else [])
    weights = torch.rand(7, generator=g, dtype=torch.float64)
    packed = torch.cat([h, logits], -1) if zi else h
    fused = NegativeBinomial.from_logits(packed, lib, theta, zi).log_prob_sum(x)
    mu = torch.exp(lib) * torch.softmax(h, -1)
    dense = (zinb_log_prob(x, mu, theta, logits) if zi else dist.nb_log_prob(x, mu, theta)).sum(-1)
    torch.testing.assert_close(fused, dense, rtol=1e-9, atol=1e-9)
    for a, b in zip(torch.autograd.grad((fused * weights).sum(), params),
                    torch.autograd.grad((dense * weights).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    d = NegativeBinomial.from_logits(packed, lib, theta, zi)  # read lazily: the same mu and scale
    torch.testing.assert_close(d.mu, mu)
    torch.testing.assert_close(d.scale, torch.softmax(h, -1))


def test_compiled_kernels_equal_eager_ones():
    pytest.importorskip("torch._dynamo")
    g = torch.Generator().manual_seed(5)
    x = torch.poisson(torch.rand(16, 40, generator=g) * 2)
    h, lib = torch.randn(16, 40, generator=g).requires_grad_(), torch.full((16, 1), 5.0, requires_grad=True)
    theta, logits = (torch.rand(40, generator=g) + 0.5).requires_grad_(), torch.randn(16, 40, generator=g).requires_grad_()
    results = []
    for on in (False, True):
        with dist.compiled_kernels(on):
            out = NegativeBinomial.from_logits(torch.cat([h, logits], -1), lib, theta, True).log_prob_sum(x)
            results.append((out, *torch.autograd.grad(out.sum(), [h, lib, theta, logits])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lgamma_series_matches_scipy():
    y = np.concatenate([np.geomspace(1e-4, 1e6, 500), np.arange(1, 60) + 0.25, np.arange(1, 60, dtype=float)])
    np.testing.assert_allclose(dist.lgamma_series(f64(y)).numpy(), scipy.special.gammaln(y), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("zi", [False, True])
@pytest.mark.parametrize("gene_theta", [False, True])
def test_compiled_kernels_equal_eager_ones_for_every_likelihood_setting(zi, gene_theta):
    """NB and ZINB, theta per gene or per cell: the compiled kernels (series lgamma) give the eager values."""
    pytest.importorskip("torch._dynamo")
    g = torch.Generator().manual_seed(6)
    x = torch.poisson(torch.rand(16, 30, generator=g) * 3)
    h, lib = torch.randn(16, 60 if zi else 30, generator=g).requires_grad_(), torch.full((16, 1), 4.0)
    theta = (torch.rand(30 if gene_theta else (16, 30), generator=g) + 0.2).requires_grad_()
    results = []
    for on in (False, True):
        with dist.compiled_kernels(on):
            out = NegativeBinomial.from_logits(h, lib, theta, zi).log_prob_sum(x)
            results.append((out, *torch.autograd.grad(out.sum(), [h, theta])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_zinb_falls_back_to_softplus_when_its_sum_underflows():
    x = torch.tensor([[0.0, 3.0, 0.0]])
    h = torch.tensor([[9.0, 0.0, -1.0, -120.0, 0.3, -1.0]], requires_grad=True)  # [scale logits | zi logits]
    lib = torch.tensor([[np.log(5e4)]])
    theta = torch.tensor([40.0, 1.5, 0.7], requires_grad=True)
    out = NegativeBinomial.from_logits(h, lib, theta, True).log_prob_sum(x)
    grads = torch.autograd.grad(out.sum(), [h, theta])
    hd, thd = h.detach().double().requires_grad_(), theta.detach().double().requires_grad_()
    ref = zinb_log_prob(x.double(), torch.exp(lib.double()) * torch.softmax(hd[:, :3], -1), thd, hd[:, 3:]).sum(-1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-3)
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), [hd, thd])):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_from_logits_refuses_a_block_of_the_wrong_width():
    with pytest.raises(ValueError, match="5 columns; expected 8 for 4 genes"):
        NegativeBinomial.from_logits(torch.zeros(2, 5), torch.zeros(2, 1), torch.ones(4), zero_inflated=True)


def test_dropout_keeps_the_expectation_and_is_the_identity_in_eval_mode():
    from cellvi.nn import Dropout

    torch.manual_seed(0)
    for p in (0.3, 0.03):  # 0.03: MrVI's attention
        layer, h = Dropout(p), torch.ones(400, 500)
        out = layer.train()(h)
        kept = out != 0
        assert abs(float(kept.float().mean()) - (1 - p)) < 0.005  # each unit kept with probability 1 - p
        torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))  # kept: scaled by 1/(1-p)
        assert abs(float(out.mean()) - 1.0) < 0.01
        assert torch.equal(layer.eval()(h), h)


def test_compiled_dropout_saves_no_boolean_mask_for_backward():
    """A compiled graph with dropout saves float tensors for backward: a saved comparison mask (``u >= p``) costs
    MrVI's compiled step ~0.6 ms, inductor's C++ kernels write booleans slowly (see :func:`cellvi.nn.dropout`)."""
    pytest.importorskip("torch._dynamo")
    from cellvi.nn import dropout

    fn = torch.compile(lambda h: dropout(h, 0.1).exp(), dynamic=True)
    h = torch.randn(8, 16, requires_grad=True)
    fn(h).sum().backward()  # compiled
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = fn(h)
    out.sum().backward()
    assert saved and torch.bool not in saved, saved


def test_expected_counts_per_unit_library_equal_the_mean_over_the_library():
    """expression_from(..., "mean"), DE's expression, is px.mean / exp(library) computed without mu (ZINB and NB)."""
    from cellvi.models.base import expression_from

    g = torch.Generator().manual_seed(7)
    logits, lib, theta = torch.randn(6, 20, generator=g), torch.rand(6, 1, generator=g) * 3 + 4, torch.rand(10) + 0.5
    for zi in (True, False):
        px = NegativeBinomial.from_logits(logits if zi else logits[:, :10], lib, theta, zi)
        torch.testing.assert_close(expression_from(px, lib, "mean"), px.mean / torch.exp(lib), rtol=1e-5, atol=1e-9)


def test_importance_log_marginal_is_the_log_mean_exp_whatever_the_chunk():
    from cellvi.models.base import importance_log_marginal

    w = torch.randn(250, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5
    draws = iter(w.split(1))  # one weight row per draw, handed out in the order asked for

    def log_weights(k):
        return torch.cat([next(draws) for _ in range(k)])

    torch.testing.assert_close(importance_log_marginal(log_weights, 250, chunk=60),
                               torch.logsumexp(w, 0) - np.log(250))
    with pytest.raises(ValueError, match="n_mc_samples=0"):
        importance_log_marginal(log_weights, 0)
