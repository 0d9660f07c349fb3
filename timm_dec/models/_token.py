"""The DEC drive shared by the token families (ViT/DeiT, BEiT, Eva, relpos ViT): one ``forward_features`` and one
``forward_intermediates`` skeleton with two per-family hooks, as `SwinStagesDECMixin` serves Swin v1 and V2.

A family implements ``_dec_embed`` (patch embedding, prefix tokens, positions; what every block shares) and
``_dec_run_block`` (one block through `DECModelMixin.dec_block`, with the block's own keyword arguments). The
skeleton canonicalises the image with the input DEC, runs the blocks and, in the equivariant mode, un-warps every
spatial output (the final tokens and each intermediate) to the input's geometry; prefix tokens pass through.
Each family keeps timm's ``forward_intermediates`` signature and forwards to `_dec_intermediates`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._compat import feature_take_indices
from ._base import DECModelMixin

__all__ = ["TokenDECMixin", "MaskedTokenDECMixin"]

Intermediates = Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]


class TokenDECMixin(DECModelMixin):
    """DEC drive of a ViT-class model whose blocks take (B, P + h*w, D) tokens; mixed in before the timm class."""
    dec_unit_name = "block"

    def dec_units(self) -> Sequence[nn.Module]:
        return self.blocks

    def dec_in_chans(self, index: int) -> int:
        return self.embed_dim

    def _dec_embed(self, x: torch.Tensor, **forward_kwargs: Any) -> Tuple[torch.Tensor, Tuple[int, int], Any]:
        """Embed the (canonical) image (B, C, H, W): (B, P + h*w, D) tokens, the grid (h, w) and what every block
        shares (rotary or relative position codes, the attention mask); family hook."""
        raise NotImplementedError

    def _dec_run_block(self, index: int, block: nn.Module, x: torch.Tensor, grid: Tuple[int, int], shared: Any,
                       image: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on ``x`` through `dec_block`, with its keyword arguments from ``shared``; family hook."""
        raise NotImplementedError

    def _dec_unwarp(self, y: torch.Tensor, knots: Optional[torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
        return self.dec_uncanonicalize(y, knots, "tokens", grid, self.num_prefix_tokens)

    def _dec_tokens(
            self,
            x: torch.Tensor,
            take_indices: Sequence[int] = (),
            norm: bool = False,
            stop_early_at: Optional[int] = None,
            **forward_kwargs: Any,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], Tuple[int, int], Optional[torch.Tensor]]:
        """Run the model on the canonical image.

        Returns:
            The last block's (B, P + h*w, D) output, in the canonical geometry (`_dec_final` norms and un-warps it);
            the tokens after each block in ``take_indices`` (normed if ``norm``), un-warped; the grid (h, w); and the
            input DEC's knots (None without one).
        """
        x, knots = self.dec_canonicalize_image(x)
        image = x
        x, grid, shared = self._dec_embed(x, **forward_kwargs)
        blocks = self.blocks if stop_early_at is None else self.blocks[:stop_early_at + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._dec_run_block(i, blk, x, grid, shared, image)
            if i in take_indices:
                intermediates.append(self._dec_unwarp(self.norm(x) if norm else x, knots, grid))
        return x, intermediates, grid, knots

    def _dec_final(self, x: torch.Tensor, knots: Optional[torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
        return self._dec_unwarp(self.norm(x), knots, grid)

    def _dec_features(self, x: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        """Embeddings, the blocks (adapted ones through their DEC) and the final norm: (B, P + h*w, D), un-warped to
        the input's geometry in the equivariant mode."""
        x, _, grid, knots = self._dec_tokens(x, **forward_kwargs)
        return self._dec_final(x, knots, grid)

    def _dec_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            **forward_kwargs: Any,
    ) -> Intermediates:
        """timm's ``forward_intermediates`` of the token families, with the adapted units run through their DEC."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, intermediates, (h, w), knots = self._dec_tokens(
            x, take_indices, norm, max_index if stop_early else None, **forward_kwargs)

        prefix_tokens = None
        if self.num_prefix_tokens:
            prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            result: Dict[str, Any] = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result['image_features'] = self._dec_final(x, knots, (h, w))
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self._dec_final(x, knots, (h, w)), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings, the blocks (adapted ones through their DEC) and the final norm: (B, P + h*w, D), un-warped to
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
        """timm's ``forward_intermediates`` (``Beit``, ``VisionTransformerRelPos``) on the canonical image, the
        adapted blocks run through their DEC, the spatial outputs un-warped in the equivariant mode."""
        return self._dec_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only)


class MaskedTokenDECMixin(TokenDECMixin):
    """`TokenDECMixin` for the families whose forwards take ``attn_mask`` and ``is_causal`` (``Eva``; ViT adds
    ``output_dict`` to ``forward_intermediates``)."""

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """Embeddings, the blocks (adapted ones through their DEC) and the final norm: (B, P + h*w, D), un-warped to
        the input's geometry in the equivariant mode."""
        return self._dec_features(x, attn_mask=attn_mask, is_causal=is_causal)

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
        """timm's ``Eva.forward_intermediates`` on the canonical image, the adapted blocks run through their DEC, the
        spatial outputs un-warped in the equivariant mode."""
        return self._dec_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only,
            attn_mask=attn_mask, is_causal=is_causal)
