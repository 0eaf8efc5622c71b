"""contrastiveVI: background and salient latent spaces for target-vs-background experiments
(Weinberger, Lin and Lee, 2023, Nat. Methods 20:1336).

A background set of cells (e.g. controls) and a target set (e.g. stimulated cells) share a
background latent z; target cells also have a salient latent s for what only they vary in.
Generative model, for a cell with counts x, batch b and covariates c:

    z ~ Normal(0, I)                                    background latent (n_background_latent)
    s ~ Normal(0, I) for target cells, s = 0 for        salient latent (n_salient_latent)
        background cells
    l = log(sum x)  or  l ~ Normal(mu_b, sigma_b^2)     log library size, observed or latent
    rho = softmax(f([z, s], b, c))                      one decoder for both kinds of cells
    x_g ~ ZINB(exp(l) * rho_g, theta_g, pi_g)           counts, one inverse dispersion per gene

with separate amortised encoders q(z | x, b), q(s | x, b) (and q(l | x, b)). The objective adds,
for background cells, E log p(x | z, 0) - KL(q(z) || p(z)) and, for target cells,
E log p(x | z, s) - KL(q(z) || p(z)) - KL(q(s) || p(s)), and optionally penalises the squared
2-Wasserstein distance between the background cells' q(s | x) and a point mass at 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import Tensor, nn
from torch.distributions import kl_divergence

from cellvi import distributed
from cellvi import distributions as dist
from cellvi.data.loader import CountData, split_indices
from cellvi.models.base import Model, _last_batch_min_size, as_indices, average_over_batches, check_library_size, expression_from
from cellvi.models.scvi import flatten_samples, repeat_samples
from cellvi.nn import MLP, GaussianEncoder, Linear

REPRESENTATION_KINDS = ("salient", "background")


@dataclass(frozen=True)
class ContrastiveVIConfig:
    n_hidden: int = 128  # width of hidden layers
    n_background_latent: int = 10  # size of z, shared by background and target cells
    n_salient_latent: int = 10  # size of s, what only target cells vary in
    n_layers: int = 1  # hidden layers in the encoders and the decoder
    dropout_rate: float = 0.1  # encoder dropout
    use_observed_lib_size: bool = True  # l = log total counts, else a latent log-normal per batch
    wasserstein_penalty: float = 0.0  # weight of W2^2(q(s | x), delta_0) for background cells

    def __post_init__(self):
        for name in ("n_hidden", "n_background_latent", "n_salient_latent", "n_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        if not (self.wasserstein_penalty >= 0 and math.isfinite(self.wasserstein_penalty)):
            raise ValueError(f"wasserstein_penalty must be a finite number >= 0, got {self.wasserstein_penalty!r}.")


class ContrastiveVIModule(nn.Module):
    """q(z | x, b), q(s | x, b), q(l | x, b) and p(x | z, s, l, b, c)."""

    def __init__(self, n_genes: int, n_batches: int, n_cats_per_cov: list[int], n_continuous_cov: int,
                 config: ContrastiveVIConfig, library_log_means: Tensor, library_log_vars: Tensor):
        super().__init__()
        self.config = cfg = config
        self.n_batches = n_batches
        enc = dict(n_cats=[n_batches], n_hidden=cfg.n_hidden, dropout_rate=cfg.dropout_rate, inject_all=True)
        self.z_encoder = GaussianEncoder(n_genes, cfg.n_background_latent, n_layers=cfg.n_layers, **enc)
        self.s_encoder = GaussianEncoder(n_genes, cfg.n_salient_latent, n_layers=cfg.n_layers, **enc)
        self.l_encoder = None if cfg.use_observed_lib_size else GaussianEncoder(n_genes, 1, n_layers=1, **enc)
        n_latent = cfg.n_background_latent + cfg.n_salient_latent
        self.decoder = MLP(n_latent + n_continuous_cov, cfg.n_hidden, n_cats=[n_batches, *n_cats_per_cov],
                           n_hidden=cfg.n_hidden, n_layers=cfg.n_layers, dropout_rate=0.0, inject_all=True)
        self.heads = Linear(cfg.n_hidden, 2 * n_genes)  # one matmul: [scale logits | zero-inflation logits]
        self.log_theta = nn.Parameter(torch.randn(n_genes))  # ZINB inverse dispersion, one per gene
        self.register_buffer("library_log_means", library_log_means.float().reshape(-1))
        self.register_buffer("library_log_vars", library_log_vars.float().reshape(-1))

    # q(z, s, l | x): any cells, background or target
    def inference(self, x: Tensor, batch: Tensor, size_factor: Tensor | None = None, n_samples: int = 1,
                  nz: dist.Nonzeros | None = None) -> dict:
        h = torch.log1p(x) if nz is None else dist.log1p_dense(x, nz)  # encoders read log(1 + x)
        qz = self.z_encoder(h, [batch])  # (B, n_background_latent)
        qs = self.s_encoder(h, [batch])  # (B, n_salient_latent)
        shape = () if n_samples == 1 else (n_samples,)
        z, s = qz.rsample(shape), qs.rsample(shape)  # (B, L) or (S, B, L)
        ql = None
        if self.l_encoder is None:
            library = torch.log(x.sum(-1, keepdim=True) if size_factor is None else size_factor)  # (B, 1)
            if n_samples > 1:
                library = library.expand(n_samples, *library.shape)
        else:
            ql = self.l_encoder(h, [batch])
            library = ql.rsample(shape)
        return {"qz": qz, "qs": qs, "ql": ql, "z": z, "s": s, "library": library}

    # p(x | z, s, l, b, c): all inputs 2-D (cells, ...); s is already 0 for background cells
    def generative(self, z: Tensor, s: Tensor, library: Tensor, batch: Tensor, cat_covs: Tensor,
                   cont_covs: Tensor) -> dict:
        h = torch.cat([z, s, cont_covs], -1) if cont_covs.shape[-1] else torch.cat([z, s], -1)
        h = self.decoder(h, [batch, *cat_covs.unbind(-1)])  # (B, n_hidden)
        # [scale logits | zero-inflation logits] (B, 2G); mu = exp(library) * softmax(scale logits), computed
        # when read (training fuses it into the likelihood)
        px = dist.NegativeBinomial.from_logits(self.heads(h), library, torch.exp(self.log_theta), zero_inflated=True)
        pl = None
        if self.l_encoder is not None:
            pl = dist.normal(self.library_log_means[batch][:, None], self.library_log_vars[batch][:, None].sqrt())
        return {"px": px, "pl": pl}

    def loss(self, batch: dict[str, Tensor], kl_weight: float = 1.0) -> dict[str, Tensor]:
        """Loss of one minibatch of background and target cells (:func:`paired_batches`: one background
        minibatch, then one target minibatch, gathered together; ``batch["is_target"]`` flags the target rows).

        ``"loss"`` is, as in scvi-tools, the mean over background cells of their terms plus the mean over
        target cells of theirs (one background/target pair). The per-cell entries follow the minibatch's
        rows: ``reconstruction_loss``, ``kl_local`` (KL of z, of s for target cells, of l when inferred) and
        ``wasserstein_penalty`` (the unweighted W2^2 term; 0 for target cells).
        """
        x, is_target = batch["x"], batch["is_target"]  # (B, G), (B,)
        inf = self.inference(x, batch["batch"], batch.get("size_factor"), nz=batch.get("nonzeros"))
        s = inf["s"] * is_target[:, None]  # the salient latent of background cells is 0
        gen = self.generative(inf["z"], s, inf["library"], batch["batch"], batch["cat_covs"], batch["cont_covs"])
        rec = -gen["px"].log_prob_sum(x, batch.get("nonzeros"))  # (B,)
        kl_z = dist.kl_standard_normal(inf["qz"]).sum(-1)
        kl_s = dist.kl_standard_normal(inf["qs"]).sum(-1) * is_target
        kl_l = kl_divergence(inf["ql"], gen["pl"]).sum(-1) if inf["ql"] is not None else torch.zeros_like(kl_z)
        qs = inf["qs"]
        # W2^2(N(m, diag v), delta_0) = |m|^2 + sum(v), for background cells only
        w2 = (qs.loc.square().sum(-1) + qs.variance.sum(-1)) * ~is_target
        per_cell = rec + kl_weight * (kl_z + kl_s + self.config.wasserstein_penalty * w2) + kl_l
        n_target = is_target.sum()  # a tensor: no device sync
        loss = (per_cell * torch.where(is_target, 1.0 / n_target, 1.0 / (x.shape[0] - n_target))).sum()
        return {"loss": loss, "reconstruction_loss": rec, "kl_local": kl_z + kl_s + kl_l, "wasserstein_penalty": w2}


# --------------------------------------------------------------------------- minibatch pairs


def _one_pass(idx: Tensor, batch_size: int, shuffle: bool, generator: torch.Generator | None,
              min_size: int) -> list[Tensor]:
    """``idx`` cut into minibatches (shuffled first); a last one smaller than ``min_size`` is dropped
    unless it is the only one."""
    if shuffle:
        idx = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
    chunks = list(idx.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < min_size:
        chunks.pop()
    return chunks


def paired_batches(data: CountData, background: Tensor, target: Tensor, batch_size: int, *,
                   shuffle: bool = False, generator: torch.Generator | None = None,
                   min_size: int = 1) -> Iterator[dict[str, dict[str, Tensor]]]:
    """One epoch of minibatch pairs, each gathered as one minibatch: a background minibatch's cells, then a
    target minibatch's, with ``"is_target"`` (bool, per cell) telling them apart.

    The epoch follows the larger of the two sets (each of its cells once); the smaller set is cycled,
    reshuffled at each pass, so every step sees one minibatch of each (as scvi-tools' contrastive
    data loader, which also cycles the smaller set).
    """
    bg_larger = background.numel() >= target.numel()
    large, small = (background, target) if bg_larger else (target, background)
    pending: list[Tensor] = []
    for large_idx in _one_pass(large, batch_size, shuffle, generator, min_size):
        if not pending:
            pending = _one_pass(small, batch_size, shuffle, generator, min_size)
        small_idx = pending.pop(0)
        bg_idx, tg_idx = (large_idx, small_idx) if bg_larger else (small_idx, large_idx)
        batch = data.gather(torch.cat([bg_idx, tg_idx]))
        batch["is_target"] = torch.arange(batch["x"].shape[0], device=batch["x"].device) >= bg_idx.numel()
        yield batch


# --------------------------------------------------------------------------- helpers on the data set-up


def _cell_set(indices, n_obs: int, name: str) -> np.ndarray:
    """Sorted unique rows of a background/target set, refusing empty sets and repeated cells."""
    if indices is None:
        raise ValueError(f"{name} is required: the rows (integer positions or a boolean mask) of those cells.")
    idx = as_indices(indices, n_obs)
    if idx.size == 0:
        raise ValueError(f"{name} is empty; contrastiveVI needs at least one background and one target cell.")
    uniq = np.unique(idx)
    if uniq.size != idx.size:
        raise ValueError(f"{name} lists {idx.size - uniq.size} cell(s) more than once; give each cell once.")
    return uniq


class ContrastiveVI(Model):
    """contrastive Variational Inference (Weinberger et al., 2023).

    ``ContrastiveVI.setup_anndata(adata, batch_key=...)``, then
    ``model = ContrastiveVI(adata); model.train(background_indices, target_indices)``.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`.
    n_hidden, n_layers, dropout_rate
        Width and depth of the encoders and decoder; encoder dropout.
    n_background_latent, n_salient_latent
        Sizes of the background latent z (all cells) and the salient latent s (target cells).
    use_observed_lib_size
        Use log total counts as the library size; otherwise infer it with a per-batch log-normal prior.
    wasserstein_penalty
        Weight of the squared 2-Wasserstein distance between background cells' q(s | x) and 0, which
        keeps shared variation out of the salient space (0: off, the scvi-tools default).

    Notes
    -----
    As in scvi-tools: ZINB likelihood, one inverse dispersion per gene, encoders and decoder
    conditioned on the batch. Unlike scvi-tools, registered categorical/continuous covariates also
    condition the decoder, a ``size_factor_key`` replaces the observed library size, and the cells
    trained as background (``background_indices_``) are decoded with s = 0 in the ``"salient"``
    expression too, so their salient and background expression coincide.
    """

    config_class = ContrastiveVIConfig

    def __init__(self, adata: AnnData, n_hidden: int = 128, n_background_latent: int = 10,
                 n_salient_latent: int = 10, n_layers: int = 1, dropout_rate: float = 0.1,
                 use_observed_lib_size: bool = True, wasserstein_penalty: float = 0):
        config = ContrastiveVIConfig(n_hidden=n_hidden, n_background_latent=n_background_latent,
                                     n_salient_latent=n_salient_latent, n_layers=n_layers, dropout_rate=dropout_rate,
                                     use_observed_lib_size=use_observed_lib_size,
                                     wasserstein_penalty=float(wasserstein_penalty))
        super().__init__(adata, config)
        from cellvi import settings

        spec = self.spec
        means, variances = self._data().library_log_stats(spec.n_batches)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.module = ContrastiveVIModule(spec.n_genes, spec.n_batches, spec.n_cats_per_cov,
                                              spec.n_continuous_cov, config, means, variances)
        self.module.eval()
        self.background_indices_: np.ndarray | None = None  # rows of adata trained as background
        self.target_indices_: np.ndarray | None = None

    # ------------------------------------------------------------------ training

    @distributed.spawns_processes
    def train(
        self,
        background_indices,
        target_indices,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        *,
        seed: int | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        resume_from: str | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train on background and target cells; every step sees one minibatch of each.

        The other parameters are those of :meth:`cellvi.SCVI.train` (``plan_kwargs`` for Adam and the KL
        warm-up of the z and s KL terms and the Wasserstein penalty; trainer options for gradient
        clipping and early stopping; ``seed``, ``checkpoint_dir``, ``checkpoint_every``, ``resume_from``).

        Parameters
        ----------
        background_indices, target_indices
            Rows of the background cells (e.g. controls) and of the target cells (e.g. stimulated),
            as integer positions or boolean masks; the two sets must be non-empty and disjoint.
            Cells in neither set are not used.
        max_epochs
            Passes over the larger of the two training sets (the smaller one is cycled); default
            ``min(400, 400 * 20000 / n_cells)`` as in scvi-tools.
        train_size, validation_size, shuffle_set_split
            Each set is split on its own into training and validation cells with these fractions.
        batch_size
            Cells per minibatch of each set (a step sees up to ``2 * batch_size`` cells).

        Returns
        -------
        None. ``history_`` gets SCVI's keys: ``elbo_train``, ``reconstruction_loss_train`` and
        ``kl_local_train`` per cell (background and target cells together), ``train_loss`` and
        ``validation_loss`` per background/target pair (the optimised loss, as in scvi-tools), and
        ``wasserstein_penalty_train``, the unweighted W2^2 term per cell (0 for target cells).
        ``background_indices_``/``target_indices_`` hold the two sets; ``train_indices_`` and
        ``validation_indices_`` the rows of both sets used for training and validation.
        """
        n_obs = self.adata.n_obs
        background = _cell_set(background_indices, n_obs, "background_indices")
        target = _cell_set(target_indices, n_obs, "target_indices")
        overlap = np.intersect1d(background, target)
        if overlap.size:
            raise ValueError(f"{overlap.size} cell(s) are both background and target (e.g. rows {overlap[:5].tolist()});"
                             " the two sets must be disjoint.")
        config, generator = self._training_setup(max_epochs, accelerator, devices, early_stopping, None,
                                                 dict(plan_kwargs or {}), trainer_kwargs, seed)
        data = self._data()
        def split(rows: np.ndarray) -> list[np.ndarray]:  # each set is split on its own
            parts = split_indices(rows.size, train_size, validation_size, shuffle=shuffle_set_split, generator=generator)
            return [rows[part.numpy()] for part in parts]

        (bg_train, bg_val), (tg_train, tg_val) = split(background), split(target)
        self.background_indices_, self.target_indices_ = background, target
        self.train_indices_ = np.concatenate([bg_train, tg_train])
        self.validation_indices_ = np.concatenate([bg_val, tg_val])
        on = lambda a: torch.as_tensor(a, device=data.device)  # noqa: E731
        bg_train, bg_val, tg_train, tg_val = on(bg_train), on(bg_val), on(tg_train), on(tg_val)
        has_val = bg_val.numel() > 0 and tg_val.numel() > 0  # validation needs cells of both sets
        min_size = _last_batch_min_size(batch_size, datasplitter_kwargs)
        n_train, n_val = bg_train.numel() + tg_train.numel(), bg_val.numel() + tg_val.numel() if has_val else 0
        rank, size = distributed.world()
        if size > 1:  # under torchrun each rank trains on an equal share of each set (same number of steps)
            bg_train, tg_train = (t[rank::size][: t.numel() // size] for t in (bg_train, tg_train))
            bg_val, tg_val = (t[rank::size] for t in (bg_val, tg_val))
        self._fit(
            config, generator,
            lambda: paired_batches(data, bg_train, tg_train, batch_size, shuffle=True, generator=generator,
                                   min_size=min_size),
            (lambda: paired_batches(data, bg_val, tg_val, batch_size)) if has_val else None,
            n_obs_train=n_train, n_obs_val=n_val,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume_from=resume_from,
        )

    # ------------------------------------------------------------------ latent spaces

    @torch.no_grad()
    def get_latent_representation(self, adata: AnnData | None = None, indices=None, give_mean: bool = True,
                                  batch_size: int | None = None, representation_kind: str = "salient") -> np.ndarray:
        """Salient latent s or background latent z of each cell.

        Parameters
        ----------
        give_mean
            The posterior mean (else one sample).
        representation_kind
            ``"salient"`` (q(s | x), also for background cells: the encoder's output, which their
            decoding ignores) or ``"background"`` (q(z | x)).

        Returns
        -------
        ``(n_cells, n_salient_latent)`` or ``(n_cells, n_background_latent)`` array.
        """
        if representation_kind not in REPRESENTATION_KINDS:
            raise ValueError(f"representation_kind={representation_kind!r} is not one of {REPRESENTATION_KINDS}.")
        self.module.eval()
        q, sample = ("qs", "s") if representation_kind == "salient" else ("qz", "z")
        out = []
        for batch in self._minibatches(adata, indices, batch_size):
            inf = self.module.inference(batch["x"], batch["batch"], batch.get("size_factor"))
            out.append((inf[q].loc if give_mean else inf[sample]).cpu())
        width = self.config.n_salient_latent if q == "qs" else self.config.n_background_latent
        return torch.cat(out).numpy() if out else np.zeros((0, width), np.float32)

    # ------------------------------------------------------------------ expression

    def get_elbo(self, *args, **kwargs):
        """Not available, as in scvi-tools' ContrastiveVI: its loss pairs background and target minibatches."""
        raise NotImplementedError("ContrastiveVI has no get_elbo (nor has scvi-tools' ContrastiveVI): its loss pairs "
                                  "a background and a target minibatch; read model.history['elbo_validation'].")

    def get_reconstruction_error(self, *args, **kwargs):
        """Not available, as in scvi-tools' ContrastiveVI (see :meth:`get_elbo`)."""
        raise NotImplementedError("ContrastiveVI has no get_reconstruction_error (nor has scvi-tools' ContrastiveVI); "
                                  "read model.history['reconstruction_loss_validation'].")

    def _background_mask(self, adata: AnnData | None) -> np.ndarray | None:
        """Which rows of ``adata`` were trained as background (only known for the model's own AnnData)."""
        if self.background_indices_ is None or not (adata is None or adata is self.adata):
            return None
        mask = np.zeros(self.adata.n_obs, dtype=bool)
        mask[self.background_indices_] = True
        return mask

    @torch.no_grad()
    def _expression(self, batch: dict, n_samples: int, batch_codes: list[int | None], library_size,
                    kinds: tuple[str, ...], is_background: Tensor | None) -> dict[str, Tensor]:
        """Decoded expression of each kind (``"background"``: s = 0; ``"salient"``: the cell's s, 0 for
        known background cells), each ``(n_samples, cells, genes)``, averaged over ``batch_codes``."""
        m = self.module
        inf = m.inference(batch["x"], batch["batch"], batch.get("size_factor"), n_samples)
        z, s, library = inf["z"], inf["s"], inf["library"]
        if n_samples > 1:
            z, s, library = flatten_samples(z), flatten_samples(s), flatten_samples(library)  # (S * B, ...)
        cat, cont, own = (repeat_samples(batch[k], n_samples) for k in ("cat_covs", "cont_covs", "batch"))
        latents = {"background": torch.zeros_like(s), "salient": s}
        mix_background = "salient" in kinds and is_background is not None and bool(is_background.any())
        decode = (*kinds, "background") if mix_background and "background" not in kinds else kinds
        out = {}
        for kind in decode:
            expr = average_over_batches(lambda b, kind=kind: expression_from(
                m.generative(z, latents[kind], library, b, cat, cont)["px"], library, library_size), own, batch_codes)
            out[kind] = expr.reshape(n_samples, -1, expr.shape[-1])
        if mix_background:  # known background cells: s = 0, so salient = background, exactly
            out["salient"] = torch.where(is_background[None, :, None], out["background"], out["salient"])
        return {k: out[k] for k in kinds}

    def _expression_chunks(self, adata, idx: np.ndarray, n_samples: int, transform_batch, library_size,
                           kinds: tuple[str, ...], batch_size: int | None, genes: np.ndarray | None):
        """Per kind, the ``(n_samples, cells, genes)`` expression of cells ``idx`` (on the CPU)."""
        codes = self._batch_codes(transform_batch)
        bg_mask = self._background_mask(adata)
        if bg_mask is not None:
            bg_mask = torch.as_tensor(bg_mask, device=self.device)
        return self._decode(adata, idx, batch_size, genes, lambda batch: self._expression(
            batch, n_samples, codes, library_size, kinds, None if bg_mask is None else bg_mask[batch["index"]]),
            kinds, n_samples)

    @torch.no_grad()
    def get_normalized_expression(self, adata: AnnData | None = None, indices=None, transform_batch=None,
                                  gene_list=None, library_size: float | str = 1, n_samples: int = 1,
                                  n_samples_overall: int | None = None, batch_size: int | None = None,
                                  return_mean: bool = True, return_numpy: bool | None = None, silent: bool = True
                                  ) -> dict[str, np.ndarray | pd.DataFrame]:
        """Denoised, library-size-normalized expression decoded from the background latent alone
        (s = 0) and from both latents.

        Parameters
        ----------
        transform_batch
            ``None``: each cell decoded in its own batch. A batch name, or a list of them: each cell
            decoded as if from each listed batch, and the results averaged.
        gene_list
            Return these genes only (in the model's gene order, as scvi-tools).
        library_size
            1 gives proportions (rows sum to 1 over all genes); ``"latent"`` gives expected counts at
            the cell's own library size.
        n_samples
            Posterior samples of (z, s) per cell; averaged when ``return_mean``.
        n_samples_overall
            Return this many rows, each one posterior draw of a cell drawn at random (with
            replacement) from ``indices``, indexed by the drawn cells' names.
        return_numpy
            ``None``: DataFrames (cells x genes) unless the results are 3-D, then numpy arrays.
        silent
            Accepted for compatibility; cellvi shows no progress bar here.

        Returns
        -------
        ``{"background": ..., "salient": ...}``, each ``(cells, genes)`` (DataFrame or array), or
        ``(n_samples, cells, genes)`` arrays when ``n_samples > 1`` and ``return_mean=False``. Cells
        trained as background get s = 0 in both, so their two entries are equal.
        """
        check_library_size(library_size)
        adata_, idx = self._expression_rows(adata, indices, n_samples_overall)
        genes = self._gene_mask(gene_list)
        exprs = self._expression_chunks(adata, idx, n_samples, transform_batch, library_size,
                                        ("background", "salient"), batch_size, genes)
        return {kind: self._expression_output(expr, adata_, idx, genes, return_mean, return_numpy)
                for kind, expr in exprs.items()}

    @torch.no_grad()
    def get_salient_normalized_expression(self, adata: AnnData | None = None, indices=None, transform_batch=None,
                                          gene_list=None, library_size: float | str = 1, n_samples: int = 1,
                                          n_samples_overall: int | None = None, batch_size: int | None = None,
                                          return_mean: bool = True, return_numpy: bool | None = None):
        """The ``"salient"`` entry of :meth:`get_normalized_expression` (decoded from z and s), computed alone."""
        check_library_size(library_size)
        adata_, idx = self._expression_rows(adata, indices, n_samples_overall)
        genes = self._gene_mask(gene_list)
        expr = self._expression_chunks(adata, idx, n_samples, transform_batch, library_size, ("salient",),
                                       batch_size, genes)["salient"]
        return self._expression_output(expr, adata_, idx, genes, return_mean, return_numpy)

    # ------------------------------------------------------------------ differential expression

    @torch.no_grad()
    def _de_draws(self, adata: AnnData | None, indices: np.ndarray, n_samples: int, transform_batch: str | None,
                  batch_size: int | None, *, kind: str = "salient") -> np.ndarray:
        """Normalized expression draws at library size 1 for the DE engine: expected counts per unit
        library, ``(1 - pi) * rho``, as :meth:`cellvi.SCVI._de_draws` (see ``docs/de.md``).

        Returns
        -------
        ``(n_samples * len(indices), genes)`` float32, sample-major (row ``k * n_cells + i`` is draw
        ``k`` of cell ``i``); ``kind`` is ``"salient"`` or ``"background"``.
        """
        if kind not in REPRESENTATION_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {REPRESENTATION_KINDS}.")
        adata_ = self.adata if adata is None else adata
        idx = as_indices(indices, adata_.n_obs)
        expr = self._expression_chunks(adata, idx, n_samples, transform_batch, "mean", (kind,), batch_size, None)[kind]
        return np.ascontiguousarray(expr.reshape(-1, expr.shape[-1]), dtype=np.float32)

    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1=None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: str = "change",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = False,
        target_idx=None,
        n_samples: int = 1,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression through :func:`cellvi.de.differential_expression`.

        The other parameters are those of :meth:`cellvi.SCVI.differential_expression`, except ``mode``,
        whose default is ``"change"`` as in scvi-tools' ContrastiveVI.

        Parameters
        ----------
        target_idx
            Rows (integer positions, boolean mask or ``adata.obs.query`` string) of the target cells.
            When every cell the requested comparisons involve lies inside it, expression is decoded
            from both latents (salient expression); otherwise from the background latent alone (s = 0).
            ``None``: salient expression for all cells (cells trained as background still get s = 0).
        n_samples
            Posterior draws decoded per chosen cell, as in scvi-tools (which passes it to the expression
            function). The number of cells decoded per population is ``n_samples_overall // n_samples``
            (``n_samples_overall``, default 5,000, is one of the ``**kwargs``).
        **kwargs
            Keyword-only options of :func:`cellvi.de.differential_expression` (``pseudocounts``,
            ``n_samples_overall``, ``weights``, ``filter_outlier_cells``, ``seed``,
            ``use_counts``, ...). With background expression (see ``target_idx``) ``use_counts`` defaults
            to ``False``: the observed counts of target cells also carry the salient variation that
            background expression leaves out.

        Returns
        -------
        DataFrame indexed by gene, as returned by the DE engine.
        """
        from cellvi import de

        adata_ = self.adata if adata is None else adata
        kind = "salient"
        if target_idx is not None:
            target = de.cells_from(adata_, target_idx, "target_idx")
            pairs = de.comparisons(adata_, groupby, group1, group2, idx1, idx2)
            involved = np.unique(np.concatenate([np.concatenate([r1, r2]) for _, _, r1, r2 in pairs]))
            kind = "salient" if np.isin(involved, target).all() else "background"
        if kind == "background":
            kwargs.setdefault("use_counts", False)
        return de.differential_expression(
            self, adata=adata, groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2, mode=mode,
            delta=delta, batch_size=batch_size, all_stats=all_stats, batch_correction=batch_correction,
            batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, silent=silent, n_samples=n_samples,
            draws_fn=functools.partial(self._de_draws, adata, kind=kind),
            latent_fn=functools.partial(self._de_latent, adata, kind=kind), **kwargs)

    def _de_latent(self, adata: AnnData | None, rows: np.ndarray, *, kind: str) -> np.ndarray:
        """Latent means the DE engine screens for outlier cells: z, and s too for salient expression."""
        z = self.get_latent_representation(adata, indices=rows, representation_kind="background")
        if kind == "background":
            return z
        return np.hstack([z, self.get_latent_representation(adata, indices=rows, representation_kind="salient")])

    # ------------------------------------------------------------------ save / load

    def _meta(self) -> dict:
        """As the base model's, plus the background and target rows."""
        meta = super()._meta()
        for name in ("background_indices", "target_indices"):
            rows = getattr(self, name + "_")
            meta[name] = None if rows is None else rows.tolist()
        return meta

    def _restore(self, meta: dict) -> None:
        for name in ("background_indices", "target_indices"):
            if meta.get(name) is not None:
                setattr(self, name + "_", np.asarray(meta[name], dtype=np.int64))
