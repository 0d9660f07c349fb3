"""Pure-PyTorch reference of the monotone warp: dense source coordinates, then bilinear `grid_sample`.

Differentiable in ``x`` and ``knots``; the ground truth the Triton kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .knots import DEFAULT_INVERSE_SWEEPS, dense_coords

__all__ = ["monotone_warp_ref", "sample_nchw"]


def sample_nchw(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear, border-clamped sampling with align_corners=True.

    Args:
        x: (B, C, H, W) map.
        coords: (B, Ho, Wo, 2) normalised source coordinates (x, y) in [0, 1].

    Returns:
        (B, C, Ho, Wo) samples, in the dtype of ``x`` promoted with ``coords``.
    """
    dtype = torch.promote_types(x.dtype, coords.dtype)
    grid = coords.to(dtype) * 2 - 1
    return F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=True)


def monotone_warp_ref(
        x: torch.Tensor,
        knots: torch.Tensor,
        inverse: bool,
        layout: str,
        height: int,
        width: int,
        num_prefix_tokens: int = 0,
        sweeps: int = DEFAULT_INVERSE_SWEEPS,
) -> torch.Tensor:
    """Reference warp on already checked inputs (see `timm_dec.ops.monotone_warp` for the contract).

    Coordinates are computed in float32 or better, outside autocast; samples are returned in ``x.dtype``.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        coord_dtype = torch.promote_types(knots.dtype, torch.float32)
        coords = dense_coords(knots.to(coord_dtype), height, width, inverse=inverse, sweeps=sweeps)
        sample_dtype = torch.promote_types(x.dtype, torch.float32)
        if layout == "nchw":
            return sample_nchw(x.to(sample_dtype), coords).to(x.dtype)
        if layout == "nhwc":
            out = sample_nchw(x.to(sample_dtype).permute(0, 3, 1, 2), coords)
            return out.permute(0, 2, 3, 1).contiguous().to(x.dtype)
        # tokens: (B, P + H*W, C); the prefix tokens pass through.
        batch, _, chans = x.shape
        prefix, spatial = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        fmap = spatial.to(sample_dtype).reshape(batch, height, width, chans).permute(0, 3, 1, 2)
        out = sample_nchw(fmap, coords).flatten(2).transpose(1, 2).to(x.dtype)
        return torch.cat((prefix, out), dim=1)
