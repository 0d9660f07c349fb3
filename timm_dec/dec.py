"""The Deep Equilibrium Canonicalizer (DEC): the update network H and its equilibrium solve.

A DEC maps a feature map F (B, C, H, W) to monotone-scaling knots at the fixed point
``logits* = H(S^{-1}(F; knots(logits*)))`` (DESIGN.md "DEC"; paper Sec. 4.2, A1). F is first reduced to a small map
P: average pooling to at most ``pool_size`` per side, then a 1x1 projection to ``proj_chans`` channels. Both are
per-pixel linear (or spatially linear) maps, so reducing once and warping the small map each iteration costs little.
The update ``f(z) = bound * tanh(H(S^{-1}(P; knots(z))) / bound)`` runs conv3x3 -> act -> conv3x3 -> instance norm ->
act -> conv1x1 to 2 channels -> adaptive average pooling to (G+1, G). The last conv starts at exactly zero, so at
initialisation f is constantly 0 and the fixed point is the identity warp, reached in one evaluation.

The forward solve (Anderson acceleration from logits = 0 by default) runs per sample under ``torch.no_grad()``; a
sample whose solve produces a non-finite value or ends with a relative residual above ``fallback_residual`` gets the
identity logits instead, and is counted. In training mode, with grad enabled, the solution re-enters the graph
torchdeq-style: one application ``z = f(z*)`` with grad, whose incoming gradient is replaced by the solution g of the
adjoint fixed point ``g = J_f(z*)^T g + grad`` (``backward="implicit"``), or ``phantom_steps`` unrolled applications
of f from z* (``backward="phantom"``). No graph runs through the solver iterations, so training memory does not grow
with ``max_iter``; in eval mode or without grad no graph is built at all.

Why a compact solver of our own rather than torchdeq: torchdeq's solvers stop on a criterion over the whole batch (a
sample keeps iterating, and its result keeps changing, until the batch is done, so it depends on its batch mates), its
Anderson mixing and its fallback are not per sample, and its ``DEQ`` objects take a config bag that can silently
override explicit keyword arguments; the no-grad solve, the adjoint solve and the phantom steps take ~200 lines here,
all tested against independent references, without a new dependency.

Solver statistics are kept out of the modules: ``with solver_stats() as stats: model(x)`` collects, per DEC name and
per call, the mean iterations, the largest final residual, the fallbacks and the batch size. Outside such a context
nothing is recorded and no device sync is spent on statistics.
"""
from __future__ import annotations

import contextvars
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_act_layer

from .ops import identity_logits, knots_from_logits, monotone_warp
from .ops.layout import LAYOUTS, spatial_size
from .solver import SOLVERS, SolverInfo, get_solver

__all__ = ["DECConfig", "DEC", "SolveRecord", "SolverStats", "solver_stats", "BACKWARD_MODES", "UPDATE_FORMS"]

BACKWARD_MODES = ("implicit", "phantom")
UPDATE_FORMS = ("absolute", "residual")


