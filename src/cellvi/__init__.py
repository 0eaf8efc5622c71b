"""cellvi: deep generative models for single-cell omics (scVI, Bayesian DE, contrastiveVI, ...).

Heavy dependencies (torch, anndata) are imported when a model is first used, so ``import cellvi``
stays fast.
"""

from importlib import import_module

from cellvi import settings

__version__ = "0.1.0"

_LAZY = {
    "SCVI": "cellvi.models.scvi",
    "ContrastiveVI": "cellvi.models.contrastivevi",
    "MrVI": "cellvi.models.mrvi",
    "MRVI": "cellvi.models.mrvi",
    "TotalVI": "cellvi.models.totalvi",
    "TOTALVI": "cellvi.models.totalvi",
    "PeakVI": "cellvi.models.peakvi",
    "PEAKVI": "cellvi.models.peakvi",
    "datasets": "cellvi.datasets",
    "pl": "cellvi.pl",
    "data": "cellvi.data",
}
__all__ = ["settings", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = import_module(_LAZY[name])
        value = module if module.__name__.endswith(name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cellvi' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
