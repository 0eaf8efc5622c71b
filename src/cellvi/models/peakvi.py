"""PeakVI: chromatin accessibility (scATAC) in a latent space (Ashuach et al., 2022, Cell Rep. Methods 2:100182).

Generative model, for a cell with peak counts x (read as accessible or not, ``x > 0``), batch s and
covariates c:

    z ~ Normal(0, I)                               latent state (n_latent)
    y_r = 1[x_r > 0]                               binarised accessibility
    p = sigmoid(f(z, s, c))                        accessibility of each region in this cell state
    d = sigmoid(g(y)) in (0, 1)                    cell factor (sequencing depth, signal-to-noise), encoded
    f_r = sigmoid(r_r)                             region factor (a learned parameter per region)
    y_r ~ Bernoulli(p_r * d * f_r)

The peak matrix stays sparse (CSR) until a minibatch is gathered, and the likelihood sums
``log(1 - q)`` densely plus ``log q - log(1 - q)`` on the accessible entries only
(:meth:`cellvi.distributions.Bernoulli.log_prob_sum`). The encoders read the binarised minibatch.
Counts are binarised in the model; the AnnData is left alone. A cell with no accessible region
is refused at set-up.

Differential accessibility (:meth:`PeakVI.differential_accessibility`) follows the DE guide's choice for
accessibility: the effect is a *difference* of population accessibilities, ``h2 - h1``, not a log ratio.
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

from cellvi import de, settings
from cellvi import distributions as dist
from cellvi.data.setup import get_counts
from cellvi.models.base import Model, average_over_batches
from cellvi.nn import MLP, GaussianEncoder, Linear, binary_matmul

CHOICES = {
    "latent_distribution": ("normal", "ln"),
    "use_batch_norm": ("encoder", "decoder", "none", "both"),
    "use_layer_norm": ("encoder", "decoder", "none", "both"),
}


@dataclass(frozen=True)
class PeakVIConfig:
    n_hidden: int | None = None  # None: int(sqrt(n_regions))
    n_latent: int | None = None  # None: int(sqrt(n_hidden))
    n_layers_encoder: int = 2
    n_layers_decoder: int = 2
    dropout_rate: float = 0.1  # encoder dropout
    model_depth: bool = True  # learn the cell factor d (else d = 1)
    region_factors: bool = True  # learn the region factors f (else f = 1)
    use_batch_norm: str = "none"
    use_layer_norm: str = "both"
    latent_distribution: str = "normal"
    deeply_inject_covariates: bool = False  # covariates enter every decoder layer, not only the first
    encode_covariates: bool = False  # the encoder reads batch and covariates too

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")


def accessible(batch: dict[str, Tensor]) -> Tensor:
    """The minibatch's counts binarised, 1 where a region is accessible: ``min(x, 1)`` (counts are non-negative
    integers, so one pass gives what ``(x > 0).float()`` gives in two)."""
    return batch["x"].clamp(max=1.0)


class _Given(nn.Module):
    """Stands for an MLP's first layer when its output is computed elsewhere (:class:`EncoderInput`): passes it on."""

    def forward(self, h: Tensor, cats: list[Tensor] = ()) -> Tensor:
        return h


