"""Solver statistics of DEC calls, collected through a context variable, never stored on modules.

``with solver_stats() as stats: model(x)`` collects a `SolveRecord` per DEC call: mean and largest iterations and
how many samples took each count, residuals at exit, fallbacks, unconverged, fold-guarded and Jacobian-free
samples. Outside such a context (and always under ``torch.compile``) nothing is recorded and nothing is read on the
host.
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .solver import SolverInfo

__all__ = ["SolveRecord", "SolverStats", "solver_stats", "recording", "record_solve"]


@dataclass(frozen=True)
class SolveRecord:
    """One DEC call.

    Attributes:
        name: the DEC's ``name`` (``"dec"`` when it has none).
        batch: samples in the call.
        mean_iterations: mean evaluations of H per sample.
        max_iterations: most evaluations of H spent on one sample.
        max_residual: largest final relative residual among the samples whose solve stayed finite (0 if none).
        mean_residual: mean final relative residual of those samples (0 if none).
        fallbacks: samples whose solve went non-finite and fell back to the identity.
        not_converged: finite samples whose residual stayed above ``tol`` (they keep their best iterate).
        jacobian_free: finite samples whose residual stayed above ``NEAR_TOL_FACTOR`` x ``tol``: with the implicit
            backward they get the Jacobian-free gradient (`DEC._adjoint`).
        fold_guarded: samples whose warp the fold guard blended toward the identity.
        mean_residual: mean final relative residual of the finite samples (0 if none).
        iteration_counts: entry k is the number of samples that took k evaluations of H (k = 0 .. max_iterations);
            empty in records made without it.
    """

    name: str
    batch: int
    mean_iterations: float
    max_iterations: int
    max_residual: float
    fallbacks: int
    not_converged: int = 0
    jacobian_free: int = 0
    fold_guarded: int = 0
    mean_residual: float = 0.0
    iteration_counts: tuple[int, ...] = ()


_SUMMED = ("fallbacks", "not_converged", "fold_guarded", "jacobian_free")


class SolverStats:
    """Collector of `SolveRecord`s, filled by every DEC that runs inside `solver_stats`."""

    def __init__(self) -> None:
        self.records: list[SolveRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: SolveRecord) -> None:
        self.records.append(record)

    @property
    def names(self) -> list[str]:
        """DEC names in order of first appearance."""
        return list(dict.fromkeys(r.name for r in self.records))

    @property
    def total_fallbacks(self) -> int:
        return sum(r.fallbacks for r in self.records)

    @property
    def total_not_converged(self) -> int:
        return sum(r.not_converged for r in self.records)

    @property
    def total_samples(self) -> int:
        return sum(r.batch for r in self.records)

    @property
    def mean_residual(self) -> float:
        """Mean final relative residual per sample over every recorded call (sample-weighted); 0 when empty."""
        samples = self.total_samples
        return sum(r.mean_residual * r.batch for r in self.records) / samples if samples else 0.0

    @property
    def mean_iterations(self) -> float:
        """Mean evaluations of H per sample over every recorded call (sample-weighted); 0 when empty."""
        samples = self.total_samples
        return sum(r.mean_iterations * r.batch for r in self.records) / samples if samples else 0.0

    @property
    def iteration_counts(self) -> list[int]:
        """Entry k: samples over every recorded call that took k evaluations of H (how far ``max_iter`` is from
        where the solves end); [] when empty."""
        counts = [0] * max((len(r.iteration_counts) for r in self.records), default=0)
        for r in self.records:
            for k, n in enumerate(r.iteration_counts):
                counts[k] += n
        return counts

    @property
    def iterations_sd(self) -> float:
        """Standard deviation of the evaluations of H per sample over every recorded call (from
        `iteration_counts`); 0 when fewer than 2 samples. ``iterations_sd / sqrt(total_samples)`` is the standard
        error of `mean_iterations` for independent inputs."""
        counts = self.iteration_counts
        n = sum(counts)
        if n < 2:
            return 0.0
        mean = sum(k * c for k, c in enumerate(counts)) / n
        return math.sqrt(sum(c * (k - mean) ** 2 for k, c in enumerate(counts)) / (n - 1))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per DEC name: ``calls``, ``samples``, ``mean_iterations`` (sample-weighted), ``max_iterations``,
        ``max_residual``, ``fallbacks``, ``not_converged``, ``fold_guarded`` and ``jacobian_free``."""
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            s = out.setdefault(r.name, dict(calls=0, samples=0, mean_iterations=0.0, max_iterations=0,
                                            max_residual=0.0, **{k: 0 for k in _SUMMED}))
            s["mean_iterations"] = (s["mean_iterations"] * s["samples"] + r.mean_iterations * r.batch) / (
                s["samples"] + r.batch)
            s["calls"] += 1
            s["samples"] += r.batch
            s["max_iterations"] = max(s["max_iterations"], r.max_iterations)
            s["max_residual"] = max(s["max_residual"], r.max_residual)
            for k in _SUMMED:
                s[k] += getattr(r, k)
        return out

    def __repr__(self) -> str:
        return (f"SolverStats(calls={len(self)}, mean_iterations={self.mean_iterations:.2f}, "
                f"fallbacks={self.total_fallbacks}, not_converged={self.total_not_converged})")


_COLLECTORS: contextvars.ContextVar[tuple[SolverStats, ...]] = contextvars.ContextVar(
    "timm_dec_solver_stats", default=())


@contextmanager
def solver_stats() -> Iterator[SolverStats]:
    """Collect solver statistics of every DEC call in this context (nested contexts all collect).

    Example:
        >>> dec = DEC(8, name="blocks.0.dec")
        >>> with solver_stats() as stats:
        ...     knots = dec(torch.randn(2, 8, 6, 6), layout="nchw")
        >>> stats.summary()["blocks.0.dec"]["mean_iterations"]
        1.0
    """
    stats = SolverStats()
    token = _COLLECTORS.set(_COLLECTORS.get() + (stats,))
    try:
        yield stats
    finally:
        _COLLECTORS.reset(token)


def recording() -> bool:
    """Whether a `solver_stats` collector is open (never inside a compiled graph)."""
    # dynamo folds is_compiling() to True, so a compiled graph never reads the context variable or the host
    return not torch.compiler.is_compiling() and bool(_COLLECTORS.get())


def record_solve(name: str, info: SolverInfo, guard: torch.Tensor, near: torch.Tensor) -> None:
    """Add one DEC call's `SolveRecord` to every open `solver_stats` collector (reads the host).

    Args:
        name: the DEC's name.
        info: the forward solve's `SolverInfo`.
        guard: (B,) the fold guard's blend factor (1 where the warp needed no guard).
        near: (B,) samples within the implicit gradient's reach (`timm_dec.dec.NEAR_TOL_FACTOR`).
    """
    finite = ~info.failed
    any_finite = bool(finite.any())
    max_res = info.residual[finite].max().item() if any_finite else 0.0
    mean_res = info.residual[finite].double().mean().item() if any_finite else 0.0
    record = SolveRecord(
        name=name or "dec", batch=int(info.iterations.numel()),
        mean_iterations=info.iterations.double().mean().item(), max_iterations=int(info.iterations.max().item()),
        max_residual=float(max_res), fallbacks=int(info.failed.sum().item()),
        not_converged=int((finite & ~info.converged).sum().item()), fold_guarded=int((guard < 1).sum().item()),
        jacobian_free=int((finite & ~near).sum().item()),
        mean_residual=float(mean_res),
        iteration_counts=tuple(torch.bincount(info.iterations.long().flatten()).tolist()))
    for stats in _COLLECTORS.get():
        stats.add(record)
