"""Monotone scaling parameters and the warp map l they define.

Conventions (README, "Design"): coordinates are normalised to [0, 1] with align_corners=True, a point is (x, y).
A G x G DEC grid has knot tables of shape (B, 2, G+1, G+1):

* ``knots[:, 0, m, n]`` is the value of the row function l^{y_m} at x_n (row m, knot n),
* ``knots[:, 1, n, m]`` is the value of the column function l^{x_n} at y_m (column n, knot m).

Each row of each table increases from 0 to 1. The forward map l(x, y) = (l_X, l_Y) interpolates the row functions
linearly in y and the column functions linearly in x, which makes each of l_X and l_Y the bilinear interpolation of
its knot table. The inverse alternates exact 1D inverses of the row and column functions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "knots_from_logits", "identity_logits", "identity_knots", "check_knots", "apply_map", "apply_inverse_map",
    "pixel_coords", "dense_coords", "DEFAULT_INVERSE_SWEEPS", "SEGMENT_EPS",
]

DEFAULT_INVERSE_SWEEPS = 3
# A segment narrower than this is treated as collapsed when inverting; softmax knots in float32 can tie near 1.
SEGMENT_EPS = 1e-12
KNOT_ATOL = 1e-4


def knots_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Monotone knots from unconstrained logits.

    Args:
        logits: (B, 2, G+1, G) segment logits; channel 0 for the G+1 rows, channel 1 for the G+1 columns.

    Returns:
        (B, 2, G+1, G+1) knots: 0, then the cumulative softmax, ending exactly at 1. Zero logits give k/G.

    Example:
        >>> knots_from_logits(torch.zeros(1, 2, 5, 4))[0, 0, 0]
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
    """
    if logits.dim() != 4 or logits.shape[1] != 2 or logits.shape[2] != logits.shape[3] + 1:
        raise ValueError(f"logits must have shape (B, 2, G+1, G), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating point tensor, got {logits.dtype}")
    cum = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    cum = cum / cum[..., -1:]  # the last knot is exactly 1, whatever the rounding of the cumulative sum
    return F.pad(cum, (1, 0))


