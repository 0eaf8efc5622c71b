"""Built-in data: a simulator with known ground truth, and readers for .h5ad and 10x files.

:func:`simulate` is the demo data and the ground truth for statistical tests. It draws counts from
a negative binomial whose mean combines, on the log scale:

- a cell-type program (marker genes up in each type) plus continuous within-type variation,
- a batch effect (every gene a little, a set of "batch genes" strongly),
- a donor effect (donors are nested in batches; each donor gives a control and a stimulated sample),
- a condition effect: in stimulated samples, the known DE genes of the responding cell types shift
  by +/- ``de_lfc`` (log2), and the cell-type proportions shift (a known abundance change).

Truth is stored in ``var`` (``de_<cell type>``, ``true_lfc_<cell type>``, ``batch_gene``,
``marker_<cell type>``) and ``uns["truth"]``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    *,
    n_batches: int = 2,
    n_cell_types: int = 4,
    n_donors_per_batch: int = 2,
    de_cell_types: int = 1,
    frac_de_genes: float = 0.08,
    de_lfc: float = 1.0,
    frac_batch_genes: float = 0.05,
    batch_lfc: float = 1.5,
    batch_noise: float = 0.3,
    abundance_shift: float | list[float] = 2.0,
    mean_library_size: float = 1500.0,
    theta: float = 5.0,
    seed: int = 0,
    donor_response_sd: float = 0.0,
) -> AnnData:
    """Simulate multi-batch, multi-donor, two-condition counts with known truth.

    Parameters
    ----------
    n_cells, n_genes
        Size of the count matrix.
    n_batches, n_cell_types, n_donors_per_batch
        Design: donors are nested in batches; each donor has a ``ctrl`` and a ``stim`` sample.
    de_cell_types
        How many cell types (the first ones) respond to the stimulation with DE genes.
    frac_de_genes, de_lfc
        Fraction of genes DE in each responding type, and their absolute log2 fold change.
    frac_batch_genes, batch_lfc, batch_noise
        Genes with a strong batch effect (log2 ``batch_lfc``) and the sd (log2) of the mild
        batch effect on every gene.
    abundance_shift
        Fold change of the first cell type's proportion in ``stim`` (1 = none), or one fold change per
        cell type (e.g. ``[3, 1, 1 / 3]``: the first type up, the third down).
    mean_library_size, theta
        Mean total counts per cell and NB inverse dispersion (gene-wise, around ``theta``).
    seed
        Random seed; the same seed gives the same data.
    donor_response_sd
        Donor-level noise of the response to stimulation: each donor's stimulated cells get, on every
        gene, an extra log2 effect ``N(0, donor_response_sd^2)`` of their own (the same in every cell
        type), so that donors, not cells, are the replicates of a stim-vs-ctrl effect. Its mean over
        infinitely many donors is 0: the truth in ``var`` is unchanged. 0 (default) adds nothing and
        draws nothing (the same seed gives the same data as without the option).

    Returns
    -------
    AnnData with counts in ``X`` (CSR, float32) and ``obs`` columns ``cell_type``, ``batch``,
    ``donor``, ``condition``, ``sample``; truth in ``var`` and ``uns["truth"]``.
    """
    rng = np.random.default_rng(seed)
    ln2 = np.log(2.0)
    types = [f"type_{k}" for k in range(n_cell_types)]
    batches = [f"batch_{b}" for b in range(n_batches)]
    donors = [(b, f"donor_{b}_{d}") for b in range(n_batches) for d in range(n_donors_per_batch)]
    # --- design: cells to samples, then cell types with a condition-dependent abundance
    donor_idx = rng.integers(len(donors), size=n_cells)
    stim = rng.random(n_cells) < 0.5
    base_p = np.full(n_cell_types, 1.0 / n_cell_types)
    stim_p = base_p.copy()
    if np.ndim(abundance_shift):
        stim_p *= np.asarray(abundance_shift, dtype=float)
    else:
        stim_p[0] *= abundance_shift
    stim_p /= stim_p.sum()
    ct = np.where(stim, rng.choice(n_cell_types, n_cells, p=stim_p), rng.choice(n_cell_types, n_cells, p=base_p))
    batch = np.array([donors[d][0] for d in donor_idx])
    # --- log mean expression per gene (natural log)
    base = rng.normal(0.0, 1.5, n_genes)  # heavy-tailed gene means, as in real data
    markers = np.zeros((n_cell_types, n_genes), bool)
    type_eff = np.zeros((n_cell_types, n_genes))
    for k in range(n_cell_types):
        m = rng.choice(n_genes, max(1, n_genes // 10), replace=False)
        markers[k, m] = True
        type_eff[k, m] = rng.uniform(1.0, 2.5, m.size)
    programs = rng.normal(0.0, 0.4, (2, n_genes))  # continuous within-type variation
    position = rng.normal(0.0, 1.0, (n_cells, 2))
    batch_genes = np.zeros(n_genes, bool)
    batch_genes[rng.choice(n_genes, max(1, int(frac_batch_genes * n_genes)), replace=False)] = True
    batch_eff = rng.normal(0.0, batch_noise * ln2, (n_batches, n_genes))
    batch_eff[1:, batch_genes] += batch_lfc * ln2 * rng.choice([-1, 1], (n_batches - 1, batch_genes.sum()))
    donor_eff = rng.normal(0.0, 0.1, (len(donors), n_genes))
    de = np.zeros((n_cell_types, n_genes), bool)
    lfc = np.zeros((n_cell_types, n_genes))
    candidates = np.flatnonzero(~batch_genes)
    for k in range(de_cell_types):
        g = rng.choice(candidates, max(1, int(frac_de_genes * n_genes)), replace=False)
        de[k, g] = True
        lfc[k, g] = de_lfc * rng.choice([-1, 1], g.size)
    log_mu = (base + type_eff[ct] + position @ programs + batch_eff[batch] + donor_eff[donor_idx]
              + stim[:, None] * lfc[ct] * ln2)
    if donor_response_sd > 0:  # its own generator, so the default draws stay exactly as they were
        response = np.random.default_rng([seed, 1]).normal(0.0, donor_response_sd * ln2, (len(donors), n_genes))
        log_mu = log_mu + stim[:, None] * response[donor_idx]
    rho = np.exp(log_mu - log_mu.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = rng.lognormal(np.log(mean_library_size) + rng.normal(0, 0.2, n_batches)[batch], 0.4)
    mu = rho * library[:, None]
    theta_g = theta * rng.lognormal(0.0, 0.3, n_genes)
    counts = rng.poisson(rng.gamma(theta_g, mu / theta_g))
    empty = counts.sum(1) == 0
    counts[empty, rng.integers(n_genes, size=empty.sum())] = 1  # no empty cells
    cond = np.where(stim, "stim", "ctrl")
    donor_names = np.array([d for _, d in donors])[donor_idx]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(types)[ct], categories=types),
            "batch": pd.Categorical(np.array(batches)[batch], categories=batches),
            "donor": pd.Categorical(donor_names, categories=[d for _, d in donors]),
            "condition": pd.Categorical(cond, categories=["ctrl", "stim"]),
            "sample": pd.Categorical([f"{d}_{c}" for d, c in zip(donor_names, cond)]),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_genes)]))
    var["batch_gene"] = batch_genes
    for k, t in enumerate(types):
        var[f"marker_{t}"] = markers[k]
        var[f"de_{t}"] = de[k]
        var[f"true_lfc_{t}"] = lfc[k]
    adata = AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    adata.uns["truth"] = {
        "de_cell_types": types[:de_cell_types],
        "de_lfc": de_lfc,
        "cell_type_proportions_ctrl": base_p.tolist(),
        "cell_type_proportions_stim": stim_p.tolist(),
        "seed": seed,
    }
    return adata


def simulate_citeseq(
    n_cells: int = 1000,
    n_genes: int = 200,
    n_proteins: int = 20,
    *,
    n_batches: int = 2,
    n_cell_types: int = 4,
    markers_per_type: int = 2,
    foreground_lfc: tuple[float, float] = (1.5, 3.0),
    protein_theta: float = 5.0,
    missing_proteins: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> AnnData:
    """CITE-seq: the RNA of :func:`simulate` plus antibody counts with a known background and foreground.

    Every protein has a background rate per batch (log-normal around ``exp(3)``); the marker proteins
    of a cell type add a foreground on top in the cells of that type, ``exp(u)`` times the background,
    ``u ~ Uniform(foreground_lfc)`` (natural log). Counts are NB with inverse dispersion ``protein_theta``.

    Parameters
    ----------
    n_cells, n_genes, n_batches, n_cell_types
        As in :func:`simulate` (same seed: the same RNA).
    n_proteins, markers_per_type
        Panel size and marker proteins per cell type (distinct across types while the panel allows).
    missing_proteins
        ``{batch name: [protein positions]}``: proteins not in that batch's panel, stored as zeros
        (scvi-tools' convention for a protein not measured).

    Returns
    -------
    AnnData with RNA counts in ``X``, protein counts in ``obsm["protein_expression"]`` (DataFrame),
    ``obs`` as :func:`simulate`, and the truth in ``uns["protein_markers"]`` (proteins x cell types, bool)
    and ``uns["protein_background"]`` (log background rate, proteins x batches).
    """
    adata = simulate(n_cells, n_genes, n_batches=n_batches, n_cell_types=n_cell_types, seed=seed)
    rng = np.random.default_rng([seed, 1])
    ct = adata.obs["cell_type"].cat.codes.to_numpy()
    batch = adata.obs["batch"].cat.codes.to_numpy()
    background = rng.normal(3.0, 0.7, n_proteins)[None] + rng.normal(0.0, 0.3, (n_batches, n_proteins))
    markers = np.zeros((n_cell_types, n_proteins), bool)
    order = rng.permutation(n_proteins)
    for k in range(n_cell_types):
        chosen = order[k * markers_per_type : (k + 1) * markers_per_type]
        if chosen.size < markers_per_type:  # panel too small for distinct markers: reuse proteins
            chosen = rng.choice(n_proteins, markers_per_type, replace=False)
        markers[k, chosen] = True
    effect = rng.uniform(*foreground_lfc, n_proteins)
    log_rate = background[batch] + markers[ct] * effect[None] + rng.normal(0.0, 0.2, (n_cells, n_proteins))
    mu = np.exp(log_rate)
    counts = rng.poisson(rng.gamma(protein_theta, mu / protein_theta)).astype(np.float32)
    names = [f"prot_{t}" for t in range(n_proteins)]
    batches = list(adata.obs["batch"].cat.categories)
    for name, positions in (missing_proteins or {}).items():
        if name not in batches:
            raise ValueError(f"missing_proteins names batch {name!r}; batches are {batches}.")
        counts[np.ix_(batch == batches.index(name), list(positions))] = 0.0
    adata.obsm["protein_expression"] = pd.DataFrame(counts, index=adata.obs_names, columns=names)
    types = list(adata.obs["cell_type"].cat.categories)
    adata.uns["protein_markers"] = pd.DataFrame(markers.T, index=names, columns=types)
    adata.uns["protein_background"] = pd.DataFrame(background.T, index=names, columns=batches)
    return adata


# simulate_atac draws its matrix by blocks of about this many entries (cells x regions)
SIMULATE_BLOCK_ENTRIES = 2**22


def simulate_atac(
    n_cells: int = 1000,
    n_regions: int = 2000,
    *,
    n_batches: int = 2,
    n_cell_types: int = 4,
    frac_da: float = 0.05,
    base_accessibility: tuple[float, float] = (0.02, 0.3),
    da_accessibility: tuple[float, float] = (0.4, 0.8),
    batch_noise: float = 0.3,
    seed: int = 0,
) -> AnnData:
    """scATAC peak counts with known differentially accessible (DA) regions per cell type.

    Each region has a base accessibility ``a_r ~ Uniform(base_accessibility)``; in each cell type a
    fraction ``frac_da`` of the regions (disjoint across types) opens to ``Uniform(da_accessibility)``.
    A region is observed accessible with probability ``a * d * f`` (PeakVI's model: cell factor
    ``d ~ Uniform(0.4, 1)``, region factor ``f ~ Uniform(0.5, 1)``), with a batch shift of
    ``N(0, batch_noise)`` on the logit; accessible regions get ``1 + Poisson(0.3)`` counts.

    Returns
    -------
    AnnData with counts in ``X`` (CSR float32), ``obs`` columns ``cell_type`` and ``batch``, and the truth in
    ``var`` (``da_<cell type>``: opens in that type; ``accessibility_<cell type>``: ``a`` in that type)
    and ``obs["cell_factor"]``.
    """
    rng = np.random.default_rng([seed, 2])
    types = [f"type_{k}" for k in range(n_cell_types)]
    batches = [f"batch_{b}" for b in range(n_batches)]
    ct = rng.integers(n_cell_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    acc = np.tile(rng.uniform(*base_accessibility, n_regions), (n_cell_types, 1))  # (types, regions)
    order = rng.permutation(n_regions)
    n_da = max(1, int(frac_da * n_regions))
    da = np.zeros((n_cell_types, n_regions), bool)
    for k in range(n_cell_types):
        da[k, order[k * n_da : (k + 1) * n_da]] = True
        acc[k, da[k]] = rng.uniform(*da_accessibility, da[k].sum())
    cell_factor = rng.uniform(0.4, 1.0, n_cells)
    region_factor = rng.uniform(0.5, 1.0, n_regions)
    shift = rng.normal(0.0, batch_noise, (n_batches, n_regions))
    # by blocks of cells (the same random stream as whole arrays): float arrays of one block, not of the matrix
    step = max(1, SIMULATE_BLOCK_ENTRIES // n_regions)
    blocks = [slice(i, i + step) for i in range(0, n_cells, step)]
    open_ = np.empty((n_cells, n_regions), bool)
    for rows in blocks:
        q = acc[ct[rows]] * cell_factor[rows, None] * region_factor[None]
        logit = np.log(q) - np.log1p(-q) + shift[batch[rows]]
        open_[rows] = rng.random(q.shape) < 1.0 / (1.0 + np.exp(-logit))
    empty = ~open_.any(1)
    open_[empty, rng.integers(n_regions, size=empty.sum())] = True  # no empty cells
    counts = sp.vstack([sp.csr_matrix((0, n_regions), dtype=np.float32)]  # (0 rows: no cells, no blocks)
                       + [sp.csr_matrix((open_[rows] * (1 + rng.poisson(0.3, open_[rows].shape))).astype(np.float32))
                          for rows in blocks], format="csr")
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.array(types)[ct], categories=types),
                        "batch": pd.Categorical(np.array(batches)[batch], categories=batches),
                        "cell_factor": cell_factor}, index=pd.Index([f"cell_{i}" for i in range(n_cells)]))
    var = pd.DataFrame(index=pd.Index([f"chr1:{1000 * r + 1}-{1000 * r + 500}" for r in range(n_regions)]))
    for k, t in enumerate(types):
        var[f"da_{t}"] = da[k]
        var[f"accessibility_{t}"] = acc[k]
    var["region_factor"] = region_factor
    return AnnData(counts, obs=obs, var=var)


def simulate_contrastive(n_cells: int = 1500, n_genes: int = 200, *, n_program: int = 15, lfc: float = 2.0,
                         seed: int = 0, **simulate_kwargs):
    """:func:`simulate` (3 cell types, 2 batches, ctrl/stim, no other stim effect) plus a target-only
    program, for contrastive models: half of the stim cells, across all cell types, express ``n_program``
    genes ``2**lfc`` times their cell type's level. Truth: ``obs["program"]`` ("on"/"off") and
    ``var["program"]``.
    """
    a = simulate(n_cells, n_genes, n_cell_types=3, de_cell_types=0, abundance_shift=1.0, seed=seed,
                                 **simulate_kwargs)
    rng = np.random.default_rng(seed + 100)
    X = a.X.toarray()
    markers = a.var[[c for c in a.var if c.startswith("marker_")]].any(axis=1).to_numpy()
    lib = X.sum(1)
    ct = a.obs["cell_type"].cat.codes.to_numpy()
    level = np.stack([(X[ct == k] / lib[ct == k, None]).mean(0) for k in range(ct.max() + 1)])  # (types, genes)
    # program genes: neither markers nor batch genes, moderately expressed (below the top fifth), so that
    # switching them on does not dilute every other gene's share of the library much
    free = np.flatnonzero(~(markers | a.var["batch_gene"].to_numpy()))
    by_level = free[np.argsort(-level.mean(0)[free])]
    candidates = by_level[len(by_level) // 5 :][: 3 * n_program]
    program = rng.choice(candidates, n_program, replace=False)
    on = (a.obs["condition"] == "stim").to_numpy() & (rng.random(n_cells) < 0.5)
    extra = rng.poisson((2**lfc - 1) * level[ct][:, program] * lib[:, None])  # expected total: 2**lfc x level
    X[np.ix_(on, program)] += extra[on]
    a.X = sp.csr_matrix(X.astype(np.float32))
    a.var["program"] = np.isin(np.arange(n_genes), program)
    a.obs["program"] = np.where(on, "on", "off")
    return a


def simulate_cohort(
    n_cells: int = 3000,
    n_genes: int = 200,
    *,
    n_cell_types: int = 5,
    n_groups: int = 2,
    n_subgroups: int = 2,
    n_samples_per_subgroup: int = 4,
    frac_de_genes: float = 0.2,
    de_lfc: float = 1.5,
    da_fold: float = 3.0,
    mean_library_size: float = 1500.0,
    theta: float = 5.0,
    seed: int = 0,
) -> AnnData:
    """Simulate a multi-sample cohort like MrVI's semi-synthetic benchmark (Boyeau et al., 2025, Fig. 2).

    Samples are nested: ``n_groups`` values of covariate 1 (``cov1``), each split into ``n_subgroups``
    (``cov1_sub``) of ``n_samples_per_subgroup`` samples. Cell subsets:

    - ``type_0`` (subset A): differential expression along the hierarchy. Samples of group j shift
      one set of genes by ``de_lfc`` (log2, between the extreme groups), samples of subgroup (j, k) shift a second set by
      ``+/- de_lfc / 2``; samples of a subgroup are identical. The true sample distances are the
      Euclidean distances between these log-mean shifts (``uns["truth"]["sample_distances"]``).
    - ``type_1`` and ``type_2`` (subsets B, C): differential abundance along covariate 2 (``cov2``,
      crossed with covariate 1): samples with ``cov2 == "high"`` have ``da_fold`` times more
      ``type_1`` cells and ``da_fold`` times fewer ``type_2`` cells.
    - the other types: neither.

    Returns
    -------
    AnnData with counts in ``X`` (CSR, float32); ``obs``: ``cell_type``, ``sample``, ``cov1``,
    ``cov1_sub``, ``cov2``; ``var``: ``de_group_gene``, ``de_subgroup_gene``, ``true_lfc_cov1`` (log2 shift,
    last group vs first, in ``type_0``); ``uns["truth"]``: ``sample_distances`` (samples in
    ``sample_names`` order), ``de_cell_type``, ``da_cell_types``.
    """
    if n_cell_types < 4:
        raise ValueError(f"n_cell_types must be >= 4 (a DE subset, two DA subsets, a null one); got {n_cell_types}.")
    rng = np.random.default_rng(seed)
    ln2 = np.log(2.0)
    types = [f"type_{k}" for k in range(n_cell_types)]
    # --- samples and their covariates
    n_samples = n_groups * n_subgroups * n_samples_per_subgroup
    sample_names = [f"sample_{i:02d}" for i in range(n_samples)]
    group = np.repeat(np.arange(n_groups), n_subgroups * n_samples_per_subgroup)
    subgroup = np.repeat(np.arange(n_groups * n_subgroups), n_samples_per_subgroup)
    high = np.arange(n_samples) % 2 == 1  # cov2 alternates within every subgroup: crossed with cov1
    # --- cells: sample, then cell type with sample-dependent (DA) proportions
    sample = rng.integers(n_samples, size=n_cells)
    p = np.full((n_samples, n_cell_types), 1.0)
    p[high, 1] *= da_fold
    p[~high, 2] *= da_fold
    p /= p.sum(1, keepdims=True)
    ct = (rng.random(n_cells)[:, None] > np.cumsum(p[sample], 1)).sum(1)
    # --- log mean expression: base + cell-type markers + DE shifts in type_0
    base = rng.normal(0.0, 1.5, n_genes)
    type_eff = np.zeros((n_cell_types, n_genes))
    for k in range(n_cell_types):
        m = rng.choice(n_genes, max(1, n_genes // 10), replace=False)
        type_eff[k, m] = rng.uniform(1.0, 2.5, m.size)
    n_de = max(2, int(frac_de_genes * n_genes))
    de_genes = rng.choice(n_genes, n_de, replace=False)
    group_genes, sub_genes = de_genes[: n_de // 2], de_genes[n_de // 2 :]
    group_eff = np.zeros((n_groups, n_genes))
    position = np.linspace(-0.5, 0.5, n_groups) if n_groups > 1 else np.zeros(1)  # groups spread along a line
    group_eff[:, group_genes] = de_lfc * position[:, None] * rng.choice([-1, 1], group_genes.size)
    sub_eff = np.zeros((n_groups * n_subgroups, n_genes))
    sub_eff[:, sub_genes] = 0.5 * de_lfc * rng.choice([-1, 1], (n_groups * n_subgroups, sub_genes.size))
    sample_eff = group_eff[group] + sub_eff[subgroup]  # (samples, genes), log2
    log_mu = base + type_eff[ct] + (ct == 0)[:, None] * sample_eff[sample] * ln2
    rho = np.exp(log_mu - log_mu.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = rng.lognormal(np.log(mean_library_size), 0.3, n_cells)
    theta_g = theta * rng.lognormal(0.0, 0.3, n_genes)
    counts = rng.poisson(rng.gamma(theta_g, rho * library[:, None] / theta_g))
    empty = counts.sum(1) == 0
    counts[empty, rng.integers(n_genes, size=empty.sum())] = 1
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(types)[ct], categories=types),
            "sample": pd.Categorical(np.array(sample_names)[sample], categories=sample_names),
            "cov1": pd.Categorical(np.array([f"group_{g}" for g in group])[sample]),
            "cov1_sub": pd.Categorical(np.array([f"subgroup_{g}" for g in subgroup])[sample]),
            "cov2": pd.Categorical(np.where(high, "high", "low")[sample], categories=["low", "high"]),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_genes)]))
    var["de_group_gene"] = np.isin(np.arange(n_genes), group_genes)
    var["de_subgroup_gene"] = np.isin(np.arange(n_genes), sub_genes)
    var["true_lfc_cov1"] = group_eff[-1] - group_eff[0]
    diff = sample_eff[:, None, :] - sample_eff[None, :, :]
    adata = AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    adata.uns["truth"] = {
        "sample_names": sample_names,
        "sample_distances": np.sqrt((diff**2).sum(-1)),
        "de_cell_type": types[0],
        "da_cell_types": types[1:3],
        "seed": seed,
    }
    return adata


# --------------------------------------------------------------------------- readers


def read_h5ad(path: str | Path) -> AnnData:
    """Read an .h5ad file (a thin wrapper over :func:`anndata.read_h5ad` with a clear error)."""
    import anndata

    path = Path(path)
    if not path.exists():
        raise ValueError(f"No such file: {path}")
    return anndata.read_h5ad(path)


def read_10x_h5(path: str | Path) -> AnnData:
    """Read a Cell Ranger (v3+) filtered/raw ``*.h5`` matrix: cells x features, raw counts."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise ValueError(f"No such file: {path}")
    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise ValueError(f"{path} is not a Cell Ranger v3+ h5 file (no 'matrix' group).")
        g = f["matrix"]
        n_features, n_cells = g["shape"][:]
        X = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_features, n_cells))
        dec = lambda a: [v.decode() if isinstance(v, bytes) else str(v) for v in a]  # noqa: E731
        barcodes = dec(g["barcodes"][:])
        feat = g["features"]
        var = pd.DataFrame({"gene_ids": dec(feat["id"][:])}, index=pd.Index(dec(feat["name"][:])))
        if "feature_type" in feat:
            var["feature_types"] = dec(feat["feature_type"][:])
    adata = AnnData(X.T.tocsr().astype(np.float32), obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
    adata.var_names_make_unique()
    return adata


def _open_maybe_gz(folder: Path, names: list[str]):
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return gzip.open(candidate, "rt") if candidate.suffix == ".gz" else open(candidate)
    raise ValueError(f"None of {names} (or .gz) found in {folder}.")


def read_10x_mtx(path: str | Path) -> AnnData:
    """Read a Cell Ranger matrix folder (``matrix.mtx``, ``features.tsv``/``genes.tsv``, ``barcodes.tsv``, gz or not)."""
    from scipy.io import mmread

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder with a 10x matrix.")
    with _open_maybe_gz(folder, ["matrix.mtx"]) as fh:
        X = sp.csr_matrix(mmread(fh).T, dtype=np.float32)
    with _open_maybe_gz(folder, ["features.tsv", "genes.tsv"]) as fh:
        feats = pd.read_csv(fh, sep="\t", header=None)
    with _open_maybe_gz(folder, ["barcodes.tsv"]) as fh:
        barcodes = pd.read_csv(fh, sep="\t", header=None)[0].astype(str)
    var = pd.DataFrame({"gene_ids": feats[0].astype(str).to_numpy()},
                       index=pd.Index(feats[1 if feats.shape[1] > 1 else 0].astype(str).to_numpy()))
    if feats.shape[1] > 2:
        var["feature_types"] = feats[2].astype(str).to_numpy()
    adata = AnnData(X, obs=pd.DataFrame(index=pd.Index(barcodes.to_numpy())), var=var)
    adata.var_names_make_unique()
    return adata