@contextmanager
def _native_cpu_convs(device: torch.device) -> Iterator[None]:
    """Run CPU convolutions on PyTorch's native kernels (oneDNN off); touches only the oneDNN on/off switch."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        yield
        return
    with torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None):
        yield


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DECConfig:
    """Options of a DEC; `timm_dec.adapt` and ``create_model`` pass ``dec_<field>=...`` through.

    Attributes:
        grid: G, cells per side of the monotone-scaling grid.
        widths: output channels of H's two 3x3 convolutions (paper A1: 64 and 128).
        proj_chans: channels of the 1x1 projection of the feature map that H sees.
        pool_size: the projected map is average-pooled to at most this size per side before the solve; None keeps it.
        act_layer: activation of H, any name timm's ``get_act_layer`` knows.
        solver: forward solver, a key of `timm_dec.solver.SOLVERS` (``"anderson"``, ``"fixed_point"``).
        max_iter: most evaluations of H per sample in the forward solve.
        tol: a sample stops once its relative residual ``||f(z) - z|| / (||f(z)|| + eps)`` is below this.
        history: Anderson memory m.
        backward: ``"implicit"`` (adjoint fixed point) or ``"phantom"`` (unrolled steps from the solution).
        backward_max_iter: most iterations of the adjoint solve.
        backward_tol: relative residual at which the adjoint solve stops.
        backward_solver: solver of the adjoint fixed point; None uses ``solver``.
        phantom_steps: unrolled applications of f in phantom mode.
        fallback_residual: a sample whose final relative residual exceeds this (or is non-finite) gets the identity.
        logit_bound: logits pass through ``bound * tanh(logits / bound)``, so every knot segment stays positive.
        update: ``"absolute"``: f(z) = H(S^{-1}(P; z)) (DESIGN.md); ``"residual"``: f(z) = z + H(S^{-1}(P; z)), the
            gradient-step form of paper eq. 17-18, whose fixed points are where H sees a canonical map and returns 0.
    """

    grid: int = 4
    widths: tuple[int, int] = (64, 128)
    proj_chans: int = 16
    pool_size: Optional[int] = 16
    act_layer: str = "gelu"
    solver: str = "anderson"
    max_iter: int = 12
    tol: float = 1e-3
    history: int = 5
    backward: str = "implicit"
    backward_max_iter: int = 12
    backward_tol: float = 1e-4
    backward_solver: Optional[str] = None
    phantom_steps: int = 3
    fallback_residual: float = 0.1
    logit_bound: float = 8.0
    update: str = "absolute"

    def __post_init__(self) -> None:
        widths = self.widths
        if isinstance(widths, Sequence) and not isinstance(widths, str):
            widths = tuple(widths)
            object.__setattr__(self, "widths", widths)  # lists from the command line become a tuple
        if not (isinstance(widths, tuple) and len(widths) == 2 and all(_is_int(w) and w >= 1 for w in widths)):
            raise ValueError(f"dec widths must be two positive channel counts, got {self.widths!r}")
        for field in ("grid", "proj_chans", "max_iter", "history", "backward_max_iter", "phantom_steps"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"dec {field} must be an integer >= 1, got {value!r}")
        if self.pool_size is not None and (not _is_int(self.pool_size) or self.pool_size < 2):
            raise ValueError(f"dec pool_size must be None or an integer >= 2, got {self.pool_size!r}")
        for field in ("tol", "backward_tol", "fallback_residual", "logit_bound"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"dec {field} must be a positive finite number, got {value!r}")
        for field in ("solver", "backward_solver"):
            value = getattr(self, field)
            if (value is not None or field == "solver") and value not in SOLVERS:
                raise ValueError(f"unknown dec {field} {value!r}; choose one of {tuple(SOLVERS)}")
        if self.update not in UPDATE_FORMS:
            raise ValueError(f"unknown dec update {self.update!r}; choose one of {UPDATE_FORMS}")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"unknown dec backward {self.backward!r}; choose one of {BACKWARD_MODES}")
        if not isinstance(self.act_layer, str):
            raise ValueError(f"dec act_layer must be an activation name, got {self.act_layer!r}")
        try:
            get_act_layer(self.act_layer)
        except KeyError:
            raise ValueError(f"unknown dec act_layer {self.act_layer!r}; use a name timm's get_act_layer knows") from None


# ---------------------------------------------------------------------------------------------------------------------
# Statistics, collected through a context variable, never stored on modules


@dataclass(frozen=True)
class SolveRecord:
    """One DEC call.

    Attributes:
        name: the DEC's ``name`` (``"dec"`` when it has none).
        batch: samples in the call.
        mean_iterations: mean evaluations of H per sample.
        max_iterations: most evaluations of H spent on one sample.
        max_residual: largest final relative residual among the samples whose solve stayed finite (0 if none).
        fallbacks: samples that fell back to the identity.
    """

    name: str
    batch: int
    mean_iterations: float
    max_iterations: int
    max_residual: float
    fallbacks: int


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
    def total_samples(self) -> int:
        return sum(r.batch for r in self.records)

    @property
    def mean_iterations(self) -> float:
        """Mean evaluations of H per sample over every recorded call (sample-weighted); 0 when empty."""
        samples = self.total_samples
        return sum(r.mean_iterations * r.batch for r in self.records) / samples if samples else 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        """Per DEC name: ``calls``, ``samples``, ``mean_iterations`` (sample-weighted), ``max_iterations``,
        ``max_residual`` and ``fallbacks``."""
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            s = out.setdefault(r.name, dict(
                calls=0, samples=0, mean_iterations=0.0, max_iterations=0, max_residual=0.0, fallbacks=0))
            s["mean_iterations"] = (s["mean_iterations"] * s["samples"] + r.mean_iterations * r.batch) / (
                s["samples"] + r.batch)
            s["calls"] += 1
            s["samples"] += r.batch
            s["max_iterations"] = max(s["max_iterations"], r.max_iterations)
            s["max_residual"] = max(s["max_residual"], r.max_residual)
            s["fallbacks"] += r.fallbacks
        return out

    def __repr__(self) -> str:
        return (f"SolverStats(calls={len(self)}, mean_iterations={self.mean_iterations:.2f}, "
                f"fallbacks={self.total_fallbacks})")


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


def _record(name: str, info: SolverInfo, fallback: torch.Tensor) -> None:
    collectors = _COLLECTORS.get()
    if not collectors:
        return
    finite = torch.isfinite(info.residual)
    max_res = info.residual[finite].max().item() if bool(finite.any()) else 0.0
    record = SolveRecord(
        name=name or "dec", batch=int(info.iterations.numel()),
        mean_iterations=info.iterations.double().mean().item(), max_iterations=int(info.iterations.max().item()),
        max_residual=float(max_res), fallbacks=int(fallback.sum().item()))
    for stats in collectors:
        stats.add(record)


# ---------------------------------------------------------------------------------------------------------------------
# Implicit differentiation


class _ImplicitGrad(torch.autograd.Function):
    """Identity in forward; in backward, replaces the incoming gradient v by the adjoint solution of g = J^T g + v."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, adjoint: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.adjoint = adjoint
        return z.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.adjoint(grad), None


