"""BEiT and BEiTv2 with DEC: `BeitDEC` and the ``beit*_dec`` names of timm's ``beit`` module.

Each adapted block runs through `DECModelMixin.dec_block` on the (B, 1 + H*W, C) tokens (the class token passes
through unwarped) and keeps receiving ``shared_rel_pos_bias``. Importing this module registers ``<base>_dec`` for
every ``beit*`` model of timm's ``beit`` module and the aliases ``beit_{base,large}_dec``. (timm's ``beit3_*`` are
``VisionTransformer`` models: `timm_dec.models.vit_dec` registers them.)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings, the blocks (adapted ones through their DEC) and the final norm: (B, 1 + h*w, D), un-warped to
        the input's geometry in the equivariant mode."""
        return self._dec_features(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``Beit.forward_intermediates`` on the canonical image, the adapted blocks run through their DEC,
        the spatial outputs un-warped in the equivariant mode."""
        return self._dec_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only)


register_dec_family(Beit, BeitDEC, "BEiT, BEiTv2")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

_ALIASES = {
    'beit_base_dec': 'beit_base_patch16_224',
    'beit_large_dec': 'beit_large_patch16_224',
}

register_dec_models(globals(), supported_base_names(('beit*',), modules=('beit',)), _ALIASES)
