"""EVA, EVA02, the RoPE ViTs, Perception Encoder and DINOv3 with DEC: `EvaDEC` and the ``*_dec`` names of timm's
``eva`` module.

Every model timm builds in ``eva.py`` is an ``Eva``: ``eva_*``, ``eva02_*``, the RoPE ViTs ``vit_*_rope_*``,
Perception Encoder ``vit_pe_*``, DINOv3 ``vit_*_dinov3*``, LingBot-Vision and Sapiens2. Each adapted block runs
through `DECModelMixin.dec_block` on the (B, P + H*W, C) tokens; the P prefix tokens (class, registers) pass
through unwarped.

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

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.models._features import feature_take_indices
from timm.models.eva import Eva

from ..adapt import DECModelMixin, register_dec_family
from ._registry import register_dec_models, supported_base_names

__all__ = ["EvaDEC"]


class EvaDEC(DECModelMixin, Eva):
    """A timm ``Eva`` whose blocks in ``dec_cfg.blocks`` are canonicalised by a DEC.

    Takes the ``Eva`` arguments plus the ``dec_*`` options (`timm_dec.adapt.split_dec_kwargs`). Default DEC blocks:
    ``(0, 1)``. Each block keeps its RoPE on the fixed token grid (see the module docstring); mixed-mode RoPE gives
    every block its own embedding, as in the base. Patch dropout is not supported (it breaks the token grid the
    warp needs).
    """
    dec_unit_name = "block"
    default_dec_blocks = (0, 1)

    @classmethod
    def dec_check_adaptable(cls, model: nn.Module) -> None:
        if model.patch_drop is not None:
            raise ValueError("timm_dec cannot adapt an Eva model with patch dropout (patch_drop_rate > 0): DEC warps "
                             "the full token grid")

    def dec_units(self) -> Sequence[nn.Module]:
        return self.blocks

    def dec_in_chans(self, index: int) -> int:
        return self.embed_dim

    def _dec_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[int, int]]:
        """Patch-embed ``x`` (B, C, H, W), add prefix tokens and positions: (B, P + h*w, D) tokens, the RoPE
        embedding (or None) and the grid (h, w)."""
        self.dec_check_input(x)
        img_size = x.shape[-2:]
        x = self.patch_embed(x)
        # dynamic_img_size (DINOv3): patch_embed returns NHWC, flattened only in _pos_embed
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.dynamic_feat_size(img_size))
        x, rot_pos_embed = self._pos_embed(x)
        x = self.norm_pre(x)
        return x, rot_pos_embed, grid

    def _dec_run_block(
            self,
            index: int,
            block: nn.Module,
            x: torch.Tensor,
            grid: Tuple[int, int],
            rot_pos_embed: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
            image: torch.Tensor,
    ) -> torch.Tensor:
        rope = rot_pos_embed
        if self.rope_mixed and rot_pos_embed is not None:
            rope = rot_pos_embed[index]  # depth-dependent embeddings: one per block
        return self.dec_block(
            index, block, x, layout="tokens", grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
            checkpointing=self.grad_checkpointing, image=image, rope=rope, attn_mask=attn_mask, is_causal=is_causal)

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """Embeddings, the blocks (adapted ones through their DEC) and the final norm: (B, P + h*w, D)."""
        image = x
        x, rot_pos_embed, grid = self._dec_embed(x)
        for i, blk in enumerate(self.blocks):
            x = self._dec_run_block(i, blk, x, grid, rot_pos_embed, attn_mask, is_causal, image)
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
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``Eva.forward_intermediates`` with the adapted blocks run through their DEC."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format for EVA-ViT features must be one of NCHW or NLC.'
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B = x.shape[0]
        image = x
        x, rot_pos_embed, (H, W) = self._dec_embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            x = self._dec_run_block(i, blk, x, (H, W), rot_pos_embed, attn_mask, is_causal, image)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = None
        if self.num_prefix_tokens:
            prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if reshape:
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


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
