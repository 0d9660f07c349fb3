"""``timm-dec bench warp|overhead``: benchmarks that time their candidates side by side, in one run.

``warp`` times the monotone warp at the shapes DEC sees inside ViT-S (tokens) and Swin-T stage 1 (NHWC), forward and
forward+backward, against (a) the composed path of the paper's released code and (c) the memory bound ``x.clone()``.
``overhead`` (base vs ``*_dec`` models) lives in `timm_dec.bench_overhead`, imported only when asked for; its
``bench_overhead(args) -> dict`` prints its own table and returns a JSON-serialisable result, which `run` writes.

Timing: the candidates run round-robin (warm-up rounds, then ``--repeats`` timed rounds), so a machine shared with
other jobs slows them alike; each figure is the median over rounds. CUDA is synchronised around every call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .ops import knots_from_logits, monotone_warp, resolve_backend

__all__ = [
    "add_arguments", "run", "bench_warp", "composed_warp", "format_warp_table", "time_interleaved", "paired_times",
    "environment",
    "write_json", "BENCHMARKS", "WARP_SHAPES",
]

BENCHMARKS = ("warp", "overhead")
WARP_SHAPES: dict[str, dict[str, Any]] = {
    "vit_s_tokens": dict(layout="tokens", batch=64, height=14, width=14, channels=384, prefix=1),
    "swin_t_stage1_nhwc": dict(layout="nhwc", batch=16, height=56, width=56, channels=96, prefix=0),
}
OVERHEAD_MODELS = (
    "vit_small_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224")
# (b) fwd+bwd / (a) fwd+bwd on the CPU; on a GPU (a) / (b) fwd+bwd and (b) fwd / (c) fwd (issue 2, section 4).
CPU_MAX_RATIO = 1.0
GPU_MIN_SPEEDUP = 2.0
GPU_MAX_CLONE_RATIO = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``timm-dec bench``: the benchmark to run, then shared, warp and overhead options."""
    parser.add_argument("which", choices=BENCHMARKS, help="'warp': the warp op; 'overhead': base vs *_dec models")
    parser.add_argument("--device", default="cpu", help="device to time on: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds; every figure is their median")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    parser.add_argument("--out", default=".", help="directory of the JSON result (default: the current directory)")
    parser.add_argument("--json", default=None, help="path of the JSON result (default: OUT/bench_WHICH.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    warp = parser.add_argument_group("warp")
    warp.add_argument("--shapes", nargs="+", choices=tuple(WARP_SHAPES), default=list(WARP_SHAPES),
                      help="shapes to time (default: all)")
    warp.add_argument("--grid", type=int, default=4, help="DEC grid size G")
    warp.add_argument("--batch", type=int, default=None, help="override the batch size of every warp shape")
    overhead = parser.add_argument_group("overhead")
    overhead.add_argument("--models", nargs="+", default=list(OVERHEAD_MODELS), help="timm base model names")
    overhead.add_argument("--batch-size", type=int, default=8, help="batch size of the overhead benchmark")
    overhead.add_argument("--img-size", type=int, default=224, help="input resolution of the overhead benchmark")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.which``, print its table and write its JSON; returns the exit status."""
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.which == "warp":
        shapes = {name: dict(WARP_SHAPES[name]) for name in args.shapes}
        if args.batch is not None:
            for shape in shapes.values():
                shape["batch"] = args.batch
        result = bench_warp(shapes, device=args.device, grid=args.grid, repeats=args.repeats, warmup=args.warmup,
                            seed=args.seed)
        print(format_warp_table(result))
    elif args.which == "overhead":
        from .bench_overhead import bench_overhead  # the model benchmark imports timm models; load it on demand
        result = bench_overhead(args)
    else:
        raise ValueError(f"unknown benchmark {args.which!r}, expected one of {BENCHMARKS}")
    path = args.json or os.path.join(args.out, f"bench_{args.which}.json")
    write_json(result, path)
    print(f"wrote {path}")
    return 0


def write_json(result: dict[str, Any], path: str) -> None:
    """Write a benchmark result as indented JSON, creating the parent directory."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_times(
        fns: dict[str, Callable[[], Any]],
        device: torch.device,
        repeats: int,
        warmup: int,
) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, timed round-robin so that background load hits all alike.

    Keeping every round (not only the median) lets a ratio be taken per round, between calls that ran back to back
    under the same background load, and the median taken over those ratios.

    Args:
        fns: name -> function of no arguments.
        device: synchronised before and after every call when it is a CUDA device.
        repeats: timed rounds.
        warmup: untimed rounds first.

    Returns:
        name -> ``repeats`` seconds, in round order.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def time_interleaved(
        fns: dict[str, Callable[[], Any]],
        device: torch.device,
        repeats: int,
        warmup: int,
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (see `paired_times`).

    Returns:
        name -> median seconds.
    """
    return {name: statistics.median(t) for name, t in paired_times(fns, device, repeats, warmup).items()}


def composed_warp(x: torch.Tensor, logits: torch.Tensor, layout: str, height: int, width: int,
                  num_prefix_tokens: int = 0) -> torch.Tensor:
    """Canonicalisation S^{-1} composed of stock ops, as the paper's released code does it (baseline (a)).

    softmax/cumsum -> knots -> `F.interpolate` to a dense (B, 2, H, W) grid -> the map transposed to NCHW ->
    `F.grid_sample` -> transposed back (and concatenated after the prefix tokens).

    Args:
        x: (B, H, W, C) for ``"nhwc"``; (B, P + H*W, C) for ``"tokens"``.
        logits: (B, 2, G+1, G) segment logits.
        layout: ``"nhwc"`` or ``"tokens"``.
        height, width: map size.
        num_prefix_tokens: P, for ``"tokens"``.

    Returns:
        The canonicalised map, shaped like ``x``.
    """
    knots = F.pad(torch.softmax(logits, dim=-1).cumsum(dim=-1), (1, 0))
    tables = torch.stack((knots[:, 0], knots[:, 1].transpose(-1, -2)), dim=1)
    grid = F.interpolate(tables, size=(height, width), mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1) * 2 - 1
    if layout == "nhwc":
        out = F.grid_sample(x.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.permute(0, 2, 3, 1)
    if layout != "tokens":
        raise ValueError(f"layout must be 'nhwc' or 'tokens', got {layout!r}")
    batch, _, chans = x.shape
    fmap = x[:, num_prefix_tokens:].transpose(1, 2).reshape(batch, chans, height, width)
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.cat((x[:, :num_prefix_tokens], out.flatten(2).transpose(1, 2)), dim=1)


def _warp_candidates(
        x: torch.Tensor, logits: torch.Tensor, shape: dict[str, Any],
) -> dict[str, Callable[[], torch.Tensor]]:
    layout, height, width, prefix = shape["layout"], shape["height"], shape["width"], shape["prefix"]

    def ours(inverse: bool) -> Callable[[], torch.Tensor]:
        # check=False: in DEC the knots come straight from knots_from_logits, so the value check (a sync) is skipped.
        return lambda: monotone_warp(x, knots_from_logits(logits), inverse=inverse, layout=layout,
                                     grid_size=(height, width), num_prefix_tokens=prefix, check=False)

    return {
        "composed": lambda: composed_warp(x, logits, layout, height, width, prefix),
        "monotone_warp": ours(False),
        "monotone_warp_inverse": ours(True),
        "clone": lambda: x.clone(),
    }


def bench_warp(
        shapes: dict[str, dict[str, Any]],
        device: str | torch.device = "cpu",
        grid: int = 4,
        repeats: int = 10,
        warmup: int = 3,
        seed: int = 0,
) -> dict[str, Any]:
    """Time (a) the composed path, (b) `monotone_warp` (both directions) and (c) ``x.clone()``, fwd and fwd+bwd.

    Args:
        shapes: name -> dict(layout, batch, height, width, channels, prefix), e.g. `WARP_SHAPES`.
        device: where to run; `monotone_warp` uses whatever backend its dispatch picks there.
        grid: DEC grid size G.
        repeats: timed rounds (median reported).
        warmup: untimed rounds.
        seed: seed of x, logits (0.5 * N(0, 1)) and the upstream gradient.

    Returns:
        JSON-serialisable dict: ``environment``, ``backend``, and per shape the times in milliseconds
        (``fwd_ms`` / ``fwd_bwd_ms`` per candidate), ``ratios``, the bar checks and the max abs difference of
        (a) and (b) outputs.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    result: dict[str, Any] = {
        "benchmark": "warp", "environment": environment(device), "backend": resolve_backend(None, device),
        "grid": grid, "repeats": repeats, "warmup": warmup, "shapes": {},
    }
    for name, shape in shapes.items():
        batch, height, width, chans, prefix = (shape[k] for k in ("batch", "height", "width", "channels", "prefix"))
        dims = (batch, height, width, chans) if shape["layout"] == "nhwc" else (batch, prefix + height * width, chans)
        x = torch.randn(dims, generator=gen).to(device).requires_grad_()
        logits = (0.5 * torch.randn(batch, 2, grid + 1, grid, generator=gen)).to(device).requires_grad_()
        upstream = torch.randn(dims, generator=gen).to(device)
        fns = _warp_candidates(x, logits, shape)
        with torch.no_grad():
            max_abs_diff = (fns["composed"]() - fns["monotone_warp"]()).abs().max().item()
            fwd = time_interleaved(fns, device, repeats, warmup)

        def with_backward(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def step() -> None:
                x.grad = None
                logits.grad = None
                fn().backward(upstream)
            return step

        fwd_bwd = time_interleaved({k: with_backward(fn) for k, fn in fns.items()}, device, repeats, warmup)
        entry = {
            **shape,
            "fwd_ms": {k: 1e3 * v for k, v in fwd.items()},
            "fwd_bwd_ms": {k: 1e3 * v for k, v in fwd_bwd.items()},
            "max_abs_diff_composed_vs_ours": max_abs_diff,
            "ratios": {
                "fwd_ours_over_composed": fwd["monotone_warp"] / fwd["composed"],
                "fwd_bwd_ours_over_composed": fwd_bwd["monotone_warp"] / fwd_bwd["composed"],
                "fwd_inverse_over_composed": fwd["monotone_warp_inverse"] / fwd["composed"],
                "fwd_bwd_inverse_over_composed": fwd_bwd["monotone_warp_inverse"] / fwd_bwd["composed"],
                "fwd_ours_over_clone": fwd["monotone_warp"] / fwd["clone"],
                "fwd_bwd_ours_over_clone": fwd_bwd["monotone_warp"] / fwd_bwd["clone"],
            },
        }
        entry["bars"] = _warp_bars(entry, device)
        result["shapes"][name] = entry
    return result


def _warp_bars(entry: dict[str, Any], device: torch.device) -> dict[str, dict[str, Any]]:
    ratios = entry["ratios"]
    if device.type == "cpu":
        ratio = ratios["fwd_bwd_ours_over_composed"]
        return {"cpu_fwd_bwd_ours_over_composed_<=1": {"value": ratio, "pass": ratio <= CPU_MAX_RATIO}}
    speedup = 1.0 / ratios["fwd_bwd_ours_over_composed"]
    clone_ratio = ratios["fwd_ours_over_clone"]
    return {
        "gpu_fwd_bwd_speedup_over_composed_>=2": {"value": speedup, "pass": speedup >= GPU_MIN_SPEEDUP},
        "gpu_fwd_ours_over_clone_<=2": {"value": clone_ratio, "pass": clone_ratio <= GPU_MAX_CLONE_RATIO},
    }


def format_warp_table(result: dict[str, Any]) -> str:
    """The warp result as a text table: ms per candidate, then ours / composed and ours / clone ratios."""
    env = result["environment"]
    lines = [
        f"monotone warp on {env['device']} ({env.get('device_name', env['machine'])}, {env['torch_threads']} threads, "
        f"torch {env['torch']}), backend {result['backend']}, G={result['grid']}, median of {result['repeats']}",
        f"{'shape':<20} {'timing':<8} {'composed(a)':>12} {'ours(b)':>10} {'ours inv':>10} {'clone(c)':>10} "
        f"{'b/a':>7} {'inv/a':>7} {'b/c':>7}",
    ]
    for name, entry in result["shapes"].items():
        for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            t = entry[key]
            lines.append(
                f"{name:<20} {label:<8} {t['composed']:>12.2f} {t['monotone_warp']:>10.2f} "
                f"{t['monotone_warp_inverse']:>10.2f} {t['clone']:>10.2f} "
                f"{t['monotone_warp'] / t['composed']:>7.2f} {t['monotone_warp_inverse'] / t['composed']:>7.2f} "
                f"{t['monotone_warp'] / t['clone']:>7.2f}")
    lines.append("times in ms; b/a < 1 means monotone_warp is faster than the composed path")
    for name, entry in result["shapes"].items():
        for bar, check in entry["bars"].items():
            lines.append(f"bar {name} {bar}: {check['value']:.3f} {'PASS' if check['pass'] else 'FAIL'}")
    return "\n".join(lines)
