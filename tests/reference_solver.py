"""The per-sample solver of timm_dec 0.1 (active-set shrinking, one host sync per iteration), kept as the reference
that the static-shape solver of `timm_dec.solver` must reproduce: ``func(z, index)`` sees only the active rows."""
from __future__ import annotations

from typing import Callable

import torch

from timm_dec.solver import RESIDUAL_EPS, SolverInfo

SolverFunc = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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



def reference_anderson(func: SolverFunc, z0: torch.Tensor, *, max_iter: int, tol: float, history: int = 5,
                       lam: float = 1e-4, beta: float = 1.0):
    """The old ``anderson``: same contract, ``func(z, index)`` on the active rows only."""
    return _solve(func, z0, max_iter, tol, history, lam, beta)
