"""timm_dec: locally scale-consistent timm models with the Deep Equilibrium Canonicalizer (DEC).

``import timm_dec`` registers the ``<base>_dec`` models in timm's registry.
"""
__version__ = "0.1.0"

from .ops import identity_logits, knots_from_logits, monotone_warp
