"""What a model reads from an AnnData: the :class:`DataSpec`, and the checks on the counts.

``setup_anndata`` validates the data, then records which layer and which ``.obs`` columns are used
(with their category orders and the gene names) in a frozen :class:`DataSpec`. The spec is stored as
a JSON string in ``adata.uns["_cellvi_setup"]`` (the only thing cellvi writes into the user's AnnData)
and is saved with every model, so that a model can check that new data has the same genes and known
categories.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

UNS_KEY = "_cellvi_setup"


@dataclass(frozen=True)
class DataSpec:
    """The data set-up of a model: which AnnData fields it reads, and their categories."""

    var_names: tuple[str, ...]  # genes, in model order
    layer: str | None = None  # counts from adata.layers[layer], or adata.X when None
    batch_key: str | None = None
    labels_key: str | None = None
    sample_key: str | None = None  # the samples of a multi-sample cohort (MrVI's target covariate)
    size_factor_key: str | None = None
    categorical_covariate_keys: tuple[str, ...] = ()
    continuous_covariate_keys: tuple[str, ...] = ()
    batch_categories: tuple[str, ...] = ("0",)  # one implicit batch when batch_key is None
    label_categories: tuple[str, ...] = ("0",)
    sample_categories: tuple[str, ...] = ("0",)  # one implicit sample when sample_key is None
    covariate_categories: tuple[tuple[str, ...], ...] = ()  # one tuple per categorical covariate
    extra: dict = field(default_factory=dict)  # model-specific keys
    model_class: str | None = None  # the model class whose setup_anndata wrote this (None: any model)
    # second modality: surface proteins (TotalVI); empty when the model reads counts only
    protein_expression_obsm_key: str | None = None  # proteins from adata.obsm[key] (cells x proteins)
    protein_names: tuple[str, ...] = ()  # in model order
    panel_key: str | None = None  # .obs column of protein panels; None: each batch is its own panel
    panel_categories: tuple[str, ...] = ()  # panels (or batches when panel_key is None)
    protein_missing: tuple[tuple[int, ...], ...] = ()  # per panel: proteins never measured (all zero) there

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    @property
    def n_proteins(self) -> int:
        return len(self.protein_names)

    @property
    def n_batches(self) -> int:
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        return len(self.label_categories)

    @property
    def n_samples(self) -> int:
        return len(self.sample_categories)

    @property
    def n_cats_per_cov(self) -> list[int]:
        return [len(c) for c in self.covariate_categories]

    @property
    def n_continuous_cov(self) -> int:
        return len(self.continuous_covariate_keys)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DataSpec:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"Unknown fields {sorted(unknown)} in a cellvi data set-up: was it written by a newer cellvi?")
        for key in ("var_names", "categorical_covariate_keys", "continuous_covariate_keys",
                    "batch_categories", "label_categories", "sample_categories", "protein_names",
                    "panel_categories"):
            if key in raw:  # fields absent from set-ups written before they existed keep their defaults
                raw[key] = tuple(raw[key])
        for key in ("covariate_categories", "protein_missing"):
            if key in raw:
                raw[key] = tuple(tuple(c) for c in raw[key])
        return cls(**raw)


# --------------------------------------------------------------------------- counts


def get_counts(adata: AnnData, layer: str | None):
    """The count matrix of ``adata`` (``X`` or a layer), as stored: dense array or scipy sparse."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty: pass `layer=` naming the layer that holds the raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(
            f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers.keys())}); "
            "pass the name of the layer that holds raw counts, or layer=None to use adata.X."
        )
    return adata.layers[layer]


VALIDATION_CHUNK = 8192  # rows read at a time when the counts stay on disk
VALUES_CHUNK = 1 << 24  # entries checked at a time in memory (~100 MB of temporaries at most)


