"""Feature-map layouts and their spatial size: what the warp, its Triton kernel and DEC share.

Importing this module imports neither Triton nor the warp backends.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["LAYOUTS", "spatial_size", "pair"]

LAYOUTS = ("nchw", "nhwc", "tokens")


def spatial_size(
        x: torch.Tensor,
        layout: str,
        grid_size: Optional[Union[int, Sequence[int]]],
        num_prefix_tokens: int,
        check: bool = True,
) -> tuple[int, int]:
    """(H, W) of the feature map in ``x``, checking the layout's rank and the token count.

    Args:
        x: (B, C, H, W) for ``"nchw"``, (B, H, W, C) for ``"nhwc"``, (B, P + H*W, C) for ``"tokens"``.
        layout: one of `LAYOUTS` (checked by the caller).
        grid_size: (H, W) of a token map (an int for square), inferred for square token maps when None; for the
            other layouts, if given, it must match the map.
        num_prefix_tokens: P, for ``"tokens"`` only.
        check: check the rank, the token count and the arguments; without, only read the size (inputs that the
            caller has checked).

    Raises:
        ValueError: naming what does not fit.
    """
    if not check:
        if layout == "nchw":
            return x.shape[2], x.shape[3]
        if layout == "nhwc":
            return x.shape[1], x.shape[2]
        if grid_size is not None:
            return pair(grid_size)
        side = math.isqrt(x.shape[1] - num_prefix_tokens)
        return side, side
    expected_rank = {"nchw": 4, "nhwc": 4, "tokens": 3}[layout]
    names = {"nchw": "(B, C, H, W)", "nhwc": "(B, H, W, C)", "tokens": "(B, P + H*W, C)"}
    if x.dim() != expected_rank:
        raise ValueError(f"layout {layout!r} expects x of shape {names[layout]}, got {tuple(x.shape)}")
    if layout != "tokens":
        if num_prefix_tokens:
            raise ValueError(f"num_prefix_tokens is only for layout 'tokens', got {num_prefix_tokens} with {layout!r}")
        height, width = (x.shape[2], x.shape[3]) if layout == "nchw" else (x.shape[1], x.shape[2])
        if grid_size is not None and tuple(pair(grid_size)) != (height, width):
            raise ValueError(f"grid_size {tuple(pair(grid_size))} does not match the map size {(height, width)}")
        return height, width
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    spatial = x.shape[1] - num_prefix_tokens
    if grid_size is None:
        side = int(round(max(spatial, 0) ** 0.5))
        if spatial < 1 or side * side != spatial:
            raise ValueError(
                f"grid_size is required: {x.shape[1]} tokens minus {num_prefix_tokens} prefix tokens "
                f"is not a square number of patches")
        return side, side
    height, width = pair(grid_size)
    if height < 1 or width < 1:
        raise ValueError(f"grid_size must be positive, got {(height, width)}")
    if num_prefix_tokens + height * width != x.shape[1]:
        raise ValueError(
            f"grid_size {(height, width)} with {num_prefix_tokens} prefix tokens needs "
            f"{num_prefix_tokens + height * width} tokens, but x has N = {x.shape[1]}")
    return height, width


def pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    """``(v, v)`` for an int, else the two ints of ``v``; `ValueError` for another length."""
    if isinstance(v, int):
        return v, v
    v = tuple(int(s) for s in v)
    if len(v) != 2:
        raise ValueError(f"grid_size must be an int or (H, W), got {v}")
    return v
