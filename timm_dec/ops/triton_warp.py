"""Fused Triton kernels of the monotone warp: source coordinates from the knots, bilinear sampling, and its backward.

One program handles one (sample, block of output pixels). It computes each pixel's source coordinate from the
(B, 2, G+1, G+1) knot table (the forward map l, or the alternating exact inverse l^{-1}), then loops over the
channels in blocks of ``BLOCK_C``, reading the four bilinear neighbours straight from ``x`` in its own layout
(nchw, nhwc or tokens, any strides) and writing the output in the same layout. No dense coordinate grid is built.

The backward kernel recomputes the coordinates, scatters ``grad_x`` with atomic adds into a float32 (float64 for
float64 inputs) buffer in the input's layout, and emits the gradient of the loss with respect to each pixel's
normalised source coordinate, (B, H, W, 2). PyTorch chains that through the small coordinate computation
(`dense_coords` under autograd) to get the gradient for the knots.

The arithmetic mirrors the reference (`monotone_warp_ref`) operation for operation, so that on and near the border,
where the gradient of border-clamped sampling is discontinuous, both take the same side: the forward map uses the
index and weight arithmetic of ``F.interpolate(mode="bilinear", align_corners=True)``, the inverse the same steps as
`apply_inverse_map`, and sampling the unnormalisation, clamping and weights of
``F.grid_sample(padding_mode="border", align_corners=True)``. Coordinates are computed in float32 (float64 for
float64 knots), never in half precision, whatever the input dtype or autocast state.

Importing this module imports Triton; ``import timm_dec`` does not import this module. On a machine without a GPU
the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - exercised in a subprocess with Triton hidden
    raise ImportError(
        "timm_dec.ops.triton_warp needs Triton (`pip install triton`, Linux with a CUDA GPU); "
        "use monotone_warp(..., backend='torch') or TIMM_DEC_WARP_BACKEND=torch for the PyTorch reference"
    ) from e

from .knots import DEFAULT_INVERSE_SWEEPS, SEGMENT_EPS, dense_coords
from .layout import LAYOUTS

__all__ = ["monotone_warp_triton", "MonotoneWarpFn", "interpreter_enabled"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1
_EPS = tl.constexpr(SEGMENT_EPS)


def interpreter_enabled() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``), where CPU tensors are accepted."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _div(a, b):
    """IEEE round-to-nearest division: float32 ``/`` lowers to the approximate div.full.f32 on NVIDIA GPUs."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _resize_index(i, size, G: tl.constexpr, COORD: tl.constexpr):
    """Knot indices and weights of output index ``i`` when G+1 knots are resized to ``size`` (align_corners=True).

    The arithmetic of ``F.interpolate``: source index = fl(G / (size-1)) * i, clamped to the last knot.
    """
    scale = _div(tl.full((), G, COORD), tl.maximum(size - 1, 1).to(COORD))  # a single pixel sits at 0
    src = scale * i.to(COORD)
    lower = tl.minimum(tl.floor(src), G)
    lam1 = tl.minimum(tl.maximum(src - lower, 0.0), 1.0)
    i0 = lower.to(tl.int32)
    i1 = i0 + (i0 < G).to(tl.int32)
    return i0, i1, 1.0 - lam1, lam1


