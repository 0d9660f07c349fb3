"""Per-sample fixed-point solvers with a static trip count: Anderson acceleration and plain fixed-point iteration.

Every solver has one signature,
``solver(func, z0, *, args, max_iter, tol, history, beta, check_every, compact) -> (z, fz, info)``,
and a small string-keyed registry, `SOLVERS`, picks one. ``func(z, *args)`` evaluates the map on a (b, ...) batch
of rows of z, where ``args`` are per-sample (B, ...) tensors the solver slices alongside z: all B rows, or, with
``compact=True``, the rows still active. It must treat samples independently (the DEC's H does).

Each sample runs its own iteration, with its own Anderson least-squares mixing and its own stopping: once its
relative residual ``||f(z) - z|| / (||f(z)|| + eps)`` is below ``tol`` it is frozen with ``torch.where`` (its
iterate is not updated), so a sample's result never depends on its batch mates. With ``check_every=None`` (and
always under ``torch.compile``) shapes never change and nothing in the loop reads a value on the host: the map runs
on the full batch for ``max_iter`` iterations, so the solve can be compiled into one graph and captured in a CUDA
graph. In eager mode with ``check_every`` set, the loop reads the active set on the host every ``check_every``
iterations and stops once no sample is active; with ``compact=True`` it evaluates the map, until the next check,
only on the rows active at the last one (a batch pays for its samples' iterations, not for its slowest sample's). A
sample whose map returns a non-finite value is flagged in ``info.failed``, restarted from ``z0`` (so the map never
sees its non-finite iterate again) and frozen.

The solvers build no autograd graph of their own; callers run them under ``torch.no_grad()`` for the forward solve,
and inside a backward pass for the adjoint solve.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

__all__ = [
    "SolverInfo", "anderson", "fixed_point", "SOLVERS", "get_solver", "relative_residual", "RESIDUAL_EPS",
    "check_solver_args",
]

# Denominator guard of the relative residual; the logits the DEC solves for are O(1).
RESIDUAL_EPS = 1e-6

SolverFunc = Callable[..., torch.Tensor]


class SolverInfo(NamedTuple):
    """Per-sample outcome of a solve; every field has shape (B,).

    Attributes:
        iterations: evaluations of the map spent on the sample before it stopped (int64).
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
    """Next Anderson iterate of each sample from its own history, batched over samples.

    Solves, per sample, min ||sum_i alpha_i (f_i - x_i)|| subject to sum_i alpha_i = 1 (a bordered linear system,
    regularised relative to the residuals' own scale, in float64), and returns
    sum_i alpha_i (beta f_i + (1 - beta) x_i). A singular or non-finite system (collinear history) takes the plain
    step from the newest entry instead, chosen with ``torch.where`` (no host read).

    Args:
        x_hist: (b, n, D) past iterates; entry n-1 is the newest.
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
    eye = torch.eye(n, dtype=gram.dtype, device=g.device)
    border = torch.ones(b, 1, n, dtype=gram.dtype, device=g.device)
    system = torch.cat([
        torch.cat([gram.new_zeros(b, 1, 1), border], dim=2),
        torch.cat([border.transpose(1, 2), gram + (lam * scale + 1e-300)[:, None, None] * eye], dim=2),
    ], dim=1)
    rhs = torch.cat([gram.new_ones(b, 1), gram.new_zeros(b, n)], dim=1)
    sol, info = torch.linalg.solve_ex(system, rhs)
    alpha = sol[:, 1:]
    bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
    plain = torch.zeros_like(alpha)
    plain[:, -1] = 1
    alpha = torch.where(bad[:, None], plain, alpha)
    mixed = f_hist if beta == 1 else beta * f_hist + (1 - beta) * x_hist
    return (alpha.to(f_hist.dtype).unsqueeze(1) @ mixed).squeeze(1)


def check_solver_args(max_iter: int, tol: float, history: int, beta: float, check_every: Optional[int]) -> None:
    """Raise ``ValueError`` naming the first bad solver option."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    if check_every is not None and check_every < 1:
        raise ValueError(f"check_every must be None or >= 1, got {check_every}")


