"""ViT, DeiT (plain, distilled, DeiT3), DINOv2 and BEiT3 with DEC: `VisionTransformerDEC` and the ``*_dec`` names.

The classes extend timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` the way timm's DeiT extends ViT:
they override only the methods that run the blocks (through `timm_dec.models._token.TokenDECMixin`): the input DEC
canonicalises the image before the patch embedding, and each adapted block runs through `DECModelMixin.dec_block`
on the (B, P + H*W, C) tokens; the P prefix tokens (class, distillation, registers) pass through unwarped.
Importing this module registers ``<base>_dec`` for every model of timm's ``vision_transformer``,
``vision_transformer_hybrid`` and ``deit`` modules (all built as one of these classes: ``vit_*``, ``deit*``,
``beit3*``, ``eva_large_*``, ``aimv2_*``, ``flexivit_*``, ``test_vit*``), and the aliases
``vit_{tiny,small,base,large}_dec``, ``deit_{tiny,small,base}_dec``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.layers import PatchDropout
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ._base import register_dec_family
from ._registry import register_dec_models, supported_base_names
from ._token import MaskedTokenDECMixin

__all__ = ["VisionTransformerDEC", "VisionTransformerDistilledDEC"]


class VisionTransformerDEC(MaskedTokenDECMixin, VisionTransformer):
    """A timm ``VisionTransformer`` with DECs at ``dec_cfg.blocks`` (the input image and/or blocks).

    Takes the ``VisionTransformer`` arguments plus the ``dec_*`` options (`timm_dec.models._base.parse_dec_options`).
    Default DEC positions: ``("input",)``. Patch dropout is not supported (it breaks the token grid the warp needs).
    """

    @classmethod
    def dec_check_adaptable(cls, model: nn.Module) -> None:
        if isinstance(model.patch_drop, PatchDropout):
            raise ValueError("timm_dec cannot adapt a ViT with patch dropout (patch_drop_rate > 0): DEC warps the "
                             "full token grid")

    def _dec_embed(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Tuple[int, int], Dict[str, Any]]:
        img_size = x.shape[-2:]
        x = self.patch_embed(x)
        # dynamic_img_size: patch_embed returns NHWC, flattened only in _pos_embed
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.dynamic_feat_size(img_size))
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        masked = attn_mask is not None or is_causal
        return x, grid, dict(attn_mask=attn_mask, is_causal=is_causal) if masked else {}

    def _dec_run_block(self, index: int, block: nn.Module, x: torch.Tensor, grid: Tuple[int, int],
                       shared: Dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        return self.dec_block(
            index, block, x, layout="tokens", grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
            checkpointing=self.grad_checkpointing and not shared, image=image, **shared)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``VisionTransformer.forward_intermediates`` on the canonical image, the adapted blocks run through
        their DEC, the spatial outputs un-warped in the equivariant mode."""
        return self._dec_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only, output_dict,
            attn_mask=attn_mask, is_causal=is_causal)


class VisionTransformerDistilledDEC(VisionTransformerDEC, VisionTransformerDistilled):
    """timm's distilled DeiT (class + distillation token, two heads) with DEC; see `VisionTransformerDEC`."""


register_dec_family(VisionTransformer, VisionTransformerDEC, "ViT, DeiT, DeiT3, DINOv2 with or without registers")
register_dec_family(VisionTransformerDistilled, VisionTransformerDistilledDEC, "distilled DeiT")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

_ALIASES = {
    'vit_tiny_dec': 'vit_tiny_patch16_224',
    'vit_small_dec': 'vit_small_patch16_224',
    'vit_base_dec': 'vit_base_patch16_224',
    'vit_large_dec': 'vit_large_patch16_224',
    'deit_tiny_dec': 'deit_tiny_patch16_224',
    'deit_small_dec': 'deit_small_patch16_224',
    'deit_base_dec': 'deit_base_patch16_224',
}

register_dec_models(
    globals(),
    supported_base_names(('*',), modules=('vision_transformer', 'vision_transformer_hybrid', 'deit')),
    _ALIASES,
)
