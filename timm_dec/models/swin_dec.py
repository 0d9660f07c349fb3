"""Swin Transformer (v1) with DEC: `SwinTransformerDEC` and the ``swin_*_dec`` names.

The DEC unit of Swin is a stage: stage k's DEC reads the (B, H, W, C) map entering the stage, the map is
canonicalised, the stage runs (its patch merging may halve H and W) and, in the equivariant mode, its output is
un-canonicalised with the same knots, which are in normalised coordinates and so fit the smaller map.
Importing this module registers ``<base>_dec`` for every ``swin_*`` model of timm's ``swin_transformer`` module and
the aliases ``swin_{tiny,small,base,large}_dec``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from .._compat import feature_take_indices
from ._base import DECModelMixin, register_dec_family
from ._registry import register_dec_models, supported_base_names

__all__ = ["SwinStagesDECMixin", "SwinTransformerDEC"]


class SwinStagesDECMixin(DECModelMixin):
    """The DEC drive of a Swin with (B, H, W, C) stages (timm's ``SwinTransformer`` and ``SwinTransformerV2``): their
    patch embedding, ``layers`` and final ``norm`` are the same, so one ``forward_features`` and one
    ``forward_intermediates`` serve both. Default DEC positions: ``("input",)``. ``forward_intermediates`` also accepts
    ``output_fmt='NHWC'``, so ``features_only`` (`timm_dec.models._features.DECFeatureListNet`) keeps the base's NHWC
    maps.
    """
    dec_unit_name = "stage"
    dec_group_suffix = (0,)  # DEC k joins stage k's first group, with its patch merging

    def dec_units(self) -> Sequence[nn.Module]:
        return self.layers

    def dec_in_chans(self, index: int) -> int:
        return self.layers[index].dim

    def _dec_run_stage(self, index: int, stage: nn.Module, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        # a stage checkpoints its own blocks when grad checkpointing is on
        return self.dec_block(index, stage, x, layout="nhwc", image=image)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, the stages (adapted ones through their DEC) and the final norm: (B, H', W', C'),
        un-warped to the input's geometry in the equivariant mode."""
        x, knots = self.dec_canonicalize_image(x)
        image = x
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers):
            x = self._dec_run_stage(i, stage, x, image)
        return self.dec_uncanonicalize(self.norm(x), knots, "nhwc")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``SwinTransformer(V2).forward_intermediates`` on the canonical image, the adapted stages run through
        their DEC, the spatial outputs un-warped in the equivariant mode.

        ``output_fmt`` may be ``'NCHW'`` (timm's) or ``'NHWC'`` (the stages' own layout, as timm's Swin
        ``features_only`` returns).
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output shape must be NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.layers), indices)

        x, knots = self.dec_canonicalize_image(x)
        image = x
        x = self.patch_embed(x)
        num_stages = len(self.layers)
        stages = self.layers if not stop_early else self.layers[:max_index + 1]
        i = 0
        for i, stage in enumerate(stages):
            x = self._dec_run_stage(i, stage, x, image)
            if i in take_indices:
                x_inter = self.dec_uncanonicalize(self.norm(x) if norm and i == num_stages - 1 else x, knots, "nhwc")
                if output_fmt == 'NCHW':
                    x_inter = x_inter.permute(0, 3, 1, 2).contiguous()
                intermediates.append(x_inter)

        if intermediates_only:
            return intermediates
        if i == num_stages - 1:
            x = self.norm(x)  # sized for (and only applied to) the last stage
        return self.dec_uncanonicalize(x, knots, "nhwc"), intermediates


class SwinTransformerDEC(SwinStagesDECMixin, SwinTransformer):
    """A timm ``SwinTransformer`` whose stages in ``dec_cfg.blocks`` are canonicalised by a DEC.

    Takes the ``SwinTransformer`` arguments plus the ``dec_*`` options; the stages run through
    `SwinStagesDECMixin`.
    """


register_dec_family(SwinTransformer, SwinTransformerDEC, "Swin v1")

default_cfgs: Dict[str, Any] = {}  # filled by register_dec_models, read by timm's register_model

_ALIASES = {
    'swin_tiny_dec': 'swin_tiny_patch4_window7_224',
    'swin_small_dec': 'swin_small_patch4_window7_224',
    'swin_base_dec': 'swin_base_patch4_window7_224',
    'swin_large_dec': 'swin_large_patch4_window7_224',
}

register_dec_models(globals(), supported_base_names(('swin_*',), modules=('swin_transformer',)), _ALIASES)
