"""Per-sample fixed-point solvers: Anderson acceleration and plain fixed-point iteration.

Every solver has one signature, ``solver(func, z0, *, max_iter, tol, history) -> (z, fz, info)``, and a small
string-keyed registry, `SOLVERS`, picks one. ``func(z, index)`` evaluates the map on the rows ``index`` of the batch:
``z`` holds only those rows. Each sample runs its own iteration, with its own Anderson least-squares mixing and its own
stopping: once its relative residual ``||f(z) - z|| / (||f(z)|| + eps)`` is below ``tol`` it is frozen and ``func`` is
no longer called on it, so a sample's result never depends on the other samples of the batch. A sample whose map
returns a non-finite value stops at once and is flagged in ``info.failed``.

The solvers build no autograd graph of their own; callers run them under ``torch.no_grad()`` for the forward solve,
and inside a backward pass for the adjoint solve.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["SolverInfo", "anderson", "fixed_point", "SOLVERS", "get_solver", "relative_residual", "RESIDUAL_EPS"]

# Denominator guard of the relative residual; the logits the DEC solves for are O(1).
RESIDUAL_EPS = 1e-6

SolverFunc = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SolverInfo(NamedTuple):
    """Per-sample outcome of a solve; every field has shape (B,).

    Attributes:
        iterations: evaluations of the map spent on the sample (int64).
        residual: relative residual of the returned iterate; inf where the solve failed (float).
        converged: the residual reached ``tol``.
        failed: the map returned a non-finite value for the sample.
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    failed: torch.Tensor


def relative_residual(z: torch.Tensor, fz: torch.Tensor, eps: float = RESIDUAL_EPS) -> torch.Tensor:
    """Per-sample ``||f(z) - z|| / (||f(z)|| + eps)``.

    Args:
        z: (B, ...) iterates.
        fz: (B, ...) the map at ``z``.
        eps: guard against a zero denominator.

    Returns:
        (B,) relative residuals.
    """
    diff = (fz - z).flatten(1).norm(dim=1)
    return diff / (fz.flatten(1).norm(dim=1) + eps)


def _anderson_mix(x_hist: torch.Tensor, f_hist: torch.Tensor, lam: float, beta: float) -> torch.Tensor:
    """Next Anderson iterate of each sample from its own history.

    Solves, per sample, min ||sum_i alpha_i (f_i - x_i)|| subject to sum_i alpha_i = 1 (a bordered linear system,
    regularised relative to the residuals' own scale, in float64), and returns
    sum_i alpha_i (beta f_i + (1 - beta) x_i).

    Args:
        x_hist: (b, n, D) past iterates.
        f_hist: (b, n, D) the map at those iterates.
        lam: Tikhonov regularisation, relative to the mean squared residual norm.
        beta: damping; 1 mixes the map values only.

    Returns:
        (b, D) next iterates, in the dtype of ``f_hist``.
    """
    b, n, _ = x_hist.shape
    g = (f_hist - x_hist).double()
    gram = g @ g.transpose(1, 2)
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1)
    system = gram.new_zeros(b, n + 1, n + 1)
    system[:, 0, 1:] = 1
    system[:, 1:, 0] = 1
    system[:, 1:, 1:] = gram + (lam * scale + 1e-300)[:, None, None] * torch.eye(n, dtype=gram.dtype, device=g.device)
    rhs = gram.new_zeros(b, n + 1)
    rhs[:, 0] = 1
    sol, info = torch.linalg.solve_ex(system, rhs)
    alpha = sol[:, 1:]
    # A singular or non-finite system (collinear history) falls back to the plain step from the newest entry.
    bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
    if bool(bad.any()):
        plain = torch.zeros_like(alpha)
        plain[:, -1] = 1
        alpha = torch.where(bad[:, None], plain, alpha)
    mixed = f_hist if beta == 1 else beta * f_hist + (1 - beta) * x_hist
    return (alpha.to(f_hist.dtype).unsqueeze(1) @ mixed).squeeze(1)