@triton.jit
def _invert_at(table_ptr, other, target, G: tl.constexpr, KP: tl.constexpr):
    """One half-sweep of the inverse: solve f(c) = target, f = the table's rows interpolated at ``other``.

    ``table_ptr`` points at a (G+1, G+1) table (rows functions, or columns functions); ``other`` is the current value
    of the other coordinate. f is increasing and piecewise linear with knots at k/G, so its inverse is exact: count
    the inner knots <= target (one vectorised compare over a (pixels, KP >= G+1) tile) and interpolate in that
    segment. The steps and their rounding are those of `apply_inverse_map`.
    """
    g_other = other * G
    m = tl.minimum(tl.maximum(tl.floor(g_other), 0.0), G - 1)
    t = g_other - m
    lo_ptr = table_ptr + m.to(tl.int32) * (G + 1)
    hi_ptr = lo_ptr + (G + 1)
    k = tl.arange(0, KP)[None, :]
    inner = (k >= 1) & (k < G)
    tk = t[:, None]
    v = (1.0 - tk) * tl.load(lo_ptr[:, None] + k, mask=inner, other=0.0) \
        + tk * tl.load(hi_ptr[:, None] + k, mask=inner, other=0.0)
    seg = tl.sum(((v <= target[:, None]) & inner).to(tl.int32), axis=1)
    lo = (1.0 - t) * tl.load(lo_ptr + seg) + t * tl.load(hi_ptr + seg)
    hi = (1.0 - t) * tl.load(lo_ptr + seg + 1) + t * tl.load(hi_ptr + seg + 1)
    num = target - lo
    den = tl.maximum(hi - lo, _EPS)
    if target.dtype == tl.float32:  # _div inlined: nested calls are what the interpreter pays most for
        frac = tl.minimum(tl.maximum(tl.math.div_rn(num, den), 0.0), 1.0)
        res = tl.math.div_rn(seg.to(tl.float32) + frac, tl.full((), G, tl.float32))
    else:
        frac = tl.minimum(tl.maximum(num / den, 0.0), 1.0)
        res = (seg.to(target.dtype) + frac) / G
    return res


@triton.jit
def _source_coords(k_ptr, h, w, H, W, G: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr,
                   SWEEPS: tl.constexpr):
    """Normalised source coordinate (x, y) of output pixels (h, w): l(p), or l^{-1}(p) when ``INVERSE``.

    ``k_ptr`` points at one sample's (2, G+1, G+1) knots: rows table, then columns table.
    """
    COORD: tl.constexpr = k_ptr.dtype.element_ty
    KS: tl.constexpr = G + 1
    col_ptr = k_ptr + KS * KS
    if INVERSE:
        qx = _div(w.to(COORD), tl.maximum(W - 1, 1).to(COORD))
        qy = _div(h.to(COORD), tl.maximum(H - 1, 1).to(COORD))
        cx = qx
        cy = qy
        for _ in tl.static_range(SWEEPS):
            cx = _invert_at(k_ptr, cy, qx, G, KP)    # x from the row functions interpolated at the current y
            cy = _invert_at(col_ptr, cx, qy, G, KP)  # y from the column functions interpolated at the new x
    else:
        # l_X interpolates the rows table [y, x], l_Y the columns table transposed: T_Y[m, n] = cols[n, m].
        h0, h1, lh0, lh1 = _resize_index(h, H, G, COORD)
        w0, w1, lw0, lw1 = _resize_index(w, W, G, COORD)
        cx = (lh0 * (lw0 * tl.load(k_ptr + h0 * KS + w0) + lw1 * tl.load(k_ptr + h0 * KS + w1))
              + lh1 * (lw0 * tl.load(k_ptr + h1 * KS + w0) + lw1 * tl.load(k_ptr + h1 * KS + w1)))
        cy = (lh0 * (lw0 * tl.load(col_ptr + w0 * KS + h0) + lw1 * tl.load(col_ptr + w1 * KS + h0))
              + lh1 * (lw0 * tl.load(col_ptr + w0 * KS + h1) + lw1 * tl.load(col_ptr + w1 * KS + h1)))
    return cx, cy


@triton.jit
def _border_axis(c, size, ACC: tl.constexpr):
    """grid_sample(align_corners=True, padding_mode="border") along one axis for normalised coordinates ``c``.

    Returns the lower neighbour (int32), the weight of the upper one, and d(pixel coordinate)/d(grid coordinate),
    which is zero on and beyond the border as in PyTorch.
    """
    last = (size - 1).to(ACC)
    scale = last * 0.5
    pix = ((c.to(ACC) * 2.0 - 1.0) + 1.0) * scale  # the reference samples at grid = 2c - 1
    grad_mult = tl.where((pix > 0.0) & (pix < last), scale, 0.0)
    pix = tl.minimum(tl.maximum(pix, 0.0), last)
    lower = tl.floor(pix)
    return lower.to(tl.int32), pix - lower, grad_mult


