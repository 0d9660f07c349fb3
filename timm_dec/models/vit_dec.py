"""ViT, DeiT (plain, distilled, DeiT3), DINOv2 and BEiT3 with DEC: `VisionTransformerDEC` and the ``*_dec`` names.

The classes extend timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` the way timm's DeiT extends ViT:
they override only the methods that run the blocks, so each adapted block runs through `DECModelMixin.dec_block`
on the (B, P + H*W, C) tokens; the P prefix tokens (class, distillation, registers) pass through unwarped.
Importing this module registers ``<base>_dec`` for every model of timm's ``vision_transformer``,
``vision_transformer_hybrid`` and ``deit`` modules (all built as one of these classes: ``vit_*``, ``deit*``,
``beit3*``, ``eva_large_*``, ``aimv2_*``, ``flexivit_*``, ``test_vit*``), and the aliases
``vit_{tiny,small,base,large}_dec``, ``deit_{tiny,small,base}_dec``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.layers import PatchDropout
from timm.models._features import feature_take_indices
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from ..adapt import DECModelMixin, register_dec_family
from ._registry import register_dec_models, supported_base_names

__all__ = ["VisionTransformerDEC", "VisionTransformerDistilledDEC"]


class VisionTransformerDEC(DECModelMixin, VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks in ``dec_cfg.blocks`` are canonicalised by a DEC.

    Takes the ``VisionTransformer`` arguments plus the ``dec_*`` options (`timm_dec.adapt.split_dec_kwargs`).
    Default DEC blocks: ``(0, 1)``. Patch dropout is not supported (it breaks the token grid the warp needs).
    """
    dec_unit_name = "block"
    default_dec_blocks = (0, 1)

    @classmethod
    def dec_check_adaptable(cls, model: nn.Module) -> None:
        if isinstance(model.patch_drop, PatchDropout):
            raise ValueError("timm_dec cannot adapt a ViT with patch dropout (patch_drop_rate > 0): DEC warps the "
                             "full token grid")

    def dec_units(self) -> Sequence[nn.Module]:
        return self.blocks

    def dec_in_chans(self, index: int) -> int:
        return self.embed_dim

    def _dec_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch-embed ``x`` (B, C, H, W) and add the prefix tokens: (B, P + h*w, D) tokens and the grid (h, w)."""
        self.dec_check_input(x)
        img_size = x.shape[-2:]
        x = self.patch_embed(x)
        # dynamic_img_size: patch_embed returns NHWC, flattened only in _pos_embed
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.dynamic_feat_size(img_size))
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        return x, grid

    def _dec_run_block(
            self,
            index: int,
            block: nn.Module,
            x: torch.Tensor,
            grid: Tuple[int, int],
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
            image: torch.Tensor,
    ) -> torch.Tensor:
        masked = attn_mask is not None or is_causal
        block_kwargs = dict(attn_mask=attn_mask, is_causal=is_causal) if masked else {}
        return self.dec_block(
            index, block, x, layout="tokens", grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
            checkpointing=self.grad_checkpointing and not masked, image=image, **block_kwargs)

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """Embeddings, the blocks (adapted ones through their DEC) and the final norm: (B, P + h*w, D)."""
        image = x
        x, grid = self._dec_embed(x)
        for i, blk in enumerate(self.blocks):
            x = self._dec_run_block(i, blk, x, grid, attn_mask, is_causal, image)
        return self.norm(x)

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
        """timm's ``VisionTransformer.forward_intermediates`` with the adapted blocks run through their DEC."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B = x.shape[0]
        image = x
        x, (H, W) = self._dec_embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            x = self._dec_run_block(i, blk, x, (H, W), attn_mask, is_causal, image)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        if self.num_prefix_tokens:
            prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        else:
            prefix_tokens = None
        if reshape:
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            result_dict = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result_dict['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result_dict['image_features'] = self.norm(x)
            return result_dict

        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


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
