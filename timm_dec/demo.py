"""``timm-dec demo``: the paper's locally scaled digits comparison (Tables 2 and 3, Fig. 8, Fig. A2), end to end.

One seed, one architecture, the same training budget for every method. Stage 1 trains the plain model without
augmentation for ``--epochs`` (from scratch, or from timm's pretrained weights with ``--pretrained``); it is the
shared starting point, as the pretrained weights are in the paper ("all other baselines are initialized from Base",
Sec. 5.4). Stage 2 gives every method ``--finetune-epochs`` from those weights: **Base** keeps training without
augmentation; **Aug** trains with `RandomMonotoneScale` (the strong baseline); **InvL** is Aug plus the eq. 25 loss;
**Canon** is Aug with the model inside `InputCanonicalizer`; **DEC** is Aug with the ``<model>_dec`` variant (the same
backbone weights, DEC at identity), so DEC is trained with the augmentation too, as in the paper. Every model has
seen the same number of optimiser steps; all are evaluated on the same held-out test set (disjoint source digits).
(The paper's MNIST runs fine-tune DEC and the baselines from Aug; from scratch on a CPU, a tiny ViT trained with the
augmentation from the first step often stays on its initial loss plateau, so the shared start is the plain model.)

Outputs, in ``--out`` (default ``demo_out/``):

* ``summary.json``: the configuration, per method ``acc``, ``inv_e`` (raw; x100 = the paper's InvE(1e-2)),
  per-scale and per-bin accuracy, timings, the checkpoint and the ``timm-dec eval`` command that re-evaluates it;
* ``tables.txt``: the printed tables; ``per_scale_accuracy.png``; ``prob_correct.png`` (Fig. 8 style);
  ``warp_grids.png`` (Fig. A2: the warps the DEC of the first adapted block finds, drawn over the inputs);
* ``checkpoints/<method>.safetensors``.

Presets: ``default`` finishes in under 15 minutes on 2 CPU cores (a tiny ViT on a 48 px canvas, 1-digit numbers);
``paper`` is the paper's MNIST setting for a GPU (224 px, 3 digits, 6000 / 50000 images, pretrained ViT, 50 + 40
epochs, the A1 learning rates); ``smoke`` runs in seconds for tests. Any option given explicitly overrides the preset.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.utils import ParseKwargs
from tqdm.auto import tqdm

from .baselines import InputCanonicalizer, InvarianceLoss
from .data import LocallyScaledDigits, RandomMonotoneScale, random_knots
from .hub import save_checkpoint
from .evaluate import (
    evaluate_model, format_per_scale_table, format_table, normalize_transform, parse_bins, parse_scales,
)
from .metrics import evaluate_scale_consistency, format_scale
from .models import load_dec_state_dict
from .ops import apply_map, monotone_warp

__all__ = ["PRESETS", "METHODS", "add_arguments", "run", "resolve_config", "paper_lr"]

METHODS = ("base", "aug", "invl", "canon", "dec")
LABELS = {"base": "Base", "aug": "Aug", "invl": "InvL", "canon": "Canon", "dec": "DEC"}

PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        model="vit_tiny_patch16_224", pretrained=False,
        model_kwargs=dict(img_size=48, patch_size=6, embed_dim=96, depth=4, num_heads=3),
        num_digits=1, canvas=48, digit_size=16, scale_range=(0.4, 2.0),
        train_samples=4000, test_samples=600, epochs=12, finetune_epochs=4, batch_size=64, lr=2e-3, finetune_lr=5e-4,
        weight_decay=0.05, warmup_frac=0.1, new_lr_mult=5.0,
        aug_strength=0.2, aug_p=0.5, invl_weight=1.0,
        canon_warps=64, canon_energy_size=16, canon_energy_widths=(8, 16),
        dec_blocks=(0, 1), dec_grid=4, dec_mode="equivariant", dec_widths=(16, 32), dec_max_iter=12,
        scales=(0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0), scale_bins=((0.4, 1.0), (1.0, 2.0), (2.0, 3.0)),
        prob_scales=tuple(round(0.4 + 0.1 * i, 2) for i in range(17)), prob_images=4, grid_images=4, eval_batch=100,
    ),
    "paper": dict(
        model="vit_base_patch16_224", pretrained=True, model_kwargs={},
        num_digits=3, canvas=224, digit_size=None, scale_range=(0.4, 2.0),
        train_samples=6000, test_samples=50000, epochs=50, finetune_epochs=40, batch_size=64, lr=None, finetune_lr=None,
        weight_decay=0.05, warmup_frac=0.05, new_lr_mult=10.0,
        aug_strength=0.2, aug_p=0.5, invl_weight=1.0,
        canon_warps=64, canon_energy_size=32, canon_energy_widths=(32, 64),
        dec_blocks=None, dec_grid=4, dec_mode="equivariant", dec_widths=(64, 128), dec_max_iter=12,
        # Table 3's third bin is [2, 3]; three 28 px digits fit side by side on 224 px only up to scale 2.66.
        scales=(0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3), scale_bins=((0.4, 1.0), (1.0, 2.0), (2.0, 2.6)),
        prob_scales=tuple(round(0.7 + 0.05 * i, 2) for i in range(13)), prob_images=6, grid_images=6, eval_batch=128,
    ),
    "smoke": dict(
        model="vit_tiny_patch16_224", pretrained=False,
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
        num_digits=1, canvas=32, digit_size=None, scale_range=(0.4, 2.0),
        train_samples=16, test_samples=6, epochs=1, finetune_epochs=1, batch_size=8, lr=1e-3, finetune_lr=1e-3,
        weight_decay=0.05, warmup_frac=0.0, new_lr_mult=1.0,
        aug_strength=0.2, aug_p=0.5, invl_weight=1.0,
        canon_warps=4, canon_energy_size=8, canon_energy_widths=(4, 4),
        dec_blocks=(0,), dec_grid=2, dec_mode="equivariant", dec_widths=(4, 4), dec_max_iter=4,
        scales=(0.8, 1.0, 1.2), scale_bins=((0.4, 1.0), (1.0, 2.0)),
        prob_scales=(0.8, 1.0, 1.2), prob_images=2, grid_images=2, eval_batch=8,
    ),
}
# Paper A1, locally scaled MNIST: 1e-4 for ResNet, ViT, DeiT, BEiT; 2e-5 for DINOv2; 8e-4 for Swin.
_PAPER_LR = (("dinov2", 2e-5), ("swin", 8e-4), ("", 1e-4))
_FINETUNE_LR_RATIO = 0.5


def paper_lr(model: str) -> float:
    """The paper's learning rate (A1, locally scaled MNIST) for a timm model name."""
    return next(lr for key, lr in _PAPER_LR if key in model)