@triton.jit
def _pixel_setup(k_ptr, b, pb, H, W, HW, G: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr,
                 SWEEPS: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, INDEX_64: tl.constexpr):
    """Pixels of block ``pb`` of sample ``b``, their bilinear neighbours and weights (shared by both kernels).

    Returns the pixel index p, row h and column w (int64 when ``INDEX_64``), the pixel mask, the neighbour rows
    y0, y1 and columns x0, x1 with the masks of the upper ones (e_ok, s_ok: inside the map), the weights of the
    upper neighbours (wx, wy) and the coordinate-gradient factors (gmx, gmy).
    """
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW  # HW is an argument, not H * W: when it is a multiple of 16 Triton knows the mask is too
    h = p // W
    w = p - h * W
    KS: tl.constexpr = G + 1
    cx, cy = _source_coords(k_ptr + b.to(tl.int64) * (2 * KS * KS), h, w, H, W, G, KP, INVERSE, SWEEPS)
    x0, wx, gmx = _border_axis(cx, W, ACC)
    y0, wy, gmy = _border_axis(cy, H, ACC)
    x1 = x0 + 1
    y1 = y0 + 1
    e_ok = pmask & (x1 < W)
    s_ok = pmask & (y1 < H)
    if INDEX_64:
        p = p.to(tl.int64)
        h = h.to(tl.int64)
        w = w.to(tl.int64)
        x0 = x0.to(tl.int64)
        x1 = x1.to(tl.int64)
        y0 = y0.to(tl.int64)
        y1 = y1.to(tl.int64)
    return p, h, w, pmask, x0, x1, y0, y1, e_ok, s_ok, wx, wy, gmx, gmy


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _warp_fwd_kernel(
        x_ptr, k_ptr, out_ptr,
        H, W, HW, C, num_pblocks,
        sx_b, sx_h, sx_w, sx_c,
        so_b, so_h, so_w, so_c,
        G: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, SWEEPS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INDEX_64: tl.constexpr, OUT_FLAT: tl.constexpr,
):
    """out[b, p, c] = bilinear sample of x[b, :, :, c] at the source coordinate of pixel p (layouts via strides)."""
    pid = tl.program_id(0)
    b = pid // num_pblocks
    pb = pid - b * num_pblocks
    p, h, w, pmask, x0, x1, y0, y1, e_ok, s_ok, wx, wy, gmx, gmy = _pixel_setup(
        k_ptr, b, pb, H, W, HW, G, KP, INVERSE, SWEEPS, ACC, BLOCK_P, INDEX_64)
    ex = 1.0 - wx
    ey = 1.0 - wy
    nw = (ey * ex)[:, None]
    ne = (ey * wx)[:, None]
    sw = (wy * ex)[:, None]
    se = (wy * wx)[:, None]
    off_nw = (y0 * sx_h + x0 * sx_w)[:, None]
    off_ne = (y0 * sx_h + x1 * sx_w)[:, None]
    off_sw = (y1 * sx_h + x0 * sx_w)[:, None]
    off_se = (y1 * sx_h + x1 * sx_w)[:, None]
    if OUT_FLAT:  # rows follow each other: the pixel index is contiguous, which lets stores vectorise along pixels
        off_o = (p * so_w)[:, None]
    else:
        off_o = (h * so_h + w * so_w)[:, None]
    x_b = x_ptr + b.to(tl.int64) * sx_b
    o_b = out_ptr + b.to(tl.int64) * so_b
    pm = pmask[:, None]
    em = e_ok[:, None]
    sm = s_ok[:, None]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = (c < C)[None, :]
        if INDEX_64:
            c = c.to(tl.int64)
        xc = (c * sx_c)[None, :]
        v_nw = tl.load(x_b + off_nw + xc, mask=pm & cm, other=0.0).to(ACC)
        v_ne = tl.load(x_b + off_ne + xc, mask=em & cm, other=0.0).to(ACC)
        v_sw = tl.load(x_b + off_sw + xc, mask=sm & cm, other=0.0).to(ACC)
        v_se = tl.load(x_b + off_se + xc, mask=em & sm & cm, other=0.0).to(ACC)
        out = v_nw * nw + v_ne * ne + v_sw * sw + v_se * se
        tl.store(o_b + off_o + (c * so_c)[None, :], out.to(out_ptr.dtype.element_ty), mask=pm & cm)


