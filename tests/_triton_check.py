"""Checks of the fused Triton warp that must run in a fresh interpreter; driven by tests/test_warp_triton.py.

``python tests/_triton_check.py GROUP [GROUP ...]`` runs the groups in one process (importing timm_dec costs
seconds) and prints one JSON line of measured figures; it exits non-zero (with the traceback) when a check fails.

* ``reference`` and ``details`` need ``TRITON_INTERPRET=1`` in the environment before Triton is imported: the kernels
  then run on CPU tensors in Triton's interpreter and are compared with the PyTorch reference.
* ``errors`` and ``compile`` need the interpreter off: the first checks that CPU tensors are refused, the second
  compiles the kernels, specialised exactly as the launcher would launch them, for sm_90 and sm_80 and reads the
  register use, spills and vector loads off ptxas and the PTX (no GPU needed).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional

import numpy as np
import torch

from timm_dec.ops import LAYOUTS, identity_knots, knots_from_logits, monotone_warp, monotone_warp_ref

RTOL = 1e-4
STATS: dict[str, float] = {}


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------

def _shape(layout: str, b: int, c: int, h: int, w: int, p: int) -> tuple[int, ...]:
    return {"nchw": (b, c, h, w), "nhwc": (b, h, w, c), "tokens": (b, p + h * w, c)}[layout]


def _record(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Keep the largest absolute error and the largest error relative to the reference's scale."""
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    STATS[f"{name}_max_abs"] = max(STATS.get(f"{name}_max_abs", 0.0), err)
    STATS[f"{name}_max_rel"] = max(STATS.get(f"{name}_max_rel", 0.0), err / scale if scale else 0.0)


