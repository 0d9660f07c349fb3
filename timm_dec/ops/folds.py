"""Folds of the monotone warp: the Jacobian determinant of l, and a guard that keeps it positive.

Why corners suffice. Inside a cell [x_n, x_{n+1}] x [y_m, y_{m+1}] with fractions (s, t), l_X is the bilinear
interpolation of the row table and l_Y of the column table (`timm_dec.ops.knots`), so

    dl_X/dx = G [(1-t) w0[m, n] + t w0[m+1, n]]              linear in t only
    dl_X/dy = G [(1-s) dK0[m, n] + s dK0[m, n+1]]            linear in s only
    dl_Y/dx = G [(1-t) dK1[n, m] + t dK1[n, m+1]]            linear in t only
    dl_Y/dy = G [(1-s) w1[n, m] + s w1[n+1, m]]              linear in s only

with w0[r, n] = K0[r, n+1] - K0[r, n] (row r's segment n), dK0[m, q] = K0[m+1, q] - K0[m, q] (the change of knot q
between rows m and m+1), and w1, dK1 likewise for the column table. det J = (dl_X/dx)(dl_Y/dy) - (dl_X/dy)(dl_Y/dx)
is a sum of products of a function of t and a function of s, i.e. bilinear in (s, t): its minimum over the cell is
at one of the four corners. So the warp is fold-free (det J > 0 everywhere) iff det J > 0 at the 4 G^2 cell corners,
each evaluated with its cell's one-sided slopes; `jacobian_det_corners` computes them exactly.

The guard. Blending the knots toward the identity, K_lam = I + lam (K - I), scales every slope difference by lam
(the identity has w = 1/G and dK = 0), so at a corner det J(lam) = 1 + lam c1 + lam^2 c2 is a quadratic with
det J(0) = 1. The largest lam in [0, 1] that keeps det J >= ``min_det`` at every corner is the smallest positive root
of det J(lam) = min_det over the corners (capped at 1), found in closed form; warps that do not come within
``min_det`` of folding are returned unchanged (lam = 1).
"""
from __future__ import annotations

import torch

from .knots import apply_inverse_map, apply_map

__all__ = ["jacobian_det_corners", "min_jacobian_det", "fold_free_knots", "local_magnification"]