# ---------------------------------------------------------------------------------------------------------------------
# configuration


def _floats(text: str) -> tuple[float, ...]:
    return tuple(parse_scales(text))


def _bins(text: str) -> tuple[tuple[float, float], ...]:
    return tuple(parse_bins(text))


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``timm-dec demo`` options; those left out come from ``--preset``."""
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default",
                        help="default: < 15 min on 2 CPU cores; paper: the paper's setting for a GPU; smoke: seconds")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    parser.add_argument("--methods", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                        default=METHODS,
                        help=f"comma-separated subset of {','.join(METHODS)} (base and aug always run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = parser.add_argument_group("model (default from the preset)")
    g.add_argument("--model", default=None, help="timm base model name; DEC uses <model>_dec")
    g.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs, metavar="KEY=VALUE",
                   help="create_model kwargs replacing the preset's (img_size=64 patch_size=8 ...)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start Base and Aug from timm's pretrained weights (needs the Hub or its cache)")
    g = parser.add_argument_group("data")
    g.add_argument("--num-digits", type=int, default=None)
    g.add_argument("--canvas", type=int, default=None)
    g.add_argument("--digit-size", type=int, default=None)
    g.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--test-samples", type=int, default=None)
    g = parser.add_argument_group("training (same budget for every method)")
    g.add_argument("--epochs", type=int, default=None, help="stage 1: the shared plain model, without augmentation")
    g.add_argument("--finetune-epochs", type=int, default=None, help="stage 2: every method, from stage 1")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="stage 1 peak learning rate (paper preset: A1's per model)")
    g.add_argument("--finetune-lr", type=float, default=None, help="stage 2 peak learning rate")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--warmup-frac", type=float, default=None, help="linear warm-up, as a fraction of each stage")
    g.add_argument("--new-lr-mult", type=float, default=None,
                   help="learning-rate multiplier of the modules new in stage 2 (the DEC, Canon's energy net)")
    g.add_argument("--aug-strength", type=float, default=None,
                   help="RandomMonotoneScale strength for Aug, InvL, Canon's bank and DEC (presets: 0.2; at 0.5, the "
                        "independent row and column functions shear a digit beyond recognition)")
    g.add_argument("--aug-p", type=float, default=None, help="RandomMonotoneScale probability")
    g.add_argument("--invl-weight", type=float, default=None, help="weight of the eq. 25 loss")
    g.add_argument("--canon-warps", type=int, default=None)
    g.add_argument("--canon-energy-size", type=int, default=None)
    g.add_argument("--canon-energy-widths", type=int, nargs=2, default=None, metavar=("C1", "C2"))
    g.add_argument("--dec-blocks", type=_ints, default=None, help="comma-separated block indices")
    g.add_argument("--dec-grid", type=int, default=None)
    g.add_argument("--dec-mode", choices=("equivariant", "invariant"), default=None)
    g.add_argument("--dec-widths", type=int, nargs=2, default=None, metavar=("C1", "C2"))
    g.add_argument("--dec-max-iter", type=int, default=None)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--scales", type=_floats, default=None, help="per-digit scales of the per-scale curve and InvE")
    g.add_argument("--scale-bins", type=_bins, default=None, help="Table 3 bins, e.g. 0.4-1.0,1.0-2.0")
    g.add_argument("--prob-scales", type=_floats, default=None, help="scales of the Fig. 8 curves")
    g.add_argument("--prob-images", type=int, default=None, help="test images in the Fig. 8 plot")
    g.add_argument("--grid-images", type=int, default=None, help="test images in the Fig. A2 plot")
    g.add_argument("--eval-batch", type=int, default=None)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset, overridden by every option given explicitly; checked."""
    cfg = copy.deepcopy(PRESETS[args.preset])
    for key in cfg:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = dict(value) if key == "model_kwargs" else value
    if cfg["lr"] is None:
        cfg["lr"] = paper_lr(cfg["model"])
    if cfg["finetune_lr"] is None:
        cfg["finetune_lr"] = cfg["lr"] * _FINETUNE_LR_RATIO
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    cfg["methods"] = tuple(m for m in METHODS if m in set(args.methods) | {"base", "aug"})
    for key in ("train_samples", "test_samples", "batch_size", "eval_batch", "canon_warps", "num_digits", "canvas"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("epochs", "finetune_epochs", "prob_images", "grid_images"):
        if cfg[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if not 0 <= cfg["warmup_frac"] < 1:
        raise ValueError(f"--warmup-frac must be in [0, 1), got {cfg['warmup_frac']}")
    if cfg["epochs"] + cfg["finetune_epochs"] == 0:
        raise ValueError("--epochs and --finetune-epochs are both 0: nothing would be trained")
    cfg["seed"] = args.seed
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# training


def _progress(iterable: Any, desc: str, disable: bool, **kwargs: Any) -> Any:
    return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True, **kwargs)


def _render(dataset: Any, disable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a LocallyScaledDigits (no transform): (N, C, H, W) in [0, 1] and (N,) labels."""
    images, labels = [], []
    for i in _progress(range(len(dataset)), "render train set", disable):
        image, label = dataset[i]
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to zero, per step."""
    warmup = int(round(warmup_frac * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _param_groups(model: nn.Module, lr: float, weight_decay: float, new_prefixes: Sequence[str],
                  new_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for 1-D parameters (timm's habit); ``new_lr_mult`` for the new modules."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = any(name.startswith(pref) for pref in new_prefixes)
        groups.setdefault((new, p.ndim <= 1 or name.endswith(".bias")), []).append(p)
    return [dict(params=ps, lr=lr * (new_lr_mult if new else 1.0), weight_decay=0.0 if no_decay else weight_decay)
            for (new, no_decay), ps in groups.items()]


def train(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
        warmup_frac: float,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        invl: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        invl_scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        new_prefixes: Sequence[str] = (),
        new_lr_mult: float = 1.0,
        seed: int = 0,
        channels: Optional[int] = None,
        device: torch.device = torch.device("cpu"),
        desc: str = "train",
        progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` for ``epochs`` on pre-rendered images with AdamW and a warm-up + cosine schedule.

    Args:
        model: a classifier, trained in place.
        images: (N, C, H, W) training images in [0, 1]; C may be 1 with ``channels`` 3 (expanded per batch).
        labels: (N,) class indices.
        normalize: applied to each batch after the augmentation.
        augment: batch augmentation on [0, 1] images (e.g. `RandomMonotoneScale`), or None.
        invl: the InvL loss module; with it, each batch also runs on ``invl_scale(batch)``.
        invl_scale: random monotone scaling of a batch for InvL.
        new_prefixes: parameter-name prefixes of the modules new in this stage (they get ``new_lr_mult``).
        seed: seed of the batch order.
        channels: channels the model takes, when the stored images have one.

    Returns:
        ``steps``, ``seconds`` and ``final_loss`` (mean of the last 20 steps).
    """
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    if total == 0:
        return dict(steps=0, seconds=0.0, final_loss=float("nan"))
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, lr, weight_decay, new_prefixes, new_lr_mult), lr=lr)
    scheduler = _schedule(optimizer, total, warmup_frac)
    order_rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = _progress(range(total), desc, not progress)
    perm = torch.empty(0, dtype=torch.long)
    for step in bar:
        k = step % steps_per_epoch
        if k == 0:
            perm = torch.randperm(len(images), generator=order_rng)
        idx = perm[k * batch_size:(k + 1) * batch_size]
        x, y = images[idx], labels[idx].to(device)
        if augment is not None:
            x = augment(x)
        if channels is not None and x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        x = x.to(device)
        logits = model(normalize(x))
        loss = F.cross_entropy(logits, y)
        if invl is not None and invl_scale is not None:
            loss = loss + invl(logits, model(normalize(invl_scale(x))))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == total - 1:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return dict(steps=total, seconds=time.perf_counter() - start, final_loss=sum(losses[-20:]) / len(losses[-20:]))


# ---------------------------------------------------------------------------------------------------------------------
# plots


def _plot_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib  # the plots need the optional `demo` extra; nothing else does
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ax.plot(r["scales"], [100 * a for a in r["per_scale_acc"]], marker="o", label=LABELS[method])
    ax.set_xlabel("per-digit scale")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Per-scale accuracy (test set)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_prob(curves: dict[str, torch.Tensor], scales: Sequence[float], images: torch.Tensor, labels: Sequence[int],
               path: Path) -> None:
    """Fig. 8: probability of the correct class against the scale, one panel per test image."""
    import matplotlib  # the plots need the optional `demo` extra; nothing else does
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 5.6), squeeze=False,
                             gridspec_kw=dict(height_ratios=(1, 1.4)))
    for i in range(n):
        axes[0, i].imshow(images[i].mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"label {labels[i]}")
        axes[0, i].axis("off")
        for method, probs in curves.items():
            axes[1, i].plot(list(scales), probs[i].tolist(), marker=".", label=LABELS[method])
        axes[1, i].set_ylim(-0.02, 1.02)
        axes[1, i].set_xlabel("per-digit scale")
        axes[1, i].grid(alpha=0.3)
    axes[1, 0].set_ylabel("P(correct class)")
    axes[1, -1].legend(fontsize=8)
    fig.suptitle("Probability of the correct class across local scales (Fig. 8 style)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _warp_lines(knots: torch.Tensor, grid: int, samples: int = 33) -> list[torch.Tensor]:
    """Polylines (in normalised coordinates) of l applied to the lines of a regular grid: where each canonical
    cell is sampled from in the input. knots: (2, G+1, G+1)."""
    t = torch.linspace(0, 1, samples, dtype=knots.dtype)
    lines = []
    for c in torch.linspace(0, 1, grid + 1, dtype=knots.dtype):
        for pts in (torch.stack((torch.full_like(t, c), t), -1), torch.stack((t, torch.full_like(t, c)), -1)):
            lines.append(apply_map(knots[None], pts[None])[0])
    return lines


def _plot_grids(images: torch.Tensor, knots: torch.Tensor, labels: Sequence[int], title: str, path: Path) -> None:
    """Fig. A2: the learned monotone scaling of each input, drawn as the warped grid over the image."""
    import matplotlib  # the plots need the optional `demo` extra; nothing else does
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, grid = images.shape[0], knots.shape[-1] - 1
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    h, w = images.shape[-2:]
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(images[i].mean(0).numpy(), cmap="gray", vmin=0, vmax=1, extent=(0, w - 1, h - 1, 0))
        for line in _warp_lines(knots[i].double().cpu(), grid):
            xy = line.numpy()
            ax.plot(xy[:, 0] * (w - 1), xy[:, 1] * (h - 1), color="tab:orange", lw=1.2)
        ax.set_title(f"label {labels[i]}")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _first_dec_knots(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Knots that the first adapted block's DEC finds for ``x`` (a forward hook, removed after)."""
    key = str(min(int(k) for k in model.dec))
    found: list[torch.Tensor] = []
    handle = model.dec[key].register_forward_hook(lambda mod, inp, out: found.append(out.detach()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return found[0], key


# ---------------------------------------------------------------------------------------------------------------------
# main


def _eval_command(cfg: dict[str, Any], method: str, checkpoint: Path) -> str:
    model = cfg["model"] + ("_dec" if method == "dec" else "")
    kwargs = dict(cfg["model_kwargs"])
    if method == "dec":
        kwargs.update(_dec_kwargs(cfg))
    parts = ["timm-dec", "eval", "--model", model, "--checkpoint", str(checkpoint)]
    if kwargs:
        parts += ["--model-kwargs"] + [f"{k}={v!r}".replace(" ", "") for k, v in kwargs.items()]
    if method == "canon":
        parts += ["--canon", "--canon-warps", str(cfg["canon_warps"]), "--canon-strength", f"{cfg['aug_strength']:g}",
                  "--canon-seed", str(cfg["seed"]), "--canon-energy-size", str(cfg["canon_energy_size"]),
                  "--canon-energy-widths", *map(str, cfg["canon_energy_widths"])]
    parts += ["--num-digits", str(cfg["num_digits"]), "--canvas", str(cfg["canvas"]), "--scale-range",
              *map(str, cfg["scale_range"]), "--num-samples", str(cfg["test_samples"]),
              "--scales", ",".join(f"{s:g}" for s in cfg["scales"]), "--data-seed", str(cfg["seed"]),
              "--seed", str(cfg["seed"])]
    if cfg["digit_size"] is not None:
        parts += ["--digit-size", str(cfg["digit_size"])]
    if cfg["scale_bins"]:
        parts += ["--scale-bins", ",".join(f"{lo:g}-{hi:g}" for lo, hi in cfg["scale_bins"])]
    return " ".join(shlex.quote(p) for p in parts)


def _dec_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    out = dict(dec_grid=cfg["dec_grid"], dec_mode=cfg["dec_mode"], dec_widths=tuple(cfg["dec_widths"]),
               dec_max_iter=cfg["dec_max_iter"])
    if cfg["dec_blocks"] is not None:
        out["dec_blocks"] = tuple(cfg["dec_blocks"])
    return out


@dataclass
class _Setup:
    """What the steps of `run` share."""
    cfg: dict[str, Any]
    device: torch.device
    progress: bool
    out: Path
    data_kw: dict[str, Any]
    test_set: LocallyScaledDigits
    num_classes: int
    normalize: Callable[[torch.Tensor], torch.Tensor]

    def create(self, name: str, **extra: Any) -> nn.Module:
        """A classifier for the digits, seeded, with timm's pretrained weights for a base model if asked for."""
        torch.manual_seed(self.cfg["seed"])
        return timm.create_model(name, pretrained=self.cfg["pretrained"] and not name.endswith("_dec"),
                                 num_classes=self.num_classes, **self.cfg["model_kwargs"], **extra)


def _train_all(s: _Setup, images: torch.Tensor, labels: torch.Tensor,
               probe: nn.Module) -> tuple[dict[str, nn.Module], dict[str, dict[str, float]]]:
    """Stage 1 (shared) and stage 2 (every method); the trained models and their timings."""
    cfg, seed = s.cfg, s.cfg["seed"]
    aug_rng = torch.Generator().manual_seed(seed + 1)
    augment = RandomMonotoneScale(cfg["aug_strength"], p=cfg["aug_p"], generator=aug_rng)

    def invl_scale(x: torch.Tensor) -> torch.Tensor:
        knots = random_knots(x.shape[0], augment.grid, cfg["aug_strength"], generator=aug_rng).to(x.device)
        return monotone_warp(x, knots, inverse=True, check=False)

    common = dict(batch_size=cfg["batch_size"], weight_decay=cfg["weight_decay"], warmup_frac=cfg["warmup_frac"],
                  normalize=s.normalize, channels=s.data_kw["channels"], device=s.device, progress=s.progress)
    stage1 = dict(common, epochs=cfg["epochs"], lr=cfg["lr"])
    stage2 = dict(common, epochs=cfg["finetune_epochs"], lr=cfg["finetune_lr"], new_lr_mult=cfg["new_lr_mult"])
    timings: dict[str, dict[str, float]] = {}

    # Stage 1, shared: the plain model from scratch (or from timm's pretrained weights), without augmentation. It
    # plays the role of the paper's pretrained starting point, so every method below starts from the same weights.
    stage1_model = probe
    stage1_result = train(stage1_model, images, labels, seed=seed, desc="stage 1 (shared)", **stage1)
    stage1_state = {k: v.detach().clone() for k, v in stage1_model.state_dict().items()}
    models = _stage2_models(s, stage1_model, stage1_state)
    stage2_setup = {
        "base": dict(),
        "aug": dict(augment=augment),
        "invl": dict(augment=augment, invl=InvarianceLoss(cfg["invl_weight"]), invl_scale=invl_scale),
        "canon": dict(augment=augment, new_prefixes=("energy.",)),
        "dec": dict(augment=augment, new_prefixes=("dec.",)),
    }
    for method in cfg["methods"]:
        result = train(models[method], images, labels, seed=seed + 1, desc=f"{LABELS[method]:<5} stage 2",
                       **stage2_setup[method], **stage2)
        timings[method] = dict(stage1=stage1_result["seconds"], stage2=result["seconds"],
                               train_steps=stage1_result["steps"] + result["steps"])
    return models, timings


def _stage2_models(s: _Setup, stage1_model: nn.Module, stage1_state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Every method's model at the start of stage 2, from the stage-1 weights. Base keeps training as it was."""
    cfg, seed = s.cfg, s.cfg["seed"]
    models: dict[str, nn.Module] = {"base": stage1_model}
    for method in ("aug", "invl"):
        if method in cfg["methods"]:
            models[method] = copy.deepcopy(stage1_model)
    if "canon" in cfg["methods"]:
        torch.manual_seed(seed)
        models["canon"] = InputCanonicalizer(
            copy.deepcopy(stage1_model), num_warps=cfg["canon_warps"], strength=cfg["aug_strength"],
            in_chans=s.data_kw["channels"], energy_size=cfg["canon_energy_size"],
            energy_widths=tuple(cfg["canon_energy_widths"]), seed=seed)
    if "dec" in cfg["methods"]:
        dec_model = s.create(cfg["model"] + "_dec", **_dec_kwargs(cfg))
        load_dec_state_dict(dec_model, stage1_state, source=f"the stage-1 {cfg['model']} weights",
                            target=f"{cfg['model']}_dec")
        models["dec"] = dec_model
    return models


def _evaluate_all(s: _Setup, models: dict[str, nn.Module], timings: dict[str, dict[str, float]],
                  prob_idx: list[int]) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Evaluation: the same test set, scales and bins for every method; each checkpoint saved beside its result."""
    cfg, test_set = s.cfg, s.test_set
    results: dict[str, dict[str, Any]] = {}
    prob_curves: dict[str, torch.Tensor] = {}
    for method in cfg["methods"]:
        model = models[method]
        start = time.perf_counter()
        r = evaluate_model(model, test_set, cfg["scales"], scale_bins=cfg["scale_bins"], batch_size=cfg["eval_batch"],
                           device=s.device, seed=cfg["seed"], progress=s.progress)
        timings[method]["eval"] = time.perf_counter() - start
        if prob_idx:
            pc = evaluate_scale_consistency(model, test_set, list(cfg["prob_scales"]), indices=prob_idx,
                                            batch_size=cfg["eval_batch"], device=s.device, progress=False,
                                            return_per_sample=True)
            prob_curves[method] = pc["prob_correct"]
        ckpt = s.out / "checkpoints" / f"{method}.safetensors"
        save_checkpoint(model, ckpt, data=s.data_kw)  # records model, DEC options, data; creates checkpoints/
        r.update(checkpoint=str(ckpt), eval_command=_eval_command(cfg, method, ckpt),
                 stage1_seconds=timings[method]["stage1"], stage2_seconds=timings[method]["stage2"],
                 eval_seconds=timings[method]["eval"], train_steps=timings[method]["train_steps"])
        results[method] = r
    return results, prob_curves


def _tables(cfg: dict[str, Any], results: dict[str, dict[str, Any]], num_test: int) -> str:
    """Tables 2 and 3 (per scale, per bin) and the DEC solver line, as printed."""
    labelled = {LABELS[m]: r for m, r in results.items()}
    tables = [
        f"Table 2 style: accuracy and InvE on the test set ({num_test} images; InvE over per-digit scales "
        f"{', '.join(format_scale(s) for s in cfg['scales'])})",
        format_table(labelled), "",
        "Table 3 style: accuracy (%) per per-digit scale", format_per_scale_table(labelled),
    ]
    if cfg["scale_bins"]:
        tables += ["", "Table 3 style: accuracy (%) per scale bin (per-digit scales drawn in the bin)",
                   format_per_scale_table(labelled, key="per_bin_acc")]
    if "dec" in results and "dec_solver" in results["dec"]:
        s = results["dec"]["dec_solver"]
        tables += ["", f"DEC solver at test time: {s['mean_iterations']:.2f} iterations per sample on average, "
                       f"{s['fallbacks']} fallbacks in {s['samples']} solves"]
    return "\n".join(tables)


def _plots(s: _Setup, results: dict[str, dict[str, Any]], models: dict[str, nn.Module], prob_idx: list[int],
           prob_curves: dict[str, torch.Tensor]) -> list[str]:
    """Per-scale accuracy, probability of the correct class and the learned warp grids; the file names."""
    cfg, test_set, out = s.cfg, s.test_set, s.out
    _plot_curves(results, out / "per_scale_accuracy.png")
    plots = ["per_scale_accuracy.png"]
    if prob_idx:
        shown = torch.stack([test_set.render(test_set.describe(i).source_indices, test_set.describe(i).scales)
                             for i in prob_idx])
        _plot_prob(prob_curves, cfg["prob_scales"], shown, [test_set.describe(i).label for i in prob_idx],
                   out / "prob_correct.png")
        plots.append("prob_correct.png")
    if "dec" in models and cfg["grid_images"] > 0:
        idx = list(range(min(cfg["grid_images"], len(test_set))))
        raw = torch.stack([test_set.render(test_set.describe(i).source_indices, test_set.describe(i).scales)
                           for i in idx])
        knots, block = _first_dec_knots(models["dec"], s.normalize(raw).to(s.device))
        _plot_grids(raw, knots, [test_set.describe(i).label for i in idx],
                    f"Monotone scaling found by the DEC of block {block} (Fig. A2 style): the grid lines show where "
                    f"each canonical cell is sampled from", out / "warp_grids.png")
        plots.append("warp_grids.png")
    return plots


def _summary(args: argparse.Namespace, s: _Setup, results: dict[str, dict[str, Any]],
             prob_curves: dict[str, torch.Tensor], text: str, plots: list[str], wall: float) -> dict[str, Any]:
    """The content of ``summary.json``."""
    cfg = s.cfg
    summary: dict[str, Any] = {
        "preset": args.preset,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "num_classes": s.num_classes,
        "methods": {m: {k: v for k, v in r.items() if not isinstance(v, torch.Tensor)} for m, r in results.items()},
        "prob_correct": {m: c.tolist() for m, c in prob_curves.items()},
        "prob_scales": list(cfg["prob_scales"]),
        "tables": text,
        "plots": plots,
        "wall_seconds": wall,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(s.device),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    if "dec" in results:
        summary["dec_vs_aug"] = {"acc_points": 100 * (results["dec"]["acc"] - results["aug"]["acc"]),
                                 "inv_e_1e-2": 100 * (results["dec"]["inv_e"] - results["aug"]["inv_e"])}
    return summary


def run(args: argparse.Namespace) -> int:
    """Train and evaluate every method; print Tables 2 and 3; write the plots, checkpoints and summary."""
    cfg = resolve_config(args)
    wall_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    out = Path(args.out)
    seed = cfg["seed"]

    data_kw = dict(num_digits=cfg["num_digits"], canvas=cfg["canvas"], scale_range=tuple(cfg["scale_range"]),
                   digit_size=cfg["digit_size"], seed=seed, channels=int(cfg["model_kwargs"].get("in_chans", 3)))
    # Stored with one channel (the digits are grey), expanded per batch.
    train_set = LocallyScaledDigits("train", num_samples=cfg["train_samples"], **dict(data_kw, channels=1))
    test_set = LocallyScaledDigits("test", num_samples=cfg["test_samples"], **data_kw)
    num_classes = train_set.num_classes
    print(f"timm-dec demo (preset {args.preset}): {cfg['model']} on locally scaled {cfg['num_digits']}-digit numbers "
          f"({num_classes} classes, {cfg['canvas']} px), {len(train_set)} train / {len(test_set)} test images, "
          f"seed {seed}, device {device}, {torch.get_num_threads()} CPU threads")
    images, labels = _render(train_set, not progress)

    s = _Setup(cfg, device, progress, out, data_kw, test_set, num_classes, normalize=lambda x: x)
    probe = s.create(cfg["model"])
    s.normalize = normalize_transform(resolve_data_config({}, model=probe), data_kw["channels"])
    test_set.transform = s.normalize
    models, timings = _train_all(s, images, labels, probe)
    prob_idx = list(range(min(cfg["prob_images"], len(test_set))))
    results, prob_curves = _evaluate_all(s, models, timings, prob_idx)
    text = _tables(cfg, results, len(test_set))
    print("\n" + text)
    plots = _plots(s, results, models, prob_idx, prob_curves)

    wall = time.perf_counter() - wall_start
    summary = _summary(args, s, results, prob_curves, text, plots, wall)
    (out / "tables.txt").write_text(text + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\nwall time {wall / 60:.1f} min; wrote {out}/summary.json, tables.txt, {', '.join(plots)} and "
          f"checkpoints/ (re-evaluate one with the eval_command in summary.json)")
    return 0