class EncoderInput(nn.Module):
    """The first layers of PeakVI's encoders (z, and d with ``model_depth``) when they read y alone
    (``encode_covariates=False``): one weight ``(regions, sum of widths)``, stored transposed so that a
    region's weights are contiguous, and one bias. Built from the bodies' own first layers (same
    initialisation, values and all), which it then replaces with :class:`_Given`.

    Rule: y is read sparsely (:func:`cellvi.nn.binary_matmul`, from the minibatch's ``nonzeros``) on the CPU when
    at most ``SPARSE_MAX_DENSITY`` of the minibatch's entries are accessible (scATAC peak matrices: 1-15 %);
    otherwise (a GPU, denser data, no ``nonzeros``) as one dense matrix product over the binarised block.
    """

    SPARSE_MAX_DENSITY = 0.2

    def __init__(self, bodies: list[MLP]):
        super().__init__()
        firsts = [body.layers[0].linear for body in bodies]
        self.widths = [layer.out_features for layer in firsts]
        self.weight_t = nn.Parameter(torch.cat([layer.weight.detach().t() for layer in firsts], 1).contiguous())
        self.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in firsts]))
        for body in bodies:
            body.layers[0] = _Given()

    def reads_sparse(self, batch: dict[str, Tensor]) -> bool:
        nz = batch.get("nonzeros")
        return (nz is not None and self.weight_t.device.type == "cpu"
                and nz.rows.numel() <= self.SPARSE_MAX_DENSITY * batch["x"].numel())

    def forward(self, batch: dict[str, Tensor], y: Tensor | None = None) -> list[Tensor]:
        """The first layers' outputs (before their normalisation and activation), one ``(B, width)`` per body."""
        if self.reads_sparse(batch):
            nz = batch["nonzeros"]
            out = binary_matmul(self.weight_t, nz.rows, nz.cols, batch["x"].shape[0])
        else:
            out = torch.mm(accessible(batch) if y is None else y, self.weight_t)
        return list(out.add_(self.bias).split(self.widths, 1))