def _slopes(knots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four slope factors at the cell corners, each (B, G, G, 2): indices [m, n, corner along t or s]; views of
    the knots' differences (``unfold`` pairs neighbours without copying)."""
    k0, k1 = knots[:, 0], knots[:, 1]
    w0, w1 = k0.diff(dim=-1), k1.diff(dim=-1)        # (B, G+1, G): [row r, segment n], [column q, segment m]
    dk0, dk1 = k0.diff(dim=-2), k1.diff(dim=-2)      # (B, G, G+1): [segment m, knot q], [segment n, knot r]
    a = w0.unfold(1, 2, 1)                           # [m, n, t] = w0[m + t, n]
    d = w1.unfold(1, 2, 1).transpose(1, 2)           # [m, n, s] = w1[n + s, m]
    b = dk0.unfold(2, 2, 1)                          # [m, n, s] = dK0[m, n + s]
    c = dk1.unfold(2, 2, 1).transpose(1, 2)          # [m, n, t] = dK1[n, m + t]
    return a, b, c, d


def jacobian_det_corners(knots: torch.Tensor) -> torch.Tensor:
    """det J of the forward map l at every cell corner, in normalised coordinates (the identity gives 1).

    Args:
        knots: (B, 2, G+1, G+1) knot tables.

    Returns:
        (B, G, G, 2, 2) det J at [cell row m, cell column n, corner t, corner s].
    """
    grid = knots.shape[-1] - 1
    a, b, c, d = _slopes(knots)
    det = a[..., :, None] * d[..., None, :] - c[..., :, None] * b[..., None, :]
    return det * grid ** 2


def min_jacobian_det(knots: torch.Tensor) -> torch.Tensor:
    """(B,) the smallest det J of the warp anywhere in [0, 1]^2 (exact: the minimum over the cell corners)."""
    return jacobian_det_corners(knots).flatten(1).amin(dim=1)


def _first_crossing(c0: float, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """Smallest positive root of c2 u^2 + c1 u + c0 (c0 > 0), +inf where there is none; no host reads.

    With c0 > 0 every positive root is 2 c0 / (sqrt(c1^2 - 4 c2 c0) - c1) (the cancellation-free form): for c2 < 0
    the one positive root, for c2 > 0 and c1 < 0 the smaller of two, for c2 = 0 the root -c0 / c1 of the line. A
    denominator <= 0 (both roots negative, or none for c2 = 0) or NaN (complex roots) means no positive root.
    """
    denom = torch.sqrt(c1 * c1 - (4 * c0) * c2) - c1
    return torch.where(denom > 0, (2 * c0) / denom, torch.inf)


def fold_free_knots(knots: torch.Tensor, min_det: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each sample's knots toward the identity just enough that det J >= ``min_det`` everywhere.

    The blend factor is computed without gradient (it is a safeguard, not a learned quantity): gradients reach the
    knots scaled by it. At ``lam = 1`` the knots are returned bit for bit.

    Args:
        knots: (B, 2, G+1, G+1) knot tables.
        min_det: the smallest det J allowed, in (0, 1).

    Returns:
        ``(guarded, lam)``: (B, 2, G+1, G+1) knots whose warp has det J >= ``min_det`` at every point, and (B,) the
        blend factor of each sample (1 where no guard was needed).
    """
    if not 0 < min_det < 1:
        raise ValueError(f"min_det must be in (0, 1), got {min_det}")
    grid = knots.shape[-1] - 1
    with torch.no_grad():
        a, b, c, d = _slopes(knots.double())
        a1, d1 = grid * a - 1, grid * d - 1   # slope excess over the identity's, normalised
        c1 = a1[..., :, None] + d1[..., None, :]
        c2 = a1[..., :, None] * d1[..., None, :] - grid ** 2 * c[..., :, None] * b[..., None, :]
        lam = _first_crossing(1.0 - min_det, c1, c2).flatten(1).amin(dim=1).clamp(max=1.0).to(knots.dtype)
    identity = torch.linspace(0, 1, grid + 1, device=knots.device, dtype=knots.dtype)
    blended = identity + lam.view(-1, 1, 1, 1) * (knots - identity)
    guarded = torch.where((lam < 1).view(-1, 1, 1, 1), blended, knots)
    return guarded, lam


def local_magnification(knots: torch.Tensor, points: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """How much canonicalising enlarges the input around each input point: 1 / sqrt(det J_l) at l^{-1}(points).

    S^{-1}(F)(p) = F(l(p)), so content at input point q appears at p = l^{-1}(q), scaled by 1 / det J_l(p) in area.
    det J is taken by central differences (``eps``) in float64.

    Args:
        knots: (B, 2, G+1, G+1) knot tables.
        points: (B, N, 2) input points (x, y) in [0, 1].

    Returns:
        (B, N) float64 linear magnifications (> 1 where the canonical map enlarges the input).
    """
    knots, points = knots.double(), points.double()
    p = apply_inverse_map(knots, points, sweeps=10).clamp(eps, 1 - eps)
    ex = torch.tensor([eps, 0.0], dtype=torch.float64, device=p.device)
    ey = torch.tensor([0.0, eps], dtype=torch.float64, device=p.device)
    jx = (apply_map(knots, p + ex) - apply_map(knots, p - ex)) / (2 * eps)
    jy = (apply_map(knots, p + ey) - apply_map(knots, p - ey)) / (2 * eps)
    det = jx[..., 0] * jy[..., 1] - jy[..., 0] * jx[..., 1]
    return det.clamp_min(1e-12).rsqrt()
