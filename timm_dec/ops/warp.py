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
from .layout import LAYOUTS, spatial_size
from .reference import monotone_warp_ref

__all__ = ["monotone_warp", "resolve_backend", "BACKENDS", "BACKEND_ENV"]

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
        check: validate the inputs: the layout, the shapes of ``x`` and ``knots``, their devices, ``sweeps`` and the
            knot values (a device sync). ``check=False`` checks nothing, for callers that checked the inputs once
            (DEC's solve loop, knots straight from `knots_from_logits`).

    Returns:
        The warped map, with the layout, shape, dtype and device of ``x`` (an empty tensor for meta ``x``; a
        clone of an empty batch).

    Example:
        >>> x = torch.randn(2, 1 + 16, 8)
        >>> knots = knots_from_logits(0.5 * torch.randn(2, 2, 5, 4))
        >>> y = monotone_warp(x, knots, layout="tokens", grid_size=4, num_prefix_tokens=1)
        >>> torch.equal(y[:, 0], x[:, 0])
        True
    """
    if check:
        _check_inputs(x, knots, layout, grid_size, num_prefix_tokens, sweeps)
    height, width = spatial_size(x, layout, grid_size, num_prefix_tokens, check=False)
    if x.is_meta:
        # shapes only (a model built with device="meta", before its weights are loaded or sharded)
        return torch.empty_like(x)
    if x.shape[0] == 0:  # an empty batch (the batch size is static: no host sync)
        return x.clone()
    if resolve_backend(backend, x.device) == "triton":
        from .triton_warp import monotone_warp_triton  # imports Triton on first use only
        return monotone_warp_triton(x, knots, inverse, layout, height, width, num_prefix_tokens, sweeps, check=False)
    return monotone_warp_ref(x, knots, inverse, layout, height, width, num_prefix_tokens, sweeps)


def _check_inputs(
        x: torch.Tensor,
        knots: torch.Tensor,
        layout: str,
        grid_size: Optional[Union[int, Sequence[int]]],
        num_prefix_tokens: int,
        sweeps: int,
) -> None:
    """The checks of `monotone_warp`, each with an error naming what is wrong."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    spatial_size(x, layout, grid_size, num_prefix_tokens)
    check_knots(knots, batch=x.shape[0])
    if knots.device != x.device:
        raise ValueError(f"knots are on {knots.device} but x is on {x.device}")
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
