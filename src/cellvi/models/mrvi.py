"""MrVI: multi-resolution variational inference for multi-sample cohorts (Boyeau et al., 2025, Nat. Methods).

Generative model, for a cell with counts x from sample s (target covariate) and batch b (nuisance):

    u ~ sum_k pi_k N(m_k, diag(s_k^2))            sample-unaware state (n_latent_u); K components,
                                                  or one per label with label-informed weights
    z = u' + g(u, s),  g(u, s) ~ N(0, I)          sample-aware state (n_latent); u' = u or A_u u;
                                                  g: attention of u on a learned sample embedding
    h = softmax(A z + gamma + g_b(z, b))          normalized expression; g_b: attention on the batch
    x_g ~ NB(l * h_g, theta_g)                    counts, observed library size l

q(u | x, s) is an MLP Gaussian (its layers normalised per sample). Counterfactuals replace s by any
other sample with u fixed: every analysis (sample distances, DE, DA) is built on them, in
:mod:`cellvi.analysis`.

The networks follow scvi-tools' torch MRVI: attention over ``outerprod_dim`` tokens made from the
query and key vectors, a residual MLP on the attended tokens, LayerNorm throughout.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import Tensor, nn

from cellvi import distributions as dist
from cellvi.analysis import density, distances, regression
from cellvi.models.base import Model, as_indices
from cellvi.nn import Linear, bias_mm, dropout

PX_DEFAULTS = dict(n_latent_sample=16, n_channels=4, n_heads=2, dropout_rate=0.03, stop_gradients=False,
                   stop_gradients_mlp=True, n_hidden=32, n_layers=1, low_dim_batch=True)
QZ_DEFAULTS = dict(n_latent_sample=16, n_channels=4, n_heads=2, dropout_rate=0.03, stop_gradients=False,
                   stop_gradients_mlp=True, use_map=True, n_hidden=32, n_layers=1)
QU_DEFAULTS: dict = {}
ROWS_PER_CHUNK = 2**13  # cells x samples evaluated at once in counterfactual analyses (bounds memory)
PAIRS_PER_CHUNK = 2**22  # cells x samples^2 distances held at once (16 MB of float32)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LABEL_PRIOR_BOOST = 10.0  # logit added to a cell's own label component in the label-informed prior


def _merged(name: str, defaults: dict, given: dict | None) -> dict:
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{name} has unsupported keys {unknown}; supported: {sorted(defaults)}.")
    return {**defaults, **(given or {})}


@dataclass(frozen=True)
class MrVIConfig:
    n_latent: int = 30  # size of z (sample-aware)
    n_latent_u: int = 10  # size of u (sample-unaware)
    encoder_n_hidden: int = 128
    encoder_n_layers: int = 2  # residual blocks in the head of q(u | x)
    z_u_prior: bool = True  # penalise z - u' with N(0, exp(z_u_prior_scale)^2) (the L2 penalty)
    z_u_prior_scale: float = 0.0  # log scale of that prior
    u_prior_scale: float = 0.0  # log scale of each Gaussian of the prior on u
    u_prior_mixture: bool = True  # mixture of Gaussians prior on u (else one Gaussian)
    u_prior_mixture_k: int = 20  # its components (one per label instead when labels are set up)
    learn_z_u_prior_scale: bool = False
    scale_observations: bool = False  # divide each cell's loss by its sample's cell count
    px_kwargs: dict | None = None  # decoder attention: keys of PX_DEFAULTS
    qz_kwargs: dict | None = None  # u -> z attention: keys of QZ_DEFAULTS
    qu_kwargs: dict | None = None  # q(u | x): no options yet
    mlp_inner_width: int = 128  # width inside the residual blocks of the attention MLPs (see MrVI's Notes)
    # fields that files of earlier versions lack, with the values those versions used (read by Model.load)
    SAVED_BEFORE: ClassVar[dict] = {"mlp_inner_width": 32}

    def __post_init__(self):
        _merged("px_kwargs", PX_DEFAULTS, self.px_kwargs)
        _merged("qz_kwargs", QZ_DEFAULTS, self.qz_kwargs)
        _merged("qu_kwargs", QU_DEFAULTS, self.qu_kwargs)


# --------------------------------------------------------------------------- network blocks


class ResBlock(nn.Module):
    """``act(LN(W2 (act(LN(W1 x)) + skip(x))))``: skip is x, or a linear map when widths differ.

    With a linear skip, ``W1`` and the skip's weight are one ``(2 n_hidden, n_in)`` layer ``fc1`` (one
    product for both; files that stored them apart are read by :func:`_upgrade_state_dict`).
    """

    def __init__(self, n_in: int, n_out: int, n_hidden: int, act=F.relu):
        super().__init__()
        self.linear_skip = n_in != n_hidden
        self.fc1, self.ln1 = Linear(n_in, n_hidden * (2 if self.linear_skip else 1)), nn.LayerNorm(n_hidden)
        self.fc2, self.ln2 = Linear(n_hidden, n_out), nn.LayerNorm(n_out)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h, skip = self.fc1(x).chunk(2, -1) if self.linear_skip else (self.fc1(x), x)
        h = self.act(self.ln1(h)) + skip
        return self.act(self.ln2(self.fc2(h)))

    def forward_folded(self, coef: Tensor, fold) -> Tensor:
        """:meth:`forward` of an input ``x`` that is linear in ``coef`` and never formed: ``fold(W)`` gives
        ``(M, c)`` with ``x @ W.T = coef @ M + c``. The products that read ``x`` (``fc1``, and ``fc2`` on an
        identity skip: ``fc2(a + x) = fc2(a) + W2 x``) become one product with ``coef``."""
        if self.linear_skip:
            M, c = fold(self.fc1.weight)
            h, skip = bias_mm(c + self.fc1.bias, coef, M).chunk(2, -1)
            return self.act(self.ln2(self.fc2(self.act(self.ln1(h)) + skip)))
        M, c = fold(torch.cat([self.fc1.weight, self.fc2.weight]))
        h, out = bias_mm(c + torch.cat([self.fc1.bias, self.fc2.bias]), coef, M).split(
            [self.fc1.out_features, self.fc2.out_features], -1)  # out: fc2's bias + W2 x
        return self.act(self.ln2(bias_mm(out, self.act(self.ln1(h)), self.fc2.weight.t())))


class ResMLP(nn.Module):
    """``n_layers`` :class:`ResBlock` (width ``n_inner`` inside, ``n_hidden`` out) then a linear output layer."""

    def __init__(self, n_in: int, n_out: int, n_hidden: int, n_layers: int, n_inner: int, act=F.gelu):
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(n_in if i == 0 else n_hidden, n_hidden, n_inner, act)
                                      for i in range(n_layers)])
        self.out = Linear(n_hidden if n_layers else n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.blocks(x))

    def forward_folded(self, coef: Tensor, fold) -> Tensor:
        """:meth:`forward` of an input linear in ``coef`` (see :meth:`ResBlock.forward_folded`)."""
        if not len(self.blocks):
            M, c = fold(self.out.weight)
            return bias_mm(c + self.out.bias, coef, M)
        return self.out(self.blocks[1:](self.blocks[0].forward_folded(coef, fold)))


class TokenAttention(nn.Module):
    """Cross-attention of a query vector on a key vector, each cut into ``n_tokens`` scalar tokens.

    Token t of the query is ``q_t = (P_q query)_t``, embedded as ``q_t * a + c`` in ``E = n_channels *
    n_heads`` dimensions (likewise keys and values from the key vector), then multi-head attention
    and an output projection; the attended tokens are flattened, reduced by an MLP, concatenated to
    the query and mapped to ``n_out`` by a second MLP.

    Notes
    -----
    scvi-tools embeds a token with ``Linear(1, E)`` then applies the attention's in-projection
    ``W``: ``W (q_t a) + c = q_t (W a) + c``, so one vector ``W a`` per projection is the same function;
    it is initialised as that product of the usual initialisations.
    """

    def __init__(self, query_dim: int, kv_dim: int, n_out: int, *, n_tokens: int = 16, n_channels: int = 4,
                 n_heads: int = 2, dropout_rate: float = 0.0, n_hidden: int = 32, n_layers: int = 1,
                 n_inner: int = 128, stop_gradients_mlp: bool = False):
        super().__init__()
        E = n_channels * n_heads
        self.n_heads, self.dropout_rate, self.stop_gradients_mlp = n_heads, dropout_rate, stop_gradients_mlp
        self.query_proj = Linear(query_dim, n_tokens, bias=False)
        self.kv_proj = Linear(kv_dim, n_tokens, bias=False)
        embed = torch.empty(3, E).uniform_(-1.0, 1.0)  # Linear(1, E) weights, for q, k and v
        w_in = torch.empty(3, E, E)
        for i in range(3):
            nn.init.xavier_uniform_(w_in[i])
        self.token_weight = nn.Parameter(torch.einsum("ief,if->ie", w_in, embed))  # (3, E): q, k, v
        self.token_bias = nn.Parameter(torch.zeros(3, E))
        self.out_proj = Linear(E, E)
        nn.init.zeros_(self.out_proj.bias)
        self.mlp_tokens = ResMLP(n_tokens * E, n_tokens, n_hidden, n_layers, n_inner)
        self.mlp_out = ResMLP(n_tokens + query_dim, n_out, n_hidden, n_layers, n_inner)

    def kv_tokens(self, kv: Tensor) -> Tensor:
        """Key tokens ``(N, tokens)`` of key vectors ``(N, kv_dim)`` (scalars: see :meth:`forward`)."""
        return self.kv_proj(kv)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """``query`` ``(N, query_dim)`` attending to its own key tokens ``keys`` ``(N, T)`` (:meth:`kv_tokens`).

        With scalar tokens, attention reduces to scalar arithmetic. Per head h, query token t is
        ``q_t a + c``, key token t' is ``k_t' b + e`` and its value ``k_t' v + f``, so the score is
        ``(q_t a + c).(k_t' b + e) / sqrt(d) = lam_t k_t' + (terms constant in t')`` with
        ``lam_t = (q_t a.b + c.b) / sqrt(d)``; the constant terms cancel in the softmax over t'. With
        weights ``w = softmax_t'(lam_t k_t')``, the attended value is ``v sum_t' w k_t' + f sum_t' w``.
        Exactly multi-head attention on these tokens, with ``(N, heads, T, T)`` scalars instead of
        ``(N, heads, T, d)`` matrix products (see :meth:`_attended`).
        """
        return self.mlp_out(torch.cat([query, self._attended(self._scores(query), keys)], -1))

    def attend_all(self, query: Tensor, keys: Tensor) -> Tensor:
        """:meth:`forward` of every query ``(N, query_dim)`` on every key ``(S, T)``: ``(N, S, n_out)``.

        The query's projection is computed once per query, not once per (query, key) pair.
        """
        N, S = query.shape[0], keys.shape[0]
        lam = self._scores(query)
        if self.training or torch.is_grad_enabled():
            tokens = self._attended(lam[:, None], keys)
        else:
            tokens = self._mlp_tokens(self._mean_keys_all(lam, keys), weights_sum=False)
        rows = torch.cat([query[:, None].expand(N, S, -1), tokens.view(N, S, -1)], -1).view(N * S, -1)
        return self.mlp_out(rows).view(N, S, -1)  # (2-D: cellvi.nn.Linear's fast path)

    @staticmethod
    def _mean_keys_all(lam: Tensor, k: Tensor) -> Tensor:
        """``A`` of :meth:`_attended`'s evaluation path for every query row ``lam`` ``(N, H, T)`` on every key set
        ``k`` ``(S, T')``, as ``(N S, T H)`` (rows query-major, columns token-major).

        Laid out ``(S, T', N H T)``: the shifted scores ``lam k_t' - m`` are one ``addcmul`` whose long inner axis is
        contiguous, and the two sums over ``t'`` one product ``[k; 1] @ e`` per key set (batched): three passes over
        the scores, where broadcasting over ``(N, S, T', H, T)`` took six (two products, a shift, two sums).
        """
        (N, H, T), S = lam.shape, k.shape[0]
        lam2 = (lam * (1 / math.log(2))).reshape(1, -1)  # (1, N H T)
        m = torch.maximum(lam2 * k.amax(-1)[:, None], lam2 * k.amin(-1)[:, None])  # (S, NHT): max over t'
        k1 = torch.stack([k, torch.ones_like(k)], 1)  # (S, 2, T')
        e = torch.addcmul(m.neg_()[:, None], k[:, :, None], lam2[None]).exp2_()  # (S, T', NHT)
        sums = torch.bmm(k1, e)  # (S, 2, NHT)
        A = sums[:, 0].div_(sums[:, 1])
        return A.view(S, N, H, T).permute(1, 0, 3, 2).reshape(N * S, T * H)

    def _scores(self, query: Tensor) -> Tensor:
        """``lam`` ``(N, heads, T)``: the slope of each query token's score in the key token."""
        q = self.query_proj(query.detach() if self.stop_gradients_mlp else query)  # (N, T)
        H = self.n_heads
        a, b = self.token_weight.view(3, H, -1)[:2]
        c = self.token_bias.view(3, H, -1)[0]
        slope, shift = ((torch.stack([a, c]) * b).sum(-1) * a.shape[-1] ** -0.5).unbind(0)  # (H,) each
        return torch.addcmul(shift[:, None], q[:, None, :], slope[:, None])

    def _attended(self, lam: Tensor, k: Tensor) -> Tensor:
        """Attention of scores ``lam`` ``(..., heads, T)`` on key tokens ``k`` ``(..., T')`` (leading dims
        broadcast), through the output projection and ``mlp_tokens``: ``(rows, T)``.

        The attended token is ``bias + sum_h A_h R_v[h] + B_h R_f[h]`` with ``A = sum_t' w k_t'``, ``B = sum_t' w``
        and ``R_v[h] = W_o^h v_h``, ``R_f[h] = W_o^h f_h`` (the value and output projections folded; ``W_o^h``:
        the columns of ``W_o`` for head h). In training (or with gradients), ``w`` is a softmax (dropout on it)
        and ``[A, B]`` one matrix product with ``[k, 1]``: the fewest ops backward. In evaluation, ``B = 1`` and
        ``A = sum_t' e k_t' / sum_t' e`` with ``e = 2^((lam k_t' - m) / ln 2)`` (``m = max_t' lam k_t'``: ``lam max(k)``
        or ``lam min(k)`` by the sign of ``lam``), the key axis first so that the sums add contiguous blocks;
        ``exp2`` is several times faster than ``exp`` on CPU. (The counterfactual analyses, every cell on every
        sample's keys, take :meth:`_mean_keys_all` instead.)

        So token t of a row is ``offset + coef_t @ basis`` (``coef_t``: that row's ``[A, B]`` or ``A`` per head). In
        evaluation the flattened tokens (``T x E`` per row) are never formed: the products of ``mlp_tokens`` that
        read them are folded with ``basis`` (:meth:`ResMLP.forward_folded`), one product with ``coef`` (``T x H``).
        """
        H, T = self.n_heads, lam.shape[-1]
        if self.training or torch.is_grad_enabled():
            w = torch.softmax(lam[..., None] * k[..., None, None, :], -1)  # (..., H, T, T')
            if self.training and self.dropout_rate > 0:
                w = dropout(w, self.dropout_rate)
            sums = w @ torch.stack([k, torch.ones_like(k)], -1)[..., None, :, :]  # (..., H, T, 2): A, B
            return self._mlp_tokens(sums.transpose(-3, -2).reshape(-1, T * 2 * H), weights_sum=True)
        lam2 = lam * (1 / math.log(2))
        kb = k[..., :, None, None]  # (..., T', 1, 1)
        m = torch.where(lam2 >= 0, lam2 * k.amax(-1)[..., None, None], lam2 * k.amin(-1)[..., None, None])
        e = torch.mul(kb, lam2[..., None, :, :]).sub_(m[..., None, :, :]).exp2_()  # (..., T', H, T)
        A = torch.mul(e, kb).sum(-3).div_(e.sum(-3))  # (..., H, T)
        return self._mlp_tokens(A.transpose(-1, -2).reshape(-1, T * H), weights_sum=False)

    def _mlp_tokens(self, coef: Tensor, weights_sum: bool) -> Tensor:
        """``mlp_tokens`` of the attended tokens ``offset + coef_t @ basis``: ``coef`` ``(rows, T K)`` holds, per token,
        ``[A, B]`` per head (``weights_sum``, K = 2H) or ``A`` per head (``B = 1``, K = H). Without gradients (the
        analyses: cells x samples rows) the tokens are not formed (:meth:`ResMLP.forward_folded`)."""
        H = self.n_heads
        T = coef.shape[-1] // (2 * H if weights_sum else H)
        v, f = self.token_weight.view(3, H, -1)[2], self.token_bias.view(3, H, -1)[2]
        W_o = self.out_proj.weight.view(-1, H, v.shape[-1])  # (E, H, d)
        rows = torch.einsum("ehd,hcd->hce", W_o, torch.stack([v, f], 1)).reshape(2 * H, -1)  # (2H, E): R_v, R_f
        if weights_sum:
            basis, offset = rows, self.out_proj.bias
        else:
            R_v, R_f = rows.view(H, 2, -1).unbind(1)
            basis, offset = R_v, self.out_proj.bias + R_f.sum(0)

        if torch.is_grad_enabled():  # training (128 rows): forming the tokens takes fewer ops forward and backward
            return self.mlp_tokens(torch.addmm(offset, coef.reshape(-1, basis.shape[0]), basis).view(coef.shape[0], -1))

        def fold(W: Tensor) -> tuple[Tensor, Tensor]:  # x @ W.T = coef @ M + c for the flattened tokens x
            W3 = W.view(W.shape[0], T, -1)  # (n, T, E)
            return torch.einsum("ke,nte->tkn", basis, W3).reshape(-1, W.shape[0]), W3.sum(1) @ offset

        return self.mlp_tokens.forward_folded(coef, fold)


# --------------------------------------------------------------------------- module


class MrVIModule(nn.Module):
    """q(u | x, s), z = u' + g(u, s), p(x | z, b) and the prior p(u)."""

    def __init__(self, n_genes: int, n_samples: int, n_batches: int, n_labels: int, config: MrVIConfig,
                 n_obs_per_sample: Tensor):
        super().__init__()
        self.config = cfg = config
        self.n_samples, self.n_batches, self.n_labels = n_samples, n_batches, n_labels
        px, qz = _merged("px_kwargs", PX_DEFAULTS, cfg.px_kwargs), _merged("qz_kwargs", QZ_DEFAULTS, cfg.qz_kwargs)
        self.px_options, self.qz_options = px, qz
        L, Lu, H = cfg.n_latent, cfg.n_latent_u, cfg.encoder_n_hidden
        # q(u | x, s): two layers normalised per sample (LayerNorm without affine parameters, then a scale
        # and shift per sample), a sample offset, a residual Gaussian head. The per-sample parameters are
        # the columns of one table, [gamma_1, beta_1, gamma_2, beta_2, offset] (one gather per step)
        self.qu_fc1, self.qu_fc2 = Linear(n_genes, H), Linear(H, H)
        gammas = [1.0 + 0.02 * torch.randn(n_samples, H) for _ in range(2)]
        self.qu_per_sample = nn.Parameter(torch.cat([gammas[0], torch.zeros(n_samples, H), gammas[1],
                                                     torch.zeros(n_samples, H), 0.1 * torch.randn(n_samples, H)], 1))
        self.qu_body = nn.Sequential(*[ResBlock(H, H, H) for _ in range(cfg.encoder_n_layers)])
        self.qu_head = Linear(H, 2 * Lu)  # [mean, raw scale]
        # z = u' + g(u, s)
        self.qz_embed = nn.Parameter(0.1 * torch.randn(n_samples, qz["n_latent_sample"]))
        self.qz_ln_u, self.qz_ln_embed = nn.LayerNorm(Lu), nn.LayerNorm(qz["n_latent_sample"])
        self.qz_attention = TokenAttention(
            Lu, qz["n_latent_sample"], L * (1 if qz["use_map"] else 2), n_tokens=qz["n_latent_sample"],
            n_channels=qz["n_channels"], n_heads=qz["n_heads"], dropout_rate=qz["dropout_rate"],
            n_hidden=qz["n_hidden"], n_layers=qz["n_layers"], n_inner=cfg.mlp_inner_width,
            stop_gradients_mlp=qz["stop_gradients_mlp"])
        self.qz_base = Linear(Lu, L) if Lu != L else None
        # p(x | z, b): h = softmax(A (z + g(z, b)) + gamma)
        self.px_embed = nn.Parameter(0.1 * torch.randn(n_batches, px["n_latent_sample"]))
        self.px_ln_z, self.px_ln_embed = nn.LayerNorm(L), nn.LayerNorm(px["n_latent_sample"])
        n_res = L if px["low_dim_batch"] else n_genes
        self.px_attention = TokenAttention(
            L, px["n_latent_sample"], n_res, n_tokens=px["n_latent_sample"], n_channels=px["n_channels"],
            n_heads=px["n_heads"], dropout_rate=px["dropout_rate"], n_hidden=px["n_hidden"],
            n_layers=px["n_layers"], n_inner=cfg.mlp_inner_width,
            stop_gradients_mlp=px["stop_gradients_mlp"]) if n_batches >= 2 else None
        self.px_fc = Linear(L, n_genes)
        self.log_theta = nn.Parameter(torch.randn(n_genes))
        # p(u)
        self.n_components = n_labels if n_labels >= 2 else cfg.u_prior_mixture_k
        if cfg.u_prior_mixture:
            self.u_prior_logits = nn.Parameter(torch.zeros(self.n_components))
            self.u_prior_means = nn.Parameter(torch.randn(self.n_components, Lu))
            self.u_prior_log_scales = nn.Parameter(torch.zeros(self.n_components, Lu))
        self.z_u_log_scale = nn.Parameter(torch.zeros(L) + cfg.z_u_prior_scale,
                                          requires_grad=cfg.learn_z_u_prior_scale)
        self.register_buffer("n_obs_per_sample", n_obs_per_sample.float())
        self._register_load_state_dict_pre_hook(_upgrade_state_dict)

    # q(u | x, s)
    def qu(self, x: Tensor, sample: Tensor, nz: dist.Nonzeros | None = None) -> torch.distributions.Normal:
        h = torch.log1p(x) if nz is None else dist.log1p_dense(x, nz)
        H = self.qu_fc2.weight.shape[0]
        gamma1, beta1, gamma2, beta2, offset = F.embedding(sample, self.qu_per_sample).chunk(5, -1)
        h = F.gelu(torch.addcmul(beta1, gamma1, F.layer_norm(self.qu_fc1(h), (H,))))
        h = F.gelu(torch.addcmul(beta2, gamma2, F.layer_norm(self.qu_fc2(h), (H,))))
        mean, raw = self.qu_head(self.qu_body(h + offset)).chunk(2, -1)
        return dist.normal(mean, F.softplus(raw) + 1e-5)

    def sample_keys(self, samples: Tensor | None = None) -> Tensor:
        """Attention key tokens ``(S, T)`` of the embeddings of ``samples`` (default: every sample)."""
        embed = self.qz_embed if samples is None else self.qz_embed[samples]
        return self.qz_attention.kv_tokens(self.qz_ln_embed(embed))

    # z = u' + g(u, s); u is (N, Lu), s is (N,)
    def z_from_u(self, u: Tensor, sample: Tensor, use_mean: bool = True) -> tuple[Tensor, Tensor]:
        """``(z, g)``: the sample-aware state ``z = u' + g`` and the sample effect ``g = g(u, s)``."""
        u_in = u.detach() if self.qz_options["stop_gradients"] else u
        g = self.qz_attention(self.qz_ln_u(u_in), self.sample_keys()[sample])  # keys: once per sample, gathered
        return self._add_effect(u_in, g, use_mean)

    def _add_effect(self, u_in: Tensor, g: Tensor, use_mean: bool) -> tuple[Tensor, Tensor]:
        """``(u' + g, g)`` from the attention's output (a draw of g when ``use_map`` is off); ``g`` may have
        a sample axis before the last (broadcast against u)."""
        if not self.qz_options["use_map"]:
            loc, raw = g.chunk(2, -1)
            q_eps = dist.normal(loc, F.softplus(raw) + 1e-3)
            g = q_eps.mean if use_mean else q_eps.rsample()
        z_base = u_in if self.qz_base is None else self.qz_base(u_in)
        return (z_base.unsqueeze(-2) if g.dim() > u_in.dim() else z_base) + g, g

    # h = softmax(A z + gamma + g(z, b)); z is (N, L), b is (N,)
    def decode_logits(self, z: Tensor, batch: Tensor) -> Tensor:
        """Logits of the normalized expression h (``h = softmax(logits)``)."""
        z_in = z.detach() if self.px_options["stop_gradients"] else z
        if self.px_attention is None:
            return self.px_fc(self.px_ln_z(z_in))
        keys = self.px_attention.kv_tokens(self.px_ln_embed(self.px_embed))[batch]  # once per batch, gathered
        g = self.px_attention(self.px_ln_z(z_in), keys)
        return self.px_fc(z + g) if self.px_options["low_dim_batch"] else self.px_fc(z) + g

    def decode(self, z: Tensor, batch: Tensor) -> Tensor:
        """Normalized expression h, rows summing to 1."""
        return F.softmax(self.decode_logits(z, batch), -1)

    def log_prior_u(self, u: Tensor, label: Tensor) -> Tensor:
        """``log p(u)`` per cell (mixture, label-informed when labels are set up), shape ``u.shape[:-1]``."""
        if not self.config.u_prior_mixture:
            return dist.normal(torch.zeros_like(u), torch.full_like(u, math.exp(self.config.u_prior_scale))
                               ).log_prob(u).sum(-1)
        logits = self.u_prior_logits
        if self.n_labels >= 2:
            logits = logits + LABEL_PRIOR_BOOST * F.one_hot(label, self.n_labels).to(u.dtype)
        log_w = torch.log_softmax(logits, -1)  # (K,) or (N, K)
        comp = dist.normal(self.u_prior_means, self.u_prior_log_scales.exp()).log_prob(u.unsqueeze(-2)).sum(-1)
        return torch.logsumexp(log_w + comp, -1)

    def loss(self, batch: dict[str, Tensor], kl_weight: float = 1.0) -> dict[str, Tensor]:
        """Negative ELBO: ``-log p(x | z, b) + kl_weight (log q(u) - log p(u) - log N(g; 0, sigma^2))``.

        The networks are :func:`network_terms` (one draw of u); the softmax of the decoder is fused into the
        likelihood (:meth:`cellvi.distributions.NegativeBinomial.from_logits`).
        """
        x, s = batch["x"], batch["sample"]
        nz = batch.get("nonzeros")
        args = (self, x, s, batch["batch"], batch["label"], x.new_empty(x.shape[0], self.config.n_latent_u).normal_())
        if dist.compiling() and torch.is_grad_enabled():  # long trainings: one compiled graph, forward and backward
            logits, kl_u, kl_z = dist.kernel(network_terms, dynamic=True, options=NETWORK_COMPILE_OPTIONS)(*args)
        else:
            logits, kl_u, kl_z = network_terms(*args, nz)
        log_library = torch.log(x.sum(-1, keepdim=True))
        px = dist.NegativeBinomial.from_logits(logits, log_library, self.log_theta.exp())
        rec = -px.log_prob_sum(x, nz)  # (B,)
        per_cell = rec + kl_weight * (kl_u + kl_z)
        if self.config.scale_observations:
            per_cell = per_cell / self.n_obs_per_sample[s]
        return {"loss": per_cell.mean(), "reconstruction_loss": rec, "kl_local": kl_u + kl_z}

    def counterfactual_z(self, u: Tensor, samples: Tensor, use_mean: bool = True) -> Tensor:
        """z of each cell had it come from each of ``samples``: ``u`` ``(..., N, Lu)`` -> ``(..., N, S, L)``."""
        lead = u.shape[:-1]
        u_in = u.reshape(-1, u.shape[-1])
        g = self.qz_attention.attend_all(self.qz_ln_u(u_in), self.sample_keys(samples))  # (n, S, out)
        z, _ = self._add_effect(u_in, g, use_mean)
        return z.reshape(*lead, samples.numel(), -1)


NETWORK_COMPILE_OPTIONS = {
    "cpp_wrapper": True,  # the graph's ~60 kernels called from C++, not Python
    # dropout's uniforms from PyTorch's own generator: inductor's in-graph draw is one scalar Philox call per
    # entry (the attention weights': ~0.5 ms a step, 5-10 % of it); also gives eager's masks, seed for seed
    "fallback_random": True,
}


def network_terms(module: MrVIModule, x: Tensor, sample: Tensor, batch: Tensor, label: Tensor, eps: Tensor,
                  nz: dist.Nonzeros | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The networks of :meth:`MrVIModule.loss`, from the counts to the decoder's logits: ``(logits, kl_u, kl_z)``.

    One reparameterised draw ``u = mu + sigma eps`` (``eps`` given), so ``log q(u) = sum(-eps^2 / 2 - log sigma) - c``
    (the same value and gradients as ``qu.log_prob(u)``); ``kl_z = -log N(g; 0, sigma^2)``, the L2 penalty on the
    sample effect (0 without ``z_u_prior``). Tensors in and out: for long trainings ``torch.compile`` makes these
    ~300 small ops on 128-cell tensors, and their backward, a few fused kernels (epochs ~35 % shorter; BENCHMARKS.md).
    """
    qu = module.qu(x, sample, nz)
    u = qu.loc + eps * qu.scale
    z, g = module.z_from_u(u, sample, use_mean=False)
    log_qu = -(0.5 * eps.square() + qu.scale.log()).sum(-1) - HALF_LOG_2PI * eps.shape[-1]
    kl_u = log_qu - module.log_prior_u(u, label)  # one-sample estimate
    kl_z = torch.zeros_like(kl_u)
    if module.config.z_u_prior:
        log_sigma = module.z_u_log_scale
        kl_z = 0.5 * (g.square() * torch.exp(-2.0 * log_sigma)).sum(-1) + (log_sigma.sum() + HALF_LOG_2PI * g.shape[-1])
    return module.decode_logits(z, batch), kl_u, kl_z


def _upgrade_state_dict(state_dict: dict, prefix: str, *args) -> None:
    """Load weights saved before the fused layers: a :class:`ResBlock`'s ``fc1`` and ``skip`` become one
    ``fc1``; q(u)'s per-sample norms and offset one table ``qu_per_sample``; its two heads one ``qu_head``."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(".skip.weight")]:
        block = key[: -len("skip.weight")]
        for part in ("weight", "bias"):
            state_dict[block + "fc1." + part] = torch.cat([state_dict[block + "fc1." + part],
                                                           state_dict.pop(block + "skip." + part)])
    old = [prefix + k for k in ("qu_norm1.gamma", "qu_norm1.beta", "qu_norm2.gamma", "qu_norm2.beta", "qu_sample")]
    if all(k in state_dict for k in old):
        state_dict[prefix + "qu_per_sample"] = torch.cat([state_dict.pop(k) for k in old], 1)
    if prefix + "qu_mean.weight" in state_dict and prefix + "qu_scale.weight" in state_dict:
        for part in ("weight", "bias"):
            state_dict[prefix + "qu_head." + part] = torch.cat([state_dict.pop(prefix + "qu_mean." + part),
                                                                state_dict.pop(prefix + "qu_scale." + part)])


# --------------------------------------------------------------------------- user class


class MrVI(Model):
    """Multi-resolution Variational Inference (Boyeau et al., 2025).

    ``MrVI.setup_anndata(adata, sample_key="donor", batch_key="site")``, then
    ``model = MrVI(adata); model.train()``; then :meth:`get_local_sample_distances`,
    :meth:`differential_expression`, :meth:`differential_abundance`.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`.
    n_latent, n_latent_u
        Sizes of z (sample-aware) and u (sample-unaware).
    backend
        Accepted for scvi-tools compatibility (``"torch"``) and ignored.
    **model_kwargs
        Other fields of :class:`MrVIConfig`: ``encoder_n_hidden``, ``encoder_n_layers``, ``z_u_prior``,
        ``z_u_prior_scale``, ``u_prior_scale``, ``u_prior_mixture``, ``u_prior_mixture_k``,
        ``learn_z_u_prior_scale``, ``scale_observations``, ``px_kwargs``, ``qz_kwargs``, ``qu_kwargs``,
        and cellvi's ``mlp_inner_width``.

    Notes
    -----
    As scvi-tools' torch MRVI, with these differences: when ``n_latent == n_latent_u``, ``u' = u``
    (the paper's ``z = u + g(u, s)``) rather than a learned linear map; token embeddings of the
    attention are folded into one vector per projection (the same function, see
    :class:`TokenAttention`).

    The MLPs of both attention blocks are residual blocks 128 wide inside (``mlp_inner_width``) with
    outputs of ``n_hidden`` (32) units, as scvi-tools' (and the paper's JAX code's) blocks are.
    Earlier cellvi made them ``n_hidden`` wide inside; that narrower g(u, s) recovered the simulated
    sample hierarchy worse on some seeds (BENCHMARKS.md). Files saved then (their config lacks
    ``mlp_inner_width``) load with the width they were trained with.
    """

    config_class = MrVIConfig

    def __init__(self, adata: AnnData, n_latent: int = 30, n_latent_u: int = 10, backend: str | None = None,
                 **model_kwargs):
        config = MrVIConfig(n_latent=n_latent, n_latent_u=n_latent_u, **model_kwargs)
        super().__init__(adata, config)
        if self.spec.sample_key is None:
            raise ValueError("MrVI needs samples: call cellvi.MrVI.setup_anndata(adata, sample_key=...) first.")
        if n_latent < n_latent_u:
            warnings.warn(f"n_latent ({n_latent}) < n_latent_u ({n_latent_u}): z is smaller than u.", UserWarning,
                          stacklevel=2)
        from cellvi import settings

        spec = self.spec
        counts = torch.bincount(self._data().obs["sample"].cpu(), minlength=spec.n_samples)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.module = MrVIModule(spec.n_genes, spec.n_samples, spec.n_batches, spec.n_labels, config, counts)
        self.module.eval()

    @classmethod
    def setup_anndata(cls, adata: AnnData, layer: str | None = None, sample_key: str | None = None,
                      batch_key: str | None = None, labels_key: str | None = None, backend: str | None = "torch",
                      **kwargs) -> None:
        """Validate ``adata`` and record its counts, samples, batches and labels.

        Parameters
        ----------
        adata
            Raw counts in ``X`` or ``layers[layer]``.
        layer
            Layer with the raw counts; ``None`` reads ``adata.X``.
        sample_key
            ``.obs`` column of samples (donors, perturbations, ...): the target covariate; at least two.
        batch_key
            ``.obs`` column of the nuisance covariate (e.g. site, plate), corrected for in the decoder.
        labels_key
            ``.obs`` column of cell labels: the prior on u then has one component per label.
        backend
            Accepted for scvi-tools compatibility and ignored (cellvi is PyTorch).
        """
        from cellvi.data import setup_anndata

        if kwargs:
            raise ValueError(f"Unsupported setup_anndata arguments {sorted(kwargs)}; MrVI reads layer, sample_key, "
                             "batch_key and labels_key.")
        if sample_key is None:
            raise ValueError("MrVI needs sample_key: the .obs column naming each cell's sample (e.g. donor).")
        spec = setup_anndata(adata, layer=layer, sample_key=sample_key, batch_key=batch_key, labels_key=labels_key,
                             model_class=cls.__name__)
        if spec.n_samples < 2:
            raise ValueError(f"adata.obs[{sample_key!r}] has a single sample ({spec.sample_categories[0]!r}); MrVI "
                             "compares samples and needs at least two.")

    # ------------------------------------------------------------------ samples

    @property
    def sample_key(self) -> str:
        return self.spec.sample_key

    @property
    def sample_order(self) -> np.ndarray:
        """Sample names in model order (the order of every ``sample`` axis)."""
        return np.asarray(self.spec.sample_categories, dtype=object)

    @property
    def n_obs_per_sample(self) -> np.ndarray:
        return self.module.n_obs_per_sample.cpu().numpy()

    def update_sample_info(self, adata: AnnData | None = None) -> None:
        """Recompute :attr:`sample_info` from ``adata.obs`` (e.g. after adding a sample-level column)."""
        from cellvi.models.base import sample_table

        self.sample_info = sample_table(self.adata if adata is None else adata, self.spec)

    # ------------------------------------------------------------------ training

    # a bare call of scvi-tools' torch MRVI.train: Adam with these settings, KL warm-up over 20 epochs,
    # gradient norm clipped at 40, validation every epoch (early stopping off; patience 15 when on). cellvi: runs of
    # 2M cell passes or more compile the network (network_terms): 10-20 s (35-50 s the first time on a machine,
    # before inductor's cache holds it) against 20-35 us saved per cell pass (break-even ~1.5M passes cold)
    train_defaults = {"lr": 2e-3, "weight_decay": 1e-8, "eps": 1e-8, "optimizer": "Adam", "n_epochs_kl_warmup": 20,
                      "gradient_clip_val": 40.0, "check_val_every_n_epoch": 1, "early_stopping_patience": 15,
                      "compile_cell_passes": 2_000_000}

    def train(self, max_epochs: int | None = None, accelerator: str = "auto", devices: int | str = "auto",
              train_size: float | None = None, validation_size: float | None = None, batch_size: int = 128,
              early_stopping: bool = False, plan_kwargs: dict | None = None, **trainer_kwargs) -> None:
        """Train as a bare call of scvi-tools' torch MRVI does (its argument order).

        Defaults: epochs ``min(400, 400 * 20000 / n_cells)``, 90 % of cells for training, batch 128, Adam
        (lr 2e-3, eps 1e-8, weight decay 1e-8), KL warm-up over 20 epochs, gradient norm clipped at 40,
        validation every epoch (``elbo_validation``), no early stopping (patience 15 when on).

        Parameters
        ----------
        plan_kwargs
            ``lr``, ``weight_decay``, ``eps``, ``optimizer`` (``"Adam"`` or ``"AdamW"``), ``n_epochs_kl_warmup``,
            ... (see :meth:`cellvi.SCVI.train`).
        **trainer_kwargs
            Trainer options and cellvi's own (``shuffle_set_split``, ``seed``, ``checkpoint_dir``,
            ``resume_from``, ...), as in :meth:`cellvi.SCVI.train`.
        """
        super().train(max_epochs=max_epochs, accelerator=accelerator, devices=devices, train_size=train_size,
                      validation_size=validation_size, batch_size=batch_size, early_stopping=early_stopping,
                      plan_kwargs=plan_kwargs, **trainer_kwargs)

    # ------------------------------------------------------------------ likelihoods

    def get_marginal_ll(self, adata: AnnData | None = None, indices=None, n_mc_samples: int = 1000,
                        batch_size: int | None = None, return_mean: bool = True):
        """Not available for MrVI, as in scvi-tools (its MRVI module has no ``marginal_ll``).

        z is a deterministic function of u and the sample, and its term in the ELBO is a penalty on
        ``z - u'`` rather than a KL divergence, so there is no importance-sampling estimate of
        ``log p(x)`` to offer; use :meth:`get_elbo` to compare fits.
        """
        raise NotImplementedError("MrVI has no marginal log-likelihood (z is deterministic given u and the sample; "
                                  "its ELBO term is a penalty). Use get_elbo() or get_reconstruction_error().")

    # ------------------------------------------------------------------ latent spaces

    @torch.no_grad()
    def get_latent_representation(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None,
                                  use_mean: bool = True, give_z: bool = False) -> np.ndarray:
        """u (``give_z=False``, ``(cells, n_latent_u)``) or z in the cell's own sample (``(cells, n_latent)``).

        ``use_mean`` uses the posterior mean of u (else one draw).
        """
        self.module.eval()
        out = []
        for batch in self._minibatches(adata, indices, batch_size):
            qu = self.module.qu(batch["x"], batch["sample"], batch.get("nonzeros"))
            u = qu.mean if use_mean else qu.sample()
            out.append((self.module.z_from_u(u, batch["sample"], use_mean)[0] if give_z else u).cpu())
        return torch.cat(out).numpy()

    def _cell_chunks(self, adata: AnnData | None, indices, batch_size: int | None, n_samples: int):
        """Minibatches small enough that cells x samples stays under ``ROWS_PER_CHUNK``."""
        size = max(1, min(batch_size or 256, ROWS_PER_CHUNK // max(n_samples, 1)))
        return self._minibatches(adata, indices, size)

    @torch.no_grad()
    def get_local_sample_representation(self, adata: AnnData | None = None, indices=None, batch_size: int = 256,
                                        use_mean: bool = True, use_vmap="auto"):
        """Counterfactual z of every cell under every sample, an xarray ``(cell_name, sample, latent_dim)``."""
        import xarray as xr

        adata_ = self.adata if adata is None else adata
        idx = as_indices(indices, adata_.n_obs)
        self.module.eval()
        samples = torch.arange(self.spec.n_samples, device=self.device)
        out = []
        for batch in self._cell_chunks(adata, idx, batch_size, self.spec.n_samples):
            qu = self.module.qu(batch["x"], batch["sample"], batch.get("nonzeros"))
            u = qu.mean if use_mean else qu.sample()
            out.append(self.module.counterfactual_z(u, samples, use_mean).cpu())
        return xr.DataArray(torch.cat(out).numpy(), dims=["cell_name", "sample", "latent_dim"],
                            coords={"cell_name": np.asarray(adata_.obs_names[idx]), "sample": self.sample_order},
                            name="sample_representations")

    # ------------------------------------------------------------------ sample distances

    @torch.no_grad()
    def get_local_sample_distances(self, adata: AnnData | None = None, batch_size: int = 256, use_mean: bool = True,
                                   normalize_distances: bool = False, use_vmap="auto", groupby=None,
                                   keep_cell: bool = True, norm: str = "l2", mc_samples: int = 10):
        """Per-cell sample-by-sample distances between counterfactual states, and their group averages.

        Parameters
        ----------
        adata
            Cells to analyse (default: the model's).
        batch_size
            Cells per step (reduced so that cells x samples stays bounded).
        use_mean
            Counterfactuals from the posterior mean of u; else average over ``mc_samples`` draws.
        normalize_distances
            Divide by the spread of distances between two draws of the cell's own state (uses draws).
        use_vmap
            Accepted for compatibility; ignored (cellvi batches over samples directly).
        groupby
            ``.obs`` column(s) of cell groups: adds one variable per key, averaged over each group's cells.
        keep_cell
            Keep every cell's matrix (variable ``cell``); ``False`` holds only the group sums in memory.
        norm
            ``"l2"``, ``"l1"`` or ``"linf"``.

        Returns
        -------
        xarray.Dataset: ``cell`` with dims ``(cell_name, sample_x, sample_y)``; for each key ``k`` of
        ``groupby``, ``k`` with dims ``(k_name, sample_x, sample_y)``. Exactly symmetric, zero diagonal.
        """
        import xarray as xr

        groupby = [groupby] if isinstance(groupby, str) else list(groupby or [])
        if not keep_cell and not groupby:
            raise ValueError("keep_cell=False without groupby leaves nothing to return; pass groupby=... .")
        if normalize_distances:
            if norm != "l2":
                raise ValueError(f"normalize_distances needs norm='l2', got {norm!r}.")
            if use_mean:
                warnings.warn("normalize_distances uses sampled representations; use_mean is ignored.", UserWarning,
                              stacklevel=2)
            use_mean = False
        adata_ = self.adata if adata is None else adata
        S, n = self.spec.n_samples, adata_.n_obs
        groups = {}
        for key in groupby:
            if key not in adata_.obs.columns:
                raise ValueError(f"groupby {key!r} is not a column of adata.obs.")
            cat = pd.Categorical(adata_.obs[key])
            groups[key] = (cat, torch.zeros(len(cat.categories), S, S, dtype=torch.float64, device=self.device),
                           torch.as_tensor(cat.codes.astype(np.int64), device=self.device))
        cells = np.empty((n, S, S), dtype=np.float32) if keep_cell else None
        for batch, d in self._distance_chunks(adata, batch_size, use_mean, normalize_distances, norm, mc_samples):
            rows = batch["index"]
            if keep_cell:
                cells[rows.cpu().numpy()] = d.cpu().numpy()
            for _, sums, codes in groups.values():
                sums.index_add_(0, codes[rows], d.double())
        names = self.sample_order
        data_vars = {}
        if keep_cell:
            data_vars["cell"] = xr.DataArray(cells, dims=["cell_name", "sample_x", "sample_y"],
                                             coords={"cell_name": np.asarray(adata_.obs_names)})
        for key, (cat, sums, codes) in groups.items():
            counts = torch.bincount(codes, minlength=len(cat.categories)).double()
            present = (counts > 0).cpu().numpy()
            mean = (sums / counts.clamp_min(1)[:, None, None]).cpu().numpy()[present]
            data_vars[key] = xr.DataArray(mean, dims=[f"{key}_name", "sample_x", "sample_y"],
                                          coords={f"{key}_name": np.asarray(cat.categories)[present]})
        return xr.Dataset(data_vars, coords={"sample_x": names, "sample_y": names})

    def _distance_chunks(self, adata, batch_size, use_mean, normalized, norm, mc_samples):
        """Yield (minibatch, its ``(cells, S, S)`` distances) over all cells, a chunk at a time."""
        m = self.module
        m.eval()
        samples = torch.arange(self.spec.n_samples, device=self.device)
        S = self.spec.n_samples
        size = max(1, min(batch_size, PAIRS_PER_CHUNK // (S * S * (1 if use_mean else mc_samples))))
        for batch in self._cell_chunks(adata, None, size, S * (1 if use_mean else mc_samples)):
            qu = m.qu(batch["x"], batch["sample"], batch.get("nonzeros"))
            if use_mean:
                d = distances.sample_distances(m.counterfactual_z(qu.mean, samples), norm)
            else:
                z = m.counterfactual_z(qu.sample((mc_samples,)), samples, use_mean=False)  # (mc, B, S, L)
                d_all = distances.sample_distances(z, norm)  # (mc, B, S, S)
                if normalized:
                    own = m.z_from_u(qu.sample((2 * mc_samples,)).flatten(0, 1),
                                     batch["sample"].repeat(2 * mc_samples), use_mean=False)[0]
                    mean, var = distances.baseline_distances(own.view(2 * mc_samples, -1, own.shape[-1]))
                    d = distances.normalize_by_baseline(d_all, mean, var)
                else:
                    d = d_all.mean(0)
            yield batch, d

    # ------------------------------------------------------------------ differential abundance

    @torch.no_grad()
    def _qu_params(self, adata: AnnData | None, batch_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior mean and sd of u, and the sample code, for every cell of ``adata``."""
        self.module.eval()
        locs, scales, codes = [], [], []
        for batch in self._minibatches(adata, None, batch_size):
            qu = self.module.qu(batch["x"], batch["sample"], batch.get("nonzeros"))
            locs.append(qu.loc)
            scales.append(qu.scale)
            codes.append(batch["sample"])
        return torch.cat(locs), torch.cat(scales), torch.cat(codes)

    @torch.no_grad()
    def get_aggregated_posterior(self, adata: AnnData | None = None, sample=None, indices=None,
                                 batch_size: int = 256) -> torch.distributions.MixtureSameFamily:
        """The equal-weight mixture of q(u | x) over the cells (of ``sample`` when given), as a torch distribution."""
        adata_ = self.adata if adata is None else adata
        idx = as_indices(indices, adata_.n_obs)
        if sample is not None:
            idx = np.intersect1d(idx, np.flatnonzero(adata_.obs[self.sample_key].astype(str).to_numpy() == str(sample)))
        loc, scale, _ = self._qu_params(adata, batch_size)
        loc, scale = loc[torch.as_tensor(idx, device=loc.device)], scale[torch.as_tensor(idx, device=loc.device)]
        D = torch.distributions
        return D.MixtureSameFamily(D.Categorical(logits=torch.zeros(len(idx), device=loc.device)),
                                   D.Independent(D.Normal(loc, scale), 1))

    @torch.no_grad()
    def _sample_log_densities(self, adata, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``log q_s(u_n)`` for every cell n and sample s (``(cells, S)``), and each cell's sample code."""
        loc, scale, codes = self._qu_params(adata, batch_size)
        log_probs = density.aggregated_log_density(loc, loc, scale, codes, self.spec.n_samples)  # by blocks of cells
        return log_probs.cpu().numpy(), codes.cpu().numpy()

    def differential_abundance(self, adata: AnnData | None = None, sample_cov_keys: list[str] | None = None,
                               sample_subset: list[str] | None = None, compute_log_enrichment: bool = False,
                               omit_original_sample: bool = True, batch_size: int = 128):
        """Density of each sample's (and covariate level's) cells at each cell's state u.

        Returns
        -------
        xarray.Dataset with ``log_probs`` ``(cell_name, sample)``: ``log q_s(u_n)``, the log density of
        the aggregated posterior of sample s at cell n's posterior mean; and, for each key of
        ``sample_cov_keys``, ``<key>_log_probs`` ``(cell_name, <key>)``: the log density of the samples
        with each level (each cell's own sample left out with ``omit_original_sample``); with
        ``compute_log_enrichment``, ``<key>_log_enrichs``: level versus all other samples. A log ratio
        of two levels' densities is MrVI's DA score.
        """
        import xarray as xr

        adata_ = self.adata if adata is None else adata
        log_probs, own = self._sample_log_densities(adata, batch_size)
        present = np.isin(np.arange(self.spec.n_samples), own)  # samples with cells in adata
        names = self.sample_order
        coords = {"cell_name": np.asarray(adata_.obs_names), "sample": names[present]}
        data_vars = {"log_probs": (["cell_name", "sample"], log_probs[:, present])}
        info = self.sample_info
        allowed = present if sample_subset is None else present & np.isin(names, list(map(str, sample_subset)))
        for key in sample_cov_keys or []:
            if key not in info.columns:
                raise ValueError(f"sample covariate {key!r} is not a column of model.sample_info; it must be an .obs "
                                 "column constant within each sample.")
            values = info[key]
            levels = [v for v in pd.unique(values) if (values == v).to_numpy()[allowed].any()]
            per_level, enrich = [], []
            for v in levels:
                cols = np.flatnonzero((values == v).to_numpy() & allowed)
                per_level.append(density.mixture_over_groups(log_probs, cols, own if omit_original_sample else None))
                if compute_log_enrichment:
                    rest = np.flatnonzero(~(values == v).to_numpy() & present)
                    if rest.size == 0:
                        warnings.warn(f"All samples have {key}={v}; no log enrichment for it.", UserWarning, stacklevel=2)
                        enrich.append(np.full(len(own), np.nan))
                        continue
                    enrich.append(per_level[-1] - density.mixture_over_groups(
                        log_probs, rest, own if omit_original_sample else None))
            coords[key] = np.asarray(levels)
            data_vars[f"{key}_log_probs"] = (["cell_name", key], np.stack(per_level, 1))
            if compute_log_enrichment:
                data_vars[f"{key}_log_enrichs"] = (["cell_name", key], np.stack(enrich, 1))
        return xr.Dataset(data_vars, coords=coords)

    @torch.no_grad()
    def get_outlier_cell_sample_pairs(self, adata: AnnData | None = None, subsample_size: int = 5_000,
                                      quantile_threshold: float = 0.05, admissibility_threshold: float = 0.0,
                                      batch_size: int = 256):
        """Admissibility of each (cell, sample) pair: is the cell's state u covered by the sample's cells?

        The score of cell n for sample s is ``max_m log N(u_n; mu_m, sigma_m)`` over (up to
        ``subsample_size``) cells m of s; the threshold is the ``quantile_threshold`` quantile of the
        same score of every cell for its own sample (itself excluded), pooled over samples.

        Returns
        -------
        xarray.Dataset with ``log_probs``, ``log_ratios`` (score minus threshold) and ``is_admissible``
        (``log_ratios > admissibility_threshold``), each ``(cell_name, sample)``.
        """
        import xarray as xr

        adata_ = self.adata if adata is None else adata
        loc, scale, codes = self._qu_params(adata, batch_size)
        rng = np.random.default_rng(0)
        codes_np = codes.cpu().numpy()
        scores, within = [], []
        present = [s for s in range(self.spec.n_samples) if (codes_np == s).any()]
        for s in present:
            members = np.flatnonzero(codes_np == s)
            if subsample_size is not None and members.size > subsample_size:
                members = np.sort(rng.choice(members, subsample_size, replace=False))
            m = torch.as_tensor(members, device=loc.device)
            within.append(density.max_log_density_excluding_self(
                density.gaussian_log_density(loc[m], loc[m], scale[m])).cpu())
            col = [density.gaussian_log_density(loc[i : i + batch_size], loc[m], scale[m]).amax(1).cpu()
                   for i in range(0, loc.shape[0], batch_size)]
            scores.append(torch.cat(col))
        log_probs = torch.stack(scores, 1).numpy()
        thresh = np.quantile(torch.cat(within).numpy(), quantile_threshold)
        log_ratios = log_probs - thresh
        coords = {"cell_name": np.asarray(adata_.obs_names), "sample": self.sample_order[present]}
        return xr.Dataset({"log_probs": (["cell_name", "sample"], log_probs),
                           "log_ratios": (["cell_name", "sample"], log_ratios),
                           "is_admissible": (["cell_name", "sample"], log_ratios > admissibility_threshold)},
                          coords=coords)

    # ------------------------------------------------------------------ differential expression

    @torch.no_grad()
    def differential_expression(self, adata: AnnData | None = None, sample_cov_keys: list[str] | None = None,
                                sample_subset: list[str] | None = None, batch_size: int = 128, use_vmap="auto",
                                normalize_design_matrix: bool = True, add_batch_specific_offsets: bool = False,
                                mc_samples: int = 50, store_lfc: bool = False,
                                store_lfc_metadata_subset: list[str] | None = None, store_baseline: bool = False,
                                eps_lfc: float = 1e-4, filter_inadmissible_samples: bool = False, lambd: float = 0.0,
                                delta: float | None = 0.3, **filter_samples_kwargs):
        """Cell-specific multivariate DE: regress each cell's counterfactual states on sample covariates.

        For cell n, ``z_n(s)`` (u drawn ``mc_samples`` times, standardized over samples) is regressed on
        the design matrix of the samples (:func:`cellvi.analysis.regression.design_matrix`). The
        chi-squared statistic of ``R beta`` (``R`` the root of the Gram matrix) tests each covariate.
        With ``store_lfc``, the log2 fold change of each gene for a covariate is
        ``log2(h(z_ref + beta) + eps) - log2(h(z_ref) + eps)``, with z_ref the cell's average counterfactual
        state, averaged over draws and (equally weighted) batches.

        With ``add_batch_specific_offsets`` (scvi-tools' option for multi-site cohorts), the design
        gets one indicator column per batch of the kept samples, ``offset_batch_<batch code>``, first:
        covariates are then compared within batches. Every sample must come from a single batch
        (else a ValueError); without a ``batch_key`` the single offset is an intercept. The offsets
        are reported in ``beta``, ``effect_size`` and ``pvalue`` like any column (as scvi-tools does) but
        get no LFC: the LFCs (on the ``covariate_sub`` axis) use, in each batch, ``z_ref`` = average
        state + that batch's offset, and weight batches by the cell's admissible samples in each.

        Returns
        -------
        xarray.Dataset: ``beta`` ``(cell_name, covariate, latent_dim)``, ``effect_size``, ``pvalue``,
        ``padj`` (Benjamini-Hochberg over all cells and covariates) ``(cell_name, covariate)``; with
        ``store_lfc``, ``lfc`` (and ``lfc_std``, ``pde`` = ``P(|lfc| >= delta)`` when ``delta`` is set)
        ``(cell_name, covariate, gene)``; with ``store_baseline``, ``baseline_expression``
        ``(covariate, cell_name, gene)``; with ``filter_inadmissible_samples``, ``n_samples`` per cell.
        """
        import xarray as xr
        from scipy.stats import false_discovery_control

        if sample_cov_keys is None:
            raise ValueError("differential_expression needs sample_cov_keys: sample-level .obs columns to test.")
        adata_ = self.adata if adata is None else adata
        names = self.sample_order
        keep = np.ones(len(names), bool) if sample_subset is None else np.isin(names, list(map(str, sample_subset)))
        if keep.sum() < 2:
            raise ValueError(f"sample_subset keeps {int(keep.sum())} known sample(s); at least two are needed.")
        X, cov_names, owners = regression.design_matrix(self.sample_info.iloc[np.flatnonzero(keep)],
                                                        list(sample_cov_keys), normalize_design_matrix)
        offsets = None  # (S kept, batches): which batch each kept sample belongs to
        if add_batch_specific_offsets:
            X, cov_names, owners, offsets, offset_batches = self._with_batch_offsets(X, cov_names, owners, keep)
        lfc_keys = list(store_lfc_metadata_subset or sample_cov_keys)
        lfc_cols = np.flatnonzero(np.isin(owners, lfc_keys)) if store_lfc else np.array([], int)
        if filter_inadmissible_samples:
            adm = self.get_outlier_cell_sample_pairs(adata, **filter_samples_kwargs)["is_admissible"]
            adm = adm.reindex(sample=names[keep], fill_value=False).values
        else:
            adm = np.ones((adata_.n_obs, int(keep.sum())), bool)
        m = self.module
        m.eval()
        dev = self.device
        Xt = torch.as_tensor(X, dtype=torch.float64, device=dev)
        samples = torch.as_tensor(np.flatnonzero(keep), device=dev)
        if offsets is not None:
            offsets = torch.as_tensor(offsets, dtype=torch.float64, device=dev)
        out = {k: [] for k in ("beta", "effect_size", "pvalue", "lfc", "lfc_std", "pde", "baseline")}
        for batch in self._cell_chunks(adata, None, batch_size, int(keep.sum()) * mc_samples):
            rows = batch["index"].cpu().numpy()
            W = torch.as_tensor(adm[rows], dtype=torch.float64, device=dev)
            A, root = regression.regression_operators(Xt, W, lambd)
            qu = m.qu(batch["x"], batch["sample"], batch.get("nonzeros"))
            z = m.counterfactual_z(qu.sample((mc_samples,)), samples, use_mean=False).double()  # (mc, B, S, L)
            zs, z_mean, z_sd = regression.standardize_over_samples(z)
            beta_std = torch.einsum("nks,mnsl->mnkl", A, zs)  # (mc, B, K, L)
            stat = torch.einsum("nkj,mnjl->mnkl", root, beta_std).square().mean(0).sum(-1)  # (B, K)
            beta = beta_std * z_sd  # back to z units: (mc, B, K, L)
            out["beta"].append(beta.mean(0).float().cpu())
            out["effect_size"].append(stat.float().cpu())
            out["pvalue"].append(regression.chi2_sf(stat.cpu().numpy(), W.sum(1).clamp_min(1).cpu().numpy()[:, None]))
            if store_lfc:
                z_mean = z_mean.squeeze(-2)  # (mc, B, L)
                if offsets is None:  # every batch, equally weighted, around the average counterfactual
                    refs = [(b, z_mean) for b in range(self.spec.n_batches)]
                    weights = torch.full((len(rows), len(refs)), 1.0 / len(refs), dtype=W.dtype, device=dev)
                else:  # each batch around its fitted offset, weighted by the cell's admissible samples in it
                    refs = [(int(b), z_mean + beta[:, :, j]) for j, b in enumerate(offset_batches)]
                    weights = W @ offsets / W.sum(1, keepdim=True).clamp_min(1)
                self._lfc_chunk(beta[:, :, lfc_cols].float(), [(b, r.float()) for b, r in refs], weights.float(),
                                eps_lfc, delta, store_baseline, out)
        pvalue = np.concatenate(out["pvalue"])
        padj = false_discovery_control(pvalue.ravel(), method="bh").reshape(pvalue.shape)
        coords = {"cell_name": np.asarray(adata_.obs_names), "covariate": np.asarray(cov_names),
                  "latent_dim": np.arange(self.config.n_latent), "gene": np.asarray(self.spec.var_names)}
        data_vars = {"beta": (["cell_name", "covariate", "latent_dim"], torch.cat(out["beta"]).numpy()),
                     "effect_size": (["cell_name", "covariate"], torch.cat(out["effect_size"]).numpy()),
                     "pvalue": (["cell_name", "covariate"], pvalue),
                     "padj": (["cell_name", "covariate"], padj)}
        if filter_inadmissible_samples:
            data_vars["n_samples"] = (["cell_name"], adm.sum(1))
        if store_lfc:
            lfc_dim = "covariate"
            if len(lfc_cols) != len(cov_names):
                lfc_dim = "covariate_sub"
                coords["covariate_sub"] = np.asarray(cov_names)[lfc_cols]
            data_vars["lfc"] = (["cell_name", lfc_dim, "gene"], torch.cat(out["lfc"]).numpy())
            if delta is not None:
                data_vars["lfc_std"] = (["cell_name", lfc_dim, "gene"], torch.cat(out["lfc_std"]).numpy())
                data_vars["pde"] = (["cell_name", lfc_dim, "gene"], torch.cat(out["pde"]).numpy())
            if store_baseline:
                data_vars["baseline_expression"] = ([lfc_dim, "cell_name", "gene"], torch.cat(out["baseline"], 1).numpy())
        return xr.Dataset(data_vars, coords=coords)

    def _with_batch_offsets(self, X: np.ndarray, cov_names: list[str], owners: list[str], keep: np.ndarray):
        """Add scvi-tools' batch-specific offsets to the design of the kept samples.

        Returns the design, its names and owners, the ``(kept samples, offset columns)`` indicators, and
        the batch code of each offset column.
        """
        obs = self._data().obs
        codes = {k: torch.as_tensor(obs[k]).cpu().numpy() for k in ("sample", "batch")}  # tensors, or arrays if backed
        batch_of = regression.sample_batches(codes["sample"], codes["batch"], self.sample_order)[keep]
        if (batch_of < 0).any():
            missing = list(self.sample_order[keep][batch_of < 0][:10])
            raise ValueError(f"Samples {missing} have no cells in the model's data, so their batch is unknown; leave "
                             "them out with sample_subset or use add_batch_specific_offsets=False.")
        X, cov_names, owners = regression.add_batch_offsets(X, cov_names, owners, batch_of)
        offset_batches = np.unique(batch_of)
        return X, cov_names, owners, X[:, : len(offset_batches)], offset_batches

    def _lfc_chunk(self, beta: Tensor, refs: list[tuple[int, Tensor]], weights: Tensor, eps_lfc: float,
                   delta: float | None, store_baseline: bool, out: dict) -> None:
        """Per-gene LFCs of ``beta`` ``(mc, B, K, L)``, averaged over batches.

        For each ``(batch code, z_ref)`` of ``refs`` (``z_ref``: ``(mc, B, L)``), the draws
        ``log2(h(z_ref + beta) + eps) - log2(h(z_ref) + eps)`` are decoded in that batch; their mean,
        variance and ``P(|lfc| >= delta)`` over draws are averaged over batches with the per-cell
        ``weights`` ``(B, len(refs))`` (rows summing to one).
        """
        mc, B, K, L = beta.shape
        lfc = lfc_var = pde = base = beta.new_zeros(B, K, self.spec.n_genes)
        for j, (b, z_ref) in enumerate(refs):
            w = weights[:, j, None, None]  # (B, 1, 1)
            if not bool((w > 0).any()):
                continue
            codes = torch.full((mc * B,), b, device=beta.device, dtype=torch.int64)
            h0 = self.module.decode(z_ref.reshape(mc * B, L), codes).view(mc, B, 1, -1)
            h1 = self.module.decode((z_ref[:, :, None] + beta).reshape(mc * B * K, L),
                                    codes.repeat_interleave(K)).view(mc, B, K, -1)
            draws = torch.log2(h1 + eps_lfc) - torch.log2(h0 + eps_lfc)  # (mc, B, K, G)
            lfc = lfc + w * draws.mean(0)
            if delta is not None:
                lfc_var = lfc_var + w * draws.var(0)
                pde = pde + w * (draws.abs() >= delta).float().mean(0)
            if store_baseline:
                base = base + w * h1.mean(0)
        out["lfc"].append(lfc.cpu())
        if delta is not None:
            out["lfc_std"].append(lfc_var.sqrt().cpu())
            out["pde"].append(pde.cpu())
        if store_baseline:
            out["baseline"].append(base.permute(1, 0, 2).cpu())

    # ------------------------------------------------------------------ expression

    @torch.no_grad()
    def get_normalized_expression(self, adata: AnnData | None = None, indices=None, transform_batch=None,
                                  gene_list=None, library_size: float | str = 1, n_samples: int = 1,
                                  batch_size: int | None = None, return_mean: bool = True,
                                  return_numpy: bool | None = None):
        """Expected expression h (times ``library_size``; ``"latent"``: the observed library) in each cell's own sample."""
        self.module.eval()
        adata_, idx = self._expression_rows(adata, indices, None)
        codes = self._batch_codes(transform_batch)
        genes = self._gene_mask(gene_list)
        chunks = []
        for batch in self._minibatches(adata_, idx, batch_size):
            qu = self.module.qu(batch["x"], batch["sample"], batch.get("nonzeros"))
            u = qu.sample((n_samples,)).flatten(0, 1)
            z = self.module.z_from_u(u, batch["sample"].repeat(n_samples))[0]
            h = sum(self.module.decode(z, batch["batch"].repeat(n_samples) if c is None else torch.full_like(
                batch["batch"].repeat(n_samples), c)) for c in codes) / len(codes)
            h = h.view(n_samples, -1, h.shape[-1])
            h = h * (batch["x"].sum(-1, keepdim=True) if library_size == "latent" else float(library_size))
            chunks.append((h if genes is None else h[..., torch.as_tensor(genes, device=h.device)]).cpu())
        return self._expression_output(torch.cat(chunks, 1).numpy(), adata_, idx, gene_list, return_mean, return_numpy)


MRVI = MrVI  # scvi-tools' name