def _solve(
        func: SolverFunc,
        z0: torch.Tensor,
        max_iter: int,
        tol: float,
        history: int,
        lam: float,
        beta: float,
) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """Anderson acceleration with memory ``history``; ``history=1`` is plain fixed-point iteration."""
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must have shape (B, ...) with B >= 1, got {tuple(z0.shape)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    batch, shape = z0.shape[0], z0.shape[1:]
    device = z0.device
    x = z0.detach().reshape(batch, -1)
    x_hist = x.new_zeros(batch, history, x.shape[1])
    f_hist = torch.zeros_like(x_hist)
    best_x, best_f = x.clone(), torch.zeros_like(x)
    best_res = torch.full((batch,), float("inf"), dtype=x.dtype, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    failed = torch.zeros(batch, dtype=torch.bool, device=device)
    active = torch.arange(batch, device=device)
    for k in range(max_iter):
        fx = func(x.reshape(-1, *shape), active).detach().reshape(x.shape).to(x.dtype)
        iterations[active] += 1
        finite = torch.isfinite(fx).all(dim=1) & torch.isfinite(x).all(dim=1)
        res = torch.where(finite, relative_residual(x, fx), torch.full_like(best_res[active], float("inf")))
        better = res < best_res[active]
        rows = active[better]
        best_x[rows], best_f[rows], best_res[rows] = x[better], fx[better], res[better]
        failed[active] = ~finite
        slot = k % history
        x_hist[active, slot], f_hist[active, slot] = x, fx
        keep = finite & (res >= tol)
        if k == max_iter - 1 or not bool(keep.any()):
            break
        active = active[keep]
        if history == 1 or k == 0:
            x = fx[keep] if beta == 1 else beta * fx[keep] + (1 - beta) * x[keep]
        else:
            used = min(k + 1, history)  # ring buffer: the order of the entries does not matter to Anderson
            x = _anderson_mix(x_hist[active, :used], f_hist[active, :used], lam, beta)
    best_res = torch.where(failed, torch.full_like(best_res, float("inf")), best_res)
    info = SolverInfo(iterations, best_res, ~failed & (best_res < tol), failed)
    return best_x.reshape(z0.shape).to(z0.dtype), best_f.reshape(z0.shape).to(z0.dtype), info


def anderson(
        func: SolverFunc,
        z0: torch.Tensor,
        *,
        max_iter: int,
        tol: float,
        history: int = 5,
        lam: float = 1e-4,
        beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """Per-sample Anderson acceleration (type II) of ``z = func(z)``.

    Args:
        func: ``func(z, index)``: the map on the batch rows ``index`` (b,), with ``z`` of shape (b, ...).
        z0: (B, ...) starting point.
        max_iter: most evaluations of ``func`` per sample.
        tol: stop a sample once its relative residual is below this.
        history: memory m of the least-squares mixing.
        lam: regularisation of the mixing, relative to the residuals' scale.
        beta: damping of the mixed step, in (0, 1]; 1 is undamped.

    Returns:
        ``(z, fz, info)``: (B, ...) the lowest-residual iterate of each sample, (B, ...) the map at it, and
        `SolverInfo`.

    Example:
        >>> a = torch.tensor([0.5, 0.9])
        >>> z, fz, info = anderson(lambda z, i: a[i, None] * z + 1, torch.zeros(2, 1), max_iter=20, tol=1e-8)
        >>> z.squeeze(1).round(decimals=4)  # 1 / (1 - a)
        tensor([ 2., 10.])
    """
    return _solve(func, z0, max_iter, tol, history, lam, beta)


def fixed_point(
        func: SolverFunc,
        z0: torch.Tensor,
        *,
        max_iter: int,
        tol: float,
        history: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """Per-sample plain iteration ``z <- func(z)``; same contract as `anderson` (``history`` is ignored)."""
    return _solve(func, z0, max_iter, tol, 1, 0.0, 1.0)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, SolverInfo]]] = {
    "anderson": anderson,
    "fixed_point": fixed_point,
}


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, SolverInfo]]:
    """The solver registered as ``name`` in `SOLVERS`."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {tuple(SOLVERS)}")
    return SOLVERS[name]
