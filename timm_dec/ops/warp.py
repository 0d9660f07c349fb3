"""`monotone_warp`: the public warp op, with input checks and backend dispatch.

Dispatch: CUDA tensors go to the Triton kernel, everything else to the PyTorch reference. The ``backend`` argument
or the environment variable ``TIMM_DEC_WARP_BACKEND`` (``auto`` | ``torch`` | ``triton``) forces either.
Triton is imported only when the Triton backend is first used.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from .knots import DEFAULT_INVERSE_SWEEPS, check_knots
from .reference import monotone_warp_ref

__all__ = ["monotone_warp", "resolve_backend", "LAYOUTS", "BACKENDS", "BACKEND_ENV"]

LAYOUTS = ("nchw", "nhwc", "tokens")
BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "TIMM_DEC_WARP_BACKEND"


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that runs: ``"torch"`` or ``"triton"``.

    An explicit ``backend`` wins over ``$TIMM_DEC_WARP_BACKEND``; ``auto`` picks Triton for CUDA tensors.
    """
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    choice = choice.lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


def _spatial_size(
        x: torch.Tensor,
        layout: str,
        grid_size: Optional[Union[int, Sequence[int]]],
        num_prefix_tokens: int,
) -> tuple[int, int]:
    """(H, W) of the feature map in ``x``, checking the layout's rank and the token count."""
    expected_rank = {"nchw": 4, "nhwc": 4, "tokens": 3}[layout]
    names = {"nchw": "(B, C, H, W)", "nhwc": "(B, H, W, C)", "tokens": "(B, P + H*W, C)"}
    if x.dim() != expected_rank:
        raise ValueError(f"layout {layout!r} expects x of shape {names[layout]}, got {tuple(x.shape)}")
    if layout != "tokens":
        if num_prefix_tokens:
            raise ValueError(f"num_prefix_tokens is only for layout 'tokens', got {num_prefix_tokens} with {layout!r}")
        height, width = (x.shape[2], x.shape[3]) if layout == "nchw" else (x.shape[1], x.shape[2])
        if grid_size is not None and tuple(_pair(grid_size)) != (height, width):
            raise ValueError(f"grid_size {tuple(_pair(grid_size))} does not match the map size {(height, width)}")
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
    height, width = _pair(grid_size)
    if height < 1 or width < 1:
        raise ValueError(f"grid_size must be positive, got {(height, width)}")
    if num_prefix_tokens + height * width != x.shape[1]:
        raise ValueError(
            f"grid_size {(height, width)} with {num_prefix_tokens} prefix tokens needs "
            f"{num_prefix_tokens + height * width} tokens, but x has N = {x.shape[1]}")
    return height, width


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(s) for s in v)
    if len(v) != 2:
        raise ValueError(f"grid_size must be an int or (H, W), got {v}")
    return v


def monotone_warp(
        x: torch.Tensor,
        knots: torch.Tensor,
        *,
        inverse: bool = False,
        layout: str = "nchw",
        grid_size: Optional[Union[int, Sequence[int]]] = None,
        num_prefix_tokens: int = 0,
        sweeps: int = DEFAULT_INVERSE_SWEEPS,
        backend: Optional[str] = None,
        check: bool = True,
) -> torch.Tensor:
    """Apply a monotone scaling to a feature map.

    ``inverse=False`` canonicalises, S^{-1}(F)(p) = F(l(p)); ``inverse=True`` un-canonicalises, S(F)(p) = F(l^{-1}(p)),
    with l^{-1} from ``sweeps`` alternations of exact row and column inverses. Sampling is bilinear and
    border-clamped; identity knots return the input.

    Args:
        x: the map: (B, C, H, W) for ``"nchw"``, (B, H, W, C) for ``"nhwc"``, (B, P + H*W, C) for ``"tokens"``.
        knots: (B, 2, G+1, G+1) knot tables from `knots_from_logits`.
        inverse: apply S (sample at l^{-1}(p)) instead of S^{-1} (sample at l(p)).
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"``.
        grid_size: (H, W) of the token map (an int for square); inferred for square maps when omitted.
        num_prefix_tokens: P leading tokens (class, distillation, registers) that pass through unchanged.
        sweeps: alternations of the 2D inverse.
        backend: ``"torch"``, ``"triton"`` or ``"auto"``; default ``$TIMM_DEC_WARP_BACKEND`` or ``"auto"``.
        check: validate the knot values (a device sync); knots straight from `knots_from_logits` need no check.

    Returns:
        The warped map, with the layout, shape, dtype and device of ``x``.

    Example:
        >>> x = torch.randn(2, 1 + 16, 8)
        >>> knots = knots_from_logits(0.5 * torch.randn(2, 2, 5, 4))
        >>> y = monotone_warp(x, knots, layout="tokens", grid_size=4, num_prefix_tokens=1)
        >>> torch.equal(y[:, 0], x[:, 0])
        True
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    height, width = _spatial_size(x, layout, grid_size, num_prefix_tokens)
    if check:
        check_knots(knots, batch=x.shape[0])
    elif knots.dim() != 4 or knots.shape[0] != x.shape[0]:
        raise ValueError(f"knots of shape {tuple(knots.shape)} do not fit x of shape {tuple(x.shape)}")
    if knots.device != x.device:
        raise ValueError(f"knots are on {knots.device} but x is on {x.device}")
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    if resolve_backend(backend, x.device) == "triton":
        from .triton_warp import monotone_warp_triton  # imports Triton on first use only
        return monotone_warp_triton(x, knots, inverse, layout, height, width, num_prefix_tokens, sweeps)
    return monotone_warp_ref(x, knots, inverse, layout, height, width, num_prefix_tokens, sweeps)