def identity_logits(
        batch: int,
        grid: int,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits of the identity warp: (batch, 2, grid+1, grid) zeros."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    return torch.zeros(batch, 2, grid + 1, grid, device=device, dtype=dtype)


def identity_knots(
        batch: int,
        grid: int,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Knots of the identity warp: (batch, 2, grid+1, grid+1) with knots[..., k] = k / grid."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    k = torch.linspace(0, 1, grid + 1, device=device, dtype=dtype)
    return k.expand(batch, 2, grid + 1, grid + 1).clone()


def check_knots(knots: torch.Tensor, batch: Optional[int] = None) -> int:
    """Raise ``ValueError`` unless ``knots`` is a valid (B, 2, G+1, G+1) knot table; return G.

    Valid: floating point, finite, first knot 0 and last knot 1 (within 1e-4), non-decreasing along the last dim.
    This reads the values, so on a GPU it synchronises; internal callers with knots from `knots_from_logits` skip it.
    """
    if not isinstance(knots, torch.Tensor):
        raise ValueError(f"knots must be a tensor, got {type(knots).__name__}")
    if knots.dim() != 4 or knots.shape[1] != 2 or knots.shape[2] != knots.shape[3] or knots.shape[3] < 2:
        raise ValueError(f"knots must have shape (B, 2, G+1, G+1) with G >= 1, got {tuple(knots.shape)}")
    if batch is not None and knots.shape[0] != batch:
        raise ValueError(f"knots batch size {knots.shape[0]} does not match the input's batch size {batch}")
    if not knots.is_floating_point():
        raise ValueError(f"knots must be a floating point tensor, got {knots.dtype}")
    k = knots.detach()
    if not bool(torch.isfinite(k).all()):
        raise ValueError("knots contain non-finite values (NaN or inf)")
    if bool((k[..., 0].abs() > KNOT_ATOL).any()) or bool(((k[..., -1] - 1).abs() > KNOT_ATOL).any()):
        raise ValueError("knots must start at 0 and end at 1 along the last dim")
    if bool((k.diff(dim=-1) < 0).any()):
        raise ValueError("knots must be increasing along the last dim")
    return knots.shape[-1] - 1


def _cell(t: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell index in [0, grid-1] (a float holding an integer: callers index with ``.long()`` or do index arithmetic
    in float) and fraction in [0, 1] of coordinates ``t`` in [0, 1]."""
    gt = t * grid
    idx = gt.detach().floor().clamp(0, grid - 1)
    return idx, gt - idx


def _gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table (B, R, K), idx (B, N) -> (B, N, K): row idx[b, i] of table[b].

    Rows of the flattened (B*R, K) table by `index_select` (contiguous rows): on the CPU a quarter faster than
    `torch.gather` along dim 1 with an expanded index, with the same values and gradients.
    """
    batch, rows, width = table.shape
    flat = (idx + torch.arange(batch, device=idx.device).unsqueeze(1) * rows).reshape(-1)
    return table.reshape(batch * rows, width).index_select(0, flat).view(batch, -1, width)


def _eval_pl(values: torch.Tensor, idx: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear function with per-point knot values (B, N, K) at cell idx / fraction frac (B, N)."""
    lo = values.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    hi = values.gather(-1, (idx + 1).unsqueeze(-1)).squeeze(-1)
    return lo + frac * (hi - lo)


def _lerped_at(flat: torch.Tensor, s: torch.Tensor, t: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """s * flat[index] + t * flat[index + width]: knot values of two adjacent rows, interpolated; all (B, N)."""
    return s * flat.gather(1, index) + t * flat[:, width:].gather(1, index)


def _count_inner(flat: torch.Tensor, s: torch.Tensor, t: torch.Tensor, rowf: torch.Tensor, target: torch.Tensor,
                 grid: int) -> torch.Tensor:
    """Number of inner knots k in 1..G-1 of the interpolated function with value <= target, as floats (B, N).

    The knot values s * T[m, k] + t * T[m+1, k] are non-decreasing in k (also after rounding), so a binary search
    finds the count with ceil(log2 G) probes instead of G-1 (each probe is two gathers). A probe past the last inner
    knot reads knot G and counts as a miss. ``rowf`` is the flat index of T[m, 0] as a float (exact, small).
    """
    width = grid + 1
    seg = torch.zeros_like(s)
    hit = torch.empty_like(s)
    step, reach = 1 << max((grid - 1).bit_length() - 1, 0), 0
    while grid > 1 and step:
        probe = seg + step
        beyond = reach + step > grid - 1  # can this probe pass the last inner knot?
        index = (rowf + (probe.clamp(max=grid) if beyond else probe)).long()
        torch.le(_lerped_at(flat, s, t, index, width), target, out=hit)  # a float 0/1 straight from the compare
        if beyond:
            hit *= probe <= grid - 1
        seg.add_(hit, alpha=step)
        step, reach = step >> 1, reach + step
    return seg


def _invert_lerped(table: torch.Tensor, other: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """One half-sweep of the inverse: solve f(c) = target for c, f the table's rows interpolated at ``other``.

    f is increasing and piecewise linear with knots at k/grid, so its inverse is exact: count the inner knots of f
    <= target (`_count_inner`), then interpolate in that segment. Each knot value of f is read straight from the
    flat table (``gather`` of the two bracketing rows) instead of gathering a (B, N, G+1) copy of every point's
    function; indices are formed in float (exact small integers) and converted once. The arithmetic and its
    rounding are those of the Triton kernel's ``_invert_at``.

    Args:
        table: (B, G+1, G+1) rows table (or columns table) of each sample.
        other: (B, N) the other coordinate, in [0, 1].
        target: (B, N) the value f must reach.
        grid: G.

    Returns:
        (B, N) c in [0, 1].
    """
    width = table.shape[-1]
    flat = table.reshape(table.shape[0], -1)  # (B, (G+1)^2); table[b, m + i, k] is flat[b, (m + i) * width + k]
    m, t = _cell(other, grid)
    s = 1 - t
    rowf = m * width  # flat index of table[b, m, 0], as a float
    with torch.no_grad():  # the segment index is piecewise constant: no gradient through the count
        seg = _count_inner(flat.detach(), s.detach(), t.detach(), rowf, target, grid)
        at = (rowf + seg).long()
    lo = _lerped_at(flat, s, t, at, width)
    hi = _lerped_at(flat[:, 1:], s, t, at, width)
    frac = ((target - lo) / (hi - lo).clamp_min(SEGMENT_EPS)).clamp(0, 1)
    return (seg + frac) / grid


def _invert_rows_on_grid(table: torch.Tensor, other: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """`_invert_lerped` for a pixel grid whose ``other`` depends on the row only and ``target`` on the column only.

    The interpolated function then belongs to the row: it is built once per row, (B, H, G+1), and inverted at every
    column's target by broadcasting. Values and rounding are those of `_invert_lerped` at the same points.

    Args:
        table: (B, G+1, G+1) rows table (or columns table) of each sample.
        other: (H,) the other coordinate of each row, in [0, 1].
        target: (W,) the value f must reach in each column.
        grid: G.

    Returns:
        (B, H, W) c in [0, 1].
    """
    m, t = _cell(other, grid)
    t = t.unsqueeze(-1)
    index = m.long()
    f = (1 - t) * table.index_select(1, index) + t * table.index_select(1, index + 1)  # (B, H, G+1)
    with torch.no_grad():
        f_d = f.detach()
        seg = torch.zeros(f.shape[0], f.shape[1], target.shape[0], dtype=f.dtype, device=f.device)
        hit = torch.empty_like(seg)
        for k in range(1, grid):
            seg += torch.le(f_d[..., k:k + 1], target, out=hit)
        at = seg.long()
    lo = f.gather(2, at)
    hi = f[..., 1:].gather(2, at)
    frac = ((target - lo) / (hi - lo).clamp_min(SEGMENT_EPS)).clamp(0, 1)
    return (seg + frac) / grid


def apply_map(knots: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Evaluate the forward warp l at points.

    Args:
        knots: (B, 2, G+1, G+1) knot tables.
        points: (B, N, 2) points (x, y) in [0, 1].

    Returns:
        (B, N, 2) l(points), in [0, 1].
    """
    grid = knots.shape[-1] - 1
    x, y = points.unbind(-1)
    n, s = _cell(x, grid)
    m, t = _cell(y, grid)
    n, m = n.long(), m.long()
    rows, cols = knots[:, 0], knots[:, 1]
    lx = (1 - t) * _eval_pl(_gather_rows(rows, m), n, s) + t * _eval_pl(_gather_rows(rows, m + 1), n, s)
    ly = (1 - s) * _eval_pl(_gather_rows(cols, n), m, t) + s * _eval_pl(_gather_rows(cols, n + 1), m, t)
    return torch.stack((lx, ly), dim=-1)


def apply_inverse_map(knots: torch.Tensor, points: torch.Tensor, sweeps: int = DEFAULT_INVERSE_SWEEPS) -> torch.Tensor:
    """Evaluate l^{-1} at points by alternating exact 1D inverses.

    Each sweep solves l_X(x, y) = q_x for x with y fixed (the row functions interpolated at y are one increasing
    piecewise-linear function of x), then l_Y(x, y) = q_y for y at the new x.

    Args:
        knots: (B, 2, G+1, G+1) knot tables.
        points: (B, N, 2) points q = (x, y) in [0, 1].
        sweeps: alternations; three reach ~0.6% round-trip error on moderate warps.

    Returns:
        (B, N, 2) approximately l^{-1}(points), in [0, 1].
    """
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    grid = knots.shape[-1] - 1
    rows, cols = knots[:, 0], knots[:, 1]
    qx, qy = points.unbind(-1)
    x = _invert_lerped(rows, qy, qx, grid)  # the first x from the row functions interpolated at y = qy
    return _sweeps_from(rows, cols, x, qx, qy, grid, sweeps)


def _sweeps_from(rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                 grid: int, sweeps: int) -> torch.Tensor:
    """The rest of `apply_inverse_map` after its first x half-sweep ``x`` (B, N): (B, N, 2) points (x, y)."""
    y = _invert_lerped(cols, x, qy, grid)  # y from the column functions interpolated at the new x
    for _ in range(sweeps - 1):
        x = _invert_lerped(rows, y, qx, grid)  # x from the row functions interpolated at the current y
        y = _invert_lerped(cols, x, qy, grid)
    return torch.stack((x, y), dim=-1)


def _axis_coords(size: int, device: Optional[torch.device | str], dtype: torch.dtype) -> torch.Tensor:
    """(size,) normalised coordinates of the pixels along one axis, align_corners=True; a size of 1 sits at 0."""
    return torch.arange(size, device=device, dtype=dtype) / max(size - 1, 1)


def pixel_coords(height: int, width: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H*W, 2) normalised coordinates (x, y) of the pixels of an H x W map, row-major; a size of 1 sits at 0."""
    gy, gx = torch.meshgrid(_axis_coords(height, device, dtype), _axis_coords(width, device, dtype), indexing="ij")
    return torch.stack((gx, gy), dim=-1).reshape(-1, 2)


def dense_coords(
        knots: torch.Tensor,
        height: int,
        width: int,
        inverse: bool = False,
        sweeps: int = DEFAULT_INVERSE_SWEEPS,
) -> torch.Tensor:
    """Source coordinate of every output pixel: l(p) (``inverse=False``) or l^{-1}(p).

    Args:
        knots: (B, 2, G+1, G+1) knot tables.
        height, width: output map size.
        inverse: sample at l^{-1}(p) (the action S) instead of l(p) (the action S^{-1}).

    Returns:
        (B, H, W, 2) normalised source coordinates (x, y), in the knots' dtype.
    """
    if not inverse:
        return _forward_pixel_coords(knots, height, width)
    return _inverse_pixel_coords(knots, height, width, sweeps)


def _resize_taps(size: int, grid: int, device: torch.device, dtype: torch.dtype,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knot indices i0, i1 (size,) and weights w0, w1 (size,) of output index i when G+1 knots are resized to
    ``size`` with align_corners=True: `F.interpolate`'s arithmetic, src = fl(G / (size-1)) * i (the Triton kernel's
    ``_resize_index``)."""
    scale = torch.full((), grid, device=device, dtype=dtype) / max(size - 1, 1)
    src = scale * torch.arange(size, device=device, dtype=dtype)
    lower = src.floor().clamp_(max=grid)
    lam1 = (src - lower).clamp_(0, 1)
    i0 = lower.long()
    return i0, i0 + (i0 < grid).long(), 1 - lam1, lam1


def _forward_pixel_coords(knots: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """l at the pixels of an H x W map, (B, H, W, 2): the bilinear resize of the two knot tables, done separably.

    l_X interpolates the rows table [y, x], l_Y the columns table transposed; both are resized along x to (G+1, W),
    then along y, with the rounding of the Triton kernel (lh0 * (lw0 * a + lw1 * b) + lh1 * (...)). Equal to
    `F.interpolate` up to float rounding; on the CPU about half its forward+backward cost at (64, 48 x 48).
    """
    grid = knots.shape[-1] - 1
    tables = torch.stack((knots[:, 0], knots[:, 1].transpose(-1, -2)), dim=-1)  # (B, G+1 [y], G+1 [x], 2)
    w0, w1, lw0, lw1 = _resize_taps(width, grid, knots.device, knots.dtype)
    h0, h1, lh0, lh1 = _resize_taps(height, grid, knots.device, knots.dtype)
    along_x = tables.index_select(2, w0) * lw0.unsqueeze(-1) + tables.index_select(2, w1) * lw1.unsqueeze(-1)
    # in place on fresh (B, H, W, 2) tensors: two allocations of the output's size instead of five
    out = along_x.index_select(1, h0).mul_(lh0.view(-1, 1, 1))
    return out.add_(along_x.index_select(1, h1).mul_(lh1.view(-1, 1, 1)))


def _inverse_pixel_coords(knots: torch.Tensor, height: int, width: int, sweeps: int) -> torch.Tensor:
    """`apply_inverse_map` at the pixels of an H x W map, (B, H, W, 2), with the same values.

    The first half-sweep starts from y = the pixel's row coordinate and solves for the column's x coordinate, so it
    is done per row (`_invert_rows_on_grid`); the later half-sweeps are per point.
    """
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    batch, grid = knots.shape[0], knots.shape[-1] - 1
    rows, cols = knots[:, 0], knots[:, 1]
    ys, xs = _axis_coords(height, knots.device, knots.dtype), _axis_coords(width, knots.device, knots.dtype)
    qx = xs.repeat(height).expand(batch, -1)  # (B, H*W), row-major like pixel_coords
    qy = ys.repeat_interleave(width).expand(batch, -1)
    x = _invert_rows_on_grid(rows, ys, xs, grid).reshape(batch, -1)
    return _sweeps_from(rows, cols, x, qx, qy, grid, sweeps).reshape(batch, height, width, 2)
