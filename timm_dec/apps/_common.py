"""What the applications share: the ``--scales`` / ``--scale-bins`` parsers, the input normalisation of a timm data
config, the ``--device`` resolution and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch

__all__ = ["parse_scales", "parse_bins", "normalize_transform", "resolve_device", "warmup_cosine_schedule"]


def parse_scales(text: str) -> list[float]:
    """``"0.7,0.8,1.0"`` -> [0.7, 0.8, 1.0]; every scale a finite number > 0."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"scales must be comma-separated numbers, e.g. 0.7,0.85,1.0, got {text!r}") from None
    if not scales:
        raise ValueError(f"no scales in {text!r}")
    bad = [s for s in scales if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"scales must be finite and > 0, got {bad}")
    return scales


def parse_bins(text: str) -> list[tuple[float, float]]:
    """``"0.4-1.0,1.0-2.0"`` -> [(0.4, 1.0), (1.0, 2.0)]; each bin 0 < low <= high."""
    bins = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pieces = part.split("-")
        try:
            low, high = (float(v) for v in pieces)
        except ValueError:
            raise ValueError(f"a scale bin is LOW-HIGH, e.g. 0.4-1.0; got {part!r} in {text!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"a scale bin needs 0 < LOW <= HIGH, got {part!r}")
        bins.append((low, high))
    if not bins:
        raise ValueError(f"no scale bins in {text!r}")
    return bins


def normalize_transform(data_cfg: Mapping[str, Any], chans: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(C, H, W) or (B, C, H, W) images in [0, 1] -> normalised with the data config's ``mean`` and ``std``.

    A 1-channel model with a 3-channel config uses the channel means.
    """
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32)
    if mean.numel() != chans:
        mean, std = mean.mean().expand(chans), std.mean().expand(chans)
    mean, std = mean.view(-1, 1, 1).clone(), std.view(-1, 1, 1).clone()

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    return normalize


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: default cuda when available, else cpu; a CUDA device without CUDA is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total: int,
                           warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to zero, per step."""
    warmup = int(round(warmup_frac * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