# what raw counts must not contain: (test, what it is, how to fix it); checked in this order
_COUNT_CHECKS = (
    (lambda v: ~np.isfinite(v), "NaN or infinite values",
     "counts must be finite. Fill or remove them (e.g. adata = adata[np.isfinite(...)])."),
    (lambda v: v < 0, "negative values",
     "cellvi models need raw counts, not log-transformed or scaled data. Pass `layer=` with raw counts."),
    (lambda v: v != np.round(v), "non-integer values",
     "cellvi models need raw integer counts, not normalized data. Pass `layer=` with raw counts "
     "(e.g. adata.layers['counts'] = adata.raw.X before normalizing)."),
)


def _check_count_values(values: np.ndarray, where: str) -> None:
    """Raise a ``ValueError`` if any of ``values`` (1-D) is not finite, negative or not an integer. Each check
    runs ``VALUES_CHUNK`` entries at a time, so no temporary is the size of the data."""
    for bad, what, fix in _COUNT_CHECKS:
        n_bad, example = 0, None
        for start in range(0, values.size, VALUES_CHUNK):
            chunk = values[start : start + VALUES_CHUNK]
            mask = bad(chunk)
            k = int(np.count_nonzero(mask))
            if k and example is None:
                example = chunk[mask][0]
            n_bad += k
        if n_bad:
            raise ValueError(f"{where} contains {n_bad} {what} (e.g. {example:g}); {fix}")


def validate_counts(X, where: str, obs_names: pd.Index) -> None:
    """Raise a ``ValueError`` naming the problem when ``X`` is not a matrix of raw counts.

    Checks: finite values, no negatives, integers, and no cell with zero total counts. Counts on disk
    (a backed .h5ad or a zarr store) are checked ``VALIDATION_CHUNK`` rows at a time.
    """
    if isinstance(X, pd.DataFrame):
        X = X.to_numpy()
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        if hasattr(X, "shape") and hasattr(X, "__getitem__") and len(X.shape) == 2:  # on disk: chunk by chunk
            for start in range(0, X.shape[0], VALIDATION_CHUNK):
                validate_counts(X[start : start + VALIDATION_CHUNK], where, obs_names[start : start + VALIDATION_CHUNK])
            return
        X = np.asarray(X)
    values = (X.data if sp.issparse(X) else np.asarray(X)).reshape(-1)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{where} has dtype {values.dtype}; counts must be numeric.")
    _check_count_values(values, where)
    totals = np.asarray(X.sum(axis=1)).ravel()
    empty = np.flatnonzero(totals == 0)
    if empty.size:
        names = ", ".join(map(str, obs_names[empty[:5]]))
        raise ValueError(
            f"{empty.size} cells have zero total counts in {where} (e.g. {names}); remove them first, "
            "e.g. `adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()` or "
            "`scanpy.pp.filter_cells(adata, min_counts=1)`."
        )


# --------------------------------------------------------------------------- obs columns


def _obs_column(adata: AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise ValueError(f"{what} {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    return adata.obs[key]


def _categories(col: pd.Series, key: str) -> tuple[str, ...]:
    if col.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has {int(col.isna().sum())} missing values; fill them or drop those cells.")
    if isinstance(col.dtype, pd.CategoricalDtype):
        used = set(col.astype(str))
        return tuple(str(c) for c in col.cat.categories if str(c) in used)
    return tuple(str(c) for c in sorted(pd.unique(col.astype(str))))


def codes(adata: AnnData, key: str, categories: tuple[str, ...]) -> np.ndarray:
    """Integer codes of ``adata.obs[key]`` in the recorded category order; unknown values are an error."""
    col = _obs_column(adata, key, "Key")
    if col.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has {int(col.isna().sum())} missing values; fill them or drop those cells.")
    values = col.astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(categories)}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise ValueError(
            f"adata.obs[{key!r}] has categories the model was not set up with: {unknown[:10]} "
            f"(known: {list(categories)[:10]}). Use a model trained with these categories, or map them to known ones."
        )
    return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))


def _continuous(adata: AnnData, key: str) -> np.ndarray:
    col = _obs_column(adata, key, "Continuous covariate")
    try:
        v = col.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Continuous covariate adata.obs[{key!r}] is not numeric ({col.dtype}).") from e
    if not np.isfinite(v).all():
        raise ValueError(f"Continuous covariate adata.obs[{key!r}] has {int((~np.isfinite(v)).sum())} NaN or "
                         "infinite values; fill them or drop those cells.")
    return v


