"""scVI: a count VAE with batch correction (Lopez et al., 2018, Nat. Methods 15:1053).

Generative model, for a cell with counts x, batch s and covariates c:

    z ~ Normal(0, I)                                    latent state (n_latent)
    l = log(sum x)  or  l ~ Normal(mu_s, sigma_s^2)     log library size, observed or latent
    rho = softmax(f(z, s, c))                           normalized expression, rows sum to 1
    x_g ~ NB(exp(l) * rho_g, theta_g) [zero-inflated]   counts

and the encoder q(z | x) (q(l | x) when the library is latent) is amortised by an MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from cellvi.models.base import (
    Model,
    as_indices,
    average_over_batches,
    cell_mean,
    check_library_size,
    expression_from,
    importance_log_marginal,
)
from cellvi.nn import MLP, GaussianEncoder, Linear

CHOICES = {
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "gene_likelihood": ("zinb", "nb", "poisson"),
    "latent_distribution": ("normal", "ln"),
    "use_batch_norm": ("encoder", "decoder", "none", "both"),
    "use_layer_norm": ("encoder", "decoder", "none", "both"),
}


def check_choices(config) -> None:
    for name, allowed in CHOICES.items():
        value = getattr(config, name, None)
        if value is not None and value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}.")


@dataclass(frozen=True)
class SCVIConfig:
    n_hidden: int = 128  # width of hidden layers
    n_latent: int = 10  # size of z
    n_layers: int = 1  # hidden layers in encoder and decoder
    dropout_rate: float = 0.1  # encoder dropout
    dispersion: str = "gene"  # theta per gene, gene-batch, gene-label or gene-cell
    gene_likelihood: str = "zinb"  # zinb, nb or poisson
    latent_distribution: str = "normal"  # normal, or ln (logistic normal: z = softmax(Normal))
    use_observed_lib_size: bool = True  # l = log total counts, else a latent log-normal
    encode_covariates: bool = False  # give batch and covariates to the encoder too
    deeply_inject_covariates: bool = True  # covariates enter every decoder layer, not only the first
    use_batch_norm: str = "both"
    use_layer_norm: str = "none"
    log_variational: bool = True  # encoder reads log(1 + x)

    def __post_init__(self):
        check_choices(self)


def flatten_samples(t: Tensor) -> Tensor:
    """(S, B, ...) -> (S * B, ...)."""
    return t.reshape(-1, *t.shape[2:])


def repeat_samples(t: Tensor, n: int) -> Tensor:
    """(B, ...) -> (n * B, ...): a per-cell tensor repeated for ``n`` sample-major posterior draws."""
    return t if n == 1 else t.repeat(n, *([1] * (t.dim() - 1)))


class SCVIModule(nn.Module):
    """q(z | x), q(l | x) and p(x | z, l, s, c)."""

    def __init__(self, n_genes: int, n_batches: int, n_labels: int, n_cats_per_cov: list[int],
                 n_continuous_cov: int, config: SCVIConfig, library_log_means: Tensor, library_log_vars: Tensor):
        super().__init__()
        self.config = cfg = config
        self.n_batches, self.n_labels = n_batches, n_labels
        enc_cats = [n_batches, *n_cats_per_cov] if cfg.encode_covariates else []
        n_enc_in = n_genes + (n_continuous_cov if cfg.encode_covariates else 0)
        bn_enc = cfg.use_batch_norm in ("encoder", "both")
        bn_dec = cfg.use_batch_norm in ("decoder", "both")
        ln_enc = cfg.use_layer_norm in ("encoder", "both")
        ln_dec = cfg.use_layer_norm in ("decoder", "both")
        common = dict(n_hidden=cfg.n_hidden, dropout_rate=cfg.dropout_rate, inject_all=cfg.deeply_inject_covariates)
        self.z_encoder = GaussianEncoder(n_enc_in, cfg.n_latent, n_cats=enc_cats, n_layers=cfg.n_layers,
                                         use_batch_norm=bn_enc, use_layer_norm=ln_enc, **common)
        self.l_encoder = None if cfg.use_observed_lib_size else GaussianEncoder(
            n_enc_in, 1, n_cats=enc_cats, n_layers=1, use_batch_norm=bn_enc, use_layer_norm=ln_enc, **common)
        self.decoder = MLP(cfg.n_latent + n_continuous_cov, cfg.n_hidden, n_cats=[n_batches, *n_cats_per_cov],
                           n_hidden=cfg.n_hidden, n_layers=cfg.n_layers, dropout_rate=0.0,
                           use_batch_norm=bn_dec, use_layer_norm=ln_dec, inject_all=cfg.deeply_inject_covariates)
        # one matmul for all per-gene outputs: [scale logits | zero-inflation logits | log theta (gene-cell)]
        self.n_heads = 3 if cfg.dispersion == "gene-cell" else 2
        self.heads = Linear(cfg.n_hidden, self.n_heads * n_genes)
        n_theta = {"gene": 1, "gene-batch": n_batches, "gene-label": n_labels, "gene-cell": 0}[cfg.dispersion]
        self.log_theta = nn.Parameter(torch.randn(n_theta, n_genes)) if n_theta else None
        self.register_buffer("library_log_means", library_log_means.float().reshape(-1))
        self.register_buffer("library_log_vars", library_log_vars.float().reshape(-1))

    # q(z, l | x)
    def inference(self, x: Tensor, batch: Tensor, cat_covs: Tensor, cont_covs: Tensor,
                  size_factor: Tensor | None = None, n_samples: int = 1, nz: dist.Nonzeros | None = None) -> dict:
        cfg = self.config
        h = x if not cfg.log_variational else torch.log1p(x) if nz is None else dist.log1p_dense(x, nz)
        cats: list[Tensor] = []
        if cfg.encode_covariates:
            h = torch.cat([h, cont_covs], -1) if cont_covs.shape[-1] else h
            cats = [batch, *cat_covs.unbind(-1)]
        qz = self.z_encoder(h, cats)  # (B, n_latent)
        z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))  # (B, L) or (S, B, L)
        if cfg.latent_distribution == "ln":
            z = F.softmax(z, -1)
        ql = None
        if self.l_encoder is None:
            library = torch.log(x.sum(-1, keepdim=True) if size_factor is None else size_factor)  # (B, 1)
            if n_samples > 1:
                library = library.expand(n_samples, *library.shape)
        else:
            ql = self.l_encoder(h, cats)
            library = ql.rsample() if n_samples == 1 else ql.rsample((n_samples,))
        return {"qz": qz, "z": z, "ql": ql, "library": library}

    # p(x | z, l, s, c): all inputs are 2-D (cells, ...)
    def generative(self, z: Tensor, library: Tensor, batch: Tensor, cat_covs: Tensor, cont_covs: Tensor,
                   label: Tensor) -> dict:
        h = torch.cat([z, cont_covs], -1) if cont_covs.shape[-1] else z
        h = self.decoder(h, [batch, *cat_covs.unbind(-1)])  # (B, n_hidden)
        out = self.heads(h)  # (B, n_heads * G): [scale logits | zero-inflation logits | log theta (gene-cell)]
        G = out.shape[-1] // self.n_heads
        disp = self.config.dispersion
        if disp == "gene-cell":
            theta = torch.exp(out[:, 2 * G :])
        elif disp == "gene":
            theta = torch.exp(self.log_theta[0])  # (G,)
        else:
            theta = torch.exp(self.log_theta)[batch if disp == "gene-batch" else label]  # (B, G)
        lik = self.config.gene_likelihood
        if lik == "poisson":
            scale = F.softmax(out[:, :G], -1)  # (B, G), rows sum to 1
            px = dist.Poisson(torch.exp(library) * scale, scale=scale)
        else:  # rate exp(library) * softmax(scale logits), computed when read (training fuses it into the likelihood)
            zi = lik == "zinb"
            px = dist.NegativeBinomial.from_logits(out[:, : 2 * G] if zi else out[:, :G], library, theta, zi)
        pl = None
        if self.l_encoder is not None:
            pl = dist.normal(self.library_log_means[batch][:, None], self.library_log_vars[batch][:, None].sqrt())
        return {"px": px, "pl": pl}

    def forward_batch(self, batch: dict[str, Tensor], n_samples: int = 1) -> tuple[dict, dict]:
        """Inference then generative on a minibatch; with ``n_samples > 1`` samples are flattened
        into the cell axis (sample-major: row ``s * B + b``)."""
        inf = self.inference(batch["x"], batch["batch"], batch["cat_covs"], batch["cont_covs"],
                             batch.get("size_factor"), n_samples, batch.get("nonzeros"))
        z, library = inf["z"], inf["library"]
        covs = [batch[k] for k in ("batch", "cat_covs", "cont_covs", "label")]
        if n_samples > 1:
            z, library = flatten_samples(z), flatten_samples(library)
            covs = [repeat_samples(c, n_samples) for c in covs]
        b, cat, cont, lab = covs
        return inf, self.generative(z, library, b, cat, cont, lab)

    def loss(self, batch: dict[str, Tensor], kl_weight: float = 1.0) -> dict[str, Tensor]:
        inf, gen = self.forward_batch(batch)
        rec = -gen["px"].log_prob_sum(batch["x"], batch.get("nonzeros"))  # (B,)
        kl_z = dist.kl_standard_normal(inf["qz"]).sum(-1)  # (B,)
        if inf["ql"] is None:  # observed library size: no KL term for it
            return {"loss": torch.mean(rec + kl_weight * kl_z), "reconstruction_loss": rec, "kl_local": kl_z}
        kl_l = kl_divergence(inf["ql"], gen["pl"]).sum(-1)
        loss = torch.mean(rec + kl_weight * kl_z + kl_l)
        return {"loss": loss, "reconstruction_loss": rec, "kl_local": kl_z + kl_l}


class SCVI(Model):
    """single-cell Variational Inference (Lopez et al., 2018).

    ``SCVI.setup_anndata(adata, batch_key="batch")``, then ``model = SCVI(adata); model.train()``.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`.
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes and encoder dropout.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``: what the NB inverse
        dispersion theta may vary with.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    latent_distribution
        ``"normal"``, or ``"ln"`` (logistic normal).
    use_observed_lib_size
        Use log total counts as the library size; otherwise infer it with a per-batch log-normal prior.
    **model_kwargs
        Other fields of :class:`SCVIConfig` (``encode_covariates``, ``deeply_inject_covariates``,
        ``use_batch_norm``, ``use_layer_norm``, ``log_variational``).
    """

    config_class = SCVIConfig

    def __init__(self, adata: AnnData, n_hidden: int = 128, n_latent: int = 10, n_layers: int = 1,
                 dropout_rate: float = 0.1, dispersion: str = "gene", gene_likelihood: str = "zinb",
                 latent_distribution: str = "normal", use_observed_lib_size: bool = True, **model_kwargs):
        config = SCVIConfig(n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
                            dispersion=dispersion, gene_likelihood=gene_likelihood,
                            latent_distribution=latent_distribution, use_observed_lib_size=use_observed_lib_size,
                            **model_kwargs)
        super().__init__(adata, config)
        spec = self.spec
        means, variances = self._data().library_log_stats(spec.n_batches)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.module = SCVIModule(spec.n_genes, spec.n_batches, spec.n_labels, spec.n_cats_per_cov,
                                     spec.n_continuous_cov, config, means, variances)
        self.module.eval()

    # ------------------------------------------------------------------ latent space

    @torch.no_grad()
    def get_latent_representation(self, adata: AnnData | None = None, indices=None, give_mean: bool = True,
                                  mc_samples: int = 5000, batch_size: int | None = None,
                                  return_dist: bool = False):
        """Latent z of each cell.

        Returns
        -------
        ``(n_cells, n_latent)`` array: the posterior mean (``give_mean``) or one sample; with
        ``return_dist=True`` a tuple ``(means, variances)`` of q(z | x).
        """
        infer = lambda b: self.module.inference(b["x"], b["batch"], b["cat_covs"], b["cont_covs"],  # noqa: E731
                                                b.get("size_factor"))
        return self._latent(adata, indices, batch_size, infer, n_latent=self.config.n_latent, give_mean=give_mean,
                            mc_samples=mc_samples, return_dist=return_dist,
                            logistic_normal=self.config.latent_distribution == "ln")

    # ------------------------------------------------------------------ expression

    def _sample_posterior(self, batch: dict, n: int, with_log_weights: bool = False):
        """``n`` draws of (z, l) from q(z, l | x), flattened sample-major to ``(n * cells, ...)``,
        and optionally the log importance weights ``log p(x, z, l) - log q(z, l | x)``, shape ``(n, cells)``."""
        m = self.module
        inf = m.inference(batch["x"], batch["batch"], batch["cat_covs"], batch["cont_covs"],
                          batch.get("size_factor"), n_samples=1, nz=batch.get("nonzeros"))
        qz, ql, B = inf["qz"], inf["ql"], batch["x"].shape[0]
        z_raw = qz.sample((n,))  # (n, B, L), before the softmax of "ln"
        z = F.softmax(z_raw, -1) if self.config.latent_distribution == "ln" else z_raw
        library = inf["library"].expand(n, B, 1) if ql is None else ql.sample((n,))
        z, library = flatten_samples(z), flatten_samples(library)
        if not with_log_weights:
            return z, library, None
        log_w = (Normal(0.0, 1.0).log_prob(z_raw) - qz.log_prob(z_raw)).sum(-1)  # (n, B)
        gen = m.generative(z, library, *self._repeat_covariates(batch, n))
        log_w = log_w + gen["px"].log_prob_sum(batch["x"].repeat(n, 1)).reshape(n, B)
        if ql is not None:
            lib = library.reshape(n, B, 1)
            log_w = log_w + (gen["pl"].log_prob(library).reshape(n, B, 1) - ql.log_prob(lib)).sum(-1)
        return z, library, log_w

    @staticmethod
    def _repeat_covariates(batch: dict, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(batch, cat_covs, cont_covs, label) of a minibatch, repeated for ``n`` sample-major draws."""
        return tuple(repeat_samples(batch[k], n) for k in ("batch", "cat_covs", "cont_covs", "label"))

    @torch.no_grad()
    def _expression_samples(self, batch: dict, n_samples: int, batch_codes: list[int | None],
                            library_size, with_log_weights: bool = False):
        """Decoded expression ``(n_samples, cells, genes)``, averaged over ``batch_codes`` (same z for
        each), and the log importance weights ``(n_samples, cells)`` when asked for."""
        z, library, log_w = self._sample_posterior(batch, n_samples, with_log_weights)
        own_batch, cat, cont, lab = self._repeat_covariates(batch, n_samples)
        expr = average_over_batches(
            lambda b: expression_from(self.module.generative(z, library, b, cat, cont, lab)["px"], library, library_size),
            own_batch, batch_codes)
        expr = expr.reshape(n_samples, -1, expr.shape[-1])
        return (expr, log_w) if with_log_weights else expr

    @torch.no_grad()
    def get_normalized_expression(self, adata: AnnData | None = None, indices=None, transform_batch=None,
                                  gene_list=None, library_size: float | str = 1, n_samples: int = 1,
                                  n_samples_overall: int | None = None, batch_size: int | None = None,
                                  return_mean: bool = True, return_numpy: bool | None = None):
        """Denoised, library-size-normalized expression.

        Parameters
        ----------
        transform_batch
            ``None``: each cell decoded in its own batch. A batch name, or a list of them: each cell
            decoded as if from each listed batch, and the results averaged (batch-corrected expression).
        gene_list
            Return these genes only.
        library_size
            Scale of the result: 1 gives proportions (rows sum to 1 over all genes); ``"latent"``
            gives expected counts at the cell's own library size.
        n_samples
            Posterior samples of z per cell; averaged when ``return_mean``.
        n_samples_overall
            Return this many rows, each one posterior draw of a cell drawn at random (with replacement)
            from ``indices``: shape ``(n_samples_overall, genes)`` as in scvi-tools. Unlike scvi-tools,
            the DataFrame is indexed by the drawn cells' names.
        return_numpy
            ``None``: a DataFrame (cells x genes) unless the result is 3-D, then a numpy array.

        Returns
        -------
        ``(cells, genes)`` DataFrame/array (genes in the model's order, also with ``gene_list``), or
        ``(n_samples, cells, genes)`` array when ``n_samples > 1`` and ``return_mean=False``.
        """
        check_library_size(library_size)
        adata_, idx = self._expression_rows(adata, indices, n_samples_overall)
        codes, genes = self._batch_codes(transform_batch), self._gene_mask(gene_list)
        expr = self._decode(adata, idx, batch_size, genes, lambda b: {
            "expr": self._expression_samples(b, n_samples, codes, library_size)}, ("expr",), n_samples)["expr"]
        return self._expression_output(expr, adata_, idx, genes, return_mean, return_numpy)

    # ------------------------------------------------------------------ likelihoods

    @torch.no_grad()
    def get_marginal_ll(self, adata: AnnData | None = None, indices=None, n_mc_samples: int = 1000,
                        batch_size: int | None = None, return_mean: bool = True):
        """Importance-sampled log p(x) (higher is better) with q(z, l | x) as proposal.

        .. math:: \\log p(x) \\approx \\log \\frac1K \\sum_k \\frac{p(x | z_k, l_k) p(z_k) p(l_k)}{q(z_k, l_k | x)}
        """
        per_cell = self._per_cell(adata, indices, batch_size, lambda b: importance_log_marginal(
            lambda k: self._log_weights(b, k), n_mc_samples))
        return cell_mean(per_cell) if return_mean else per_cell

    def _log_weights(self, batch: dict, n: int) -> Tensor:
        """log p(x, z, l) - log q(z, l | x) for ``n`` posterior samples, shape ``(n, cells)``."""
        return self._sample_posterior(batch, n, with_log_weights=True)[2]

    # ------------------------------------------------------------------ differential expression

    @torch.no_grad()
    def _de_draws(self, adata: AnnData | None, indices: np.ndarray, n_samples: int, transform_batch,
                  batch_size: int | None, return_log_weights: bool = False):
        """Normalized expression draws for :mod:`cellvi.de`: ``(n_samples * cells, genes)``, sample-major; with
        ``return_log_weights`` also the ``(n_samples, cells)`` log importance weights.

        DE compares expected counts per unit library, ``(1 - pi) * rho`` for ZINB, not the scale ``rho``
        before zero-inflation: a ZINB decoder may give a gene an arbitrary scale when it explains all of
        that gene's zeros as dropouts (the scale then gets no gradient), which made unobserved genes look DE.
        """
        self.module.eval()
        codes = self._batch_codes(transform_batch)
        chunks, weights = [], []
        for batch in self._minibatches(adata, indices, batch_size):
            out = self._expression_samples(batch, n_samples, codes, "mean", return_log_weights)
            expr, log_w = out if return_log_weights else (out, None)
            chunks.append(expr.cpu())
            if log_w is not None:
                weights.append(log_w.cpu())
        draws = torch.cat(chunks, 1).reshape(-1, self.spec.n_genes).numpy()
        return (draws, torch.cat(weights, 1).numpy()) if return_log_weights else draws

    def differential_expression(self, adata: AnnData | None = None, groupby: str | None = None, group1=None,
                                group2: str | None = None, idx1=None, idx2=None, mode: str = "vanilla",
                                delta: float | None = 0.25, batch_size: int | None = None, all_stats: bool = True,
                                batch_correction: bool = False, batchid1=None, batchid2=None,
                                fdr_target: float = 0.05, silent: bool = False, weights: str = "uniform",
                                filter_outlier_cells: bool = False, *, sample_key: str | None = None,
                                condition_key: str | None = None, condition1=None, condition2=None,
                                **kwargs) -> pd.DataFrame:
        """Bayesian differential expression between two groups of cells; see :func:`cellvi.de.differential_expression`
        for every parameter and ``docs/de.md`` for a guide.

        The named parameters up to ``filter_outlier_cells`` are scvi-tools' (same names, defaults and
        meaning). The keyword-only ones are cellvi's: ``sample_key`` tests the effect across samples (donors)
        with ``pvalue``/``padj`` and donor-level calls; ``condition_key``/``condition1``/``condition2`` compare
        two conditions within each group of ``groupby`` in one call (``docs/de_donors.md``). ``**kwargs`` are
        the engine's other keyword-only options (``pseudocounts``, ``n_samples_overall``, ``n_samples``,
        ``seed``, ``use_counts``, ``center_lfc``, ``shrink_lfc``).

        Returns
        -------
        DataFrame indexed by gene with scvi-tools' columns (``proba_de``, ``bayes_factor``, ``lfc_mean``,
        ``is_de_fdr_<fdr_target>`` in change mode, ``comparison``, ...), sorted as scvi-tools sorts.
        """
        from cellvi import de

        return de.differential_expression(
            self, adata, groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2, mode=mode,
            delta=delta, batch_size=batch_size, all_stats=all_stats, batch_correction=batch_correction,
            batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, silent=silent, weights=weights,
            filter_outlier_cells=filter_outlier_cells, sample_key=sample_key, condition_key=condition_key,
            condition1=condition1, condition2=condition2, **kwargs)

    # ------------------------------------------------------------------ differential abundance

    def get_aggregated_posterior(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None,
                                 dof: float | None = 3.0) -> torch.distributions.Distribution:
        """The aggregated posterior of cells ``indices``: the equal-weight mixture of their q(z | x).

        Parameters
        ----------
        dof
            Degrees of freedom of Student-t components; ``None``: Normal components.

        Returns
        -------
        A ``torch.distributions.MixtureSameFamily`` over ``n_latent`` dimensions (``log_prob`` of
        ``(n, n_latent)`` points gives ``(n,)``), as scvi-tools.
        """
        from torch import distributions as D

        loc, var = self.get_latent_representation(adata, indices=indices, batch_size=batch_size, return_dist=True)
        if loc.shape[0] == 0:
            raise ValueError("No cells selected (`indices` is empty); the aggregated posterior needs at least one.")
        loc, scale = torch.as_tensor(loc), torch.as_tensor(var).sqrt()
        comp = D.Normal(loc, scale) if dof is None else D.StudentT(float(dof), loc, scale)
        return D.MixtureSameFamily(D.Categorical(logits=torch.zeros(loc.shape[0])), D.Independent(comp, 1))

    def differential_abundance(self, adata: AnnData | None = None, sample_key: str | None = None,
                               batch_size: int = 128, num_cells_posterior: int | None = None,
                               dof: float | None = None, *, omit_own_cell: bool = True) -> pd.DataFrame:
        """Log density of each cell under each sample's aggregated posterior (cluster-free abundance).

        A cell where one group of samples has higher density than another lies in a region those
        samples are enriched in: compare columns (e.g. mean over stimulated minus control samples).

        Parameters
        ----------
        sample_key
            ``.obs`` column of samples (any column; it need not be set up).
        batch_size
            Cells per minibatch of the encoder. The densities are computed by blocks of cells sized by memory
            (:data:`cellvi.analysis.density.DENSITY_BLOCK_ENTRIES`): never cells x cells at once.
        num_cells_posterior
            At most this many cells (drawn at random) make up each sample's mixture.
        dof
            Student-t components with these degrees of freedom; ``None``: Normal.
        omit_own_cell
            cellvi only: leave each cell's own posterior out of its sample's mixture, so that a cell does
            not vote for itself (``False`` reproduces scvi-tools' densities).

        Returns
        -------
        DataFrame of cells x samples, also written to ``adata.obsm["da_log_probs"]`` (scvi-tools writes it
        and returns None).
        """
        from cellvi.analysis.density import aggregated_log_density

        adata_ = self.adata if adata is None else adata
        if sample_key is None or sample_key not in adata_.obs.columns:
            raise ValueError(f"sample_key={sample_key!r} must be a column of adata.obs "
                             f"(columns: {list(adata_.obs.columns)}).")
        codes, names = pd.factorize(adata_.obs[sample_key].astype(str))  # samples in order of appearance
        loc, var = self.get_latent_representation(adata, return_dist=True, batch_size=batch_size)
        members = np.arange(loc.shape[0])  # the cells whose posteriors make up the mixtures
        if num_cells_posterior is not None:
            rng = np.random.default_rng(settings.seed)
            members = np.sort(np.concatenate([
                rng.choice(m, min(m.size, num_cells_posterior), replace=False)
                for m in (np.flatnonzero(codes == k) for k in range(len(names)))]))
        as_t = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        z, scale, ids = as_t(loc), as_t(np.sqrt(var)), torch.arange(loc.shape[0], device=self.device)
        comp = as_t(members)
        seg = as_t(codes[members])
        log_probs = aggregated_log_density(z, z[comp], scale[comp], seg, len(names), dof=dof,
                                           query_ids=ids if omit_own_cell else None, component_ids=comp).cpu().numpy()
        table = pd.DataFrame(log_probs.astype(np.float32), index=adata_.obs_names, columns=list(names))
        adata_.obsm["da_log_probs"] = table
        return table

    @torch.no_grad()
    def posterior_predictive_sample(self, adata: AnnData | None = None, indices=None, transform_batch=None,
                                    n_samples: int = 1, gene_list=None, batch_size: int | None = None):
        """Counts drawn from p(x | z, l) with (z, l) ~ q(z, l | x).

        Parameters
        ----------
        transform_batch
            ``None``: each cell's own batch; a batch name: decode every cell in that batch; a list:
            the draws of each listed batch averaged (as scvi-tools).
        n_samples
            Draws per cell.
        gene_list
            Return these genes only (in the model's gene order).

        Returns
        -------
        Sparse array of shape ``(cells, genes)`` (``scipy.sparse.csr_array``) when ``n_samples == 1``,
        else ``(cells, genes, n_samples)`` (``scipy.sparse.coo_array``); ``.todense()`` gives numpy.
        scvi-tools returns the same shapes as ``sparse.GCXS`` (pydata sparse, not a cellvi dependency).
        """
        adata_ = self.adata if adata is None else adata
        idx = as_indices(indices, adata_.n_obs)
        codes, genes = self._batch_codes(transform_batch), self._gene_mask(gene_list)

        def draw(batch: dict) -> dict[str, Tensor]:
            z, library, _ = self._sample_posterior(batch, n_samples)
            own, cat, cont, lab = self._repeat_covariates(batch, n_samples)
            x = average_over_batches(
                lambda b: self.module.generative(z, library, b, cat, cont, lab)["px"].sample(), own, codes)
            return {"x": x.reshape(n_samples, batch["x"].shape[0], -1)}  # (S, B, G)

        x = self._decode(adata, idx, batch_size, genes, draw, ("x",), n_samples)["x"]  # (S, cells, G)
        return sparse_counts(x)


def sparse_counts(x: np.ndarray):
    """``(S, cells, genes)`` draws -> sparse ``(cells, genes)`` (S = 1) or ``(cells, genes, S)``."""
    s, c, g = np.nonzero(x)
    values = x[s, c, g]
    if x.shape[0] == 1:
        return sp.csr_array((values, (c, g)), shape=x.shape[1:])
    return sp.coo_array((values, (c, g, s)), shape=(x.shape[1], x.shape[2], x.shape[0]))