def _solve(
        func: SolverFunc,
        z0: torch.Tensor,
        args: tuple[torch.Tensor, ...],
        max_iter: int,
        tol: float,
        history: int,
        lam: float,
        beta: float,
        check_every: Optional[int],
        compact: bool,
) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """Anderson acceleration with memory ``history``; ``history=1`` is plain (damped) fixed-point iteration."""
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must have shape (B, ...) with B >= 1, got {tuple(z0.shape)}")
    check_solver_args(max_iter, tol, history, beta, check_every)
    batch, shape = z0.shape[0], z0.shape[1:]
    start = z0.detach().reshape(batch, -1)
    x = start
    x_hist: list[torch.Tensor] = []  # newest last; at most `history` entries
    f_hist: list[torch.Tensor] = []
    best_x, best_f = x, torch.zeros_like(x)
    best_res = torch.full((batch,), float("inf"), dtype=x.dtype, device=x.device)
    iterations = torch.zeros(batch, dtype=torch.long, device=x.device)
    failed = torch.zeros(batch, dtype=torch.bool, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    compiling = torch.compiler.is_compiling()
    # Eager solves that check on the host anyway evaluate the map on the rows still active at the last check only
    # (per-sample maps give the same values); compiled and fixed-trip solves keep the static full batch.
    checking = check_every is not None and not compiling
    compact = compact and checking
    rows: Optional[torch.Tensor] = None  # indices of the rows to evaluate; None: all of them
    for k in range(max_iter):
        if rows is None:
            fx = func(x.reshape(batch, *shape), *args).detach().reshape(x.shape).to(x.dtype)
        else:
            fx = x.clone()
            fx[rows] = func(x[rows].reshape(len(rows), *shape), *(a[rows] for a in args)
                            ).detach().reshape(len(rows), -1).to(x.dtype)
        iterations = iterations + active.long()
        finite = torch.isfinite(fx).all(dim=1) & torch.isfinite(x).all(dim=1)
        res = torch.where(finite, relative_residual(x, fx), torch.full_like(best_res, float("inf")))
        better = (active & (res < best_res))[:, None]
        best_x, best_f = torch.where(better, x, best_x), torch.where(better, fx, best_f)
        best_res = torch.where(better[:, 0], res, best_res)
        failed = failed | (active & ~finite)
        active = active & finite & (res >= tol)
        if k == max_iter - 1:
            break
        if checking and (k + 1) % check_every == 0:
            if not compact:
                if not bool(active.any()):
                    break
            else:
                still = active.nonzero().squeeze(1)
                if len(still) == 0:
                    break
                rows = None if len(still) == batch else still
        x_hist, f_hist = (x_hist + [x])[-history:], (f_hist + [fx])[-history:]
        if len(x_hist) == 1:
            step = fx if beta == 1 else beta * fx + (1 - beta) * x
        else:
            step = _anderson_mix(torch.stack(x_hist, 1), torch.stack(f_hist, 1), lam, beta)
        # frozen samples keep their iterate; failed ones restart from z0 so the map never sees a non-finite value
        x = torch.where(active[:, None], step, torch.where(failed[:, None], start, x))
    best_res = torch.where(failed, torch.full_like(best_res, float("inf")), best_res)
    info = SolverInfo(iterations, best_res, ~failed & (best_res < tol), failed)
    return best_x.reshape(z0.shape).to(z0.dtype), best_f.reshape(z0.shape).to(z0.dtype), info


def anderson(
        func: SolverFunc,
        z0: torch.Tensor,
        *,
        args: tuple[torch.Tensor, ...] = (),
        max_iter: int,
        tol: float,
        history: int = 5,
        lam: float = 1e-4,
        beta: float = 1.0,
        check_every: Optional[int] = 1,
        compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """Per-sample Anderson acceleration (type II) of ``z = func(z)``.

    Args:
        func: the map ``func(z, *args)`` on a batch of rows, sample by sample.
        z0: (B, ...) starting point.
        args: per-sample (B, ...) tensors the map reads, sliced alongside z.
        max_iter: most evaluations of ``func``.
        tol: a sample is frozen once its relative residual is below this.
        history: memory m of the least-squares mixing.
        lam: regularisation of the mixing, relative to the residuals' scale.
        beta: damping of the mixed step, in (0, 1]; 1 is undamped.
        check_every: stop early once every sample is frozen, checked on the host every this many iterations;
            None never checks (a fixed trip count of ``max_iter``: no host sync at all).
        compact: between checks, evaluate ``func`` on the rows active at the last check only (eager mode with
            ``check_every`` set); every per-sample tensor the map reads must then come through ``args``. False
            gives ``func`` the whole batch every time.

    Returns:
        ``(z, fz, info)``: (B, ...) the lowest-residual iterate of each sample, (B, ...) the map at it, and
        `SolverInfo`.

    Example:
        >>> a = torch.tensor([0.5, 0.9])
        >>> z, fz, info = anderson(lambda z: a[:, None] * z + 1, torch.zeros(2, 1), max_iter=20, tol=1e-8)
        >>> z.squeeze(1).round(decimals=4)  # 1 / (1 - a)
        tensor([ 2., 10.])
    """
    return _solve(func, z0, args, max_iter, tol, history, lam, beta, check_every, compact)


def fixed_point(
        func: SolverFunc,
        z0: torch.Tensor,
        *,
        args: tuple[torch.Tensor, ...] = (),
        max_iter: int,
        tol: float,
        history: int = 1,
        beta: float = 1.0,
        check_every: Optional[int] = 1,
        compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """Per-sample plain iteration ``z <- beta func(z) + (1 - beta) z``; contract of `anderson` (``history`` ignored)."""
    return _solve(func, z0, args, max_iter, tol, 1, 0.0, beta, check_every, compact)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, SolverInfo]]] = {
    "anderson": anderson,
    "fixed_point": fixed_point,
}


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, SolverInfo]]:
    """The solver registered as ``name`` in `SOLVERS`."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {tuple(SOLVERS)}")
    return SOLVERS[name]