def size_factors(adata: AnnData, key: str) -> np.ndarray:
    v = _continuous(adata, key)
    if (v <= 0).any():
        raise ValueError(f"Size factors adata.obs[{key!r}] must be positive; {int((v <= 0).sum())} are not.")
    return v


# --------------------------------------------------------------------------- proteins (second modality)


def protein_table(adata: AnnData, key: str, names_uns_key: str | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Protein counts of ``adata.obsm[key]`` as a float64 ``(cells, proteins)`` array (NaN kept) and their names.

    The names are the DataFrame's columns, else ``adata.uns[names_uns_key]``, else ``protein_0, ...``.
    """
    if key not in adata.obsm:
        raise ValueError(f"protein_expression_obsm_key={key!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}); "
                         "store the protein counts there as a cells x proteins DataFrame or array.")
    table = adata.obsm[key]
    if isinstance(table, pd.DataFrame):
        names = tuple(map(str, table.columns))
        table = table.to_numpy()
    else:
        table = table.toarray() if sp.issparse(table) else np.asarray(table)
        if names_uns_key is not None:
            if names_uns_key not in adata.uns:
                raise ValueError(f"protein_names_uns_key={names_uns_key!r} is not in adata.uns.")
            names = tuple(map(str, adata.uns[names_uns_key]))
        else:
            names = tuple(f"protein_{i}" for i in range(table.shape[1] if table.ndim == 2 else 0))
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.number):
        raise ValueError(f"adata.obsm[{key!r}] must be a numeric cells x proteins table, got {table.dtype} "
                         f"with shape {table.shape}.")
    if len(names) != table.shape[1]:
        raise ValueError(f"{len(names)} protein names for {table.shape[1]} columns of adata.obsm[{key!r}].")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"Protein names of adata.obsm[{key!r}] must be unique and at least one.")
    return table.astype(np.float64), names


def validate_proteins(values: np.ndarray, where: str, obs_names: pd.Index) -> None:
    """Raise a ``ValueError`` unless ``values`` are raw protein counts. NaN is allowed: it marks a value not
    measured in that cell, which is left out of the likelihood."""
    if np.isinf(values).any():
        raise ValueError(f"{where} contains infinite values; protein counts must be finite (NaN marks unmeasured).")
    bad = np.flatnonzero((values < 0).any(1))
    if bad.size:
        raise ValueError(f"{where} has negative protein counts in {bad.size} cells (e.g. {list(obs_names[bad[:5]])}, "
                         f"min {np.nanmin(values):g}); totalVI needs raw antibody counts, not normalized (e.g. CLR) "
                         "values. Pass the raw counts, or set unmeasured values to NaN.")
    frac = np.isfinite(values) & (values != np.round(values))
    if frac.any():
        raise ValueError(f"{where} has {int(frac.sum())} non-integer protein counts (e.g. {values[frac][0]:g}); "
                         "pass raw antibody counts.")


def read_proteins(adata: AnnData, spec: DataSpec, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protein counts ``(cells, proteins)`` float32 with unmeasured values set to 0, and the float32 mask of
    measured values: finite, and not missing from the cell's panel (``group``: panel codes, see :class:`DataSpec`)."""
    values, _ = protein_table(adata, spec.protein_expression_obsm_key)
    validate_proteins(values, f"adata.obsm[{spec.protein_expression_obsm_key!r}]", adata.obs_names)
    measured = np.isfinite(values)
    panel_missing = np.zeros((len(spec.panel_categories), spec.n_proteins), dtype=bool)
    for g, missing in enumerate(spec.protein_missing):
        panel_missing[g, list(missing)] = True
    measured &= ~panel_missing[group]
    return np.where(measured, values, 0.0).astype(np.float32), measured.astype(np.float32)


def missing_proteins(values: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[tuple[int, ...], ...]:
    """For each panel, the proteins with no non-zero count there (scvi-tools' rule: all zero = not measured)."""
    seen = np.zeros((n_groups, values.shape[1]), dtype=bool)
    np.logical_or.at(seen, group, np.nan_to_num(values) > 0)
    return tuple(tuple(int(t) for t in np.flatnonzero(~row)) for row in seen)


def setup_anndata(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    sample_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    extra: dict | None = None,
    model_class: str | None = None,
    protein_expression_obsm_key: str | None = None,
    protein_names_uns_key: str | None = None,
    panel_key: str | None = None,
) -> DataSpec:
    """Validate ``adata`` and record what a model will read from it.

    ``model_class`` (the name of the model whose ``setup_anndata`` is called) is recorded so that
    another model refuses the set-up instead of silently ignoring keys it does not read.

    Returns
    -------
    The :class:`DataSpec`; it is also written as JSON to ``adata.uns["_cellvi_setup"]``.
    """
    if not isinstance(adata, AnnData):
        raise ValueError(f"Expected an AnnData, got {type(adata).__name__}.")
    if not adata.var_names.is_unique:
        raise ValueError("adata.var_names are not unique; call adata.var_names_make_unique() first.")
    validate_counts(get_counts(adata, layer), "adata.X" if layer is None else f"adata.layers[{layer!r}]",
                    adata.obs_names)
    cat_keys = tuple(categorical_covariate_keys or ())
    cont_keys = tuple(continuous_covariate_keys or ())
    for key in cont_keys:
        _continuous(adata, key)
    if size_factor_key is not None:
        size_factors(adata, size_factor_key)
    spec = DataSpec(
        var_names=tuple(map(str, adata.var_names)),
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=cat_keys,
        continuous_covariate_keys=cont_keys,
        batch_categories=("0",) if batch_key is None else _categories(_obs_column(adata, batch_key, "batch_key"), batch_key),
        label_categories=("0",) if labels_key is None else _categories(_obs_column(adata, labels_key, "labels_key"), labels_key),
        sample_key=sample_key,
        sample_categories=("0",) if sample_key is None else _categories(_obs_column(adata, sample_key, "sample_key"), sample_key),
        covariate_categories=tuple(_categories(_obs_column(adata, k, "Categorical covariate"), k) for k in cat_keys),
        extra=dict(extra or {}),
        model_class=model_class,
    )
    if protein_expression_obsm_key is not None:
        spec = _with_proteins(adata, spec, protein_expression_obsm_key, protein_names_uns_key, panel_key)
    adata.uns[UNS_KEY] = spec.to_json()
    return spec


def _with_proteins(adata: AnnData, spec: DataSpec, key: str, names_uns_key: str | None,
                   panel_key: str | None) -> DataSpec:
    """``spec`` with the protein fields: names, panels, and the proteins missing from each panel."""
    values, names = protein_table(adata, key, names_uns_key)
    validate_proteins(values, f"adata.obsm[{key!r}]", adata.obs_names)
    if panel_key is None:
        panels = spec.batch_categories
        group = codes(adata, spec.batch_key, panels) if spec.batch_key else np.zeros(adata.n_obs, np.int64)
    else:
        panels = _categories(_obs_column(adata, panel_key, "panel_key"), panel_key)
        group = codes(adata, panel_key, panels)
    return replace(spec, protein_expression_obsm_key=key, protein_names=names, panel_key=panel_key,
                   panel_categories=panels, protein_missing=missing_proteins(values, group, len(panels)))


def get_spec(adata: AnnData) -> DataSpec:
    """The :class:`DataSpec` recorded by ``setup_anndata``; a clear error when there is none."""
    if UNS_KEY not in adata.uns:
        raise ValueError("This AnnData has not been set up: call `Model.setup_anndata(adata, ...)` first "
                         "(e.g. `cellvi.SCVI.setup_anndata(adata, batch_key='batch')`).")
    return DataSpec.from_json(adata.uns[UNS_KEY])


def check_compatible(spec: DataSpec, adata: AnnData) -> None:
    """Raise when ``adata`` has other genes (or proteins) than ``spec`` (categories are checked when read)."""
    if spec.protein_expression_obsm_key is not None:
        _check_proteins(spec, adata)
    names = tuple(map(str, adata.var_names))
    if names != spec.var_names:
        ours, theirs = set(spec.var_names), set(names)
        if ours == theirs:
            raise ValueError("adata has the model's genes but in another order; reorder with "
                             "`adata = adata[:, model.adata.var_names]` (or the saved var_names).")
        missing, extra = sorted(ours - theirs), sorted(theirs - ours)
        raise ValueError(
            f"adata's genes differ from the model's ({len(names)} vs {len(spec.var_names)}): "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]}). "
            "Subset or reorder adata to the model's var_names."
        )


