"""Data layer: AnnData set-up and validation (:mod:`.setup`), tensors and minibatches (:mod:`.loader`)."""

from cellvi.data.setup import DataSpec, check_compatible, get_spec, setup_anndata, validate_counts

__all__ = ["DataSpec", "check_compatible", "get_spec", "setup_anndata", "validate_counts"]
