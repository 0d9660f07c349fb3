"""Relative-position ViTs with DEC: `VisionTransformerRelPosDEC` and the ``vit_relpos_*`` / ``vit_srelpos_*`` names.

timm's ``VisionTransformerRelPos`` has no absolute position embedding: each block's attention adds a relative
position bias (a table or a small MLP over log-spaced offsets, per block or shared) for the fixed token grid. Each
adapted block runs through `DECModelMixin.dec_block` on the (B, P + H*W, C) tokens (a class token, where the model
has one, passes through unwarped) and keeps receiving ``shared_rel_pos``.

Position codes: latent canonicalisation (paper Sec. 4.3, eq. 21) adapts a module M_k that maps a feature map on the
fixed token grid to another, ``S(M_k(S^{-1}(F_k)))``. The relative bias belongs to M_k: the canonical map
``S^{-1}(F_k)`` is resampled onto the same grid, the token at grid position p holding the content of canonical
coordinate p, so the bias between two tokens is the one for their grid offset, as in the base model (and as for
Swin's relative bias and the RoPE of `timm_dec.models.eva_dec`). Biasing by warped offsets would apply the warp
twice and the adapted block would no longer be ``S ∘ M_k ∘ S^{-1}`` of the pretrained block.

Importing this module registers ``<base>_dec`` for every model of timm's ``vision_transformer_relpos`` module
(``vit_relpos_*``, ``vit_srelpos_*``, ``test_vit_relpos``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from ._base import register_dec_family
from ._registry import register_dec_models, supported_base_names
from ._token import TokenDECMixin

__all__ = ["VisionTransformerRelPosDEC"]


class VisionTransformerRelPosDEC(TokenDECMixin, VisionTransformerRelPos):
    """A timm ``VisionTransformerRelPos`` whose blocks in ``dec_cfg.blocks`` are canonicalised by a DEC.

    Takes the ``VisionTransformerRelPos`` arguments plus the ``dec_*`` options. Default DEC positions: ``("input",)``.
    """

    def _dec_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int], Optional[torch.Tensor]]:
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        shared_rel_pos = self.shared_rel_pos.get_bias() if self.shared_rel_pos is not None else None
        return x, grid, shared_rel_pos

    def _dec_run_block(self, index: int, block: nn.Module, x: torch.Tensor, grid: Tuple[int, int],
                       shared: Optional[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        return self.dec_block(
            index, block, x, layout="tokens", grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
            checkpointing=self.grad_checkpointing, image=image, shared_rel_pos=shared)


register_dec_family(VisionTransformerRelPos, VisionTransformerRelPosDEC, "relative-position ViT (relpos, srelpos)")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

register_dec_models(globals(), supported_base_names(('*',), modules=('vision_transformer_relpos',)), {})