@triton.jit
def _warp_bwd_kernel(
        x_ptr, k_ptr, go_ptr, gx_ptr, gc_ptr,
        H, W, HW, C, num_pblocks,
        sx_b, sx_h, sx_w, sx_c,
        sg_b, sg_h, sg_w, sg_c,
        sgx_b, sgx_h, sgx_w, sgx_c,
        G: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, SWEEPS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INDEX_64: tl.constexpr,
        GO_FLAT: tl.constexpr, NEED_GRAD_X: tl.constexpr, NEED_GRAD_COORDS: tl.constexpr,
):
    """grad_x (atomic adds, in x's layout) and the (B, H*W, 2) gradient for the source coordinates."""
    pid = tl.program_id(0)
    b = pid // num_pblocks
    pb = pid - b * num_pblocks
    p, h, w, pmask, x0, x1, y0, y1, e_ok, s_ok, wx, wy, gmx, gmy = _pixel_setup(
        k_ptr, b, pb, H, W, HW, G, KP, INVERSE, SWEEPS, ACC, BLOCK_P, INDEX_64)
    ex = 1.0 - wx
    ey = 1.0 - wy
    if GO_FLAT:
        off_g = (p * sg_w)[:, None]
    else:
        off_g = (h * sg_h + w * sg_w)[:, None]
    g_b = go_ptr + b.to(tl.int64) * sg_b
    x_b = x_ptr + b.to(tl.int64) * sx_b
    gx_b = gx_ptr + b.to(tl.int64) * sgx_b
    pm = pmask[:, None]
    em = e_ok[:, None]
    sm = s_ok[:, None]
    acc_x = tl.zeros([BLOCK_P], ACC)
    acc_y = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = (c < C)[None, :]
        if INDEX_64:
            c = c.to(tl.int64)
        go = tl.load(g_b + off_g + (c * sg_c)[None, :], mask=pm & cm, other=0.0).to(ACC)
        if NEED_GRAD_X:
            gxc = (c * sgx_c)[None, :]
            tl.atomic_add(gx_b + (y0 * sgx_h + x0 * sgx_w)[:, None] + gxc, go * (ey * ex)[:, None],
                          mask=pm & cm, sem="relaxed")
            tl.atomic_add(gx_b + (y0 * sgx_h + x1 * sgx_w)[:, None] + gxc, go * (ey * wx)[:, None],
                          mask=em & cm, sem="relaxed")
            tl.atomic_add(gx_b + (y1 * sgx_h + x0 * sgx_w)[:, None] + gxc, go * (wy * ex)[:, None],
                          mask=sm & cm, sem="relaxed")
            tl.atomic_add(gx_b + (y1 * sgx_h + x1 * sgx_w)[:, None] + gxc, go * (wy * wx)[:, None],
                          mask=em & sm & cm, sem="relaxed")
        if NEED_GRAD_COORDS:
            xc = (c * sx_c)[None, :]
            v_nw = tl.load(x_b + (y0 * sx_h + x0 * sx_w)[:, None] + xc, mask=pm & cm, other=0.0).to(ACC)
            v_ne = tl.load(x_b + (y0 * sx_h + x1 * sx_w)[:, None] + xc, mask=em & cm, other=0.0).to(ACC)
            v_sw = tl.load(x_b + (y1 * sx_h + x0 * sx_w)[:, None] + xc, mask=sm & cm, other=0.0).to(ACC)
            v_se = tl.load(x_b + (y1 * sx_h + x1 * sx_w)[:, None] + xc, mask=em & sm & cm, other=0.0).to(ACC)
            acc_x += tl.sum(((v_ne - v_nw) * ey[:, None] + (v_se - v_sw) * wy[:, None]) * go, axis=1)
            acc_y += tl.sum(((v_sw - v_nw) * ex[:, None] + (v_se - v_ne) * wx[:, None]) * go, axis=1)
    if NEED_GRAD_COORDS:
        # d/d(grid) times d(grid)/d(coordinate) = 2, as the reference's grid = 2c - 1
        COORD: tl.constexpr = gc_ptr.dtype.element_ty
        gc_b = gc_ptr + b.to(tl.int64) * HW * 2 + p * 2
        tl.store(gc_b, (acc_x * gmx * 2.0).to(COORD), mask=pmask)
        tl.store(gc_b + 1, (acc_y * gmy * 2.0).to(COORD), mask=pmask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def _spatial_view(t: torch.Tensor, layout: str, height: int, width: int, num_prefix_tokens: int
                  ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The spatial part of ``t`` (a view, no copy) and its element strides (batch, row, column, channel)."""
    if layout == "nchw":
        return t, (t.stride(0), t.stride(2), t.stride(3), t.stride(1))
    if layout == "nhwc":
        return t, (t.stride(0), t.stride(1), t.stride(2), t.stride(3))
    spatial = t[:, num_prefix_tokens:]
    s_b, s_n, s_c = spatial.stride()
    return spatial, (s_b, width * s_n, s_n, s_c)


def _max_offset(strides: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """Largest element offset inside one sample, for the int32 / int64 decision."""
    return sum(abs(s) * (n - 1) for s, n in zip(strides, sizes))


def _launch_config(hw: int, channels: int, channel_contiguous: bool, backward: bool, wide: bool,
                   block_p: Optional[int], block_c: Optional[int]) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps).

    Channel-contiguous maps (nhwc, tokens, channels-last nchw) take channel tiles of 32-64 so that each thread moves
    16-byte vectors; channel-planar maps (nchw) gather along pixels, one address per element, so they take long
    pixel tiles of two channels; ``wide`` (float64 math) halves the tile. The sizes keep the kernels at 40-96
    registers with no spills (ptxas, sm_80 and sm_90; tests/_triton_check.py compiles them). The interpreter pays
    per program and per operation, not per element, so it gets one block per sample.
    """
    if interpreter_enabled():
        bp, bc = min(triton.next_power_of_2(hw), 1024), min(triton.next_power_of_2(channels), 64)
    elif channel_contiguous:
        top = 32 if wide else 64
        bc = top if channels % top == 0 else 32 if channels % 32 == 0 else min(triton.next_power_of_2(channels), top)
        tile = (512 if backward else 1024) // (2 if wide else 1)
        bp = min(max(tile // bc, 8), max(triton.next_power_of_2(hw), 8))
    else:
        bc = min(triton.next_power_of_2(channels), 2)
        bp = min(64 if wide else 128, max(triton.next_power_of_2(hw), 16))
    bp = block_p if block_p is not None else bp
    bc = block_c if block_c is not None else bc
    for name, v in (("block_p", bp), ("block_c", bc)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    return bp, bc, 4


def _check_inputs(x: torch.Tensor, knots: torch.Tensor) -> None:
    """What the Triton path needs beyond `monotone_warp`'s checks: its devices and dtypes (no device sync)."""
    if x.device.type != "cuda" and not (interpreter_enabled() and x.device.type == "cpu"):
        raise ValueError(
            f"the Triton warp needs CUDA tensors, got x on {x.device} (CPU tensors only run under "
            f"TRITON_INTERPRET=1); use backend='torch' for the PyTorch reference")
    if knots.device != x.device:
        raise ValueError(f"knots are on {knots.device} but x is on {x.device}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64 for the Triton warp, got {x.dtype}")
    if not knots.is_floating_point():
        raise ValueError(f"knots must be a floating point tensor, got {knots.dtype}")


def _check_shapes(x: torch.Tensor, knots: torch.Tensor, layout: str, height: int, width: int,
                  num_prefix_tokens: int, sweeps: int) -> None:
    """The shape checks of a direct call (`monotone_warp` runs its own and passes ``check=False``)."""
    if not isinstance(x, torch.Tensor) or not isinstance(knots, torch.Tensor):
        raise TypeError("x and knots must be tensors")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if knots.dim() != 4 or knots.shape[1] != 2 or knots.shape[2] != knots.shape[3] or knots.shape[3] < 2:
        raise ValueError(f"knots must have shape (B, 2, G+1, G+1) with G >= 1, got {tuple(knots.shape)}")
    expected = {
        "nchw": (knots.shape[0], None, height, width),
        "nhwc": (knots.shape[0], height, width, None),
        "tokens": (knots.shape[0], num_prefix_tokens + height * width, None),
    }[layout]
    if x.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, x.shape)):
        raise ValueError(
            f"x of shape {tuple(x.shape)} does not fit layout {layout!r} with (H, W) = {(height, width)}, "
            f"{num_prefix_tokens} prefix tokens and knots for batch {knots.shape[0]}")
    if num_prefix_tokens < 0 or (num_prefix_tokens and layout != "tokens"):
        raise ValueError(f"num_prefix_tokens must be >= 0 and is only for layout 'tokens', got {num_prefix_tokens}")
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _meta(coord_knots: torch.Tensor, inverse: bool, sweeps: int, wide: bool) -> dict:
    """Compile-time parameters shared by both kernels."""
    knots_per_row = coord_knots.shape[-1]
    return dict(G=knots_per_row - 1, KP=triton.next_power_of_2(knots_per_row), INVERSE=bool(inverse),
                SWEEPS=int(sweeps), ACC=tl.float64 if wide else tl.float32)


def _warp_forward(x: torch.Tensor, coord_knots: torch.Tensor, inverse: bool, layout: str, height: int, width: int,
                  num_prefix_tokens: int, sweeps: int, block_p: Optional[int], block_c: Optional[int]) -> torch.Tensor:
    """Launch the forward kernel; ``coord_knots`` is contiguous, float32 or float64."""
    out = torch.empty_like(x)
    if layout == "tokens" and num_prefix_tokens:
        out[:, :num_prefix_tokens].copy_(x[:, :num_prefix_tokens])
    batch, channels, hw = x.shape[0], x.shape[1 if layout == "nchw" else -1], height * width
    if batch == 0 or channels == 0 or hw == 0:
        return out
    xs, sx = _spatial_view(x, layout, height, width, num_prefix_tokens)
    os_, so = _spatial_view(out, layout, height, width, num_prefix_tokens)
    sizes = (1, height, width, channels)
    index_64 = max(_max_offset(sx, sizes), _max_offset(so, sizes)) > _INT32_MAX
    wide = torch.float64 in (x.dtype, coord_knots.dtype)
    bp, bc, warps = _launch_config(hw, channels, sx[3] == 1, False, wide, block_p, block_c)
    num_pblocks = triton.cdiv(hw, bp)
    with _device_guard(x):
        _warp_fwd_kernel[(batch * num_pblocks,)](
            xs, coord_knots, os_, height, width, hw, channels, num_pblocks, *sx, *so,
            **_meta(coord_knots, inverse, sweeps, wide), BLOCK_P=bp, BLOCK_C=bc, INDEX_64=index_64,
            OUT_FLAT=so[1] == width * so[2], num_warps=warps,
        )
    return out


def _warp_backward(x: torch.Tensor, coord_knots: torch.Tensor, grad_out: torch.Tensor, inverse: bool, layout: str,
                   height: int, width: int, num_prefix_tokens: int, sweeps: int, need_grad_x: bool,
                   need_grad_coords: bool, block_p: Optional[int], block_c: Optional[int]
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel: (grad_x in x's dtype and layout, (B, H, W, 2) coordinate gradient)."""
    batch, channels, hw = x.shape[0], x.shape[1 if layout == "nchw" else -1], height * width
    wide = torch.float64 in (x.dtype, coord_knots.dtype)
    launch = (need_grad_x or need_grad_coords) and batch > 0 and channels > 0 and hw > 0
    grad_x = grad_coords = None
    if need_grad_x:  # accumulated in float32 (float64): half-precision atomics would lose the small contributions
        grad_x = torch.zeros_like(x, dtype=torch.float64 if wide else torch.float32)
        if layout == "tokens" and num_prefix_tokens:
            grad_x[:, :num_prefix_tokens].copy_(grad_out[:, :num_prefix_tokens])
    if need_grad_coords:
        alloc = torch.empty if launch else torch.zeros  # the kernel writes every pixel
        grad_coords = alloc(batch, height, width, 2, device=x.device, dtype=coord_knots.dtype)
    if launch:
        xs, sx = _spatial_view(x, layout, height, width, num_prefix_tokens)
        gs, sg = _spatial_view(grad_out, layout, height, width, num_prefix_tokens)
        gxs, sgx = _spatial_view(grad_x, layout, height, width, num_prefix_tokens) if need_grad_x else (xs, sx)
        sizes = (1, height, width, channels)
        index_64 = max(_max_offset(s, sizes) for s in (sx, sg, sgx)) > _INT32_MAX
        bp, bc, warps = _launch_config(hw, channels, sx[3] == 1, True, wide, block_p, block_c)
        num_pblocks = triton.cdiv(hw, bp)
        with _device_guard(x):
            _warp_bwd_kernel[(batch * num_pblocks,)](
                xs, coord_knots, gs, gxs, grad_coords if need_grad_coords else coord_knots,
                height, width, hw, channels, num_pblocks, *sx, *sg, *sgx,
                **_meta(coord_knots, inverse, sweeps, wide), BLOCK_P=bp, BLOCK_C=bc, INDEX_64=index_64,
                GO_FLAT=sg[1] == width * sg[2], NEED_GRAD_X=need_grad_x, NEED_GRAD_COORDS=need_grad_coords,
                num_warps=warps,
            )
    if grad_x is not None and grad_x.dtype != x.dtype:
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_coords


class MonotoneWarpFn(torch.autograd.Function):
    """Autograd wrapper of the fused warp; sampling, grad_x and the coordinate gradient run in Triton kernels."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, knots: torch.Tensor, inverse: bool, layout: str, height: int,
                width: int, num_prefix_tokens: int, sweeps: int, block_p: Optional[int], block_c: Optional[int]
                ) -> torch.Tensor:
        coord_knots = knots.detach().to(torch.promote_types(knots.dtype, torch.float32)).contiguous()
        out = _warp_forward(x.detach(), coord_knots, inverse, layout, height, width, num_prefix_tokens, sweeps,
                            block_p, block_c)
        ctx.save_for_backward(x, knots, coord_knots)
        ctx.config = (inverse, layout, height, width, num_prefix_tokens, sweeps, block_p, block_c)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, knots, coord_knots = ctx.saved_tensors
        inverse, layout, height, width, num_prefix_tokens, sweeps, block_p, block_c = ctx.config
        need_x, need_knots = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_coords = _warp_backward(
            x.detach(), coord_knots, grad_out, inverse, layout, height, width, num_prefix_tokens, sweeps,
            need_x, need_knots, block_p, block_c)
        grad_knots = None
        if need_knots:
            # Chain the per-pixel coordinate gradient through the small coordinate computation.
            with torch.enable_grad(), torch.autocast(device_type=knots.device.type, enabled=False):
                k = knots.detach().requires_grad_(True)
                coords = dense_coords(k.to(coord_knots.dtype), height, width, inverse=inverse, sweeps=sweeps)
                (grad_knots,) = torch.autograd.grad(coords, k, grad_coords)
        return grad_x, grad_knots, None, None, None, None, None, None, None, None


def monotone_warp_triton(
        x: torch.Tensor,
        knots: torch.Tensor,
        inverse: bool,
        layout: str,
        height: int,
        width: int,
        num_prefix_tokens: int = 0,
        sweeps: int = DEFAULT_INVERSE_SWEEPS,
        *,
        block_p: Optional[int] = None,
        block_c: Optional[int] = None,
        check: bool = True,
) -> torch.Tensor:
    """Fused Triton warp; the same contract and results as `monotone_warp_ref`, differentiable in ``x`` and ``knots``.

    Args:
        x: (B, C, H, W) for ``"nchw"``, (B, H, W, C) for ``"nhwc"``, (B, P + H*W, C) for ``"tokens"``; any strides;
            float16, bfloat16, float32 or float64; CUDA (CPU only under ``TRITON_INTERPRET=1``).
        knots: (B, 2, G+1, G+1) knot tables (shapes and values already checked, as `monotone_warp` does, or
            straight from `knots_from_logits`).
        inverse: sample at l^{-1}(p) (the action S) instead of l(p) (S^{-1}).
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"``.
        height, width: H, W of the map.
        num_prefix_tokens: P leading tokens copied through unchanged (``"tokens"`` only).
        sweeps: alternations of the 2D inverse.
        block_p, block_c: override the pixel / channel tile (powers of two), for tests and tuning.
        check: check the layout and shapes (`monotone_warp`, which checks them itself, passes False); the devices
            and dtypes are always checked.

    Returns:
        The warped map: shape, layout, dtype and device of ``x``. Coordinates are computed in float32 (float64 for
        float64 knots) and samples in float32 (float64 for float64 inputs). ``grad_x`` is accumulated with atomic
        adds, so on a GPU its last bits can vary from run to run.
    """
    if check:
        _check_shapes(x, knots, layout, height, width, num_prefix_tokens, sweeps)
    _check_inputs(x, knots)
    return MonotoneWarpFn.apply(x, knots, bool(inverse), layout, int(height), int(width), int(num_prefix_tokens),
                                int(sweeps), block_p, block_c)
