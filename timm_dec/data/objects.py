"""Object rescaling, steps (e)-(f) of paper Sec. 5.3: `rescale_object` scales a masked object about its centre and
pastes it onto an inpainted background, for users who bring their own masks and inpainting.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._argcheck import check_float

__all__ = ["rescale_object"]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, H, W) with edge replication."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def rescale_object(
        image: torch.Tensor,
        mask: torch.Tensor,
        background: torch.Tensor,
        factor: float,
        *,
        feather: float = 1.0,
        center: str = "centroid",
) -> torch.Tensor:
    """Scale the masked object about its centre and paste it onto an inpainted background (paper 5.3, (e)-(f)).

    Output pixel p takes the object at ``c + (p - c) / factor`` (bilinear, align_corners=True pixel grid), the mask
    is moved the same way (zero outside the image), softened by a Gaussian of std ``feather`` pixels, and used as
    alpha: ``out = alpha * object + (1 - alpha) * background``. With ``factor=1`` and ``feather=0`` the object pixels
    are pasted unchanged.

    Args:
        image: (C, H, W) float image holding the object.
        mask: (H, W) bool or float mask of the object, values in [0, 1].
        background: (C, H, W) float image with the object inpainted away.
        factor: scale factor > 0 (> 1 enlarges).
        feather: std in pixels of the mask's Gaussian softening; 0 keeps the (resampled) mask's edge.
        center: ``"centroid"`` (the mask's centre of mass) or ``"bbox"`` (the centre of its bounding box).

    Returns:
        (C, H, W) locally scaled image, in ``image.dtype``.

    Example:
        >>> img, bg = torch.rand(3, 32, 32), torch.zeros(3, 32, 32)
        >>> mask = torch.zeros(32, 32, dtype=torch.bool); mask[8:16, 8:16] = True
        >>> rescale_object(img, mask, bg, 1.5).shape
        torch.Size([3, 32, 32])
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        got = f"{getattr(image, 'dtype', type(image).__name__)} of shape {tuple(getattr(image, 'shape', ()))}"
        raise ValueError(f"image must be a (C, H, W) floating point tensor, got {got}")
    if not isinstance(background, torch.Tensor) or not background.is_floating_point():
        raise ValueError("background must be a floating point tensor")
    if background.shape != image.shape:
        raise ValueError(f"background shape {tuple(background.shape)} does not match image shape {tuple(image.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    height, width = image.shape[1:]
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the image's (H, W) = {(height, width)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool or float with values in [0, 1], got {mask.dtype}")
    if mask.device != image.device or background.device != image.device:
        raise ValueError("image, mask and background must be on the same device")
    factor = check_float("factor", factor, strict=True)
    feather = check_float("feather", feather)
    if center not in ("centroid", "bbox"):
        raise ValueError(f"center must be 'centroid' or 'bbox', got {center!r}")
    dtype = torch.promote_types(image.dtype, torch.float32)
    alpha = mask.to(dtype)
    if mask.is_floating_point() and not bool(((alpha >= 0) & (alpha <= 1)).all()):
        raise ValueError("mask values must lie in [0, 1] (and not be NaN)")
    total = alpha.sum()
    if not bool(total > 0):
        raise ValueError("mask is empty: there is no object to rescale")
    ys = torch.arange(height, dtype=dtype, device=image.device)
    xs = torch.arange(width, dtype=dtype, device=image.device)
    if center == "centroid":
        cy, cx = (alpha.sum(1) * ys).sum() / total, (alpha.sum(0) * xs).sum() / total
    else:
        rows, cols = (alpha > 0).any(1).nonzero().squeeze(1), (alpha > 0).any(0).nonzero().squeeze(1)
        cy, cx = (rows[0] + rows[-1]).to(dtype) / 2, (cols[0] + cols[-1]).to(dtype) / 2
    obj, alpha = image.to(dtype)[None], alpha[None, None]
    if factor != 1:
        src_x = (cx + (xs - cx) / factor) * 2 / max(width - 1, 1) - 1
        src_y = (cy + (ys - cy) / factor) * 2 / max(height - 1, 1) - 1
        gy, gx = torch.meshgrid(src_y, src_x, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1)[None]
        obj = F.grid_sample(obj, grid, mode="bilinear", padding_mode="border", align_corners=True)
        alpha = F.grid_sample(alpha, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if feather > 0:
        alpha = _gaussian_blur(alpha, feather)
    out = alpha[0] * obj[0] + (1 - alpha[0]) * background.to(dtype)
    return out.to(image.dtype)
