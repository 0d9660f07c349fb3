"""Pure-PyTorch reference of the monotone warp: dense source coordinates, then bilinear sampling.

Differentiable in ``x`` and ``knots``; the ground truth the Triton kernel is tested against. The ``"nchw"`` layout is
sampled with `F.grid_sample`; ``"nhwc"`` and ``"tokens"`` are sampled in place, without transposes, as a weighted
gather of the four neighbouring rows (`F.embedding_bag`) that reproduces `grid_sample`'s arithmetic and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .knots import DEFAULT_INVERSE_SWEEPS, dense_coords

__all__ = ["monotone_warp_ref", "sample_nchw", "sample_rows"]


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


def _axis_taps(c: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower and upper neighbour (int64) and the weight of the upper one, (B, M) each, for coordinates ``c`` (B, M).

    `grid_sample`'s CPU arithmetic for border padding with align_corners=True along one axis: g = 2c - 1,
    pos = (g + 1) * (size - 1) / 2 clamped to [0, size - 1], no coordinate gradient exactly at the borders.
    """
    last_f = torch.tensor(size - 1, device=c.device, dtype=c.dtype)
    pos = ((c * 2 - 1 + 1) * (last_f / 2)).clamp(torch.zeros_like(last_f), last_f)
    pos = torch.where((pos > 0) & (pos < last_f), pos, pos.detach())
    lo = pos.detach().floor()
    frac = pos - lo
    lo = lo.long()
    return lo, torch.clamp_max(lo + 1, size - 1), frac


def _bilinear_taps(coords: torch.Tensor, height: int, width: int, rows_per_batch: int, first_row: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices and weights of the four bilinear taps of each output pixel, for maps stored as rows.

    Mirrors `grid_sample`'s CPU arithmetic for border padding with align_corners=True (`_axis_taps`). Each axis is
    computed on its own (B, M) tensors: elementwise ops on a trailing dim of 2 cost several times more on the CPU.

    Args:
        coords: (B, Ho, Wo, 2) normalised source coordinates (x, y).
        height, width: the input map size.
        rows_per_batch: rows of one batch element in the flattened input (P + H*W).
        first_row: row of pixel (0, 0) within a batch element (P).

    Returns:
        (B*Ho*Wo, 4) int64 row indices into the (B * rows_per_batch, C) input and (B*Ho*Wo, 4) weights, taps in the
        order (y0, x0), (y0, x1), (y1, x0), (y1, x1).
    """
    batch = coords.shape[0]
    x0, x1, wx = _axis_taps(coords[..., 0].reshape(batch, -1), width)
    y0, y1, wy = _axis_taps(coords[..., 1].reshape(batch, -1), height)
    base = torch.arange(batch, device=coords.device).view(batch, 1) * rows_per_batch + first_row
    r0, r1 = y0 * width + base, y1 * width + base
    index = torch.stack((r0 + x0, r0 + x1, r1 + x0, r1 + x1), dim=-1)
    vx = 1 - wx
    vy = 1 - wy
    weight = torch.stack((vy * vx, vy * wx, wy * vx, wy * wx), dim=-1)
    return index.reshape(-1, 4), weight.reshape(-1, 4)


def sample_rows(
        x: torch.Tensor,
        coords: torch.Tensor,
        height: int,
        width: int,
        num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Bilinear, border-clamped sampling (align_corners=True) of a channels-last map stored as rows of tokens.

    Equals `sample_nchw` on the transposed map up to float rounding, in value and gradient, without transposing:
    each output row is the weighted sum of its four neighbouring input rows (`F.embedding_bag`).

    Args:
        x: (B, P + H*W, C) tokens: P prefix tokens, then the H x W map row-major.
        coords: (B, Ho, Wo, 2) normalised source coordinates (x, y) in [0, 1].
        height, width: H and W of the map in ``x``.
        num_prefix_tokens: P, copied to the output unchanged (a -0.0 comes back as +0.0).

    Returns:
        (B, P + Ho*Wo, C) tokens, in the dtype of ``x`` promoted with ``coords``.
    """
    batch, tokens, chans = x.shape
    dtype = torch.promote_types(x.dtype, coords.dtype)
    index, weight = _bilinear_taps(coords.to(dtype), height, width, tokens, num_prefix_tokens)
    table = x.to(dtype).reshape(batch * tokens, chans)
    if not num_prefix_tokens:
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum").view(batch, -1, chans)
    # One output tensor, not a concatenation (a second copy of a large fresh tensor): each sample's prefix rows are
    # bags of one tap of weight 1 (a copy, up to the sign of a zero), its map rows bags of four taps.
    pixels, dev = index.shape[0] // batch, x.device
    samples = torch.arange(batch, device=dev).unsqueeze(1)
    prefix = torch.arange(num_prefix_tokens, device=dev) + samples * tokens
    index = torch.cat((prefix, index.view(batch, -1)), dim=1).reshape(-1)
    weight = torch.cat((weight.new_ones(batch, num_prefix_tokens), weight.view(batch, -1)), dim=1).reshape(-1)
    starts = torch.cat((torch.arange(num_prefix_tokens, device=dev),
                        num_prefix_tokens + 4 * torch.arange(pixels, device=dev)))
    offsets = (starts + samples * (num_prefix_tokens + 4 * pixels)).reshape(-1)
    out = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)
    return out.view(batch, -1, chans)


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
            rows = x.to(sample_dtype).reshape(x.shape[0], height * width, x.shape[3])
            return sample_rows(rows, coords, height, width).view(x.shape).to(x.dtype)
        return sample_rows(x.to(sample_dtype), coords, height, width, num_prefix_tokens).to(x.dtype)
