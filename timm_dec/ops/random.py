"""Random monotone scalings: the knots of a random warp, for augmentation, the Aug baseline and the metrics."""
from __future__ import annotations

from typing import Optional

import torch

from .._argcheck import check_float, check_int
from .knots import identity_knots, knots_from_logits

__all__ = ["random_knots"]


def random_knots(
        batch: int,
        grid: int = 4,
        strength: float = 0.3,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random monotone scalings: knots from logits drawn as ``strength * N(0, 1)``.

    The logits are drawn on the generator's device (CPU without a generator, from torch's global RNG), so a seeded
    generator gives the same knots on every device. Strength 0 gives the exact identity knots k/G.

    Args:
        batch: number of warps B.
        grid: DEC grid size G.
        strength: standard deviation of the segment logits; at 0.3 neighbouring segments typically differ in length
            by a factor of about 1.5 (0.5: about 2).
        generator: torch RNG to draw from; torch's global RNG when None.
        device: device of the returned knots.
        dtype: floating dtype of the returned knots.

    Returns:
        (B, 2, G+1, G+1) knots, each row increasing from 0 to 1 (see `timm_dec.ops.knots_from_logits`).

    Example:
        >>> knots = random_knots(2, grid=4, strength=0.5, generator=torch.Generator().manual_seed(0))
        >>> knots.shape
        torch.Size([2, 2, 5, 5])
    """
    batch = check_int("batch", batch, 0)
    grid = check_int("grid", grid, 1)
    strength = check_float("strength", strength)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    logits = torch.randn(batch, 2, grid + 1, grid, generator=generator, device=draw_device)
    if strength == 0:
        return identity_knots(batch, grid, device=device, dtype=dtype)
    return knots_from_logits(strength * logits).to(device=device, dtype=dtype)
