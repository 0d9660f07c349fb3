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

__all__ = ["StagesDECMixin", "SwinStagesDECMixin", "SwinTransformerDEC"]


class StagesDECMixin(DECModelMixin):
    """The DEC drive of the hierarchical models, whose units are stages: one loop for timm's ``SwinTransformer``,
    ``SwinTransformerV2`` ((B, H, W, C) stages in ``layers``, a final ``norm``) and ``SwinTransformerV2Cr`` ((B, C,
    H, W) stages in ``stages``, no final norm), with per-class hooks: ``dec_units``, ``dec_stage_layout`` and
    `_dec_final_norm`. Default DEC positions: ``("input",)``.
    """
    dec_unit_name = "stage"
    dec_group_suffix = (0,)  # DEC k joins stage k's first group, with its patch merging
    dec_stage_layout = "nhwc"

    def _dec_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm after the last stage (hook; the identity where the model has none)."""
        return x

    def _dec_stages(
            self,
            x: torch.Tensor,
            take_indices: Sequence[int] = (),
            norm: bool = False,
            stop_early_at: Optional[int] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], Optional[torch.Tensor]]:
        """Run the stages on the canonical image.

        Returns:
            The last stage's output (final-normed if the last stage ran), in the canonical geometry; the outputs of
            the stages in ``take_indices`` (the last one normed if ``norm``), un-warped, in the stages' layout; and
            the input DEC's knots (None without one), which `dec_uncanonicalize` takes.
        """
        x, knots = self.dec_canonicalize_image(x)
        image = x
        x = self.patch_embed(x)
        units = self.dec_units()
        last = len(units) - 1
        intermediates = []
        i = -1
        for i, stage in enumerate(units if stop_early_at is None else units[:stop_early_at + 1]):
            # a stage checkpoints its own blocks when grad checkpointing is on
            x = self.dec_block(i, stage, x, layout=self.dec_stage_layout, image=image)
            if i in take_indices:
                y = self._dec_final_norm(x) if norm and i == last else x
                intermediates.append(self.dec_uncanonicalize(y, knots, self.dec_stage_layout))
        if i == last:
            x = self._dec_final_norm(x)  # sized for (and only applied to) the last stage
        return x, intermediates, knots

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, the stages (adapted ones through their DEC) and the final norm, un-warped to the input's
        geometry in the equivariant mode: (B, H', W', C') for Swin v1/V2, (B, C', H', W') for V2 cr."""
        x, _, knots = self._dec_stages(x)
        return self.dec_uncanonicalize(x, knots, self.dec_stage_layout)


class SwinStagesDECMixin(StagesDECMixin):
    """The DEC drive of a Swin with (B, H, W, C) stages (timm's ``SwinTransformer`` and ``SwinTransformerV2``): their
    patch embedding, ``layers`` and final ``norm`` are the same. ``forward_intermediates`` also accepts
    ``output_fmt='NHWC'``, so ``features_only`` (`timm_dec.models._features.DECFeatureListNet`) keeps the base's NHWC
    maps.
    """

    def dec_units(self) -> Sequence[nn.Module]:
        return self.layers

    def dec_in_chans(self, index: int) -> int:
        return self.layers[index].dim

    def _dec_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

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
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x, intermediates, knots = self._dec_stages(x, take_indices, norm, max_index if stop_early else None)
        if output_fmt == 'NCHW':
            intermediates = [y.permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
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
