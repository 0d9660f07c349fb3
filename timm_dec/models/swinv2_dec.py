"""Swin Transformer V2 with DEC: `SwinTransformerV2DEC` (``swinv2_*``) and `SwinTransformerV2CrDEC`
(``swinv2_cr_*``).

As for Swin v1 (`timm_dec.models.swin_dec`), the DEC unit is a stage: stage k's DEC reads the map entering the
stage, the map is canonicalised, the stage runs (its patch merging may halve H and W) and, in the equivariant mode,
its output is un-canonicalised with the same knots, which are in normalised coordinates and so fit the smaller map.
``SwinTransformerV2`` stages take and return (B, H, W, C) maps; ``SwinTransformerV2Cr`` stages take and return
(B, C, H, W) maps, so the same adapter runs them with the ``nchw`` layout.

Position codes: the continuous relative position bias (a small MLP over log-spaced window offsets) is part of each
block, for the fixed window grid. Latent canonicalisation (paper Sec. 4.3, eq. 21) adapts the stage as a function
of a map on that grid, ``S(M_k(S^{-1}(F_k)))``: the canonical map is resampled onto the same grid, so the block
biases by grid offsets exactly as the pretrained block does.

Importing this module registers ``<base>_dec`` for every model of timm's ``swin_transformer_v2`` and
``swin_transformer_v2_cr`` modules (``swinv2_*``, ``swinv2_cr_*``) and the aliases ``swinv2_{tiny,small,base}_dec``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
from torch import nn

from .._compat import feature_take_indices
from ._base import register_dec_family
from ._registry import register_dec_models, supported_base_names
from .swin_dec import StagesDECMixin, SwinStagesDECMixin

__all__ = ["SwinTransformerV2DEC", "SwinTransformerV2CrDEC"]


class SwinTransformerV2DEC(SwinStagesDECMixin, SwinTransformerV2):
    """A timm ``SwinTransformerV2`` whose stages in ``dec_cfg.blocks`` are canonicalised by a DEC.

    Takes the ``SwinTransformerV2`` arguments plus the ``dec_*`` options; its (B, H, W, C) stages run through
    `timm_dec.models.swin_dec.SwinStagesDECMixin`, as Swin v1's do.
    """


class SwinTransformerV2CrDEC(StagesDECMixin, SwinTransformerV2Cr):
    """A timm ``SwinTransformerV2Cr`` whose stages in ``dec_cfg.blocks`` are canonicalised by a DEC.

    Its stages take and return (B, C, H, W) maps: the DEC reads and warps them in the ``nchw`` layout; they run
    through `timm_dec.models.swin_dec.StagesDECMixin`. Default DEC positions: ``("input",)``.
    """
    dec_stage_layout = "nchw"

    def dec_units(self) -> Sequence[nn.Module]:
        return self.stages

    def dec_in_chans(self, index: int) -> int:
        stage = self.stages[index]
        if stage.downscale:
            return stage.downsample.reduction.in_features // 4
        return stage.blocks[0].norm1.normalized_shape[0]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``SwinTransformerV2Cr.forward_intermediates`` on the canonical image, the adapted stages run through
        their DEC, the spatial outputs un-warped in the equivariant mode."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x, intermediates, knots = self._dec_stages(x, take_indices, norm, max_index if stop_early else None)
        if intermediates_only:
            return intermediates
        return self.dec_uncanonicalize(x, knots, "nchw"), intermediates


register_dec_family(SwinTransformerV2, SwinTransformerV2DEC, "Swin V2")
register_dec_family(SwinTransformerV2Cr, SwinTransformerV2CrDEC, "Swin V2 (cr)")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

_ALIASES = {
    'swinv2_tiny_dec': 'swinv2_tiny_window8_256',
    'swinv2_small_dec': 'swinv2_small_window8_256',
    'swinv2_base_dec': 'swinv2_base_window8_256',
}

register_dec_models(
    globals(), supported_base_names(('*',), modules=('swin_transformer_v2', 'swin_transformer_v2_cr')),
    _ALIASES)
