"""The tiny model of every family, shared by the test files: family -> (base name, tiny kwargs, image size).

One table, so that the files cannot drift apart. Each file picks the families it needs (``tiny_table(...)``).
Layer scales start at 1 (``init_values=1.0``) where a family has them: timm starts DINOv2's at 1e-5, where every block
is nearly the identity and the class token barely sees the warped patch tokens (trained layer scales are O(0.1-1)).
"""
from __future__ import annotations

from typing import Any

import torch

TinyModel = tuple[str, dict[str, Any], int]

_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
_SWIN = dict(img_size=64, window_size=4, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2))

TINY_MODELS: dict[str, TinyModel] = {
    "vit": ("vit_tiny_patch16_224", dict(_VIT, depth=3), 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", _VIT, 32),
    "deit3": ("deit3_small_patch16_224", _VIT, 32),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(_VIT, img_size=28, patch_size=7, init_values=1.0), 28),
    "beit": ("beit_base_patch16_224", _VIT, 32),
    "beitv2_shared_bias": (
        "beitv2_base_patch16_224", dict(_VIT, use_rel_pos_bias=False, use_shared_rel_pos_bias=True), 32),
    "swin": ("swin_tiny_patch4_window7_224", _SWIN, 64),
    "eva02": ("eva02_tiny_patch14_224", dict(_VIT, img_size=28, patch_size=7, head_init_scale=1.0), 28),
    "dinov3_reg": ("vit_small_patch16_dinov3", dict(_VIT, init_values=1.0, head_init_scale=1.0), 32),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(_VIT, init_values=1.0, head_init_scale=1.0), 32),
    "relpos_cls": ("vit_relpos_medium_patch16_cls_224", dict(_VIT, init_values=1.0), 32),
    "srelpos": ("vit_srelpos_small_patch16_224", dict(_VIT, init_values=1.0), 32),
    "swinv2": ("swinv2_tiny_window8_256", _SWIN, 64),
    "swinv2_cr": ("swinv2_cr_tiny_224", _SWIN, 64),
}

# a cheap H for the tests, as DECConfig fields and as create_model kwargs
SMALL_DEC = dict(widths=(8, 8), proj_chans=4, pool_size=8, image_widths=(4, 8))
SMALL_DEC_KWARGS = {f"dec_{k}": v for k, v in SMALL_DEC.items()}


def tiny_table(*families: str) -> dict[str, TinyModel]:
    """The rows of ``families`` (in that order), each a fresh copy of its kwargs."""
    return {f: (TINY_MODELS[f][0], dict(TINY_MODELS[f][1]), TINY_MODELS[f][2]) for f in families}


def off_identity(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """``model`` in eval mode with every parameter moved by ``scale`` N(0, 1) (the DECs off the identity, so that
    their weights change the logits); draws from the global generator."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s eval logits of two fixed random 32 px RGB images."""
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
