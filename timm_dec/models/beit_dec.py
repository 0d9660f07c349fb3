"""BEiT and BEiTv2 with DEC: `BeitDEC` and the ``beit*_dec`` names of timm's ``beit`` module.

Each adapted block runs through `DECModelMixin.dec_block` on the (B, 1 + H*W, C) tokens (the class token passes
through unwarped) and keeps receiving ``shared_rel_pos_bias``. Importing this module registers ``<base>_dec`` for
every ``beit*`` model of timm's ``beit`` module and the aliases ``beit_{base,large}_dec``. (timm's ``beit3_*`` are
``VisionTransformer`` models: `timm_dec.vit_dec` registers them.)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.models._features import feature_take_indices
from timm.models.beit import Beit

from ..adapt import DECModelMixin, register_dec_family
from ._registry import register_dec_models, supported_base_names

__all__ = ["BeitDEC"]


class BeitDEC(DECModelMixin, Beit):
    """A timm ``Beit`` whose blocks in ``dec_cfg.blocks`` are canonicalised by a DEC. Default DEC blocks: ``(0, 1)``."""
    dec_unit_name = "block"
    default_dec_blocks = (0, 1)

    def dec_units(self) -> Sequence[nn.Module]:
        return self.blocks

    def dec_in_chans(self, index: int) -> int:
        return self.embed_dim

    def _dec_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch-embed ``x`` (B, C, H, W), add the class token and positions: (B, 1 + h*w, D) and (h, w)."""
        self.dec_check_input(x)
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x), grid

    def _dec_run_block(
            self,
            index: int,
            block: nn.Module,
            x: torch.Tensor,
            grid: Tuple[int, int],
            rel_pos_bias: Optional[torch.Tensor],
            image: torch.Tensor,
    ) -> torch.Tensor:
        return self.dec_block(
            index, block, x, layout="tokens", grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
            checkpointing=self.grad_checkpointing, image=image, shared_rel_pos_bias=rel_pos_bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings, the blocks (adapted ones through their DEC) and the final norm: (B, 1 + h*w, D)."""
        image = x
        x, grid = self._dec_embed(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for i, blk in enumerate(self.blocks):
            x = self._dec_run_block(i, blk, x, grid, rel_pos_bias, image)
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
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``Beit.forward_intermediates`` with the adapted blocks run through their DEC."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B = x.shape[0]
        image = x
        x, (H, W) = self._dec_embed(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            x = self._dec_run_block(i, blk, x, (H, W), rel_pos_bias, image)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if reshape:
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


register_dec_family(Beit, BeitDEC, "BEiT, BEiTv2")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

_ALIASES = {
    'beit_base_dec': 'beit_base_patch16_224',
    'beit_large_dec': 'beit_large_patch16_224',
}

register_dec_models(globals(), supported_base_names(('beit*',), modules=('beit',)), _ALIASES)