def _check_proteins(spec: DataSpec, adata: AnnData) -> None:
    key = spec.protein_expression_obsm_key
    if key not in adata.obsm:
        raise ValueError(f"The model reads proteins from adata.obsm[{key!r}], which this AnnData lacks; store the "
                         f"protein counts there (columns {list(spec.protein_names[:5])}...).")
    table = adata.obsm[key]
    names = tuple(map(str, table.columns)) if isinstance(table, pd.DataFrame) else None
    n = table.shape[1] if len(table.shape) == 2 else -1
    if (names is not None and names != spec.protein_names) or n != spec.n_proteins:
        theirs = names or f"{n} unnamed columns"
        raise ValueError(f"adata.obsm[{key!r}] has other proteins than the model ({theirs} vs "
                         f"{list(spec.protein_names)}); reorder or subset its columns to the model's protein_names.")


# --------------------------------------------------------------------------- MuData (TotalVI.setup_mudata)

MUDATA_PROTEIN_KEY = "protein_expression"  # the obsm key of the proteins in the AnnData view of a MuData
MUDATA_ARGS = ("rna_layer", "protein_layer", "batch_key", "panel_key", "size_factor_key",
               "categorical_covariate_keys", "continuous_covariate_keys")  # what `modalities` may map


def import_mudata():
    """The ``mudata`` module, an optional dependency, with a clear error when it is not installed."""
    try:
        import mudata
    except ImportError as err:
        raise ImportError("Reading a MuData needs the mudata package: pip install mudata") from err
    return mudata


