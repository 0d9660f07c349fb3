"""The one training loop of the experiments (``timm-dec demo`` and ``segment``): a task brings its batches and its
loss; the optimizer (AdamW on `param_groups`), the schedule (`warmup_cosine_schedule`), the gradient clipping, the
progress bar and the result are shared.

`training_step` builds one step of a run; `train` runs it with a progress bar. The equal-compute calibration
(`calibrate_equal_time`) times the same step functions that `train` runs.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ._common import warmup_cosine_schedule

__all__ = ["Batches", "LossFn", "training_step", "train"]

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""A batch source: each call returns the next (inputs, targets) batch, drawing from the task's own generators."""
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""A task's loss of (model, inputs, targets), with its extras (InvL, Canon's ranking loss, AugL): a scalar."""


def training_step(model: nn.Module, batches: Batches, loss_fn: LossFn, groups: Sequence[dict[str, Any]], *,
                  steps: int, warmup_frac: float, clip_norm: Optional[float] = None) -> Callable[[], float]:
    """One training step of ``model`` per call: the next batch, its loss, the gradient (its norm clipped at
    ``clip_norm``), an AdamW step; each call returns the step's loss.

    Args:
        model: put in training mode here (on its device already: ``groups`` name its parameters).
        batches: the task's batch source, called once per step before ``loss_fn``.
        loss_fn: the task's loss of (model, inputs, targets).
        groups: AdamW's parameter groups (`param_groups`), each with its ``lr`` and ``weight_decay``.
        steps: the run's length: the learning rate follows `warmup_cosine_schedule` over ``max(1, steps)`` steps and
            stays where it ends after ``steps`` calls (the calibration calls a one-step run many times).
        warmup_frac: the linear warm-up, as a fraction of ``steps``.
        clip_norm: the largest total gradient norm of the trained parameters (None: no clipping).
    """
    model.train()
    optimizer = torch.optim.AdamW(groups)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = warmup_cosine_schedule(optimizer, max(1, steps), warmup_frac)
    done = [0]

    def step() -> float:
        x, y = batches()
        loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(trained, clip_norm)
        optimizer.step()
        done[0] += 1
        if done[0] <= steps:
            scheduler.step()
        return loss.item()

    return step


def train(step: Callable[[], float], steps: int, name: str, progress: bool = True) -> dict[str, float]:
    """Run ``step`` (`training_step`) ``steps`` times, with a progress bar named ``name`` showing the recent loss.

    Returns:
        ``steps``, ``seconds`` (of the steps alone) and ``final_loss``, the mean loss of the last 20 steps (NaN
        without steps).
    """
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=name, disable=not progress or steps == 0, dynamic_ncols=True)
    for i in bar:
        losses.append(step())
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    final = sum(losses[-20:]) / len(losses[-20:]) if losses else float("nan")
    return dict(steps=steps, seconds=time.perf_counter() - start, final_loss=final)
