"""Is a DEC at its equilibrium, and is its backward the gradient of its forward? (`timm-dec bench equilibrium`)

`gradient_check` measures, in float64 on a few inputs, the directional derivative of an objective along a random
direction in the DEC parameters three ways:

- **true**: central finite differences of the objective with every DEC solved to ``true_tol`` (the equilibrium
  itself), at two step sizes; their agreement says the equilibrium is unique and smooth along the direction (a jump
  to another fixed point makes the difference quotients disagree);
- **backward at the equilibrium**: the model's backward with the solves at ``true_tol``;
- **backward as configured**: the model's backward with the DEC options it runs with (its ``max_iter`` and ``tol``):
  the gradient training actually follows.

The objective is the summed log-probability of each input's predicted class (the class fixed at the unperturbed
model), so it is smooth where the equilibrium is. `convergence` reports the share of forward solves within ``tol``
and the mean iterations, as every result of an iterative method should.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..dec import DEC, solver_stats

__all__ = ["gradient_check", "convergence", "dec_parameters", "solve_options"]


def dec_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every DEC module in ``model`` (found by type), in module order."""
    params = [p for m in model.modules() if isinstance(m, DEC) for p in m.parameters()]
    if not params:
        raise ValueError(f"{type(model).__name__} has no DEC modules")
    return params


class solve_options:
    """Context manager: every DEC of ``model`` runs with the given `DECConfig` changes, restored on exit."""

    def __init__(self, model: nn.Module, **changes: Any) -> None:
        self.decs = [m for m in model.modules() if isinstance(m, DEC)]
        self.changes = changes
        self.saved: list[Any] = []

    def __enter__(self) -> "solve_options":
        self.saved = [d.cfg for d in self.decs]
        for d in self.decs:
            d.cfg = dataclasses.replace(d.cfg, **self.changes)
        return self

    def __exit__(self, *exc: Any) -> None:
        for d, cfg in zip(self.decs, self.saved):
            d.cfg = cfg


def convergence(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Share of forward solves within ``tol`` and mean iterations of ``model`` (eval, no grad) on ``x`` (N, C, H, W).

    Returns:
        ``samples`` (solves: inputs times DECs), ``within_tol`` (share), ``mean_iterations``, ``mean_residual``,
        ``max_residual``, ``fallbacks``.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad(), solver_stats() as stats:
        for chunk in x.split(batch_size):
            model(chunk)
    model.train(was_training)
    summary = stats.summary()
    samples = stats.total_samples
    return dict(samples=samples, within_tol=1 - stats.total_not_converged / max(1, samples),
                mean_iterations=stats.mean_iterations, mean_residual=stats.mean_residual,
                max_residual=max((s["max_residual"] for s in summary.values()), default=0.0),
                fallbacks=stats.total_fallbacks)


def gradient_check(
        model: nn.Module,
        x: torch.Tensor,
        *,
        steps: Sequence[float] = (1e-4, 1e-6),
        true_tol: float = 1e-11,
        true_max_iter: int = 200,
        seed: int = 0,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, Any]:
    """The DEC's backward against finite differences of its equilibrium, in float64 (module docstring).

    Args:
        model: a classifier containing DECs (eval mode is used; a float64 copy is made, ``model`` is untouched).
        x: (N, C, H, W) inputs, already normalised.
        steps: finite-difference step sizes (central differences) along the unit direction.
        true_tol: the tolerance of the "true" solves, forward and adjoint; ``true_max_iter`` their iteration budget.
        seed: seed of the random direction.
        transform: applied to the model's output before ``log_softmax`` (default none).

    Returns:
        ``fd`` (one directional derivative per step), ``fd_agree`` (relative spread of those), ``true`` (the first
        step's), ``backward`` (as configured), ``backward_at_equilibrium``, ``error`` (|backward - true| / |true|),
        ``error_at_equilibrium``, and ``configured`` / ``equilibrium``: `convergence` of the solves with the
        configured and the true options on ``x``.
    """
    m = copy.deepcopy(model).double().eval()
    x = x.detach().double()
    params = dec_parameters(m)
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction))
    direction = [d / norm for d in direction]
    transform = transform or (lambda out: out)

    def log_probs() -> torch.Tensor:
        return transform(m(x)).log_softmax(-1)

    # the true equilibrium and its exact adjoint: both solves run to ``true_tol``
    exact = dict(tol=true_tol, max_iter=true_max_iter, backward_tol=true_tol, backward_max_iter=true_max_iter)
    with solve_options(m, **exact), torch.no_grad():
        classes = log_probs().argmax(-1)

    def objective() -> torch.Tensor:
        return log_probs().gather(-1, classes[:, None]).sum()

    def shifted(h: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=h)
            value = float(objective())
            for p, d in zip(params, direction):
                p.sub_(d, alpha=h)
        return value

    def backward() -> float:
        m.zero_grad(set_to_none=True)
        with torch.enable_grad():
            objective().backward()
        return sum(float((p.grad * d).sum()) for p, d in zip(params, direction) if p.grad is not None)

    with solve_options(m, **exact):
        fd = [(shifted(h) - shifted(-h)) / (2 * h) for h in steps]
        at_equilibrium = backward()
        equilibrium = convergence(m, x)
    configured_grad = backward()
    configured = convergence(m, x)
    true = fd[0]
    scale = max(abs(true), 1e-300)
    return dict(fd=fd, steps=list(steps), fd_agree=(max(fd) - min(fd)) / scale, true=true, backward=configured_grad,
                backward_at_equilibrium=at_equilibrium, error=abs(configured_grad - true) / scale,
                error_at_equilibrium=abs(at_equilibrium - true) / scale, configured=configured,
                equilibrium=equilibrium, inputs=int(x.shape[0]))
