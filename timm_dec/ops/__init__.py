"""The monotone scaling group acting on feature maps: knots, the warp map l, and the fused warp op.

Importing this package never imports Triton or touches CUDA.
"""
from .knots import (
    DEFAULT_INVERSE_SWEEPS,
    apply_inverse_map,
    apply_map,
    check_knots,
    dense_coords,
    identity_knots,
    identity_logits,
    knots_from_logits,
    pixel_coords,
)
from .layout import LAYOUTS, pair, spatial_size
from .random import random_knots
from .reference import monotone_warp_ref, sample_nchw
from .warp import BACKEND_ENV, BACKENDS, monotone_warp, resolve_backend

__all__ = [
    "knots_from_logits", "identity_logits", "identity_knots", "check_knots", "apply_map", "apply_inverse_map",
    "pixel_coords", "dense_coords", "monotone_warp", "monotone_warp_ref", "sample_nchw", "resolve_backend",
    "random_knots", "LAYOUTS", "BACKENDS", "BACKEND_ENV", "DEFAULT_INVERSE_SWEEPS", "spatial_size", "pair",
]