def is_mudata(obj) -> bool:
    """Whether ``obj`` is a MuData (a MuData can only exist once mudata is imported: nothing is imported here)."""
    mudata = sys.modules.get("mudata")
    return mudata is not None and isinstance(obj, mudata.MuData)


def check_modalities(modalities: dict | None, mdata) -> dict[str, str | None]:
    """scvi-tools' ``modalities`` of ``setup_mudata``: the modality each argument reads, with every argument
    present (``None``: the top-level ``mdata.obs``). The RNA and protein modalities are required."""
    if not isinstance(modalities, dict):
        raise ValueError(f"modalities={modalities!r}: give a dict naming the modality of the RNA and of the proteins, "
                         "e.g. modalities={'rna_layer': 'rna', 'protein_layer': 'protein'}.")
    extra = sorted(set(modalities) - set(MUDATA_ARGS))
    if extra:
        raise ValueError(f"modalities has keys that are not arguments of setup_mudata: {extra}; use {list(MUDATA_ARGS)}.")
    for required in ("rna_layer", "protein_layer"):
        if modalities.get(required) is None:
            raise ValueError(f"modalities must name the modality of {required!r} (one of {list(mdata.mod)}), "
                             f"e.g. modalities={{'rna_layer': 'rna', 'protein_layer': 'protein'}}.")
    unknown = {k: v for k, v in modalities.items() if v is not None and v not in mdata.mod}
    if unknown:
        raise ValueError(f"modalities {unknown} name modalities that mdata lacks (it has {list(mdata.mod)}).")
    return {arg: modalities.get(arg) for arg in MUDATA_ARGS}


def _modality_obs_keys(spec: DataSpec) -> dict[str, tuple[str, ...]]:
    """The ``.obs`` columns of ``spec``, per ``setup_mudata`` argument."""
    one = lambda key: () if key is None else (key,)  # noqa: E731
    return {"batch_key": one(spec.batch_key), "panel_key": one(spec.panel_key),
            "size_factor_key": one(spec.size_factor_key),
            "categorical_covariate_keys": spec.categorical_covariate_keys,
            "continuous_covariate_keys": spec.continuous_covariate_keys}


