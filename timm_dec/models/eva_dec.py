"""EVA, EVA02, the RoPE ViTs, Perception Encoder and DINOv3 with DEC: `EvaDEC` and the ``*_dec`` names of timm's
``eva`` module.

Every model timm builds in ``eva.py`` is an ``Eva``: ``eva_*``, ``eva02_*``, the RoPE ViTs ``vit_*_rope_*``,
Perception Encoder ``vit_pe_*``, DINOv3 ``vit_*_dinov3*``, LingBot-Vision and Sapiens2. Each adapted block runs
through `DECModelMixin.dec_block` on the (B, P + H*W, C) tokens (the input DEC canonicalises the image before the
patch embedding); the P prefix tokens (class, registers) pass through unwarped.

Position codes: latent canonicalisation (paper Sec. 4.3, eq. 21) adapts a module M_k that is a function of the
feature map F_k on the fixed token grid, ``S(M_k(S^{-1}(F_k)))``. An Eva block adds its rotary embedding (RoPE)
inside attention, at the grid positions of the tokens it is given; that rotation is part of M_k. The canonical map
``S^{-1}(F_k)`` is resampled onto the same fixed grid -- the token at grid position p holds the content of
canonical coordinate p -- so the block applies RoPE for the fixed grid positions, exactly as the base does, and
as Swin's relative position bias and BEiT's relative bias do in the other families. Giving tokens warped RoPE
coordinates instead would apply the warp twice (once by resampling, once in the phase), and the adapted block would
no longer be ``S ∘ M_k ∘ S^{-1}`` of the pretrained M_k: eq. 21's equivariance holds for any fixed M_k, and only a
fixed M_k keeps the pretrained block and the identity at initialisation. The absolute position embedding, where a
model has one, is added before the first block, so it is part of F_0 and is canonicalised with the content.

Importing this module registers ``<base>_dec`` for every model of timm's ``eva`` module and the aliases
``vit_{small,base,large}_dinov3_dec`` and ``eva02_{tiny,small,base,large}_dec``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from timm.models.eva import Eva
from torch import nn

from ._base import register_dec_family
from ._registry import register_dec_models, supported_base_names
from ._token import MaskedTokenDECMixin

__all__ = ["EvaDEC"]


class EvaDEC(MaskedTokenDECMixin, Eva):
    """A timm ``Eva`` whose blocks in ``dec_cfg.blocks`` are canonicalised by a DEC.

    Takes the ``Eva`` arguments plus the ``dec_*`` options (`timm_dec.models._base.parse_dec_options`). Default DEC
    positions: ``("input",)``. Each block keeps its RoPE on the fixed token grid (see the module docstring);
    mixed-mode RoPE gives every block its own embedding, as in the base. Patch dropout is not supported (it breaks
    the token grid the warp needs).
    """

    @classmethod
    def dec_check_adaptable(cls, model: nn.Module) -> None:
        if model.patch_drop is not None:
            raise ValueError("timm_dec cannot adapt an Eva model with patch dropout (patch_drop_rate > 0): DEC warps "
                             "the full token grid")

    def _dec_embed(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Tuple[int, int], Dict[str, Any]]:
        img_size = x.shape[-2:]
        x = self.patch_embed(x)
        # dynamic_img_size (DINOv3): patch_embed returns NHWC, flattened only in _pos_embed
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.dynamic_feat_size(img_size))
        x, rot_pos_embed = self._pos_embed(x)
        x = self.norm_pre(x)
        return x, grid, dict(rope=rot_pos_embed, attn_mask=attn_mask, is_causal=is_causal)

    def _dec_run_block(self, index: int, block: nn.Module, x: torch.Tensor, grid: Tuple[int, int],
                       shared: Dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        rope = shared["rope"]
        if self.rope_mixed and rope is not None:
            rope = rope[index]  # depth-dependent embeddings: one per block
        return self.dec_block(
            index, block, x, layout="tokens", grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
            checkpointing=self.grad_checkpointing, image=image, **dict(shared, rope=rope))


register_dec_family(Eva, EvaDEC, "EVA, EVA02, RoPE ViTs, Perception Encoder, DINOv3, LingBot, Sapiens2")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

_ALIASES = {
    'vit_small_dinov3_dec': 'vit_small_patch16_dinov3',
    'vit_base_dinov3_dec': 'vit_base_patch16_dinov3',
    'vit_large_dinov3_dec': 'vit_large_patch16_dinov3',
    'eva02_tiny_dec': 'eva02_tiny_patch14_224',
    'eva02_small_dec': 'eva02_small_patch14_224',
    'eva02_base_dec': 'eva02_base_patch14_224',
    'eva02_large_dec': 'eva02_large_patch14_224',
}

register_dec_models(globals(), supported_base_names(('*',), modules=('eva',)), _ALIASES)
