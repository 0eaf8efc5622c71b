"""totalVI: RNA and surface proteins of CITE-seq in one latent space (Gayoso et al., 2021, Nat. Methods 18:272).

Generative model, for a cell with RNA counts x, protein counts y, batch s and covariates c:

    z ~ Normal(0, I)                                         latent state (n_latent)
    l = log(sum x)                                           log library size (observed)
    rho = softmax(f_rho(z, s, c))                            normalized RNA expression
    x_g ~ NB(exp(l) * rho_g, theta_g) [zero-inflated]        RNA counts, as in scVI
    log beta_t ~ Normal(a_t(z, s, c), b_t(z, s, c))          protein background rate; prior Normal(c_ts, d_ts)
    alpha_t = 1 + softplus(f_alpha(z, s, c))_t >= 1          foreground / background ratio
    pi_t = sigmoid(f_pi(z, s, c))_t                          probability that the protein is background only
    y_t ~ pi_t NB(beta_t, phi_t) + (1 - pi_t) NB(alpha_t beta_t, phi_t)

The background prior ``N(c_ts, d_ts)`` is one per protein and batch, learned, and initialised
empirical-Bayes style from the data (the lower component of a two-Gaussian fit to ``log(1 + y)``,
:func:`fit_background_prior`). Proteins not measured in a cell (missing from its panel, or NaN)
are left out of the likelihood and of the background KL through the loader's ``protein_mask``; they are
never read as zero counts. The encoder q(z | x, y, s) reads ``log(1 + x)`` and ``log(1 + y)`` (0 where
not measured) with the batch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from cellvi import distributions as dist
from cellvi import settings
from cellvi.data.loader import obs_arrays
from cellvi.data.setup import (
    MUDATA_PROTEIN_KEY,
    UNS_KEY,
    DataSpec,
    check_modalities,
    get_counts,
    import_mudata,
    is_mudata,
    mudata_spec,
    mudata_view,
    setup_anndata,
)
from cellvi.models.base import (
    Model,
    _file_names,
    _read_meta,
    average_over_batches,
    cell_mean,
    check_library_size,
    expression_from,
    importance_log_marginal,
)
from cellvi.models.scvi import flatten_samples, repeat_samples
from cellvi.nn import MLP, GaussianEncoder, Linear

CHOICES = {
    "gene_dispersion": ("gene", "gene-batch", "gene-label"),
    "protein_dispersion": ("protein", "protein-batch", "protein-label"),
    "gene_likelihood": ("nb", "zinb"),
    "latent_distribution": ("normal", "ln"),
    "use_batch_norm": ("encoder", "decoder", "none", "both"),
    "use_layer_norm": ("encoder", "decoder", "none", "both"),
}
MIN_PROTEINS_EMPIRICAL = 10  # scvi-tools' default: the empirical background prior with more than 10 proteins


@dataclass(frozen=True)
class TotalVIConfig:
    n_latent: int = 20  # size of z
    gene_dispersion: str = "gene"  # theta per gene, gene-batch or gene-label
    protein_dispersion: str = "protein"  # phi per protein, protein-batch or protein-label
    gene_likelihood: str = "nb"  # nb or zinb
    latent_distribution: str = "normal"  # normal, or ln (z = softmax(Normal))
    empirical_protein_background_prior: bool | None = None  # None: True when there are more than 10 proteins
    override_missing_proteins: bool = False  # True: an all-zero protein in a panel counts as measured (zeros)
    n_hidden: int = 256
    n_layers_encoder: int = 2
    n_layers_decoder: int = 1
    dropout_rate_encoder: float = 0.2
    dropout_rate_decoder: float = 0.2
    encode_covariates: bool = True  # the encoder reads batch and covariates too
    use_batch_norm: str = "both"
    use_layer_norm: str = "none"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")


# --------------------------------------------------------------------------- empirical background prior


def fit_background_prior(log_y: np.ndarray, measured: np.ndarray, n_iter: int = 200,
                         min_sd: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of the lower component of a two-component 1-D Gaussian mixture, per column, by EM.

    Parameters
    ----------
    log_y
        ``(cells, proteins)`` values, e.g. ``log(1 + y)``.
    measured
        Boolean mask of the entries to fit; each column is fitted to its measured entries only.
    n_iter
        EM iterations (all columns at once).
    min_sd
        Floor of each component's sd (a column of identical values would otherwise collapse to sd 0).

    Returns
    -------
    ``(mean, sd)``, each ``(proteins,)``; NaN for columns with fewer than two measured entries.
    """
    x = np.asarray(log_y, dtype=np.float64)
    w = np.asarray(measured, dtype=np.float64)
    n = w.sum(0)
    m = (w * x).sum(0) / np.maximum(n, 1)
    sd = np.sqrt((w * (x - m) ** 2).sum(0) / np.maximum(n, 1)) + min_sd
    mu = np.stack([m - sd, m + sd])  # (2, P): start one component below and one above the mean
    var = np.stack([sd**2, sd**2])
    log_pi = np.log(np.full((2, x.shape[1]), 0.5))
    for _ in range(n_iter):
        logp = log_pi[:, None] - 0.5 * ((x[None] - mu[:, None]) ** 2 / var[:, None] + np.log(2 * np.pi * var[:, None]))
        r = np.exp(logp - np.logaddexp(logp[0], logp[1])[None]) * w[None]  # (2, N, P) responsibilities
        nk = r.sum(1) + 1e-12
        log_pi = np.log(nk / nk.sum(0))
        mu = (r * x[None]).sum(1) / nk
        var = np.maximum((r * (x[None] - mu[:, None]) ** 2).sum(1) / nk, min_sd**2)
    lower = np.argmin(mu, 0)
    cols = np.arange(x.shape[1])
    mean, sd = mu[lower, cols], np.sqrt(var[lower, cols])
    mean[n < 2], sd[n < 2] = np.nan, np.nan
    return mean, sd