class RegionHead(nn.Module):
    """The decoder's last layer, ``logits = h W^T + b`` over the regions, with ``W`` stored transposed as
    ``weight_t`` ``(n_hidden, regions)``. Same initialisation as ``Linear(n_hidden, n_regions)`` (it builds one).
    In training the product is fused into the likelihood (:meth:`cellvi.distributions.Bernoulli.from_linear`,
    given ``weight``, a transposed view); in that layout its products run on oneDNN's fast paths and the
    weight's gradient needs no transposing copy (1.4 -> 0.75 ms per step at 128 x 70 x 5,000, 2 threads)."""

    def __init__(self, n_hidden: int, n_regions: int):
        super().__init__()
        layer = Linear(n_hidden, n_regions)
        self.weight_t = nn.Parameter(layer.weight.detach().t().contiguous())
        self.bias = nn.Parameter(layer.bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """``(regions, n_hidden)``: ``nn.Linear``'s layout, a view."""
        return self.weight_t.t()

    def forward(self, h: Tensor) -> Tensor:
        return torch.mm(h, self.weight_t).add_(self.bias)  # (B, regions)


def _upgrade_state_dict(module: PeakVIModule, state_dict: dict, prefix: str, *args) -> None:
    """Load weights saved by earlier versions: the head's ``weight`` (``nn.Linear`` layout) becomes
    :class:`RegionHead`'s ``weight_t``; each encoder's first layer on its own (before :class:`EncoderInput`) is fused."""
    if prefix + "head.weight" in state_dict:
        state_dict[prefix + "head.weight_t"] = state_dict.pop(prefix + "head.weight").t().contiguous()
    if module.encoder_input is None or prefix + "encoder_input.weight_t" in state_dict:
        return
    names = ["z_encoder.body", "d_body"][: len(module.encoder_input.widths)]
    keys = [f"{prefix}{name}.layers.0.linear." for name in names]
    if not all(k + "weight" in state_dict for k in keys):
        return  # let load_state_dict report what is missing
    state_dict[prefix + "encoder_input.weight_t"] = torch.cat([state_dict.pop(k + "weight").t() for k in keys], 1)
    state_dict[prefix + "encoder_input.bias"] = torch.cat([state_dict.pop(k + "bias") for k in keys])


class PeakVIModule(nn.Module):
    """q(z | y), d(y) and p(y | z, d, f, s, c)."""

    def __init__(self, n_regions: int, n_batches: int, n_cats_per_cov: list[int], n_continuous_cov: int,
                 config: PeakVIConfig):
        super().__init__()
        self.config = cfg = config
        n_hidden = cfg.n_hidden or max(int(np.sqrt(n_regions)), 1)
        self.n_latent = cfg.n_latent or max(int(np.sqrt(n_hidden)), 1)
        enc_cats = [n_batches, *n_cats_per_cov] if cfg.encode_covariates else []
        n_enc_in = n_regions + (n_continuous_cov if cfg.encode_covariates else 0)
        bn = lambda part: cfg.use_batch_norm in (part, "both")  # noqa: E731
        ln = lambda part: cfg.use_layer_norm in (part, "both")  # noqa: E731
        enc = dict(n_cats=enc_cats, n_hidden=n_hidden, n_layers=cfg.n_layers_encoder, dropout_rate=cfg.dropout_rate,
                   use_batch_norm=bn("encoder"), use_layer_norm=ln("encoder"), inject_all=cfg.deeply_inject_covariates)
        self.z_encoder = GaussianEncoder(n_enc_in, self.n_latent, **enc)
        if cfg.model_depth:
            self.d_body = MLP(n_enc_in, n_hidden, **enc)
            self.d_head = Linear(n_hidden, 1)
        self.decoder = MLP(self.n_latent + n_continuous_cov, n_hidden, n_cats=[n_batches, *n_cats_per_cov],
                           n_hidden=n_hidden, n_layers=cfg.n_layers_decoder, dropout_rate=0.0,
                           use_batch_norm=bn("decoder"), use_layer_norm=ln("decoder"),
                           inject_all=cfg.deeply_inject_covariates)
        self.head = RegionHead(n_hidden, n_regions)
        self.region_factors = nn.Parameter(torch.zeros(n_regions)) if cfg.region_factors else None
        # the encoders' first layers, on y alone, as one (regions x widths) weight that may read y sparsely
        self.encoder_input = None if cfg.encode_covariates else EncoderInput(self._encoder_bodies())
        self._register_load_state_dict_pre_hook(_upgrade_state_dict, with_module=True)

    def _encoder_bodies(self) -> list[MLP]:
        return [self.z_encoder.body] + ([self.d_body] if self.config.model_depth else [])

    # q(z | y) and the cell factor d(y)
    def inference(self, batch: dict[str, Tensor], n_samples: int = 1, y: Tensor | None = None) -> dict:
        """``y``: the minibatch's binarised counts when already at hand (:func:`accessible`)."""
        cfg = self.config
        cats: list[Tensor] = []
        if self.encoder_input is not None:  # the first layers' outputs, fused (their bodies start after them)
            h_z, *h_d = self.encoder_input(batch, y)
        else:
            h = accessible(batch) if y is None else y  # binarised accessibility
            cont = batch["cont_covs"]
            h_z = h_d = torch.cat([h, cont], -1) if cont.shape[-1] else h
            cats = [batch["batch"], *batch["cat_covs"].unbind(-1)]
            h_d = [h_d]
        qz = self.z_encoder(h_z, cats)
        z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))
        if cfg.latent_distribution == "ln":
            z = F.softmax(z, -1)
        d = torch.sigmoid(self.d_head(self.d_body(h_d[0], cats))) if cfg.model_depth else \
            h_z.new_ones(h_z.shape[0], 1)
        return {"qz": qz, "z": z, "d": d}  # z (B, L), d (B, 1)

    # p(y | z, s, c): the logits of the accessibility p before the cell and region factors (p = sigmoid(logits))
    def generative(self, z: Tensor, batch: Tensor, cat_covs: Tensor, cont_covs: Tensor) -> dict:
        return {"logits": self.head(self.decode_hidden(z, batch, cat_covs, cont_covs))}  # (B, R); p = sigmoid

    def decode_hidden(self, z: Tensor, batch: Tensor, cat_covs: Tensor, cont_covs: Tensor) -> Tensor:
        """The decoder's last hidden layer ``(B, n_hidden)``, before the head."""
        h = torch.cat([z, cont_covs], -1) if cont_covs.shape[-1] else z
        return self.decoder(h, [batch, *cat_covs.unbind(-1)])

    def region_factor(self) -> Tensor | float:
        return 1.0 if self.region_factors is None else torch.sigmoid(self.region_factors)

    def loss(self, batch: dict[str, Tensor], kl_weight: float = 1.0) -> dict[str, Tensor]:
        y = None if self.encoder_input is not None and self.encoder_input.reads_sparse(batch) else accessible(batch)
        inf = self.inference(batch, y=y)
        h = self.decode_hidden(inf["z"], batch["batch"], batch["cat_covs"], batch["cont_covs"])
        px = dist.Bernoulli.from_linear(h, self.head.weight, self.head.bias, inf["d"], self.region_factor())
        nz = batch.get("nonzeros")  # the accessible entries (their count values are not read)
        # the likelihood reads any count > 0 as accessible: the counts themselves do when y was not needed
        rec = -px.log_prob_sum(batch["x"] if y is None else y, nz)  # (B,)
        kl_z = dist.kl_standard_normal(inf["qz"]).sum(-1)
        # scvi-tools' PEAKVI minimises sum_cells(rec.sum() + kl_weight * kl): the reconstruction of the whole
        # minibatch once per cell, i.e. the KL weighted 1 / (cells in the minibatch) against it. Without that
        # weight the latent of the default small network collapses (docs/peakvi.md); the logged ELBO is unweighted.
        kl_scale = kl_weight / rec.shape[0]
        return {"loss": torch.mean(rec + kl_scale * kl_z), "reconstruction_loss": rec, "kl_local": kl_z}


