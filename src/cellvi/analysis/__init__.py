"""MrVI's analyses as small pure functions on tensors and arrays (no AnnData, no model).

- :mod:`.distances`: sample-by-sample distances between counterfactual cell states.
- :mod:`.density`: aggregated-posterior densities (differential abundance, admissibility).
- :mod:`.regression`: per-cell regression of counterfactual states on sample covariates (DE).
- :mod:`.explore`: clustering cells by their distance matrices, and samples by an average one.
"""