def background_prior_init(proteins: np.ndarray, mask: np.ndarray, batch: np.ndarray, n_batches: int,
                          empirical: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Initial ``(mean, log sd)`` of the background prior, each ``(proteins, batches)``.

    Empirical: :func:`fit_background_prior` per batch; a protein not measured in a batch takes its mean
    over the batches where it is (0 and sd 1 when it is measured nowhere). Otherwise random, as scvi-tools.
    """
    P = proteins.shape[1]
    if not empirical:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((P, n_batches)), np.clip(rng.standard_normal((P, n_batches)), -10, 1)
    mean, sd = np.full((P, n_batches), np.nan), np.full((P, n_batches), np.nan)
    for b in range(n_batches):
        rows = batch == b
        if rows.any():
            mean[:, b], sd[:, b] = fit_background_prior(np.log1p(proteins[rows]), mask[rows] > 0)
    n_fitted = (~np.isnan(mean)).sum(1, keepdims=True)  # batches where each protein is measured
    fill_mean = np.where(n_fitted > 0, np.nansum(mean, 1, keepdims=True) / np.maximum(n_fitted, 1), 0.0)
    fill_sd = np.where(n_fitted > 0, np.nansum(sd, 1, keepdims=True) / np.maximum(n_fitted, 1), 1.0)
    return np.where(np.isnan(mean), fill_mean, mean), np.log(np.where(np.isnan(sd), fill_sd, sd))


# --------------------------------------------------------------------------- module


class TotalVIModule(nn.Module):
    """q(z | x, y, s) and p(x, y | z, s, c) (see the module docstring)."""

    def __init__(self, n_genes: int, n_proteins: int, n_batches: int, n_labels: int, n_cats_per_cov: list[int],
                 n_continuous_cov: int, config: TotalVIConfig, prior_mean: np.ndarray, prior_log_scale: np.ndarray):
        super().__init__()
        self.config = cfg = config
        self.n_genes, self.n_proteins, self.n_latent = n_genes, n_proteins, cfg.n_latent
        enc_cats = [n_batches, *n_cats_per_cov] if cfg.encode_covariates else []
        n_enc_in = n_genes + n_proteins + (n_continuous_cov if cfg.encode_covariates else 0)
        bn = lambda part: cfg.use_batch_norm in (part, "both")  # noqa: E731
        ln = lambda part: cfg.use_layer_norm in (part, "both")  # noqa: E731
        self.z_encoder = GaussianEncoder(n_enc_in, cfg.n_latent, n_cats=enc_cats, n_hidden=cfg.n_hidden,
                                         n_layers=cfg.n_layers_encoder, dropout_rate=cfg.dropout_rate_encoder,
                                         use_batch_norm=bn("encoder"), use_layer_norm=ln("encoder"))
        self.decoder = MLP(cfg.n_latent + n_continuous_cov, cfg.n_hidden, n_cats=[n_batches, *n_cats_per_cov],
                           n_hidden=cfg.n_hidden, n_layers=cfg.n_layers_decoder, dropout_rate=cfg.dropout_rate_decoder,
                           use_batch_norm=bn("decoder"), use_layer_norm=ln("decoder"))
        # one matmul for every per-feature output:
        # [RNA scale logits (G) | RNA zero-inflation logits (G, zinb) | background mean, log sd | foreground | mixing (P each)]
        self.n_gene_heads = 2 if cfg.gene_likelihood == "zinb" else 1
        self.heads = Linear(cfg.n_hidden, self.n_gene_heads * n_genes + 4 * n_proteins)
        n_theta = {"gene": 1, "gene-batch": n_batches, "gene-label": n_labels}[cfg.gene_dispersion]
        n_phi = {"protein": 1, "protein-batch": n_batches, "protein-label": n_labels}[cfg.protein_dispersion]
        self.log_theta = nn.Parameter(torch.randn(n_theta, n_genes))  # RNA inverse dispersion
        self.log_phi = nn.Parameter(2 * torch.rand(n_phi, n_proteins))  # protein inverse dispersion
        # background prior N(c_ts, d_ts), learned from its empirical-Bayes start
        self.prior_mean = nn.Parameter(torch.as_tensor(prior_mean, dtype=torch.float32))  # (P, batches)
        self.prior_log_scale = nn.Parameter(torch.as_tensor(prior_log_scale, dtype=torch.float32))

    # q(z | x, y, s, c)
    def inference(self, batch: dict[str, Tensor], n_samples: int = 1) -> dict:
        x, y = batch["x"], batch["proteins"]
        nz = batch.get("nonzeros")
        h = torch.cat([torch.log1p(x) if nz is None else dist.log1p_dense(x, nz), torch.log1p(y)], -1)
        cats: list[Tensor] = []
        if self.config.encode_covariates:
            cont = batch["cont_covs"]
            h = torch.cat([h, cont], -1) if cont.shape[-1] else h
            cats = [batch["batch"], *batch["cat_covs"].unbind(-1)]
        qz = self.z_encoder(h, cats)  # (B, n_latent)
        z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))  # (B, L) or (S, B, L)
        if self.config.latent_distribution == "ln":
            z = F.softmax(z, -1)
        sf = batch.get("size_factor")
        library = torch.log(x.sum(-1, keepdim=True) if sf is None else sf)  # (B, 1)
        if n_samples > 1:
            library = library.expand(n_samples, *library.shape)
        return {"qz": qz, "z": z, "library": library}

    def _decode(self, z: Tensor, batch: Tensor, cat_covs: Tensor, cont_covs: Tensor,
                label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder's one output block ``heads`` ``(cells, n_gene_heads * G + 4 P)`` and the inverse
        dispersions: theta ``(G,)`` or ``(cells, G)``, phi ``(P,)`` or ``(cells, P)``."""
        cfg = self.config
        h = torch.cat([z, cont_covs], -1) if cont_covs.shape[-1] else z
        h = self.decoder(h, [batch, *cat_covs.unbind(-1)])  # (B, n_hidden)
        theta = torch.exp(self.log_theta[0] if cfg.gene_dispersion == "gene" else
                          self.log_theta[batch if cfg.gene_dispersion == "gene-batch" else label])
        phi = torch.exp(self.log_phi[0] if cfg.protein_dispersion == "protein" else
                        self.log_phi[batch if cfg.protein_dispersion == "protein-batch" else label])
        return self.heads(h), theta, phi

    # p(x, y | z, l, s, c): all inputs 2-D (cells, ...)
    def generative(self, z: Tensor, library: Tensor, batch: Tensor, cat_covs: Tensor, cont_covs: Tensor,
                   label: Tensor) -> dict:
        cfg, G, P = self.config, self.n_genes, self.n_proteins
        heads, theta, phi = self._decode(z, batch, cat_covs, cont_covs, label)
        back_mean, back_log_sd, fore, mixing = heads[:, self.n_gene_heads * G :].split(P, -1)  # (B, P) each
        # RNA: mu = exp(library) * softmax(scale logits), computed when read (training fuses it into the likelihood)
        zi = cfg.gene_likelihood == "zinb"
        px = dist.NegativeBinomial.from_logits(heads[:, : (2 if zi else 1) * G], library, theta, zi)
        q_back = dist.normal(back_mean, F.softplus(back_log_sd) + BACK_SD_EPS)  # q(log beta | z)
        log_back = q_back.rsample()
        rate_back = torch.exp(log_back.clamp(max=LOG_BACK_MAX))  # clamp: no overflow from a wild start
        rate_fore = rate_back * (1.0 + F.softplus(fore) + 1e-8)  # alpha >= 1
        py = dist.NegativeBinomialMixture(rate_back, rate_fore, phi, mixing)
        p_back = dist.normal(self.prior_mean.T[batch], torch.exp(self.prior_log_scale.T[batch]))  # (B, P)
        return {"px": px, "py": py, "q_back": q_back, "p_back": p_back, "log_back": log_back}

    def forward_batch(self, batch: dict[str, Tensor], n_samples: int = 1) -> tuple[dict, dict]:
        """Inference then generative; ``n_samples > 1`` flattens samples into the cell axis (row ``s * B + b``)."""
        inf = self.inference(batch, n_samples)
        z, library = inf["z"], inf["library"]
        covs = [batch[k] for k in ("batch", "cat_covs", "cont_covs", "label")]
        if n_samples > 1:
            z, library = flatten_samples(z), flatten_samples(library)
            covs = [repeat_samples(c, n_samples) for c in covs]
        return inf, self.generative(z, library, *covs)

    def terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The per-cell terms of the negative ELBO at one posterior draw, each ``(B,)``, with scvi-tools'
        names, and the draw ``z``.

        With gradients (training), all of the likelihood and the background KL run in one fused autograd
        function (:class:`_HeadsTerms`); otherwise, and with ``FUSED_TERMS[0] = False``, as written out in
        :meth:`terms_reference` (same values to float round-off, same random draws)."""
        if not (FUSED_TERMS[0] and torch.is_grad_enabled()):
            return self.terms_reference(batch)
        inf = self.inference(batch)
        z, library, B = inf["z"], inf["library"], batch["x"].shape[0]
        heads, theta, phi = self._decode(z, batch["batch"], batch["cat_covs"], batch["cont_covs"], batch["label"])
        eps = torch.empty(B, self.n_proteins, dtype=heads.dtype, device=heads.device).normal_()  # q(log beta | z)
        nz = batch.get("nonzeros")
        nz = dist.nonzeros(batch["x"]) if nz is None else nz
        rna, rec_protein, kl_back = _HeadsTerms.apply(
            heads, library, theta, nz.rows, nz.cols, nz.values, eps, phi, self.prior_mean, self.prior_log_scale,
            batch["batch"], batch["proteins"], batch["protein_mask"], self.config.gene_likelihood == "zinb")
        return {"reconst_loss_gene": -rna, "reconst_loss_protein": rec_protein,
                "kl_div_z": dist.kl_standard_normal(inf["qz"]).sum(-1), "kl_div_back_pro": kl_back, "z": z}

    def terms_reference(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`terms` from the distributions of :meth:`generative`, each term as its formula reads."""
        inf, gen = self.forward_batch(batch)
        mask = batch["protein_mask"]  # (B, P): unmeasured proteins add nothing
        return {"reconst_loss_gene": -gen["px"].log_prob_sum(batch["x"], batch.get("nonzeros")),
                "reconst_loss_protein": -(gen["py"].log_prob(batch["proteins"]) * mask).sum(-1),
                "kl_div_z": dist.kl_standard_normal(inf["qz"]).sum(-1),
                "kl_div_back_pro": (kl_divergence(gen["q_back"], gen["p_back"]) * mask).sum(-1),
                "z": inf["z"]}

    def loss(self, batch: dict[str, Tensor], kl_weight: float = 1.0) -> dict[str, Tensor]:
        t = self.terms(batch)
        rec = t["reconst_loss_gene"] + t["reconst_loss_protein"]
        kl = t["kl_div_z"] + t["kl_div_back_pro"]
        return {"loss": torch.mean(rec + kl_weight * kl), "reconstruction_loss": rec, "kl_local": kl, "z": t["z"]}

    def log_weights(self, batch: dict[str, Tensor], n_samples: int) -> Tensor:
        """``log p(x, y, z, log beta) - log q(z, log beta | x, y)`` for ``n_samples`` posterior draws per cell,
        shape ``(n_samples, B)``. Only measured proteins' backgrounds enter (an unmeasured protein has no
        likelihood: its background integrates out of p and q alike)."""
        inf = self.inference(batch)
        qz, B = inf["qz"], batch["x"].shape[0]
        z_raw = qz.sample((n_samples,))  # (S, B, L), before the softmax of "ln"
        z = F.softmax(z_raw, -1) if self.config.latent_distribution == "ln" else z_raw
        library = flatten_samples(inf["library"].expand(n_samples, B, 1))
        rep = lambda key: repeat_samples(batch[key], n_samples)  # noqa: E731
        gen = self.generative(flatten_samples(z), library, *(rep(k) for k in ("batch", "cat_covs", "cont_covs", "label")))
        mask, log_back = rep("protein_mask"), gen["log_back"]
        log_lik = gen["px"].log_prob_sum(rep("x")) + (gen["py"].log_prob(rep("proteins")) * mask).sum(-1)
        log_back_ratio = ((gen["p_back"].log_prob(log_back) - gen["q_back"].log_prob(log_back)) * mask).sum(-1)
        log_z_ratio = (Normal(0.0, 1.0).log_prob(z_raw) - qz.log_prob(z_raw)).sum(-1)  # (S, B)
        return log_z_ratio + (log_lik + log_back_ratio).reshape(n_samples, B)


# --------------------------------------------------------------------------- fused training terms

FUSED_TERMS = [True]  # switch: TotalVIModule.terms through _HeadsTerms (tests compare it with terms_reference)
BACK_SD_EPS = 1e-4  # added to the sd of q(log beta | z)
LOG_BACK_MAX = 20.0  # log beta is clamped here before exp (no overflow from a wild start)


def protein_terms(block: Tensor, eps: Tensor, phi: Tensor, prior_mean: Tensor, prior_log_scale: Tensor, y: Tensor,
                  mask: Tensor, need_grad: bool = True, series: bool = False):
    """The protein part of the negative ELBO per cell, and its derivatives, in one pass over ``(cells, P)``.

    ``block`` is the decoder's protein output ``(cells, 4 P)``: ``[back_mean | back_raw_sd | fore | mixing]``. With
    ``sd = softplus(back_raw_sd) + 1e-4``, ``log beta = back_mean + eps * sd`` (the reparameterised draw of
    q(log beta | z), ``eps`` standard normal), ``beta = exp(min(log beta, 20))``, ``alpha = 1 + softplus(fore)``:

    - ``reconst = -sum_t mask * log[pi NB(y; beta, phi) + (1 - pi) NB(y; alpha beta, phi)]``, ``pi = sigmoid(mixing)``
      (as :func:`cellvi.distributions.nb_mixture_log_prob`, its lgamma terms computed once for both components);
    - ``kl = sum_t mask * KL(N(back_mean, sd) || N(prior_mean, exp(prior_log_scale)))`` (closed form, as
      ``torch.distributions.kl_divergence``).

    ``phi`` is ``(P,)`` or ``(cells, P)``; the other arguments ``(cells, P)``. ``series``: lgamma and digamma as
    plain arithmetic (:func:`cellvi.distributions.lgamma_series`, :func:`~cellvi.distributions.digamma`), for a
    compiled kernel (:func:`cellvi.distributions.kernel`). Returns ``(reconst, kl, d_block, d_kl, d_phi,
    d_prior_log_scale)``: the first two ``(cells,)``; then (None unless ``need_grad``) the derivatives of each cell's
    terms w.r.t. its own entries, masked: of reconst w.r.t. the block ``(cells, 4, P)``; of kl w.r.t. back_mean
    and back_raw_sd ``(cells, 2, P)`` (w.r.t. prior_mean: minus the first); of reconst w.r.t. phi, of kl w.r.t.
    prior_log_scale, ``(cells, P)`` each.
    """
    lgamma, digamma = (dist.lgamma_series, dist.digamma) if series else (torch.lgamma, torch.digamma)
    # the four blocks, each contiguous (eager elementwise ops on a strided (cells, P) view take a slow path)
    back_mean, back_raw_sd, fore, mixing = block.reshape(-1, 4, y.shape[-1]).transpose(0, 1).contiguous().unbind(0)
    sd = F.softplus(back_raw_sd) + BACK_SD_EPS
    log_back = back_mean + eps * sd
    rate_back = torch.exp(log_back.clamp(max=LOG_BACK_MAX))
    alpha = 1.0 + F.softplus(fore)  # (+ 1e-8 in the formula: below float32's resolution at 1)
    rate_fore = rate_back * alpha
    log_phi = torch.log(phi + dist.EPS)
    common = lgamma(y + phi) - lgamma(phi) - lgamma(y + 1.0)
    t_back, t_fore = phi + rate_back + dist.EPS, phi + rate_fore + dist.EPS
    lt_back, lt_fore = torch.log(t_back), torch.log(t_fore)
    nb_back = phi * (log_phi - lt_back) + y * (torch.log(rate_back + dist.EPS) - lt_back) + common
    nb_fore = phi * (log_phi - lt_fore) + y * (torch.log(rate_fore + dist.EPS) - lt_fore) + common
    sp_mixing = F.softplus(mixing)
    a = nb_back - (sp_mixing - mixing)  # log pi + log NB(y; beta)   (softplus(-l) = softplus(l) - l)
    b = nb_fore - sp_mixing  # log (1 - pi) + log NB(y; alpha beta)
    reconst = -(torch.logaddexp(a, b) * mask).sum(-1)
    sigma_p = torch.exp(prior_log_scale)
    var_ratio = (sd / sigma_p).pow(2)
    gap = back_mean - prior_mean
    t1 = (gap / sigma_p).pow(2)
    kl = (0.5 * (var_ratio + t1 - 1 - torch.log(var_ratio)) * mask).sum(-1)
    if not need_grad:
        return reconst, kl, None, None, None, None
    # derivatives of the log mixture: p_back = sigmoid(a - b) is the background's posterior share
    p_back = torch.sigmoid(a - b)
    p_fore = 1.0 - p_back
    phi_y = phi + y
    d_back = p_back * (y / (rate_back + dist.EPS) - phi_y / t_back)  # d/d beta (background component)
    d_fore = p_fore * (y / (rate_fore + dist.EPS) - phi_y / t_fore)  # d/d (alpha beta)
    d_phi = (digamma(phi_y) - digamma(phi) + log_phi + phi / (phi + dist.EPS)
             - p_back * (lt_back + phi_y / t_back) - p_fore * (lt_fore + phi_y / t_fore))
    neg_mask = -mask  # reconst is minus the masked sum
    d_mean = (d_back + d_fore * alpha) * rate_back * (log_back <= LOG_BACK_MAX) * neg_mask  # via log beta
    sig_sd = torch.sigmoid(back_raw_sd)  # d sd / d back_raw_sd
    d_block = torch.stack([d_mean, d_mean * eps * sig_sd, d_fore * rate_back * torch.sigmoid(fore) * neg_mask,
                           (p_back - torch.sigmoid(mixing)) * neg_mask], 1)
    inv_var_p = 1.0 / sigma_p.square()
    d_kl = torch.stack([gap * inv_var_p * mask, (sd * inv_var_p - 1.0 / sd) * sig_sd * mask], 1)
    return reconst, kl, d_block, d_kl, d_phi * neg_mask, (1.0 - var_ratio - t1) * mask


class _HeadsTerms(torch.autograd.Function):
    """TotalVI's likelihood and background KL from the decoder's one output block ``heads``
    ``[RNA logits | back_mean, back_raw_sd, fore, mixing]``, per cell: ``(log p(x), reconst_protein, kl_back)``.

    The RNA part is :func:`cellvi.distributions.nb_logits_forward` on the RNA columns (the fused NB/ZINB kernel
    SCVI uses), the protein part :func:`protein_terms`, each compiled for long runs
    (:func:`cellvi.distributions.kernel`); derivatives come from the forward pass, and backward writes both into
    one gradient of ``heads`` (no slicing, splitting or concatenation in autograd: each of those costs a zero
    fill and an add of the whole block). The background prior's parameters ``(P, batches)`` are read at each
    cell's batch here, and their gradient summed back per batch.
    """

    @staticmethod
    def forward(ctx, heads, log_library, theta, rows, cols, xv, eps, phi, prior_mean, prior_log_scale, batch, y,
                mask, zero_inflated):
        heads, log_library, theta, phi = heads.detach(), log_library.detach(), theta.detach(), phi.detach()
        n_rna = (2 if zero_inflated else 1) * theta.shape[-1]
        rna, saved_rna = dist.nb_logits_forward(heads[:, :n_rna], log_library, theta,
                                                dist.Nonzeros(rows, cols, xv), zero_inflated)
        prior_m = prior_mean.detach().t().index_select(0, batch)
        prior_ls = prior_log_scale.detach().t().index_select(0, batch)
        reconst, kl, d_block, d_kl, d_phi, d_prior_ls = dist.kernel(protein_terms)(
            heads[:, n_rna:], eps, phi, prior_m, prior_ls, y, mask, True, dist.compiling())
        ctx.save_for_backward(*saved_rna[:5], d_block, d_kl, d_phi, d_prior_ls, batch)
        ctx.gene_theta, ctx.phi_per_protein, ctx.n_batches = saved_rna[5], phi.dim() == 1, prior_mean.shape[1]
        return rna, reconst, kl

    @staticmethod
    def backward(ctx, g_rna, g_rec, g_kl):
        *saved_rna, d_block, d_kl, d_phi, d_prior_ls, batch = ctx.saved_tensors
        B, P = d_block.shape[0], d_block.shape[-1]
        g_kl_cells = g_kl[:, None]
        protein = d_block * g_rec[:, None, None]
        protein[:, :2].addcmul_(d_kl, g_kl_cells[:, None])
        d_heads, d_lib, d_theta = dist.nb_logits_backward((*saved_rna, ctx.gene_theta), g_rna,
                                                          extra=protein.view(B, 4 * P))
        d_phi = torch.mv(d_phi.t(), g_rec) if ctx.phi_per_protein else d_phi * g_rec[:, None]
        per_batch = lambda d: torch.zeros(ctx.n_batches, P, dtype=d.dtype, device=d.device).index_add_(  # noqa: E731
            0, batch, d).t().contiguous()
        return (d_heads, d_lib, d_theta, None, None, None, None, d_phi, per_batch(-d_kl[:, 0] * g_kl_cells),
                per_batch(d_prior_ls * g_kl_cells), None, None, None, None)


def protein_values(py: dist.NegativeBinomialMixture, sample_protein_mixing: bool, include_protein_background: bool,
                   scale_protein: bool) -> Tensor:
    """Denoised protein expression from p(y | z): the foreground rate weighted by the foreground probability
    ``(1 - pi) * alpha * beta`` (``+ pi * beta`` with the background); with ``sample_protein_mixing`` the
    component is drawn instead of weighted; ``scale_protein`` makes each cell's values sum to 1."""
    pi = py.mixture_probs
    if sample_protein_mixing:
        pi = torch.bernoulli(pi)
    value = py.mu2 * (1.0 - pi)
    if include_protein_background:
        value = value + py.mu1 * pi
    return value / value.sum(-1, keepdim=True) if scale_protein else value


# --------------------------------------------------------------------------- user class


class TotalVI(Model):
    """total Variational Inference for CITE-seq (Gayoso et al., 2021).

    ``TotalVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")``,
    then ``model = TotalVI(adata); model.train()``; or from a MuData,
    ``TotalVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "protein_layer": "protein"})``, then
    ``TotalVI(mdata)``.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`, or MuData set up with :meth:`setup_mudata`. For a
        MuData, ``model.mdata`` is it and ``model.adata`` the AnnData the model reads from it (see
        :func:`cellvi.data.setup.mudata_view`); methods take the MuData (or another one with the same
        modalities) as ``adata``.
    n_latent
        Size of z.
    gene_dispersion
        ``"gene"``, ``"gene-batch"`` or ``"gene-label"``: what the RNA inverse dispersion may vary with.
    protein_dispersion
        ``"protein"``, ``"protein-batch"`` or ``"protein-label"``.
    gene_likelihood
        ``"nb"`` or ``"zinb"``.
    latent_distribution
        ``"normal"``, or ``"ln"`` (logistic normal).
    empirical_protein_background_prior
        Start the background prior from the data (:func:`fit_background_prior`); ``None``: when there are
        more than 10 proteins (as scvi-tools), else a random start.
    override_missing_proteins
        Read a protein that is all zero in a panel (or batch) as measured zeros; by default it is taken as
        not measured there and left out of the likelihood (as scvi-tools).
    **model_kwargs
        Other fields of :class:`TotalVIConfig` (``n_hidden``, ``n_layers_encoder``, ``n_layers_decoder``,
        ``dropout_rate_encoder``, ``dropout_rate_decoder``, ``encode_covariates``, ``use_batch_norm``,
        ``use_layer_norm``).
    """

    config_class = TotalVIConfig

    def __init__(self, adata: AnnData, n_latent: int = 20, gene_dispersion: str = "gene",
                 protein_dispersion: str = "protein", gene_likelihood: str = "nb", latent_distribution: str = "normal",
                 empirical_protein_background_prior: bool | None = None, override_missing_proteins: bool = False,
                 **model_kwargs):
        config = TotalVIConfig(n_latent=n_latent, gene_dispersion=gene_dispersion,
                               protein_dispersion=protein_dispersion, gene_likelihood=gene_likelihood,
                               latent_distribution=latent_distribution,
                               empirical_protein_background_prior=empirical_protein_background_prior,
                               override_missing_proteins=override_missing_proteins, **model_kwargs)
        self.mdata = adata if is_mudata(adata) else None
        if self.mdata is not None:
            adata = mudata_view(adata, mudata_spec(adata))
        super().__init__(adata, config)
        spec = self.spec
        if spec.protein_expression_obsm_key is None:
            raise ValueError("This AnnData was not set up with proteins: call "
                             "`TotalVI.setup_anndata(adata, protein_expression_obsm_key=...)` first.")
        if override_missing_proteins:  # every protein counts as measured in every panel (NaN still masks)
            self.spec = dataclasses.replace(spec, protein_missing=tuple(() for _ in spec.panel_categories))
            spec = self.spec
        obs = obs_arrays(adata, spec)
        proteins, mask, batch = obs["proteins"], obs["protein_mask"], obs["batch"]
        if not mask.any():
            raise ValueError(f"No protein is measured in any cell of adata.obsm[{spec.protein_expression_obsm_key!r}] "
                             "(all zero or NaN); totalVI needs protein counts.")
        empirical = (spec.n_proteins > MIN_PROTEINS_EMPIRICAL if empirical_protein_background_prior is None
                     else bool(empirical_protein_background_prior))
        prior_mean, prior_log_scale = background_prior_init(proteins, mask, batch, spec.n_batches, empirical,
                                                            settings.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.module = TotalVIModule(spec.n_genes, spec.n_proteins, spec.n_batches, spec.n_labels,
                                        spec.n_cats_per_cov, spec.n_continuous_cov, config, prior_mean, prior_log_scale)
        self.module.eval()

    # ------------------------------------------------------------------ set-up

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        protein_expression_obsm_key: str,
        protein_names_uns_key: str | None = None,
        batch_key: str | None = None,
        panel_key: str | None = None,
        layer: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Validate ``adata`` and record the RNA layer, the protein table and the ``.obs`` columns read.

        Parameters
        ----------
        adata
            Raw RNA counts in ``X`` or ``layers[layer]``.
        protein_expression_obsm_key
            ``adata.obsm`` key of the raw protein counts, cells x proteins: a DataFrame (columns are the
            protein names) or an array. NaN marks a value not measured in that cell; negative or
            non-integer values are refused.
        protein_names_uns_key
            ``adata.uns`` key of the protein names when the table is an array (default ``protein_0``, ...).
        batch_key
            ``.obs`` column of batches, corrected for; each batch has its own background prior.
        panel_key
            ``.obs`` column of antibody panels; a protein with no non-zero count in a panel is taken as
            not measured there (default: each batch is a panel).
        layer, size_factor_key, categorical_covariate_keys, continuous_covariate_keys
            As in :meth:`cellvi.SCVI.setup_anndata`.

        Returns
        -------
        None; the set-up is stored as JSON in ``adata.uns["_cellvi_setup"]``.
        """
        setup_anndata(adata, layer=layer, batch_key=batch_key, size_factor_key=size_factor_key,
                      categorical_covariate_keys=categorical_covariate_keys,
                      continuous_covariate_keys=continuous_covariate_keys,
                      protein_expression_obsm_key=protein_expression_obsm_key,
                      protein_names_uns_key=protein_names_uns_key, panel_key=panel_key, model_class=cls.__name__)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        panel_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        modalities: dict[str, str] | None = None,
    ) -> None:
        """Validate a MuData and record its RNA and protein modalities and the ``.obs`` columns read.

        Parameters
        ----------
        mdata
            MuData with an RNA and a protein modality holding the same cells in the same order.
        rna_layer, protein_layer
            Layer of raw counts in the RNA / protein modality; ``None`` reads its ``X``.
        batch_key, panel_key, size_factor_key, categorical_covariate_keys, continuous_covariate_keys
            As in :meth:`setup_anndata`: columns of the ``.obs`` of the modality ``modalities`` names for
            that argument, or of ``mdata.obs`` when it names none (``panel_key`` defaults to
            ``batch_key``'s modality, as scvi-tools).
        modalities
            Which modality each argument reads, e.g. ``{"rna_layer": "rna", "protein_layer": "protein",
            "batch_key": "rna"}``; ``rna_layer`` and ``protein_layer`` are required.

        Returns
        -------
        None; the set-up is stored as JSON in ``mdata.uns["_cellvi_setup"]``. Needs the ``mudata`` package.
        """
        import_mudata()
        if not is_mudata(mdata):
            raise ValueError(f"setup_mudata takes a MuData, got {type(mdata).__name__}; set up an AnnData with "
                             "TotalVI.setup_anndata.")
        reading = {"modalities": check_modalities(modalities, mdata), "protein_layer": protein_layer}
        draft = DataSpec(var_names=(), layer=rna_layer, batch_key=batch_key, panel_key=panel_key,
                         size_factor_key=size_factor_key,
                         categorical_covariate_keys=tuple(categorical_covariate_keys or ()),
                         continuous_covariate_keys=tuple(continuous_covariate_keys or ()), extra={"mudata": reading})
        spec = setup_anndata(mudata_view(mdata, draft), layer=rna_layer, batch_key=batch_key,
                             size_factor_key=size_factor_key, categorical_covariate_keys=categorical_covariate_keys,
                             continuous_covariate_keys=continuous_covariate_keys,
                             protein_expression_obsm_key=MUDATA_PROTEIN_KEY, panel_key=panel_key,
                             extra={"mudata": reading}, model_class=cls.__name__)
        mdata.uns[UNS_KEY] = spec.to_json()

    def _anndata(self, adata) -> AnnData | None:
        """What a method reads: ``None`` for the model's own data (its MuData too), the model's view of
        another MuData, or the AnnData given."""
        if adata is None or (self.mdata is not None and adata is self.mdata):
            return None
        if not is_mudata(adata):
            return adata
        if "mudata" not in self.spec.extra:
            raise ValueError("This model was set up from an AnnData; pass an AnnData laid out the same way, not a MuData.")
        return mudata_view(adata, self.spec)

    @classmethod
    def load(cls, dir_path, adata=None, accelerator: str = "auto", device: int | str = "auto",
             prefix: str | None = None) -> TotalVI:
        """As :meth:`cellvi.models.base.Model.load`; ``adata`` may also be a MuData with the modalities the
        model was set up with."""
        if not is_mudata(adata):
            return super().load(dir_path, adata, accelerator, device, prefix)
        spec = DataSpec.from_json(json.dumps(_read_meta(Path(dir_path), _file_names(prefix))["spec"]))
        if "mudata" not in spec.extra:
            raise ValueError(f"The model in {dir_path} was set up from an AnnData; load it with an AnnData.")
        model = super().load(dir_path, mudata_view(adata, spec), accelerator, device, prefix)
        model.mdata = adata
        return model

    # ------------------------------------------------------------------ training

    train_defaults = {"lr": 4e-3, "reduce_lr_on_plateau": True, "n_epochs_kl_warmup": None}

    def train(self, max_epochs: int | None = None, lr: float = 4e-3, accelerator: str = "auto",
              devices: int | list[int] | str = "auto", train_size: float | None = None,
              validation_size: float | None = None, shuffle_set_split: bool = True, batch_size: int = 256,
              early_stopping: bool = True, check_val_every_n_epoch: int | None = None,
              reduce_lr_on_plateau: bool = True, n_steps_kl_warmup: int | None = None,
              n_epochs_kl_warmup: int | None = None, adversarial_classifier: bool | None = None,
              datasplitter_kwargs: dict | None = None, plan_kwargs: dict | None = None, external_indexing=None,
              **kwargs) -> None:
        """Train with scvi-tools' TOTALVI defaults (its arguments, in its order).

        Parameters
        ----------
        max_epochs
            Default ``min(400, 400 * 20000 / n_cells)``.
        lr
            Learning rate (4e-3).
        batch_size
            Cells per minibatch (256).
        early_stopping
            On ``elbo_validation`` (on by default, as scvi-tools' TOTALVI).
        reduce_lr_on_plateau
            Lower the learning rate when ``elbo_validation`` stalls (on by default).
        n_steps_kl_warmup, n_epochs_kl_warmup
            KL warm-up; by default over ``0.75 * n_cells`` steps, as scvi-tools.
        adversarial_classifier
            Train a classifier of the batch on z that the model learns to fool (:class:`cellvi.train.Adversary`;
            weight ``scale_adversarial_loss``, a plan option, default ``"auto"``: ``1 - kl_weight``). ``None``:
            on when some protein is missing from some panel (as scvi-tools) and there are several batches.
            Its loss is in ``history["adversarial_classifier_loss_train"]``.
        plan_kwargs
            Other training-plan options (see :meth:`cellvi.models.base.Model.train`); they override the
            arguments above (in scvi-tools the arguments win).
        **kwargs
            Everything else :meth:`cellvi.models.base.Model.train` takes (``seed``, ``checkpoint_dir``,
            trainer options such as ``early_stopping_patience``).
        """
        if external_indexing is not None:
            raise ValueError("external_indexing is not supported; use train_size/validation_size.")
        if adversarial_classifier is None:
            adversarial_classifier = self.spec.n_batches > 1 and any(self.spec.protein_missing)
        plan = {"lr": lr, "reduce_lr_on_plateau": reduce_lr_on_plateau, "n_epochs_kl_warmup": n_epochs_kl_warmup,
                "adversarial_classifier": bool(adversarial_classifier),
                "n_steps_kl_warmup": int(0.75 * self.adata.n_obs) if n_steps_kl_warmup is None else n_steps_kl_warmup,
                **(plan_kwargs or {})}
        if check_val_every_n_epoch is not None:
            kwargs["check_val_every_n_epoch"] = check_val_every_n_epoch
        super().train(max_epochs=max_epochs, accelerator=accelerator, devices=devices, train_size=train_size,
                      validation_size=validation_size, shuffle_set_split=shuffle_set_split, batch_size=batch_size,
                      early_stopping=early_stopping, datasplitter_kwargs=datasplitter_kwargs, plan_kwargs=plan,
                      **kwargs)

    # ------------------------------------------------------------------ latent space

    @torch.no_grad()
    def get_latent_representation(self, adata: AnnData | None = None, indices=None, give_mean: bool = True,
                                  mc_samples: int = 5000, batch_size: int | None = None, return_dist: bool = False):
        """Latent z of each cell (RNA and proteins together).

        Returns
        -------
        ``(n_cells, n_latent)`` array: the posterior mean (``give_mean``) or one sample; with
        ``return_dist=True`` a tuple ``(means, variances)`` of q(z | x, y).
        """
        return self._latent(self._anndata(adata), indices, batch_size, self.module.inference,
                            n_latent=self.config.n_latent, give_mean=give_mean, mc_samples=mc_samples,
                            return_dist=return_dist,
                            logistic_normal=self.config.latent_distribution == "ln")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def get_elbo(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None,
                 return_mean: bool = True):
        """The evidence lower bound of each cell (higher is better): ``-(reconstruction loss + KL)`` at one
        posterior draw, RNA and proteins together, as scvi-tools.

        Returns
        -------
        A float (the mean over cells) or, with ``return_mean=False``, a ``(cells,)`` array.
        """
        per_cell = self._per_cell(self._anndata(adata), indices, batch_size, lambda b: -sum(
            t for k, t in self.module.terms(b).items() if k != "z"))
        return cell_mean(per_cell) if return_mean else per_cell

    @torch.no_grad()
    def get_reconstruction_error(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None,
                                 return_mean: bool = True) -> dict:
        """``-log p(x | z)`` and ``-log p(y | z)`` of each cell at one posterior draw (lower is better).

        Returns
        -------
        ``{"reconst_loss_gene": ..., "reconst_loss_protein": ...}`` (scvi-tools' keys): floats (means over
        cells) or, with ``return_mean=False``, ``(cells,)`` arrays.
        """
        keys = ("reconst_loss_gene", "reconst_loss_protein")

        def reconstruction(batch: dict) -> Tensor:
            terms = self.module.terms(batch)  # one posterior draw for both modalities
            return torch.stack([terms[k] for k in keys], -1)

        per_cell = self._per_cell(self._anndata(adata), indices, batch_size, reconstruction).reshape(-1, 2)
        return {k: cell_mean(per_cell[:, i]) if return_mean else per_cell[:, i] for i, k in enumerate(keys)}

    @torch.no_grad()
    def get_marginal_ll(self, adata: AnnData | None = None, indices=None, n_mc_samples: int = 1000,
                        batch_size: int | None = None, return_mean: bool = True):
        """Importance-sampled ``log p(x, y)`` of each cell (higher is better), with q(z, log beta | x, y) as
        the proposal (:meth:`TotalVIModule.log_weights`).

        .. math:: \\log p(x, y) \\approx \\log \\frac1K \\sum_k \\frac{p(x, y | z_k, \\beta_k) p(z_k) p(\\beta_k)}
                  {q(z_k | x, y) q(\\beta_k | z_k)}

        Returns
        -------
        A float (the mean over cells) or, with ``return_mean=False``, a ``(cells,)`` array.
        """
        def marginal(batch: dict) -> Tensor:
            return importance_log_marginal(lambda k: self.module.log_weights(batch, k), n_mc_samples)

        per_cell = self._per_cell(self._anndata(adata), indices, batch_size, marginal)
        return cell_mean(per_cell) if return_mean else per_cell

    # ------------------------------------------------------------------ decoding

    def _posterior_decode(self, batch: dict, n_samples: int, batch_codes: list[int | None], read) -> Tensor:
        """``read(gen, library)`` for ``n_samples`` posterior draws of z per cell, averaged over ``batch_codes``
        (the same z decoded in each batch): shape ``(n_samples, cells, features)``."""
        inf = self.module.inference(batch)
        B = batch["x"].shape[0]
        z_raw = inf["qz"].sample((n_samples,))  # (S, B, L)
        z = flatten_samples(F.softmax(z_raw, -1) if self.config.latent_distribution == "ln" else z_raw)
        library = flatten_samples(inf["library"].expand(n_samples, B, 1))
        own, cat, cont, lab = (repeat_samples(batch[k], n_samples) for k in ("batch", "cat_covs", "cont_covs", "label"))
        out = average_over_batches(lambda b: read(self.module.generative(z, library, b, cat, cont, lab), library),
                                   own, batch_codes)
        return out.reshape(n_samples, B, -1)

    def _protein_mask(self, protein_list) -> np.ndarray | None:
        """Positions of ``protein_list`` in the model's proteins, in the model's order."""
        if protein_list is None:
            return None
        names = pd.Index(self.spec.protein_names)
        protein_list = [protein_list] if isinstance(protein_list, str) else list(protein_list)
        missing = [p for p in protein_list if p not in names]
        if missing:
            raise ValueError(f"protein_list has proteins the model does not know: {missing[:10]} "
                             f"(known: {list(names[:10])}).")
        return np.flatnonzero(names.isin(protein_list))

    def _decode_rows(self, adata, idx, batch_size, n_samples, codes, read, width: int) -> np.ndarray:
        """``read`` (see :meth:`_posterior_decode`, ``width`` features) over the rows ``idx``:
        ``(n_samples, cells, width)`` on the CPU."""
        self.module.eval()
        chunks = [torch.zeros(n_samples, 0, width)]
        with torch.no_grad():
            for batch in self._minibatches(adata, idx, batch_size):
                chunks.append(self._posterior_decode(batch, n_samples, codes, read).cpu())
        return torch.cat(chunks, 1).numpy()

    def _frames(self, values: np.ndarray, names, adata: AnnData, idx: np.ndarray, columns: np.ndarray | None,
                return_mean: bool, return_numpy: bool | None):
        """``(S, cells, features)`` -> scvi-tools' output (see :meth:`Model._expression_output`)."""
        if columns is not None:
            values = values[..., columns]
        values = values.mean(0) if (return_mean or values.shape[0] == 1) else values
        if return_numpy or values.ndim == 3:
            return values
        names = pd.Index(names)
        return pd.DataFrame(values, index=adata.obs_names[idx], columns=names if columns is None else names[columns])

    @torch.no_grad()
    def get_normalized_expression(self, adata: AnnData | None = None, indices=None,
                                  n_samples_overall: int | None = None, transform_batch=None, gene_list=None,
                                  protein_list=None, library_size: float | str = 1, n_samples: int = 1,
                                  sample_protein_mixing: bool = False, scale_protein: bool = False,
                                  include_protein_background: bool = False, batch_size: int | None = None,
                                  return_mean: bool = True, return_numpy: bool | None = None, silent: bool = True):
        """Denoised RNA and protein expression (``silent`` is accepted for scvi-tools compatibility).

        Parameters
        ----------
        transform_batch
            ``None``: each cell decoded in its own batch; a batch name or a list of them: decoded in each and
            averaged (batch-corrected expression).
        gene_list, protein_list
            Return these genes / proteins only (in the model's order).
        library_size
            RNA scale: 1 gives proportions; ``"latent"`` expected counts at the cell's library size.
        n_samples
            Posterior samples of z per cell; averaged when ``return_mean``.
        n_samples_overall
            Return this many rows, each one posterior draw of a cell drawn at random from ``indices``.
        sample_protein_mixing
            Draw the background/foreground component instead of weighting by its probability.
        scale_protein
            Make each cell's protein values sum to 1.
        include_protein_background
            Add the background component ``pi * beta`` to the foreground ``(1 - pi) * alpha * beta``.
        return_numpy
            ``None``: DataFrames unless the result is 3-D.

        Returns
        -------
        ``(rna, protein)``: ``(cells, genes)`` and ``(cells, proteins)`` DataFrames/arrays, or
        ``(n_samples, cells, features)`` arrays when ``n_samples > 1`` and ``return_mean=False``.
        """
        check_library_size(library_size)
        adata_, idx = self._expression_rows(self._anndata(adata), indices, n_samples_overall)
        codes, genes, proteins = self._batch_codes(transform_batch), self._gene_mask(gene_list), \
            self._protein_mask(protein_list)

        def read(gen: dict, library: Tensor) -> Tensor:
            pro = protein_values(gen["py"], sample_protein_mixing, include_protein_background, scale_protein)
            return torch.cat([expression_from(gen["px"], library, library_size), pro], -1)

        G = self.spec.n_genes
        both = self._decode_rows(adata_, idx, batch_size, n_samples, codes, read, G + self.spec.n_proteins)
        rna, pro = both[..., :G], both[..., G:]
        return (self._frames(rna, self.spec.var_names, adata_, idx, genes, return_mean, return_numpy),
                self._frames(pro, self.spec.protein_names, adata_, idx, proteins, return_mean, return_numpy))

    @torch.no_grad()
    def get_protein_foreground_probability(self, adata: AnnData | None = None, indices=None, transform_batch=None,
                                           protein_list=None, n_samples: int = 1, batch_size: int | None = None,
                                           return_mean: bool = True, return_numpy: bool | None = None,
                                           silent: bool = True):
        """Probability that each protein's counts come from the foreground, ``1 - pi`` in the totalVI paper
        (``silent`` is accepted for scvi-tools compatibility).

        Returns
        -------
        ``(cells, proteins)`` DataFrame (or array), or ``(n_samples, cells, proteins)`` when ``n_samples > 1``
        and ``return_mean=False``.
        """
        adata_, idx = self._expression_rows(self._anndata(adata), indices, None)
        codes, proteins = self._batch_codes(transform_batch), self._protein_mask(protein_list)

        def read(gen: dict, library: Tensor) -> Tensor:
            return torch.sigmoid(-gen["py"].mixture_logits)  # 1 - pi

        fg = self._decode_rows(adata_, idx, batch_size, n_samples, codes, read, self.spec.n_proteins)
        return self._frames(fg, self.spec.protein_names, adata_, idx, proteins, return_mean, return_numpy)

    # ------------------------------------------------------------------ differential expression

    @torch.no_grad()
    def _de_draws(self, adata: AnnData | None, indices: np.ndarray, n_samples: int, transform_batch,
                  batch_size: int | None, protein_prior_count: float = 0.1, scale_protein: bool = False,
                  sample_protein_mixing: bool = False, include_protein_background: bool = False,
                  field: str | None = None) -> np.ndarray:
        """Draws for :mod:`cellvi.de`: ``(n_samples * cells, features)``, sample-major: RNA expected counts per
        unit library (``field="rna"``), protein values plus ``protein_prior_count`` (``"protein"``), or both
        side by side (``None``)."""
        codes = self._batch_codes(transform_batch)
        G, P = self.spec.n_genes, self.spec.n_proteins

        def read(gen: dict, library: Tensor) -> Tensor:
            rna = None if field == "protein" else expression_from(gen["px"], library, "mean")
            pro = None if field == "rna" else protein_prior_count + protein_values(
                gen["py"], sample_protein_mixing, include_protein_background, scale_protein)
            return torch.cat([t for t in (rna, pro) if t is not None], -1)

        width = {"rna": G, "protein": P, None: G + P}[field]
        return self._decode_rows(adata, indices, batch_size, n_samples, codes, read, width).reshape(-1, width)

    def _protein_counts(self, adata: AnnData) -> sp.csr_matrix:
        """Observed protein counts of ``adata`` (0 where not measured), CSR."""
        return sp.csr_matrix(obs_arrays(adata, self.spec)["proteins"])

    def differential_expression(self, adata: AnnData | None = None, groupby: str | None = None, group1=None,
                                group2: str | None = None, idx1=None, idx2=None, mode: str = "change",
                                delta: float | None = 0.25, batch_size: int | None = None, all_stats: bool = True,
                                batch_correction: bool = False, batchid1=None, batchid2=None,
                                fdr_target: float = 0.05, silent: bool = False, protein_prior_count: float = 0.1,
                                scale_protein: bool = False, sample_protein_mixing: bool = False,
                                include_protein_background: bool = False, use_field=None,
                                pseudocounts: float | None = 1e-5, **kwargs) -> pd.DataFrame:
        """Bayesian DE of genes and proteins between two groups of cells, in one table (as scvi-tools).

        The engine (:func:`cellvi.de.differential_expression`, all its options apply) runs once per
        modality, so that each has its own compositional centring, model-error estimate and shrinkage
        prior (a protein rate is not a share of a library); the tables are merged per comparison.

        Parameters
        ----------
        protein_prior_count
            Added to protein values before the log fold change.
        scale_protein, sample_protein_mixing, include_protein_background
            How protein values are decoded (see :meth:`get_normalized_expression`).
        use_field
            ``["rna", "protein"]`` (default both): which modalities to test.

        Returns
        -------
        DataFrame indexed by gene names and protein names suffixed with ``_protein`` (as scvi-tools: a gene and
        its protein often share a name), with scvi-tools' columns (``proba_de``, ``bayes_factor``, ``lfc_mean``,
        ``is_de_fdr_<fdr_target>``, ``comparison``, ...).
        """
        from cellvi import de

        adata = self._anndata(adata)
        adata_ = self.adata if adata is None else adata
        use_field = ["rna", "protein"] if use_field is None else list(use_field)
        unknown = set(use_field) - {"rna", "protein"}
        if unknown or not use_field:
            raise ValueError(f"use_field={use_field!r}: give a non-empty list of 'rna' and 'protein'.")
        opts = dict(protein_prior_count=protein_prior_count, scale_protein=scale_protein,
                    sample_protein_mixing=sample_protein_mixing, include_protein_background=include_protein_background)
        features = {"rna": (self.spec.var_names, get_counts(adata_, self.spec.layer)),
                    "protein": ([f"{p}_protein" for p in self.spec.protein_names], self._protein_counts(adata_))}
        tables = []
        for field in ("rna", "protein"):
            if field not in use_field:
                continue
            draws = lambda rows, n, b, bs, field=field: self._de_draws(adata_, rows, n, b, bs, field=field, **opts)  # noqa: E731
            tables.append(de.differential_expression(
                self, adata_, groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2, mode=mode,
                delta=delta, batch_size=batch_size, all_stats=all_stats, batch_correction=batch_correction,
                batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, silent=silent,
                pseudocounts=pseudocounts, draws_fn=draws, features=features[field], **kwargs))
        return merge_tables(tables)


def merge_tables(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Per comparison (in the order of the first table), the rows of every table, sorted by evidence."""
    if len(tables) == 1:
        return tables[0]
    both = pd.concat(tables)
    out = []
    for comp in pd.unique(tables[0]["comparison"]):
        part = both[both["comparison"] == comp]
        out.append(part.sort_values(["proba_de", "lfc_mean"], ascending=False,
                                    key=lambda c: c.abs() if c.name == "lfc_mean" else c))
    return pd.concat(out)


TOTALVI = TotalVI  # scvi-tools' spelling
