"""The demo's figures: per-scale accuracy, probability of the correct class (paper Fig. 8) and the learned warp grids
(Fig. A2). matplotlib is imported only when a figure is drawn (it is in the optional ``demo`` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..ops import apply_map

__all__ = ["plot_per_scale", "plot_prob_correct", "warp_lines", "plot_warp_grids"]


def _pyplot() -> Any:
    import matplotlib  # the plots need the optional `demo` extra; nothing else does
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_per_scale(results: dict[str, dict[str, Any]], path: Path, labels: dict[str, str]) -> None:
    """Per-scale accuracy of each method (Table 3 as curves)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ax.plot(r["scales"], [100 * a for a in r["per_scale_acc"]], marker="o", label=labels.get(method, method))
    ax.set_xlabel("per-digit scale")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Per-scale accuracy (test set)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_prob_correct(curves: dict[str, torch.Tensor], scales: Sequence[float], images: torch.Tensor,
                      targets: Sequence[int], path: Path, labels: dict[str, str]) -> None:
    """Fig. 8: probability of the correct class against the scale, one panel per test image."""
    plt = _pyplot()

    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 5.6), squeeze=False,
                             gridspec_kw=dict(height_ratios=(1, 1.4)))
    for i in range(n):
        axes[0, i].imshow(images[i].mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"label {targets[i]}")
        axes[0, i].axis("off")
        for method, probs in curves.items():
            axes[1, i].plot(list(scales), probs[i].tolist(), marker=".", label=labels.get(method, method))
        axes[1, i].set_ylim(-0.02, 1.02)
        axes[1, i].set_xlabel("per-digit scale")
        axes[1, i].grid(alpha=0.3)
    axes[1, 0].set_ylabel("P(correct class)")
    axes[1, -1].legend(fontsize=8)
    fig.suptitle("Probability of the correct class across local scales (Fig. 8 style)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def warp_lines(knots: torch.Tensor, grid: int, samples: int = 33) -> list[torch.Tensor]:
    """Polylines (in normalised coordinates) of l applied to the lines of a regular grid: where each canonical
    cell is sampled from in the input. knots: (2, G+1, G+1)."""
    t = torch.linspace(0, 1, samples, dtype=knots.dtype)
    lines = []
    for c in torch.linspace(0, 1, grid + 1, dtype=knots.dtype):
        for pts in (torch.stack((torch.full_like(t, c), t), -1), torch.stack((t, torch.full_like(t, c)), -1)):
            lines.append(apply_map(knots[None], pts[None])[0])
    return lines


def plot_warp_grids(images: torch.Tensor, knots: torch.Tensor, labels: Sequence[int], title: str, path: Path) -> None:
    """Fig. A2: the learned monotone scaling of each input, drawn as the warped grid over the image."""
    plt = _pyplot()

    n, grid = images.shape[0], knots.shape[-1] - 1
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    h, w = images.shape[-2:]
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(images[i].mean(0).numpy(), cmap="gray", vmin=0, vmax=1, extent=(0, w - 1, h - 1, 0))
        for line in warp_lines(knots[i].double().cpu(), grid):
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