def _assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    """rtol with a matching atol: rtol times the reference's mean magnitude."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (name, got.shape, ref.shape, got.dtype, ref.dtype)
    _record(name, got, ref)
    atol = rtol * ref.double().abs().mean().item() if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _border_exact(grid: int, size: int) -> bool:
    """Whether F.interpolate (the reference's forward map) lands exactly on the last knot at the last pixel.

    Its source index is fl(fl(G / (size-1)) * (size-1)); when that is not G the reference samples a hair inside the
    border, where border-clamped sampling has a different one-sided gradient than exactly on it. The kernel uses the
    same index arithmetic, but the last rounding of the interpolated value can differ, so for such sizes the
    gradient for the last knot (which `knots_from_logits` pins to 1) is a matter of one ulp on either side.
    """
    if size == 1:
        return True
    scale = np.float32(grid) / np.float32(size - 1)
    return bool(np.float32(scale * np.float32(size - 1)) == np.float32(grid))


def _run_both(x: torch.Tensor, knots: torch.Tensor, inverse: bool, layout: str, h: int, w: int, p: int,
              g: torch.Tensor, sweeps: int = 3, **blocks: Any):
    """Output, grad_x and grad_knots of the Triton kernel and of the reference, for the same upstream gradient."""
    from timm_dec.ops.triton_warp import monotone_warp_triton

    results = []
    for fn in (lambda a, k: monotone_warp_triton(a, k, inverse, layout, h, w, p, sweeps, **blocks),
               lambda a, k: monotone_warp_ref(a, k, inverse, layout, h, w, p, sweeps)):
        a = x.detach().requires_grad_(x.requires_grad)  # detach, not clone: keep the strides under test
        k = knots.detach().requires_grad_(knots.requires_grad)
        out = fn(a, k)
        inputs = [t for t in (a, k) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, inputs, g) if inputs else ())
        results.append((out.detach(), next(grads) if a.requires_grad else None,
                        next(grads) if k.requires_grad else None))
    return results


def _logits_grad(logits: torch.Tensor, grad_knots: torch.Tensor) -> torch.Tensor:
    leaf = logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(knots_from_logits(leaf), leaf, grad_knots)
    return grad


# ------------------------------------------------------------------------------------------------------------------
# group "reference": hypothesis-drawn shapes, forward and both gradients (interpreter)
# ------------------------------------------------------------------------------------------------------------------

def check_reference(max_examples: int) -> None:
    """Every layout and direction, shapes drawn by hypothesis: B, C, H, W, G in 1..16, P in 0..5."""
    import dataclasses

    from triton.runtime import interpreter

    # The interpreter's int32 overflow sanitiser costs a third of the run; these maps are far from 2^31 elements,
    # and the "details" group runs with it on (and on the int64 path). The interpreter reads the options of its one
    # builder instance, made at import (setting the dataclass's default afterwards changes nothing).
    builder = interpreter.interpreter_builder
    saved = builder.options
    builder.options = dataclasses.replace(saved, sanitize_overflow=False)
    try:
        _check_reference(max_examples)
    finally:
        builder.options = saved


def _check_reference(max_examples: int) -> None:
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    combos = [(layout, inverse) for layout in LAYOUTS for inverse in (False, True)]
    for i, (layout, inverse) in enumerate(combos):
        @seed(i)  # reproducible, and different draws for each combination
        @settings(max_examples=-(-max_examples // len(combos)), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(b=st.integers(1, 16), c=st.integers(1, 16), h=st.integers(1, 16), w=st.integers(1, 16),
               grid=st.integers(1, 16), p=st.integers(0, 5), split=st.booleans(), data_seed=st.integers(0, 2**31 - 1))
        def run(b, c, h, w, grid, p, split, data_seed):
            _check_one(layout, inverse, b, c, h, w, grid, p if layout == "tokens" else 0, split, data_seed)

        run()


def _check_one(layout: str, inverse: bool, b: int, c: int, h: int, w: int, grid: int, p: int, split: bool,
               data_seed: int) -> None:
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(_shape(layout, b, c, h, w, p), generator=gen).requires_grad_(True)
    logits = 0.5 * torch.randn(b, 2, grid + 1, grid, generator=gen)
    knots = knots_from_logits(logits).requires_grad_(True)
    g = torch.randn(x.shape, generator=gen)
    # split: tiles of half the map and half the channels, so that the masks and the channel loop are exercised
    blocks = dict(block_p=max(1 << max((h * w - 1).bit_length() - 1, 0), 1),
                  block_c=max(1 << max((c - 1).bit_length() - 1, 0), 1)) if split else {}
    (out, gx, gk), (out_r, gx_r, gk_r) = _run_both(x, knots, inverse, layout, h, w, p, g, **blocks)
    _assert_close("forward", out, out_r)
    _assert_close("grad_x", gx, gx_r)
    if inverse or grid > 1:
        # G = 1 forward is the identity whatever the logits: every source point is a pixel centre, where the
        # coordinate gradient of bilinear sampling is one-sided and the side is a matter of rounding.
        last = None if inverse or (_border_exact(grid, h) and _border_exact(grid, w)) else -1
        _assert_close("grad_knots", gk[..., :last], gk_r[..., :last])
        _assert_close("grad_logits", _logits_grad(logits, gk), _logits_grad(logits, gk_r))
    if p:
        assert torch.equal(out[:, :p], x[:, :p].detach()) and torch.equal(gx[:, :p], g[:, :p])
    STATS["examples"] = STATS.get("examples", 0) + 1


# ------------------------------------------------------------------------------------------------------------------
# group "details": dtypes, prefix tokens, strides, identity, dispatch, edge cases (interpreter)
# ------------------------------------------------------------------------------------------------------------------

def _inputs(layout: str, b=2, c=6, h=5, w=7, grid=4, p=0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(_shape(layout, b, c, h, w, p), generator=gen).to(dtype)
    knots = knots_from_logits(0.5 * torch.randn(b, 2, grid + 1, grid, generator=gen))
    return x, knots, torch.randn(x.shape, generator=gen).to(dtype)


def check_half_precision() -> None:
    """fp16/bf16 in, same dtype out; error vs an fp32 reference at most 2x the PyTorch reference's own."""
    from timm_dec.ops.triton_warp import monotone_warp_triton

    for dtype in (torch.float16, torch.bfloat16):
        for layout in LAYOUTS:
            for inverse in (False, True):
                p = 2 if layout == "tokens" else 0
                x, knots, g = _inputs(layout, p=p, dtype=dtype)
                x.requires_grad_(True)
                out = monotone_warp_triton(x, knots, inverse, layout, 5, 7, p)
                assert out.dtype == dtype and out.shape == x.shape
                (gx,) = torch.autograd.grad(out, x, g)
                assert gx.dtype == dtype
                ref32 = monotone_warp_ref(x.detach().float(), knots, inverse, layout, 5, 7, p)
                ref_same = monotone_warp_ref(x.detach(), knots, inverse, layout, 5, 7, p)
                err, err_torch = (out.float() - ref32).abs().max(), (ref_same.float() - ref32).abs().max()
                STATS[f"{dtype}_err_vs_fp32"] = max(STATS.get(f"{dtype}_err_vs_fp32", 0.0), err.item())
                STATS[f"{dtype}_torch_err_vs_fp32"] = max(STATS.get(f"{dtype}_torch_err_vs_fp32", 0.0),
                                                          err_torch.item())
                eps = torch.finfo(dtype).eps
                if dtype == torch.float16:
                    assert err <= 2 * err_torch + 1e-6, (dtype, layout, inverse, err, err_torch)
                else:
                    # Triton's interpreter truncates float32 -> bfloat16 (GPUs round to nearest): within one ulp
                    bound = eps * ref32.abs() + 1e-5
                    assert bool(((out.float() - ref32).abs() <= bound).all()), (layout, inverse, err)
                x32 = x.detach().float().requires_grad_(True)
                (gx32,) = torch.autograd.grad(monotone_warp_ref(x32, knots, inverse, layout, 5, 7, p), x32, g.float())
                torch.testing.assert_close(gx.float(), gx32, rtol=2 * eps, atol=2 * eps * gx32.abs().max().item())
                if p:
                    assert torch.equal(out[:, :p], x[:, :p].detach()) and torch.equal(gx[:, :p], g[:, :p])


def check_float64_and_autocast() -> None:
    from timm_dec.ops.triton_warp import monotone_warp_triton

    for layout in LAYOUTS:
        for inverse in (False, True):
            p = 3 if layout == "tokens" else 0
            x, knots, g = _inputs(layout, p=p, dtype=torch.float64, seed=1)
            (out, gx, gk), (out_r, gx_r, gk_r) = _run_both(
                x.requires_grad_(True), knots.double().requires_grad_(True), inverse, layout, 5, 7, p, g)
            for name, a, r in (("forward", out, out_r), ("grad_x", gx, gx_r), ("grad_knots", gk, gk_r)):
                _assert_close(f"fp64_{name}", a, r, rtol=1e-10)
            # autocast must not lower the precision of the coordinates or of an fp32 input
            x32, knots32, _ = _inputs(layout, p=p, seed=2)
            plain = monotone_warp_triton(x32, knots32, inverse, layout, 5, 7, p)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cast = monotone_warp_triton(x32, knots32, inverse, layout, 5, 7, p)
            assert cast.dtype == torch.float32 and torch.equal(cast, plain)


def check_strides_prefix_and_paths() -> None:
    """Non-contiguous inputs and upstream gradients, prefix tokens, one-sided gradients, sweeps, int64 indexing."""
    import timm_dec.ops.triton_warp as tw

    b, c, h, w, p = 3, 5, 6, 4, 4
    gen = torch.Generator().manual_seed(3)
    knots = knots_from_logits(0.5 * torch.randn(b, 2, 6, 5, generator=gen)).requires_grad_(True)
    cases = {
        # channels-last memory for an nchw map: channel-contiguous reads through the same kernel
        "nchw_channels_last": ("nchw", torch.randn(b, h, w, c, generator=gen).permute(0, 3, 1, 2)),
        # a channel slice of a wider nhwc map, and a transposed token map
        "nhwc_slice": ("nhwc", torch.randn(b, h, w, 2 * c, generator=gen)[..., 1::2]),
        "tokens_transposed": ("tokens", torch.randn(b, c, p + h * w, generator=gen).transpose(1, 2)),
    }
    for name, (layout, x) in cases.items():
        pp = p if layout == "tokens" else 0
        assert not x.is_contiguous()
        g = torch.randn(1, *x.shape[1:], generator=gen).expand(x.shape)  # stride-0 upstream gradient
        for inverse in (False, True):
            (out, gx, gk), (out_r, gx_r, gk_r) = _run_both(x.requires_grad_(True), knots, inverse, layout, h, w, pp, g)
            _assert_close(f"{name}_forward", out, out_r)
            _assert_close(f"{name}_grad_x", gx, gx_r)
            last = None if inverse or (_border_exact(4, h) and _border_exact(4, w)) else -1
            _assert_close(f"{name}_grad_knots", gk[..., :last], gk_r[..., :last])
            if pp:
                assert torch.equal(out[:, :pp], x[:, :pp].detach()) and torch.equal(gx[:, :pp], g[:, :pp])

    # only one of the two gradients requested; sweeps other than 3; forced int64 offsets
    x, knots2, g = _inputs("tokens", p=1, h=4, w=4, seed=4)
    for x_grad, k_grad in ((True, False), (False, True)):
        (out, gx, gk), (out_r, gx_r, gk_r) = _run_both(
            x.requires_grad_(x_grad), knots2.requires_grad_(k_grad), True, "tokens", 4, 4, 1, g)
        _assert_close("one_grad_forward", out, out_r)
        _assert_close("one_grad", gx if x_grad else gk, gx_r if x_grad else gk_r)
    for sweeps in (1, 5):
        (out, gx, gk), (out_r, gx_r, gk_r) = _run_both(
            x.requires_grad_(True), knots2.requires_grad_(True), True, "tokens", 4, 4, 1, g, sweeps=sweeps)
        _assert_close(f"sweeps{sweeps}", torch.cat([out.flatten(), gx.flatten(), gk.flatten()]),
                      torch.cat([out_r.flatten(), gx_r.flatten(), gk_r.flatten()]))
    limit, tw._INT32_MAX = tw._INT32_MAX, 0
    try:
        for inverse in (False, True):
            (out, gx, gk), (out_r, gx_r, gk_r) = _run_both(
                x.requires_grad_(True), knots2.requires_grad_(True), inverse, "tokens", 4, 4, 1, g)
            _assert_close("int64_forward", out, out_r)
            _assert_close("int64_grad_x", gx, gx_r)
    finally:
        tw._INT32_MAX = limit


def check_identity_dispatch_edges() -> None:
    from timm_dec.ops.triton_warp import monotone_warp_triton

    for layout in LAYOUTS:
        p = 2 if layout == "tokens" else 0
        x, _, _ = _inputs(layout, p=p, seed=5)
        ident = identity_knots(x.shape[0], 4)
        for inverse in (False, True):
            out = monotone_warp(x, ident, inverse=inverse, layout=layout, grid_size=(5, 7), num_prefix_tokens=p,
                                backend="triton")
            diff = (out - x).abs().max().item()
            STATS["identity_max_abs"] = max(STATS.get("identity_max_abs", 0.0), diff)
            assert diff <= 1e-5, (layout, inverse, diff)
        # the public op dispatches here when asked to
        x, knots, _ = _inputs(layout, p=p, seed=6)
        via_dispatch = monotone_warp(x, knots, layout=layout, grid_size=(5, 7), num_prefix_tokens=p, backend="triton")
        assert torch.equal(via_dispatch, monotone_warp_triton(x, knots, False, layout, 5, 7, p))
        # an empty batch and a map of a single pixel
        x0, k0, _ = _inputs(layout, b=0, p=p)
        x0.requires_grad_(True)
        out0 = monotone_warp_triton(x0, k0, True, layout, 5, 7, p)
        assert out0.shape == x0.shape
        out0.sum().backward()
        assert x0.grad.shape == x0.shape
        x1, k1, _ = _inputs(layout, h=1, w=1, p=p)
        torch.testing.assert_close(monotone_warp_triton(x1, k1, True, layout, 1, 1, p), x1)

    # bad input gets a clear error
    x, knots, _ = _inputs("nchw")
    for bad_x, bad_knots, match in (
            (x.to(torch.int32), knots, "float16, bfloat16, float32 or float64"),
            (x, knots[:1], "does not fit layout"),
            (x, knots[:, :1], "knots must have shape"),
            (x.permute(0, 2, 3, 1), knots, "does not fit layout")):
        try:
            monotone_warp_triton(bad_x, bad_knots, False, "nchw", 5, 7)
        except ValueError as e:
            assert match in str(e), (match, str(e))
        else:
            raise AssertionError(f"no ValueError for {match}")


def check_details() -> None:
    check_half_precision()
    check_float64_and_autocast()
    check_strides_prefix_and_paths()
    check_identity_dispatch_edges()


# ------------------------------------------------------------------------------------------------------------------
# group "errors": interpreter off (CPU tensors refused)
# ------------------------------------------------------------------------------------------------------------------

def check_errors() -> None:
    from timm_dec.ops.triton_warp import monotone_warp_triton

    assert os.environ.get("TRITON_INTERPRET") != "1"
    x, knots, _ = _inputs("tokens", p=1)
    for call in (lambda: monotone_warp_triton(x, knots, False, "tokens", 5, 7, 1),
                 lambda: monotone_warp(x, knots, layout="tokens", grid_size=(5, 7), num_prefix_tokens=1,
                                       backend="triton")):
        try:
            call()
        except ValueError as e:
            assert "CUDA" in str(e) and "TRITON_INTERPRET" in str(e), str(e)
        else:
            raise AssertionError("CPU tensors were accepted without the interpreter")


# ------------------------------------------------------------------------------------------------------------------
# group "compile": ahead-of-time compilation for real GPUs, as the launcher would launch the kernels
# ------------------------------------------------------------------------------------------------------------------

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class _Recorder:
    """Stands in for a JIT kernel: records the launch arguments instead of launching."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _compile(fn, args: tuple, kwargs: dict, arch: int):
    """Compile ``fn`` for sm_<arch> with the specialisation Triton's launcher derives from these argument values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps")}
    signature, constexprs, attrs = {}, dict(kwargs), {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"unexpected launch argument {name}={value!r}")
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in fn.arg_names[len(args):]:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) that ptxas reports for the kernel."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        info = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return regs, spills