def _mudata_matrix(adata: AnnData, layer: str | None, where: str):
    if layer is None:
        if adata.X is None:
            raise ValueError(f"{where}.X is empty: name the layer with the raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} not found in {where}.layers (available: {list(adata.layers.keys())}).")
    return adata.layers[layer]


def mudata_view(mdata, spec: DataSpec) -> AnnData:
    """The AnnData a TotalVI model reads from a MuData set up with ``TotalVI.setup_mudata`` (recorded in
    ``spec.extra["mudata"]``).

    RNA counts are the RNA modality's ``X`` or ``layers[spec.layer]`` (the same matrix, not a copy); the
    proteins the protein modality's ``X`` or ``layers[protein_layer]``, as the DataFrame
    ``obsm["protein_expression"]`` named by its ``var_names``; ``obs`` is ``mdata.obs`` with each set-up
    column read where ``modalities`` says (scvi-tools' rule: the named modality's ``obs``, else
    ``mdata.obs``; the panel from ``panel_key``'s modality, else ``batch_key``'s). The user's MuData is
    not modified.
    """
    reading = spec.extra["mudata"]
    mods = reading["modalities"]
    used = {m for m in mods.values() if m is not None}
    for name in sorted(used):
        if name not in mdata.mod:
            raise ValueError(f"The set-up reads modality {name!r}, which mdata lacks (it has {list(mdata.mod)}).")
        if not mdata.mod[name].obs_names.equals(mdata.obs_names):
            raise ValueError(f"mdata[{name!r}] does not hold every cell of mdata, in mdata's order; TotalVI needs each "
                             "cell in every modality it reads: keep the cells measured in all of them first "
                             "(e.g. `mudata.pp.intersect_obs(mdata)`).")
    obs = mdata.obs.copy()
    for arg, keys in _modality_obs_keys(spec).items():
        mod = mods.get(arg) if (arg != "panel_key" or mods.get(arg) is not None) else mods.get("batch_key")
        source, where = (mdata.obs, "mdata.obs") if mod is None else (mdata.mod[mod].obs, f"mdata[{mod!r}].obs")
        for key in keys:
            if key not in source.columns:
                raise ValueError(f"{arg} {key!r} is not a column of {where} (columns: {list(source.columns)}); add it "
                                 f"there or name the modality that has it in modalities={{{arg!r}: ...}}.")
            if mod is not None:
                obs[key] = source[key].values  # aligned: checked above
    rna, pro = mdata.mod[mods["rna_layer"]], mdata.mod[mods["protein_layer"]]
    counts = _mudata_matrix(rna, spec.layer, f"mdata[{mods['rna_layer']!r}]")
    proteins = _mudata_matrix(pro, reading["protein_layer"], f"mdata[{mods['protein_layer']!r}]")
    proteins = proteins.toarray() if sp.issparse(proteins) else np.asarray(proteins)
    table = pd.DataFrame(proteins, index=obs.index, columns=pd.Index(pro.var_names.astype(str)))
    view = AnnData(X=counts if spec.layer is None else None, obs=obs, var=pd.DataFrame(index=rna.var_names.copy()),
                   layers=None if spec.layer is None else {spec.layer: counts}, obsm={MUDATA_PROTEIN_KEY: table})
    view.uns[UNS_KEY] = spec.to_json()
    return view


def mudata_spec(mdata) -> DataSpec:
    """The set-up ``TotalVI.setup_mudata`` recorded in ``mdata.uns``, with a clear error when there is none."""
    spec = DataSpec.from_json(mdata.uns[UNS_KEY]) if UNS_KEY in mdata.uns else None
    if spec is None or "mudata" not in spec.extra:
        raise ValueError("This MuData has not been set up: call `cellvi.TotalVI.setup_mudata(mdata, "
                         "modalities={'rna_layer': 'rna', 'protein_layer': 'protein'}, ...)` first.")
    return spec
