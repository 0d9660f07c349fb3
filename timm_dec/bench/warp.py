"""``timm-dec bench warp``: the monotone warp against the composed path of the paper's released code and ``x.clone()``.

It times the warp at the shapes DEC sees inside ViT-S (tokens) and Swin-T stage 1 (NHWC), forward and
forward+backward, against the composed path (softmax, interpolate, grid_sample) and the memory bound ``x.clone()``,
round-robin (`timm_dec.bench.timing.paired_times`); each figure is the median over rounds.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..ops import knots_from_logits, monotone_warp, resolve_backend
from .timing import environment, time_interleaved

__all__ = ["bench_warp", "composed_warp", "format_warp_table", "warp_targets", "WARP_SHAPES"]

WARP_SHAPES: dict[str, dict[str, Any]] = {
    "vit_s_tokens": dict(layout="tokens", batch=64, height=14, width=14, channels=384, prefix=1),
    "swin_t_stage1_nhwc": dict(layout="nhwc", batch=16, height=56, width=56, channels=96, prefix=0),
}
# targets (`timm-dec bench warp --check`): on the CPU warp fwd+bwd / composed fwd+bwd; on a GPU composed / warp
# fwd+bwd and warp fwd / clone fwd
CPU_MAX_RATIO = 1.0
GPU_MIN_SPEEDUP = 2.0
GPU_MAX_CLONE_RATIO = 2.0


def composed_warp(x: torch.Tensor, logits: torch.Tensor, layout: str, height: int, width: int,
                  num_prefix_tokens: int = 0) -> torch.Tensor:
    """Canonicalisation S^{-1} composed of stock ops, as the paper's released code does it.

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

    def warp(inverse: bool) -> Callable[[], torch.Tensor]:
        # check=False: in DEC the knots come straight from knots_from_logits, so the value check (a sync) is skipped.
        return lambda: monotone_warp(x, knots_from_logits(logits), inverse=inverse, layout=layout,
                                     grid_size=(height, width), num_prefix_tokens=prefix, check=False)

    return {
        "composed": lambda: composed_warp(x, logits, layout, height, width, prefix),
        "monotone_warp": warp(False),
        "monotone_warp_inverse": warp(True),
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
    """Time the composed path, `monotone_warp` (both directions) and ``x.clone()``, fwd and fwd+bwd.

    Args:
        shapes: name -> dict(layout, batch, height, width, channels, prefix), e.g. `WARP_SHAPES`.
        device: where to run; `monotone_warp` uses whatever backend its dispatch picks there.
        grid: DEC grid size G.
        repeats: timed rounds (median reported).
        warmup: untimed rounds.
        seed: seed of x, logits (0.5 * N(0, 1)) and the upstream gradient.

    Returns:
        JSON-serialisable dict: ``environment``, ``backend``, and per shape the times in milliseconds
        (``fwd_ms`` / ``fwd_bwd_ms`` per candidate), ``ratios``, the ``targets`` (`warp_targets`) and the max abs
        difference of the composed and the `monotone_warp` outputs.
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
            "max_abs_diff_composed_vs_warp": max_abs_diff,
            "ratios": {
                "fwd_warp_over_composed": fwd["monotone_warp"] / fwd["composed"],
                "fwd_bwd_warp_over_composed": fwd_bwd["monotone_warp"] / fwd_bwd["composed"],
                "fwd_inverse_over_composed": fwd["monotone_warp_inverse"] / fwd["composed"],
                "fwd_bwd_inverse_over_composed": fwd_bwd["monotone_warp_inverse"] / fwd_bwd["composed"],
                "fwd_warp_over_clone": fwd["monotone_warp"] / fwd["clone"],
                "fwd_bwd_warp_over_clone": fwd_bwd["monotone_warp"] / fwd_bwd["clone"],
            },
        }
        entry["targets"] = warp_targets(entry["ratios"], device)
        result["shapes"][name] = entry
    return result


def warp_targets(ratios: dict[str, float], device: torch.device) -> dict[str, dict[str, Any]]:
    """The targets of one shape, each ``{"value": ..., "met": ...}``, named with its bound.

    CPU: `monotone_warp` fwd+bwd no slower than the composed path. GPU: fwd+bwd at least 2x faster than the composed
    path, and the forward within 2x of ``x.clone()``.
    """
    if device.type == "cpu":
        ratio = ratios["fwd_bwd_warp_over_composed"]
        return {"cpu_fwd_bwd_warp_over_composed_<=1": {"value": ratio, "met": ratio <= CPU_MAX_RATIO}}
    speedup = 1.0 / ratios["fwd_bwd_warp_over_composed"]
    clone_ratio = ratios["fwd_warp_over_clone"]
    return {
        "gpu_fwd_bwd_speedup_over_composed_>=2": {"value": speedup, "met": speedup >= GPU_MIN_SPEEDUP},
        "gpu_fwd_warp_over_clone_<=2": {"value": clone_ratio, "met": clone_ratio <= GPU_MAX_CLONE_RATIO},
    }


def format_warp_table(result: dict[str, Any]) -> str:
    """The warp result as a text table: ms per candidate, then warp / composed and warp / clone ratios."""
    env = result["environment"]
    lines = [
        f"monotone warp on {env['device']} ({env.get('device_name', env['machine'])}, {env['torch_threads']} threads, "
        f"torch {env['torch']}), backend {result['backend']}, G={result['grid']}, median of {result['repeats']}",
        f"{'shape':<20} {'timing':<8} {'composed':>12} {'warp':>10} {'warp inv':>10} {'clone':>10} "
        f"{'warp/comp':>10} {'inv/comp':>9} {'warp/clone':>11}",
    ]
    for name, entry in result["shapes"].items():
        for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            t = entry[key]
            lines.append(
                f"{name:<20} {label:<8} {t['composed']:>12.2f} {t['monotone_warp']:>10.2f} "
                f"{t['monotone_warp_inverse']:>10.2f} {t['clone']:>10.2f} "
                f"{t['monotone_warp'] / t['composed']:>10.2f} {t['monotone_warp_inverse'] / t['composed']:>9.2f} "
                f"{t['monotone_warp'] / t['clone']:>11.2f}")
    lines.append("times in ms; warp/comp < 1 means monotone_warp is faster than the composed path")
    return "\n".join(lines)
