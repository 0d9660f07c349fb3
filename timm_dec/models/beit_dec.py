"""BEiT and BEiTv2 with DEC: `BeitDEC` and the ``beit*_dec`` names of timm's ``beit`` module.

Each adapted block runs through `DECModelMixin.dec_block` on the (B, 1 + H*W, C) tokens (the class token passes
through unwarped) and keeps receiving ``shared_rel_pos_bias``. Importing this module registers ``<base>_dec`` for
every ``beit*`` model of timm's ``beit`` module and the aliases ``beit_{base,large}_dec``. (timm's ``beit3_*`` are
``VisionTransformer`` models: `timm_dec.models.vit_dec` registers them.)
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from timm.models.beit import Beit
from torch import nn

from ._base import register_dec_family
from ._registry import register_dec_models, supported_base_names
from ._token import TokenDECMixin

__all__ = ["BeitDEC"]


class BeitDEC(TokenDECMixin, Beit):
    """A timm ``Beit`` with DECs at ``dec_cfg.blocks`` (the input image and/or blocks). Default: ``("input",)``."""

    def _dec_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int], Optional[torch.Tensor]]:
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        return self.pos_drop(x), grid, rel_pos_bias

    def _dec_run_block(self, index: int, block: nn.Module, x: torch.Tensor, grid: Tuple[int, int],
                       shared: Optional[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        return self.dec_block(
            index, block, x, layout="tokens", grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
            checkpointing=self.grad_checkpointing, image=image, shared_rel_pos_bias=shared)


register_dec_family(Beit, BeitDEC, "BEiT, BEiTv2")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

_ALIASES = {
    'beit_base_dec': 'beit_base_patch16_224',
    'beit_large_dec': 'beit_large_patch16_224',
}

register_dec_models(globals(), supported_base_names(('beit*',), modules=('beit',)), _ALIASES)
