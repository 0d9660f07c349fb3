"""`adapt`: give an existing timm model DEC canonicalisers, in place.

A DEC reads and warps what its unit sees, in that unit's layout: the (B, C, H, W) image (``nchw``; the input DEC),
(B, P + H*W, C) tokens (``tokens``; ViT, DeiT, BEiT, Eva, relpos ViT blocks; the P prefix tokens pass through),
(B, H, W, C) maps (``nhwc``; Swin v1 and V2 stages) or (B, C, H, W) maps (``nchw``; Swin V2 cr stages).

The instance's class is switched to its family's DEC subclass (`timm_dec.models.dec_class_for`) and the DEC
modules are attached; the machinery itself (`DECModelMixin`, the options, the family registry) lives in
`timm_dec.models` (its ``_base`` module), whose names this module re-exports for existing callers.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from .models import (  # noqa: F401  (re-exported: the adapt API before the models/_base.py split)
    DEFAULT_MODE,
    INPUT,
    MODES,
    AdaptConfig,
    DECModelMixin,
    attach_decs,
    dec_class_for,
    dec_options,
    parse_dec_options,
    register_dec_family,
    split_dec_kwargs,
    supported_families,
)

__all__ = [
    "adapt", "AdaptConfig", "DECModelMixin", "MODES", "INPUT", "register_dec_family", "dec_class_for",
    "split_dec_kwargs", "dec_options", "supported_families",
]


def adapt(
        model: nn.Module,
        *,
        blocks: Optional[Union[int, str, Sequence[Union[int, str]]]] = None,
        mode: str = DEFAULT_MODE,
        **options: Any,
) -> nn.Module:
    """Give a timm model DEC canonicalisers in front of its patch embedding and chosen blocks, in place.

    The instance's class is switched to the family's DEC subclass (e.g. ``VisionTransformer`` ->
    `timm_dec.models.vit_dec.VisionTransformerDEC`) and the DEC modules are added under ``model.dec``. Every DEC starts
    at the identity, so the adapted model returns what the model returned before.

    Default ``blocks``: ``("input",)``, one DEC that canonicalises the input image, for every family: measured on
    the demo, a warp of a coarse token map cannot bring back what a patch lost and the latent DECs learn to stay at
    the identity, while the input DEC learns to magnify small digits (README, "Defaults"). Latent DECs in front of
    blocks (Swin: stages) are further options, e.g. ``blocks=("input", 0, 1)``, at a proportional cost.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, DeiT3, DINOv2 with or without registers),
            ``VisionTransformerDistilled``, ``Beit`` (BEiT, BEiTv2), ``Eva`` (EVA, EVA02, RoPE ViTs, Perception
            Encoder, DINOv3), ``VisionTransformerRelPos``, ``SwinTransformer`` (v1), ``SwinTransformerV2`` or
            ``SwinTransformerV2Cr``.
        blocks: DEC positions: ``"input"`` (the image, before the patch embedding) and indices of the transformer
            blocks (Swin: stages) to adapt; negative indices count from the end.
        mode: ``"equivariant"`` (eq. 21: ``S(M_k(S^{-1}(F_k)))``; the input DEC un-warps the spatial outputs) or
            ``"invariant"`` (eq. 22: ``M_k(S^{-1}(F_k))``; nothing is un-warped).
        **options: `timm_dec.dec.DECConfig` fields, which own the names and defaults: ``grid`` (G, the DEC grid of
            G x G cells; default 4), ``widths``, ``max_iter``, ``tol``, ``backward``, ...

    Returns:
        ``model`` itself, now an instance of the family's DEC class.

    Raises:
        TypeError: the model class is not supported (the message lists the supported ones), or an unknown option.
        ValueError: the model is already adapted, or an option value is invalid.

    Example:
        >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> m = adapt(m, blocks=("input", 0))
        >>> list(m.dec)
        ['input', '0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt expects a timm model (nn.Module), got {type(model).__name__}")
    if isinstance(model, DECModelMixin):
        raise ValueError(f"{type(model).__name__} is already adapted (its DEC blocks: {model.dec_cfg.blocks})")
    base_cls = type(model)
    dec_cls = dec_class_for(base_cls)
    dec_cls.dec_check_adaptable(model)
    # class switch first: the options are checked with the family hooks; a rejected adapt leaves the model as it was
    model.__class__ = dec_cls
    try:
        attach_decs(model, parse_dec_options({"blocks": blocks, "mode": mode, **options}))
    except Exception:
        model.__class__ = base_cls
        raise
    return model
