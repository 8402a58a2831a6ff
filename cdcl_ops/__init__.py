"""cdcl_ops: fused, memory-bounded pseudo-label-masked InfoNCE for cross-patch dense contrastive
learning (CDCL), and the supervised (multi-positive) pixel contrast on the same kernels. See
README.md for the API."""
from . import ops  # noqa: F401  (registers the torch.library custom ops)
from ._validate import MIN_TEMPERATURE
from .backends import builtin  # noqa: F401  (registers the built-in backends)
from .bank import FeatureBank
from .cross_patch import CrossPatchInfoNCE, cross_patch_infonce
from .infonce import MaskedInfoNCE, available_backends, default_backend, masked_infonce
from .options import CrossPatchOptions
from .patches import classify_patches, patch_foreground_scores
from .supcon import SupervisedContrast, supervised_contrast

__all__ = ["masked_infonce", "MaskedInfoNCE", "supervised_contrast", "SupervisedContrast",
           "available_backends", "default_backend", "BACKENDS",
           "FeatureBank", "CrossPatchOptions", "CrossPatchInfoNCE", "cross_patch_infonce",
           "classify_patches", "patch_foreground_scores", "MIN_TEMPERATURE"]
__version__ = "0.1.0"


def __getattr__(name: str) -> tuple[str, ...]:
    # BACKENDS: the registered backends' names, read when asked (a registration later is listed)
    if name == "BACKENDS":
        from .backends import registry
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