class PeakVI(Model):
    """Peak Variational Inference for scATAC-seq (Ashuach et al., 2022).

    ``PeakVI.setup_anndata(adata, batch_key="batch")``, then ``model = PeakVI(adata); model.train()``.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`: peak (or fragment) counts, cells x regions.
    n_hidden, n_latent
        Hidden width (default ``sqrt(n_regions)``) and size of z (default ``sqrt(n_hidden)``).
    n_layers_encoder, n_layers_decoder, dropout_rate
        Network depth and encoder dropout.
    model_depth, region_factors
        Learn the cell factor ``d`` and the region factors ``f`` (each 1 when off).
    use_batch_norm, use_layer_norm
        ``"encoder"``, ``"decoder"``, ``"none"`` or ``"both"``.
    latent_distribution
        ``"normal"`` or ``"ln"``.
    deeply_inject_covariates, encode_covariates
        Covariates in every decoder layer; covariates given to the encoder too.
    """

    config_class = PeakVIConfig

    def __init__(self, adata: AnnData, n_hidden: int | None = None, n_latent: int | None = None,
                 n_layers_encoder: int = 2, n_layers_decoder: int = 2, dropout_rate: float = 0.1,
                 model_depth: bool = True, region_factors: bool = True, use_batch_norm: str = "none",
                 use_layer_norm: str = "both", latent_distribution: str = "normal",
                 deeply_inject_covariates: bool = False, encode_covariates: bool = False):
        config = PeakVIConfig(n_hidden=n_hidden, n_latent=n_latent, n_layers_encoder=n_layers_encoder,
                              n_layers_decoder=n_layers_decoder, dropout_rate=dropout_rate, model_depth=model_depth,
                              region_factors=region_factors, use_batch_norm=use_batch_norm,
                              use_layer_norm=use_layer_norm, latent_distribution=latent_distribution,
                              deeply_inject_covariates=deeply_inject_covariates, encode_covariates=encode_covariates)
        super().__init__(adata, config)
        spec = self.spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.module = PeakVIModule(spec.n_genes, spec.n_batches, spec.n_cats_per_cov, spec.n_continuous_cov,
                                       config)
        self.module.eval()

    @classmethod
    def setup_anndata(cls, adata: AnnData, batch_key: str | None = None, labels_key: str | None = None,
                      categorical_covariate_keys: list[str] | None = None,
                      continuous_covariate_keys: list[str] | None = None, layer: str | None = None) -> None:
        """Validate ``adata`` and record the layer and ``.obs`` columns read.

        Parameters
        ----------
        adata
            Peak counts in ``X`` or ``layers[layer]``: non-negative integers, read as accessible (``> 0``) or
            not; a cell with no accessible region is refused.
        batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys, layer
            As in :meth:`cellvi.SCVI.setup_anndata`.
        """
        super().setup_anndata(adata, layer=layer, batch_key=batch_key, labels_key=labels_key,
                              categorical_covariate_keys=categorical_covariate_keys,
                              continuous_covariate_keys=continuous_covariate_keys)

    train_defaults = {"lr": 1e-4, "weight_decay": 1e-3, "eps": 1e-8, "n_epochs_kl_warmup": 50,
                      "early_stopping_patience": 50}

    def train(self, max_epochs: int = 500, lr: float = 1e-4, accelerator: str = "auto",
              devices: int | list[int] | str = "auto", train_size: float | None = None,
              validation_size: float | None = None, shuffle_set_split: bool = True, batch_size: int = 128,
              weight_decay: float = 1e-3, eps: float = 1e-8, early_stopping: bool = True,
              early_stopping_patience: int = 50, check_val_every_n_epoch: int | None = None,
              n_steps_kl_warmup: int | None = None, n_epochs_kl_warmup: int | None = 50,
              datasplitter_kwargs: dict | None = None, plan_kwargs: dict | None = None, **kwargs) -> None:
        """Train with scvi-tools' PEAKVI defaults (its arguments, in its order): 500 epochs, lr 1e-4,
        weight decay 1e-3, early stopping (patience 50), KL warm-up over 50 epochs.

        ``plan_kwargs`` override the arguments; ``**kwargs`` go to :meth:`cellvi.models.base.Model.train`.
        """
        plan = {"lr": lr, "weight_decay": weight_decay, "eps": eps, "n_steps_kl_warmup": n_steps_kl_warmup,
                "n_epochs_kl_warmup": n_epochs_kl_warmup, **(plan_kwargs or {})}
        kwargs["early_stopping_patience"] = early_stopping_patience
        if check_val_every_n_epoch is not None:
            kwargs["check_val_every_n_epoch"] = check_val_every_n_epoch
        super().train(max_epochs=max_epochs, accelerator=accelerator, devices=devices, train_size=train_size,
                      validation_size=validation_size, shuffle_set_split=shuffle_set_split, batch_size=batch_size,
                      early_stopping=early_stopping, datasplitter_kwargs=datasplitter_kwargs, plan_kwargs=plan,
                      **kwargs)

    # ------------------------------------------------------------------ latent space and factors

    @torch.no_grad()
    def get_latent_representation(self, adata: AnnData | None = None, indices=None, give_mean: bool = True,
                                  mc_samples: int = 5000, batch_size: int | None = None, return_dist: bool = False):
        """Latent z of each cell: ``(cells, n_latent)`` posterior means (``give_mean``) or samples; with
        ``return_dist`` a tuple ``(means, variances)``."""
        return self._latent(adata, indices, batch_size, self.module.inference, n_latent=self.module.n_latent, give_mean=give_mean,
                            mc_samples=mc_samples, return_dist=return_dist,
                            logistic_normal=self.config.latent_distribution == "ln")

    @torch.no_grad()
    def get_library_size_factors(self, adata: AnnData | None = None, indices=None, batch_size: int = 128) -> np.ndarray:
        """The cell factor ``d`` in (0, 1) of each cell, shape ``(cells,)`` (scvi-tools returns the same array)."""
        self.module.eval()
        out = [self.module.inference(b)["d"].cpu() for b in self._minibatches(adata, indices, batch_size)]
        return torch.cat([torch.zeros(0, 1), *out]).numpy().ravel()

    @torch.no_grad()
    def get_region_factors(self) -> np.ndarray:
        """The region factors ``f = sigmoid(r)``, shape ``(regions,)``."""
        if self.module.region_factors is None:
            raise ValueError("This model was built with region_factors=False; it has no region factors.")
        return torch.sigmoid(self.module.region_factors).cpu().numpy()

    # ------------------------------------------------------------------ evaluation

    def get_marginal_ll(self, *args, **kwargs):
        """Not available, as in scvi-tools (PEAKVI's module has no marginal likelihood): use :meth:`get_elbo`."""
        raise NotImplementedError("PeakVI has no marginal log-likelihood (nor has scvi-tools' PEAKVI); use get_elbo.")

    # ------------------------------------------------------------------ accessibility

    def _accessibility(self, batch: dict, n_samples: int, codes: list[int | None], use_z_mean: bool,
                       normalize_cells: bool, normalize_regions: bool) -> Tensor:
        """``(n_samples, cells, regions)`` accessibility, averaged over the batches ``codes`` (same z)."""
        inf = self.module.inference(batch)
        qz, B = inf["qz"], batch["x"].shape[0]
        z = qz.loc.expand(n_samples, *qz.loc.shape) if use_z_mean else qz.sample((n_samples,))
        if self.config.latent_distribution == "ln":
            z = F.softmax(z, -1)
        z = z.reshape(n_samples * B, -1)
        rep = lambda t: t.repeat(n_samples, *([1] * (t.dim() - 1)))  # noqa: E731
        cat, cont = rep(batch["cat_covs"]), rep(batch["cont_covs"])
        p = average_over_batches(lambda b: torch.sigmoid(self.module.generative(z, b, cat, cont)["logits"]),
                                 rep(batch["batch"]), codes)
        if normalize_cells:
            p = p * rep(inf["d"])
        if normalize_regions:
            p = p * self.module.region_factor()
        return p.reshape(n_samples, B, -1)

    @torch.no_grad()
    def get_normalized_accessibility(self, adata: AnnData | None = None, indices=None,
                                     n_samples_overall: int | None = None, region_list=None, transform_batch=None,
                                     use_z_mean: bool = True, threshold: float | None = None,
                                     normalize_cells: bool = False, normalize_regions: bool = False,
                                     batch_size: int = 128, return_numpy: bool = False):
        """Estimated accessibility of each region in each cell.

        Parameters
        ----------
        n_samples_overall
            Return this many rows: cells drawn at random (with replacement) from ``indices``.
        region_list
            Return these regions only (in the model's order).
        transform_batch
            Decode every cell as if from this batch (a list: averaged over them).
        use_z_mean
            Decode the posterior mean of z (else one sample).
        threshold
            Set values below it to 0 and return a sparse result (``csr_matrix``, or a sparse DataFrame).
        normalize_cells, normalize_regions
            Multiply by the cell factor ``d`` / the region factors ``f`` (the Bernoulli's probability).

        Returns
        -------
        ``(cells, regions)`` DataFrame (or numpy array / CSR matrix with ``return_numpy``).
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be between 0 and 1.")
        adata_, idx = self._expression_rows(adata, indices, n_samples_overall)
        codes, regions = self._batch_codes(transform_batch), self._gene_mask(region_list)
        p = self._decode(adata_, idx, batch_size, regions, lambda b: {"p": self._accessibility(
            b, 1, codes, use_z_mean, normalize_cells, normalize_regions)}, ("p",), 1)["p"][0]
        names = pd.Index(self.spec.var_names) if regions is None else pd.Index(self.spec.var_names)[regions]
        if threshold:
            p = sp.csr_matrix(np.where(p < threshold, 0.0, p))
            return p if return_numpy else pd.DataFrame.sparse.from_spmatrix(p, index=adata_.obs_names[idx],
                                                                             columns=names)
        return p if return_numpy else pd.DataFrame(p, index=adata_.obs_names[idx], columns=names)

    get_accessibility_estimates = get_normalized_accessibility  # the name in older scvi-tools notebooks

    # ------------------------------------------------------------------ differential accessibility

    @torch.no_grad()
    @de.one_torch_thread
    def differential_accessibility(self, adata: AnnData | None = None, groupby: str | None = None, group1=None,
                                   group2: str | None = None, idx1=None, idx2=None, mode: str = "change",
                                   delta: float = 0.05, batch_size: int | None = None, all_stats: bool = True,
                                   batch_correction: bool = False, batchid1=None, batchid2=None,
                                   fdr_target: float = 0.05, silent: bool = False, n_samples: int = 5000,
                                   seed: int | None = None) -> pd.DataFrame:
        """Bayesian differential accessibility between two groups of cells.

        The steps of :mod:`cellvi.de`, with the effect of the DE guide for accessibility, a difference:

        1. population accessibilities ``h1``, ``h2``: the mean over each group's cells of posterior draws, as a
           mean and variance per region (:func:`cellvi.de.population_moments`), widened to the binomial precision
           of the group's observed accessibility;
        2. the effect ``h2 - h1``, divided by the decoder's shrinkage of effects (:func:`cellvi.de.model_slope`),
           plus its remaining error (:func:`cellvi.de.model_error_sd`), then weighed with the observed effect by
           precision (:func:`cellvi.de.combine_moments`: where the model learned little, the observed effect decides);
        3. empirical-Bayes spike-and-slab shrinkage of the effects (:func:`cellvi.de.spike_slab_posterior`), so
           that a region the data say little about keeps the prior's null weight;
        4. ``mode="change"``: ``prob_da = P(|h2 - h1| > delta)``; ``mode="vanilla"``: ``prob_da = P(h1 > h2)``
           (as scvi-tools, which then leaves ``is_da_fdr`` empty); calls at posterior expected FDR
           ``fdr_target`` (:func:`cellvi.de.expected_fdr_calls`).

        Parameters
        ----------
        groupby, group1, group2, idx1, idx2
            The populations, as in :func:`cellvi.de.differential_expression`.
        delta
            Smallest difference of accessibility that counts (change mode).
        batch_correction, batchid1, batchid2
            Decode each population in every batch (or those listed) and average.
        fdr_target
            Posterior expected FDR of the ``is_da_fdr`` calls.
        silent
            Accepted for scvi-tools compatibility.
        n_samples, seed
            Decoded draws per population and their seed (cellvi only). The probabilities are computed in closed
            form from the effect's mean and variance (Gaussian), as :func:`cellvi.de.differential_expression`'s:
            no resampling, and memory of one minibatch's draws whatever the number of cells.

        Returns
        -------
        DataFrame indexed by region, sorted by ``prob_da``, with scvi-tools' columns ``prob_da``,
        ``is_da_fdr``, ``bayes_factor``, ``effect_size`` (``est_prob2 - est_prob1``, scvi-tools' sign),
        ``emp_effect``, ``est_prob1``, ``est_prob2``, ``emp_prob1``, ``emp_prob2``, and ``comparison``,
        ``group1``, ``group2``.
        """
        if mode not in ("vanilla", "change"):
            raise ValueError(f"mode={mode!r} is not one of ('vanilla', 'change').")
        if delta is None or delta < 0:
            raise ValueError(f"delta={delta!r}: give a difference of accessibility >= 0 (e.g. 0.05).")
        if not 0.0 < fdr_target < 1.0:
            raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target}.")
        adata_ = self.adata if adata is None else adata
        seed = settings.seed if seed is None else seed
        rng = np.random.default_rng(seed)
        codes1 = self._da_batches(batch_correction, batchid1)
        codes2 = self._da_batches(batch_correction, batchid2)
        Y = sp.csr_matrix(get_counts(adata_, self.spec.layer), dtype=np.float32)
        Y.data = (Y.data > 0).astype(np.float32)  # binarised, as the likelihood reads it
        f = self.module.region_factor()
        f = np.ones(self.spec.n_genes) if isinstance(f, float) else f.detach().cpu().numpy()
        tables = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name1, name2, rows1, rows2 in de.comparisons(adata_, groupby, group1, group2, idx1, idx2):
                emp1, emp2 = (np.asarray(Y[r].mean(0)).ravel() for r in (rows1, rows2))
                (mean1, var1), (obs1, obs_var1) = self._population(adata_, rows1, codes1, emp1, f, n_samples,
                                                                   batch_size, rng)
                (mean2, var2), (obs2, obs_var2) = self._population(adata_, rows2, codes2, emp2, f, n_samples,
                                                                   batch_size, rng)
                observed, observed_var = obs2 - obs1, obs_var1 + obs_var2
                finite = np.isfinite(observed)
                # the decoder shrinks effects it learned only partly: put them on the observed scale first
                # (:func:`cellvi.de.model_slope`), then measure what remains of its error
                slope = de.model_slope(mean2 - mean1, observed, observed_var, finite)
                m, v = (mean2 - mean1) / slope, (var1 + var2) / slope**2
                v = np.maximum(v + de.model_error_sd(m, observed, observed_var, finite) ** 2, 1e-12)
                # where the model learned little of the contrast (its error is large), the observed one decides;
                # then spike-and-slab: the effect is 0 with probability 1 - w, else N(m, v)
                w, m, v, _ = de.effect_posterior(m, v, observed=(observed, np.maximum(observed_var, 1e-12)))
                if mode == "change":
                    prob = w * de.tail_probability(m, np.sqrt(v), delta)
                    calls = de.expected_fdr_calls(prob, fdr_target)
                else:  # P(h1 > h2)
                    prob, calls = de.prob_positive(w, -m, np.sqrt(v)), None
                table = pd.DataFrame({
                    "prob_da": prob, "is_da_fdr": calls, "bayes_factor": de.bayes_factor(prob),
                    "effect_size": mean2 - mean1, "emp_effect": emp2 - emp1,
                    "est_prob1": mean1, "est_prob2": mean2, "emp_prob1": emp1, "emp_prob2": emp2,
                    "comparison": f"{name1} vs {name2}", "group1": name1, "group2": name2,
                }, index=pd.Index(self.spec.var_names))
                if not all_stats:
                    table = table.drop(columns=["emp_effect", "emp_prob1", "emp_prob2"])
                tables.append(table.sort_values("prob_da", ascending=False, kind="stable"))
        return pd.concat(tables)

    def _da_batches(self, batch_correction: bool, batchid) -> list[int | None]:
        if not batch_correction:
            if batchid is not None:
                raise ValueError("batchid1/batchid2 are only used with batch_correction=True.")
            return [None]
        return self._batch_codes(list(self.spec.batch_categories) if batchid is None else batchid)

    def _population(self, adata: AnnData, rows: np.ndarray, codes: list[int | None], emp: np.ndarray,
                    region_factor: np.ndarray, n_samples: int, batch_size: int | None, rng: np.random.Generator
                    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """A population's mean accessibility ``p``, as moments ``(mean, var)`` per region, and the observed
        accessibility on the same scale with its sampling variance.

        A bounded subsample of cells (``n_samples`` decoded draws in all) gives the moments of the population
        mean (:func:`cellvi.de.population_moments`, accumulated over minibatches: memory of one minibatch's
        draws, not of the population's). The observed fraction ``e`` of accessible cells estimates ``c * p`` with
        ``c = mean(d) * f`` (cell and region factors), so ``e / c`` is an observed ``p`` with variance
        ``e (1 - e) / (n c^2)``, which is added to the model's (a region is never known better than its cells
        say; the decoder's smooth estimates carry no such floor).

        Returns
        -------
        ``((mean, var), (observed_p, sampling_var))``, each ``(regions,)``.
        """
        n_draws = max(1, min(25, -(-n_samples // rows.size)))
        n_cells = max(1, min(rows.size, n_samples // n_draws))
        chosen = np.sort(rng.choice(rows, n_cells, replace=False)) if n_cells < rows.size else rows
        self.module.eval()
        mean, var = de.population_moments_of(self._accessibility(b, n_draws, codes, False, False, False).cpu().numpy()
                                             for b in self._minibatches(adata, chosen, batch_size))
        c = float(self.get_library_size_factors(adata, chosen, batch_size or 128).mean()) * region_factor
        e = np.clip(emp, 0.5 / (rows.size + 1), 1.0 - 0.5 / (rows.size + 1))
        sampling_var = e * (1.0 - e) / (rows.size + 1) / c**2
        return (mean, var + sampling_var), (emp / c, sampling_var)


PEAKVI = PeakVI  # scvi-tools' spelling