# ---------------------------------------------------------------------------------------------------------------------
# The module


class DEC(nn.Module):
    """Deep Equilibrium Canonicalizer of one block: feature map -> knots of the equilibrium monotone scaling.

    Parameters: ``proj`` (the 1x1 projection, a Linear on channels), ``conv1``, ``conv2``, ``norm``, ``head`` (the
    zero-initialised 1x1 conv). The module keeps no per-call state, so it is reentrant and safe under DDP, deepcopy
    (EMA) and threads.

    Example:
        >>> from timm_dec.ops import identity_knots
        >>> dec = DEC(384, grid=4, name="blocks.0.dec")
        >>> knots = dec(torch.randn(2, 1 + 14 * 14, 384), layout="tokens", num_prefix_tokens=1)
        >>> knots.shape, torch.equal(knots, identity_knots(2, 4))
        (torch.Size([2, 2, 5, 5]), True)
    """

    def __init__(self, in_chans: int, cfg: Optional[DECConfig] = None, name: str = "", **overrides: Any) -> None:
        """Args:
            in_chans: C, channels of the feature maps the DEC sees.
            cfg: options; defaults to ``DECConfig()``.
            name: label of this DEC in `solver_stats` records, e.g. ``"blocks.4.dec"``.
            **overrides: any `DECConfig` field, overriding ``cfg`` (explicit keywords always win).
        """
        super().__init__()
        if not _is_int(in_chans) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
        if cfg is None:
            cfg = DECConfig()
        elif not isinstance(cfg, DECConfig):
            raise TypeError(f"cfg must be a DECConfig, got {type(cfg).__name__}")
        fields = {f.name for f in dataclasses.fields(DECConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown DEC option(s) {unknown}; the options are {sorted(fields)}")
        self.cfg: DECConfig = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self.in_chans = in_chans
        self.name = str(name)
        c = self.cfg
        act = get_act_layer(c.act_layer)
        self.proj = nn.Linear(in_chans, c.proj_chans)
        self.conv1 = nn.Conv2d(c.proj_chans, c.widths[0], 3, padding=1)
        self.act1 = act()
        self.conv2 = nn.Conv2d(c.widths[0], c.widths[1], 3, padding=1)
        self.norm = nn.InstanceNorm2d(c.widths[1], affine=True)  # per sample: no batch statistics
        self.act2 = act()
        self.head = nn.Conv2d(c.widths[1], 2, 1)
        self.reset_head()

    @property
    def grid(self) -> int:
        return self.cfg.grid

    def reset_head(self) -> None:
        """Zero the last layer, so that the fixed point is the identity warp."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _reduce(self, x: torch.Tensor, layout: str, grid_size: Any, num_prefix_tokens: int) -> torch.Tensor:
        """The map P that H warps: (B, proj_chans, h, w), h and w at most ``pool_size``, in the parameters' dtype."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        height, width = spatial_size(x, layout, grid_size, num_prefix_tokens)
        chans = x.shape[1] if layout == "nchw" else x.shape[-1]
        if chans != self.in_chans:
            raise ValueError(f"DEC {self.name!r} expects {self.in_chans} channels, got {chans} ({layout} {tuple(x.shape)})")
        if height * width < 2:
            raise ValueError(f"DEC needs a feature map with at least 2 positions, got {height} x {width}")
        if layout == "tokens":
            x = x[:, num_prefix_tokens:].unflatten(1, (height, width))
        elif layout == "nchw":
            x = x.permute(0, 2, 3, 1)
        x = x.to(self.proj.weight.dtype)  # (B, H, W, C)
        pool = self.cfg.pool_size
        if pool is not None and (height > pool or width > pool):
            # Pooling commutes with the per-pixel projection, so pool the wide map first.
            size = (min(height, pool), min(width, pool))
            x = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
        return self.proj(x).permute(0, 3, 1, 2).contiguous()

    def update(self, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """One application of the DEC map, f(z) = bound * tanh(u / bound) with u = H(S^{-1}(P; knots(z))) (or z + H
        for ``update="residual"``).

        Args:
            z: (b, 2, G+1, G) logits.
            p: (b, proj_chans, h, w) reduced feature map.

        Returns:
            (b, 2, G+1, G) next logits.
        """
        warped = monotone_warp(p, knots_from_logits(z), layout="nchw", check=False)
        # On the CPU, oneDNN picks convolution algorithms by batch size, which rounds differently (~1e-7) and the
        # solve magnifies that; the native kernels keep a sample's result independent of its batch (DESIGN.md).
        with _native_cpu_convs(z.device):
            h = self.act1(self.conv1(warped))
            h = self.act2(self.norm(self.conv2(h)))
        h = F.adaptive_avg_pool2d(self.head(h), (self.grid + 1, self.grid))
        if self.cfg.update == "residual":
            h = z + h
        bound = self.cfg.logit_bound
        return bound * torch.tanh(h / bound)

    def _adjoint(self, fz: torch.Tensor, z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Backward of the implicit mode: v -> g solving g = J_f(z*)^T g + v, per sample (J is block diagonal).

        Args:
            fz: (b, 2, G+1, G) f(z*), computed with grad from ``z``.
            z: (b, 2, G+1, G) the leaf z* that ``fz`` was computed from; the vector-Jacobian products reuse that graph.
        """
        c = self.cfg
        solver = get_solver(c.backward_solver or c.solver)

        def adjoint(v: torch.Tensor) -> torch.Tensor:
            def vjp_step(g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                full = torch.zeros_like(v).index_copy(0, index, g.to(v.dtype))
                (jtg,) = torch.autograd.grad(fz, z, full, retain_graph=True)
                return jtg[index] + v[index]

            g, _, info = solver(vjp_step, v.detach(), max_iter=c.backward_max_iter, tol=c.backward_tol,
                                history=c.history)
            # A sample whose adjoint solve broke down keeps the plain gradient (Jacobian-free backward).
            return torch.where(info.failed.view(-1, 1, 1, 1), v, g)

        return adjoint

    def logits(
            self,
            x: torch.Tensor,
            *,
            layout: str,
            grid_size: Optional[Union[int, Sequence[int]]] = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Equilibrium logits of the feature map ``x``.

        Args:
            x: (B, P + H*W, C) for ``layout="tokens"`` (the P prefix tokens are ignored), (B, H, W, C) for
                ``"nhwc"``, (B, C, H, W) for ``"nchw"``.
            layout: ``"tokens"``, ``"nhwc"`` or ``"nchw"``.
            grid_size: (H, W) of a token map (an int for square); inferred for square maps.
            num_prefix_tokens: P, class / distillation / register tokens before the patch tokens.

        Returns:
            (B, 2, G+1, G) logits*, in the parameters' dtype; identity (zero) logits for a sample whose solve fell back.
        """
        needs_graph = self.training and torch.is_grad_enabled() and (
            x.requires_grad or any(q.requires_grad for q in self.parameters()))
        return self._logits(x, layout, grid_size, num_prefix_tokens, needs_graph)

    @torch.compiler.disable
    def _logits(self, x: torch.Tensor, layout: str, grid_size: Any, num_prefix_tokens: int,
                needs_graph: bool) -> torch.Tensor:
        c = self.cfg
        with torch.autocast(device_type=x.device.type, enabled=False), torch.set_grad_enabled(needs_graph):
            p = self._reduce(x, layout, grid_size, num_prefix_tokens)
            p_const = p.detach()
            z0 = identity_logits(p.shape[0], c.grid, device=p.device, dtype=p.dtype)
            with torch.no_grad():
                z_star, f_star, info = get_solver(c.solver)(
                    lambda z, index: self.update(z, p_const[index]), z0, max_iter=c.max_iter, tol=c.tol,
                    history=c.history)
            fallback = info.failed | ~(info.residual <= c.fallback_residual)
            _record(self.name, info, fallback)
            if not needs_graph:
                return torch.where(fallback.view(-1, 1, 1, 1), z0, f_star)
            ok = (~fallback).nonzero().squeeze(1)
            if ok.numel() == 0:
                # Every sample fell back: keep the parameters in the graph (with zero gradient) for DDP.
                return z0 + sum(q.sum() for q in self.parameters()) * 0
            all_ok = ok.numel() == p.shape[0]
            z_ok, p_ok = (z_star, p) if all_ok else (z_star[ok], p[ok])
            if c.backward == "implicit":
                z_leaf = z_ok.detach().requires_grad_()
                fz = self.update(z_leaf, p_ok)
                out = _ImplicitGrad.apply(fz, self._adjoint(fz, z_leaf))
            else:
                out = z_ok
                for _ in range(c.phantom_steps):
                    out = self.update(out, p_ok)
            return out if all_ok else z0.index_copy(0, ok, out)

    def forward(
            self,
            x: torch.Tensor,
            *,
            layout: str,
            grid_size: Optional[Union[int, Sequence[int]]] = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Knots of the equilibrium monotone scaling of ``x`` (arguments as in `logits`).

        Returns:
            (B, 2, G+1, G+1) valid knots (identity for a sample whose solve fell back), in the parameters' dtype.
        """
        return knots_from_logits(self.logits(x, layout=layout, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"name={self.name!r}, in_chans={self.in_chans}, grid={c.grid}, solver={c.solver}, "
                f"max_iter={c.max_iter}, tol={c.tol}, backward={c.backward}, update={c.update}")
