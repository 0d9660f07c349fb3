"""timm_dec: locally scale-consistent timm models with the Deep Equilibrium Canonicalizer (DEC).

``import timm_dec`` registers the ``<base>_dec`` models in timm's registry: one module per timm model class in
`timm_dec.models` (``vit_dec``, ``beit_dec``, ``eva_dec``, ``relpos_dec``, ``swin_dec``, ``swinv2_dec``; the list is
`timm_dec.models.DEC_MODULES`); `adapt` gives an existing timm model DEC canonicalisers in place.
"""
__version__ = "0.1.0"

from .adapt import AdaptConfig, adapt
from .dec import DEC, DECConfig, loss_scale, solver_stats
from .models import list_dec_models, load_dec_state_dict  # importing the package registers the *_dec models
from .ops import identity_logits, knots_from_logits, monotone_warp

__all__ = [
    "__version__", "adapt", "AdaptConfig", "list_dec_models", "load_dec_state_dict", "solver_stats", "loss_scale",
    "DEC", "DECConfig",
    "identity_logits", "knots_from_logits", "monotone_warp",
]