def check_compile() -> None:
    import triton

    import timm_dec.ops.triton_warp as tw

    assert os.environ.get("TRITON_INTERPRET") != "1"
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        STATS["compile_skipped"] = "Triton's NVIDIA backend (ptxas) is not installed"
        return
    fwd, bwd = tw._warp_fwd_kernel, tw._warp_bwd_kernel
    cases = [
        # name, layout, x shape, dtype, H, W, P, inverse, arch, vectorised channel loads expected
        ("vit_s_tokens_fp32_inverse", "tokens", (2, 1 + 14 * 14, 384), torch.float32, 14, 14, 1, True, 90, True),
        ("swin_t_nhwc_bf16_forward", "nhwc", (2, 56, 56, 96), torch.bfloat16, 56, 56, 0, False, 90, True),
        ("nchw_fp32_forward_sm80", "nchw", (2, 96, 56, 56), torch.float32, 56, 56, 0, False, 80, False),
        ("nhwc_fp64_inverse_int64", "nhwc", (2, 14, 14, 64), torch.float64, 14, 14, 0, True, 90, True),
    ]
    tw._warp_fwd_kernel, tw._warp_bwd_kernel = _Recorder(fwd), _Recorder(bwd)
    try:
        for name, layout, shape, dtype, h, w, p, inverse, arch, vector in cases:
            x = torch.randn(shape).to(dtype)
            knots = knots_from_logits(0.5 * torch.randn(shape[0], 2, 5, 4))
            knots = knots.to(torch.promote_types(dtype, torch.float32))
            limit = tw._INT32_MAX
            tw._INT32_MAX = 0 if name.endswith("int64") else limit  # the offsets of a > 2^31-element map
            try:
                tw._warp_forward(x, knots, inverse, layout, h, w, p, 3, None, None)
                tw._warp_backward(x, knots, torch.randn(shape).to(dtype), inverse, layout, h, w, p, 3, True, True,
                                  None, None)
            finally:
                tw._INT32_MAX = limit
            for rec in (tw._warp_fwd_kernel, tw._warp_bwd_kernel):
                grid, args, kwargs = rec.calls.pop()
                kernel = _compile(rec.fn, args, kwargs, arch)
                regs, spills = _ptxas_usage(kernel.asm["ptx"], arch)
                vec_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", kernel.asm["ptx"]))
                kind = "fwd" if rec.fn is fwd else "bwd"
                STATS[f"{name}_{kind}"] = f"grid={grid[0]} regs={regs} spill_bytes={spills} vector_loads={vec_loads}"
                assert spills == 0, (name, kind, regs, spills)
                assert regs <= 128, (name, kind, regs)
                if vector:
                    assert vec_loads > 0, (name, kind)
    finally:
        tw._warp_fwd_kernel, tw._warp_bwd_kernel = fwd, bwd


# group name -> (check, whether it needs TRITON_INTERPRET=1)
GROUPS: dict[str, tuple[Callable[[], None], bool]] = {
    "reference": (lambda: check_reference(int(os.environ.get("TIMM_DEC_TRITON_EXAMPLES", "30"))), True),
    "details": (check_details, True),
    "errors": (check_errors, False),
    "compile": (check_compile, False),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(g not in GROUPS for g in argv):
        print(f"usage: {sys.argv[0]} GROUP [GROUP ...], GROUP in {sorted(GROUPS)}", file=sys.stderr)
        return 2
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for group in argv:
        if GROUPS[group][1] != interpret:
            print(f"group {group!r} needs TRITON_INTERPRET={'1' if GROUPS[group][1] else 'unset'}", file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    for group in argv:
        GROUPS[group][0]()
    print(json.dumps({"groups": argv, **STATS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
