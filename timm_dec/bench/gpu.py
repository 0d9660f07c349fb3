"""``timm-dec bench gpu``: the one-shot GPU check, one command, one JSON, within a time budget (default 7.5 min).

Sections, in order, each recorded as ``{"status": "measured" | "failed" | "not measured", ...}``; a section that
fails or is skipped does not stop the next one, and nothing is ever filled in that was not measured:

1. ``kernel``: the Triton warp on the device against the PyTorch reference on the same device: the output and both
   gradients (x and knots, and the logits' gradient through `knots_from_logits`), every layout and direction, float32,
   at fixed odd shapes, shapes drawn at random and the two benchmark shapes (`triton_kernel_check`).
2. ``warp``: `timm_dec.bench.warp.bench_warp` on the device (composed path, warp both ways, clone).
3. ``overhead``: `timm_dec.bench.overhead.bench_overhead` for ViT-S, Swin-T and BEiT-B in eager, compiled and
   CUDA-graph modes.

``--dry-run`` runs every code path on tiny inputs (tiny models, 64 px, 1 round) on whatever ``--device`` says, CPU
included, in about a minute: the CPU-side smoke test of the command. Sections that need CUDA (the Triton kernel, the
CUDA-graph mode) are then "not measured" with the reason.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback
from typing import Any, Callable, Optional

import torch

from ..ops import LAYOUTS, knots_from_logits, monotone_warp_ref
from .overhead import MODES, bench_overhead
from .timing import environment
from .warp import WARP_SHAPES, bench_warp, format_warp_table

__all__ = ["bench_gpu", "triton_kernel_check", "format_gpu_summary", "gpu_targets", "GPU_MODELS", "DRY_RUN_MODELS",
           "DEFAULT_BUDGET_S", "KERNEL_RTOL"]

GPU_MODELS = ("vit_small_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224")
DRY_RUN_MODELS = ("vit_tiny_patch16_224",)
DEFAULT_BUDGET_S = 450.0
KERNEL_RTOL = 1e-4
# (B, C, H, W, G, P): odd sizes, a 1-pixel side, a large grid; then random draws; then the benchmark shapes
KERNEL_SHAPES = ((2, 6, 5, 7, 4, 2), (3, 16, 1, 9, 3, 1), (2, 5, 14, 14, 8, 0), (1, 33, 16, 16, 16, 5))


def _kernel_shapes(random_draws: int, seed: int, with_bench: bool) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = list(KERNEL_SHAPES)
    for _ in range(random_draws):
        b, c, h, w, g = (int(v) for v in torch.randint(1, 17, (5,), generator=gen))
        shapes.append((b, c, h, w, g, int(torch.randint(0, 6, (1,), generator=gen))))
    if with_bench:
        for spec in WARP_SHAPES.values():
            shapes.append((spec["batch"], spec["channels"], spec["height"], spec["width"], 4, spec["prefix"]))
    return shapes


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> tuple[bool, float]:
    """Within ``rtol`` of the reference with a matching atol (rtol times the reference's mean magnitude); the largest
    error relative to the reference's largest value."""
    if ref.numel() == 0:
        return True, 0.0
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    atol = rtol * ref.abs().mean().item()
    ok = bool((err <= atol + rtol * ref.abs()).all())
    scale = ref.abs().max().item()
    return ok, err.max().item() / scale if scale else err.max().item()


def _border_exact(grid: int, size: int) -> bool:
    """Whether the reference's F.interpolate lands exactly on the last knot at the last pixel (see
    tests/_triton_check.py: otherwise the last knot's gradient is a matter of one ulp on either side)."""
    if size == 1:
        return True
    scale = torch.tensor(grid, dtype=torch.float32) / torch.tensor(size - 1, dtype=torch.float32)
    return bool(scale * torch.tensor(size - 1, dtype=torch.float32) == grid)


def triton_kernel_check(device: str | torch.device = "cuda", random_draws: int = 12, seed: int = 0,
                        with_bench_shapes: bool = True, rtol: float = KERNEL_RTOL) -> dict[str, Any]:
    """The Triton warp against the reference on ``device``: output, grad x, grad knots and grad logits.

    Returns:
        ``{"cases": N, "failures": [...], "max_rel": {quantity: largest error / largest reference value}}``; a case
        fails when a quantity is not within ``rtol`` (with atol = rtol times the reference's mean magnitude).
        As in tests/_triton_check.py, the knots' gradient is skipped for G = 1 in the forward direction (every source
        point is a pixel centre, where the one-sided coordinate gradient is a matter of rounding).
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the Triton kernel runs on CUDA tensors only, got {device}")
    from ..ops.triton_warp import monotone_warp_triton  # imports Triton

    failures: list[str] = []
    max_rel: dict[str, float] = {}
    cases = 0
    for i, (b, c, h, w, g, p) in enumerate(_kernel_shapes(random_draws, seed, with_bench_shapes)):
        for layout in LAYOUTS:
            for inverse in (False, True):
                prefix = p if layout == "tokens" else 0
                dims = {"nchw": (b, c, h, w), "nhwc": (b, h, w, c), "tokens": (b, prefix + h * w, c)}[layout]
                gen = torch.Generator().manual_seed(seed * 1000 + i)
                x = torch.randn(dims, generator=gen).to(device)
                logits = (0.5 * torch.randn(b, 2, g + 1, g, generator=gen)).to(device)
                up = torch.randn(dims, generator=gen).to(device)
                outs = []
                for fn in (lambda a, k: monotone_warp_triton(a, k, inverse, layout, h, w, prefix),
                           lambda a, k: monotone_warp_ref(a, k, inverse, layout, h, w, prefix)):
                    a = x.clone().requires_grad_()
                    lg = logits.clone().requires_grad_()
                    k = knots_from_logits(lg)
                    k.retain_grad()
                    out = fn(a, k)
                    out.backward(up)
                    outs.append({"forward": out.detach(), "grad_x": a.grad, "grad_knots": k.grad,
                                 "grad_logits": lg.grad})
                cases += 1
                # the last knot's gradient in the forward direction where F.interpolate misses the border by an ulp
                last = None if inverse or (_border_exact(g, h) and _border_exact(g, w)) else -1
                for q in ("forward", "grad_x", "grad_knots", "grad_logits"):
                    if q in ("grad_knots", "grad_logits") and g == 1 and not inverse:
                        continue
                    got, ref = outs[0][q], outs[1][q]
                    if q == "grad_knots":
                        got, ref = got[..., :last], ref[..., :last]
                    ok, rel = _close(got, ref, rtol)
                    max_rel[q] = max(max_rel.get(q, 0.0), rel)
                    if not ok:
                        failures.append(f"{q} {layout} inverse={inverse} (B,C,H,W,G,P)={(b, c, h, w, g, prefix)}: "
                                        f"max rel err {rel:.2e}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"cases": cases, "failures": failures, "max_rel": max_rel, "rtol": rtol}


def _section(result: dict[str, Any], name: str, deadline: float, fn: Callable[[], dict[str, Any]],
             skip: Optional[str] = None) -> None:
    """Run one section into ``result[name]``: measured, failed (with the error) or not measured (with why)."""
    if skip is None and time.perf_counter() > deadline:
        skip = "time budget spent"
    if skip is not None:
        result[name] = {"status": "not measured", "reason": skip}
        print(f"[{name}] not measured: {skip}", flush=True)
        return
    start = time.perf_counter()
    try:
        out = fn()
        result[name] = {"status": "measured", **out}
    except Exception as exc:  # one failing section must not cost the others
        result[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=8)}
        print(f"[{name}] failed: {type(exc).__name__}: {exc}", flush=True)
    result[name]["seconds"] = time.perf_counter() - start


def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sections of the GPU check (module docstring) with the options of `timm_dec.bench.add_arguments`."""
    device = torch.device(args.device)
    dry = bool(getattr(args, "dry_run", False))
    budget = float(getattr(args, "budget_s", None) or DEFAULT_BUDGET_S)
    cuda_ok = device.type == "cuda" and torch.cuda.is_available()
    if device.type == "cuda" and not cuda_ok:
        raise ValueError(f"--device {device} requested but CUDA is not available (use --dry-run --device cpu for a "
                         f"smoke run of the code paths)")
    if device.type != "cuda" and not dry:
        raise ValueError(f"timm-dec bench gpu measures a CUDA device, got --device {device}; add --dry-run to smoke "
                         f"test the code paths on it")
    start = time.perf_counter()
    deadline = start + budget
    result: dict[str, Any] = {
        "benchmark": "gpu", "dry_run": dry, "environment": environment(device), "budget_s": budget,
        "load_average_before": list(os.getloadavg()),
    }
    no_cuda = None if cuda_ok else f"needs a CUDA device (ran on {device})"

    _section(result, "kernel", deadline, lambda: triton_kernel_check(
        device, random_draws=2 if dry else 12, with_bench_shapes=not dry), skip=no_cuda)
    if result["kernel"]["status"] == "measured":
        k = result["kernel"]
        print(f"[kernel] {k['cases']} cases, {len(k['failures'])} failures, max rel err "
              + ", ".join(f"{q} {v:.1e}" for q, v in k["max_rel"].items()), flush=True)

    def warp() -> dict[str, Any]:
        shapes = {name: dict(spec) for name, spec in WARP_SHAPES.items()}
        if dry:
            for spec in shapes.values():
                spec["batch"] = 2
        out = bench_warp(shapes, device=device, grid=args.grid, repeats=1 if dry else args.repeats,
                         warmup=0 if dry else args.warmup, seed=args.seed)
        print(format_warp_table(out), flush=True)
        return out

    _section(result, "warp", deadline, warp)

    modes = [m for m in (getattr(args, "modes", None) or MODES) if cuda_ok or m != "cudagraph"]
    skipped_modes = [m for m in (getattr(args, "modes", None) or MODES) if m not in modes]
    models = list(getattr(args, "models", None) or (DRY_RUN_MODELS if dry else GPU_MODELS))
    overhead = []
    for name in models:  # one section per model, so that the budget is checked between models
        ns = argparse.Namespace(**{**vars(args), "models": [name], "modes": modes,
                                   "batch_size": 2 if dry else args.batch_size,
                                   "img_size": 64 if dry else args.img_size,
                                   "repeats": 1 if dry else args.repeats, "warmup": 0 if dry else args.warmup,
                                   # a dry run checks code paths, not Inductor's C++ compiler (minutes on a small CPU):
                                   # Dynamo's capture only (tests/test_compile.py checks the compiled graphs)
                                   "compile_backend": "eager" if dry else args.compile_backend})
        key = f"overhead {name}"
        _section(result, key, deadline, lambda ns=ns: bench_overhead(ns))
        overhead.append(key)
    result["overhead"] = {
        "models": {k: v for key in overhead if result[key]["status"] == "measured"
                   for k, v in result[key]["models"].items()},
        "status": {key.split(" ", 1)[1]: result[key]["status"] for key in overhead},
        "modes": modes,
        "modes_not_measured": {m: "needs a CUDA device" for m in skipped_modes},
    }
    result["load_average_after"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - start
    print(format_gpu_summary(result), flush=True)
    return result


def format_gpu_summary(result: dict[str, Any]) -> str:
    """One line per section with its status, then the overhead ratios per model and mode."""
    lines = [f"GPU check on {result['environment']['device']} "
             f"({result['environment'].get('device_name', result['environment']['machine'])})"
             + (" [dry run: tiny inputs, not figures]" if result["dry_run"] else "")
             + f", {result['wall_seconds']:.0f} s of a {result['budget_s']:.0f} s budget"]
    for name, section in result.items():
        if isinstance(section, dict) and "status" in section and isinstance(section["status"], str):
            extra = section.get("reason") or section.get("error") or ""
            lines.append(f"  {name:<40} {section['status']}" + (f" ({extra})" if extra else ""))
    for key, entry in result["overhead"]["models"].items():
        q = entry["ratios"]
        lines.append(f"  {key:<40} forward x{q['forward']:.3f}"
                     + (f", train step x{q['train_step']:.3f}" if q.get("train_step") is not None else "")
                     + (f", memory x{q['memory_total']:.3f}" if q.get("memory_total") is not None else ""))
    return "\n".join(lines)


def gpu_targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Targets of a GPU check for ``--check``: the kernel agrees with the reference; the warp and overhead targets."""
    entries: dict[str, dict[str, Any]] = {}
    kernel = result.get("kernel", {})
    if kernel.get("status") == "measured":
        entries["kernel"] = {"targets": {"failures_==0": {"value": float(len(kernel["failures"])),
                                                           "met": not kernel["failures"]}}}
    if result.get("warp", {}).get("status") == "measured":
        entries.update(result["warp"]["shapes"])
    entries.update(result["overhead"]["models"])
    return entries
