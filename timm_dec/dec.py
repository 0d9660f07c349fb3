"""The Deep Equilibrium Canonicalizer (DEC): the update network H and its equilibrium solve.

A DEC maps a map F (B, C, H, W) -- the input image for the input DEC, a block's features for a latent DEC -- to the
knots of a monotone scaling at an equilibrium of its update map f (README "Design"; paper Sec. 4.2, A1). F is first
reduced to a small map P, once per call: the image area-resized to at most ``image_size`` per side (the image H), or
the features average-pooled to at most ``pool_size`` and projected to ``proj_chans`` channels (the latent H); every
solver iteration warps P, not F. H's 2-channel output map is read in the knots' own layout (`DEC.head_logits`); its
last layer starts at zero, so at initialisation the fixed point is the identity, reached in one evaluation.

The state z is unconstrained; the warp it stands for has knots ``fold_free(knots_from_logits(bound(z)))``, with
``bound(z) = logit_bound * tanh(z / logit_bound)`` (every segment stays wider than a fixed fraction of the grid) and
the fold guard of `timm_dec.ops.folds` (det J >= ``min_jacobian`` everywhere, so the un-warp S exists). The update
is ``f(z) = H(S^{-1}(P; knots(z)))`` (``update="absolute"``, the default, the form of the authors' code) or
``f(z) = z + H(S^{-1}(P; knots(z)))`` (``"residual"``, paper eq. 16-18); `DECConfig` says how the default was chosen.

The forward solve (Anderson acceleration from z = 0 by default, `timm_dec.solver`) runs per sample under
``torch.no_grad()`` with a static trip count. A sample whose solve produces a non-finite value gets the identity
warp (and is counted); a sample that has not converged keeps its best iterate and its gradient (and is counted).
Whenever autograd needs it (grad enabled and the input or a parameter requires grad, in train and in eval mode),
the solution re-enters the graph torchdeq-style: one application of f whose incoming gradient is replaced by the
solution of the adjoint fixed point ``g = J_f(z*)^T g + grad`` (``backward="implicit"``, the default; absolute form
only), or ``phantom_steps`` applications of f from z* (``backward="phantom"``). No graph runs through the solver
iterations, so training memory does not grow with ``max_iter``. The implicit gradient is exact only at an
equilibrium, so a solve that autograd records runs to the tighter ``grad_tol`` (1e-4 by default; the outputs and the
counts still measure against ``tol``); a sample whose forward solve ended above ``tol`` is counted as not converged,
and one that ended above
``NEAR_TOL_FACTOR`` x ``tol`` gets the Jacobian-free gradient of the f(z) it returned instead (`DEC._adjoint`; counted
as ``jacobian_free``). In training mode, ``jac_reg`` > 0 adds the gradient of a Jacobian regulariser (Bai et al.,
ICML 2021) of the damped map the solver iterates, so that the solves reach ``tol`` and the implicit gradient applies.

Solver statistics are kept out of the modules: ``with solver_stats() as stats: model(x)`` collects, per DEC name and
per call, the mean iterations, the largest final residual, the fallbacks, the unconverged and the fold-guarded
samples. Outside such a context (and always under ``torch.compile``) nothing is recorded and nothing is read on the
host.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_act_layer

from ._compat import native_conv2d
from ._options import OVERRIDABLE, DECOptionError, decode_options, encode_options, mismatch_message, same_dec_option
from .ops import identity_logits, knots_from_logits, monotone_warp
from .ops.folds import fold_free_knots
from .ops.layout import LAYOUTS, spatial_size
from .solver import SOLVERS, SolverInfo, get_solver
from .stats import SolveRecord, SolverStats, record_solve, recording, solver_stats

__all__ = [
    "DECConfig", "DEC", "SolveRecord", "SolverStats", "solver_stats", "BACKWARD_MODES", "UPDATE_FORMS", "INPUTS",
    "hutchinson_probe", "NEAR_TOL_FACTOR", "loss_scale",
]

BACKWARD_MODES = ("phantom", "implicit")
# A forward solve that ended within this many times ``tol`` gets the implicit gradient at its best iterate: on the
# demo's trained DECs it was closer to the true gradient than the Jacobian-free one in every measurement, converged
# or not (README "Defaults"). Beyond it (relative residual 0.1 at the default tol: no equilibrium is near), the
# Jacobian-free gradient, which stays bounded where (I - J)^-T does not.
NEAR_TOL_FACTOR = 100.0
UPDATE_FORMS = ("residual", "absolute")
INPUTS = ("latent", "image")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DECConfig:
    """Options of a DEC; `timm_dec.adapt` and ``create_model`` pass ``dec_<field>=...`` through.

    The default update and backward are the ones measured to train from a task loss (README, "Defaults"): the
    absolute update f(z) = H(S^{-1}(F; z)) of the authors' code with implicit gradients, solved damped (``beta``
    0.35) and trained with the Jacobian regulariser of the damped map (``jac_reg`` 3), so that its solves reach
    ``tol``; a solve that is differentiated runs to ``grad_tol`` (1e-4), so that the implicit gradient is the
    gradient of the equilibrium. The damping also sets how strongly the
    trained DEC canonicalises: the regulariser draws J_f toward 1 - 1/beta (-1.86 at 0.35), H's restoring gain, and
    a canonical map keeps about 1 / (1 + gain) of its input's scale variation; a stronger gain is a wider spectrum
    of I - J_f, so more iterations (README "Defaults": beta 0.5, 0.35, 0.25 gave InvE 0.77x, 0.70x, 0.67x Aug's in
    8.1, 10.1, 12.4 iterations). The residual form
    f(z) = z + H(S^{-1}(F; z)) (paper eq. 16-18, the gradient step Phi - grad E) is the one whose fixed points follow
    a rescaled input along its orbit (the absolute form's z* = H(C) depends on the canonical map C alone, so for
    F' = S(F; g) it returns the same warp), but from H = 0 its equilibrium drifts by ``max_iter`` times H's output
    before H has learned anything, which raised the training loss of the demo's DEC-only phase (README,
    "Defaults"). It stays an option (``update="residual"``), trained with phantom gradients: its Jacobian I + dH/dz
    is the identity where dH/dz is 0 (at initialisation), so the implicit adjoint g = J^T g + v has no solution
    there, and asking for the implicit backward with it is an error.

    Attributes:
        grid: G, cells per side of the monotone-scaling grid.
        widths: output channels of H's two 3x3 convolutions (paper A1: 64 and 128).
        proj_chans: channels of the 1x1 projection of the feature map that H sees.
        pool_size: the projected map is average-pooled to at most this size per side before the solve; None (or 0,
            which ``create_model`` passes through where it drops None) keeps it.
        image_widths: channels of the image H's 3x3 convolutions (`DEC` with ``input="image"``: the input DEC, and
            latent DECs that read the image).
        image_size: the image H reads the image area-resized so that its longer side is at most this many pixels
            (64: a 224 px input is read at 64 px, the demo's 48 px at full resolution); None (or 0) reads it at full
            resolution. H must see the image at a resolution from which it can read the objects' scale.
        act_layer: activation of H, any name timm's ``get_act_layer`` knows.
        input: what H sees: ``"latent"`` (the feature map it canonicalises) or ``"image"`` (the model's normalised
            input image, read by the image H at ``image_size``; the input DEC always reads the image).
        update: ``"absolute"``: f(z) = H(S^{-1}(P; z)); ``"residual"``: f(z) = z + H(S^{-1}(P; z)).
        solver: forward solver, a key of `timm_dec.solver.SOLVERS` (``"anderson"``, ``"fixed_point"``).
        max_iter: most evaluations of H per sample in the forward solve.
        tol: a sample stops once its relative residual ``||f(z) - z|| / (||f(z)|| + eps)`` is below this.
        grad_tol: the forward solve's tolerance whenever autograd records the DEC (training, gradients in eval): the
            implicit gradient is the equilibrium's only as far as its iterate is, and one within 1e-3 can be 19% off
            (README "Defaults": the demo's 16-image check; 0.02% at 1e-4, for ~2.5 more evaluations of H in a training
            forward). Outputs and "within tol" counts measure against ``tol``: a sample that reaches ``tol`` but not
            ``grad_tol`` is converged (its best iterate). None (or 0: ``create_model`` drops None) solves to ``tol``.
        history: Anderson memory m.
        beta: Anderson (or fixed-point) damping, in (0, 1]; 1 is undamped.
        check_every: the solve stops early once every sample has converged, checked on the host every this many
            iterations; None (or 0: ``create_model(..., dec_check_every=0)``, since timm drops None keyword
            arguments) runs ``max_iter`` iterations with no host sync (the choice for CUDA graphs).
        backward: ``"implicit"`` (adjoint fixed point) or ``"phantom"`` (unrolled steps from the solution).
        phantom_steps: unrolled applications of f in phantom mode.
        backward_max_iter: most iterations of the adjoint solve (implicit mode).
        backward_tol: relative residual at which the adjoint solve stops (implicit mode). The default is the forward's
            ``tol``: the implicit gradient at an iterate within ``tol`` is off by O(tol) whatever the adjoint's
            accuracy, and on the demo's trained DEC a tighter adjoint (1e-4: two more vector-Jacobian products per
            step) gave the same gradient error (README "Defaults").
        backward_solver: solver of the adjoint fixed point; None uses ``solver``.
        jac_reg: weight of the Jacobian regulariser (Bai et al., ICML 2021) in training mode: a one-sample
            Hutchinson estimate of ||J||_F^2 / dim at z*, averaged over the batch, whose gradient the backward adds
            to the task loss's (the loss value the caller sees is unchanged, so timm's ``train.py`` trains with it
            as is). J = beta J_f + (1 - beta) I is the Jacobian of the damped map the solver iterates, so the
            regulariser keeps that map contractive (one equilibrium per input, reached in few iterations) while
            J_f itself may restore strongly (J_f = 1 - 1/beta at no cost): a canonicaliser needs a restoring H, and
            Bai et al.'s undamped form (beta = 1) pulls H's gain to zero. 0 turns it off; eval never pays for it.
        jac_reg_fraction: the share of each training batch the regulariser's estimate reads, in (0, 1]: its first
            ceil(fraction * B) samples (a static slice: no host sync), whose f is evaluated once more with the graph
            the penalty needs. Training batches are shuffled, so the slice's mean estimates the batch's at a fraction
            of the cost (the regulariser's double backward is the costliest part of a DEC's training step).
        logit_bound: the logits of the knots are ``bound * tanh(z / bound)``: a segment is at least
            ``1 / (1 + (G-1) exp(2 bound))`` of its row, at most ``1 / (1 + (G-1) exp(-2 bound))``.
        min_jacobian: the fold guard keeps det J of the warp at least this everywhere (`timm_dec.ops.folds`).
    """

    grid: int = 4
    widths: tuple[int, int] = (64, 128)
    proj_chans: int = 16
    pool_size: Optional[int] = 16
    image_widths: tuple[int, int] = (8, 16)
    image_size: Optional[int] = 64
    act_layer: str = "gelu"
    input: str = "latent"
    update: str = "absolute"
    solver: str = "anderson"
    max_iter: int = 16
    tol: float = 1e-3
    grad_tol: Optional[float] = 1e-4
    history: int = 5
    beta: float = 0.35
    check_every: Optional[int] = 1
    backward: str = "implicit"
    phantom_steps: int = 1
    backward_max_iter: int = 12
    backward_tol: float = 1e-3
    backward_solver: Optional[str] = None
    jac_reg: float = 3.0
    jac_reg_fraction: float = 1.0
    logit_bound: float = 1.5
    min_jacobian: float = 0.05

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The option names, in field order: ``dec_<name>`` for ``create_model``, ``<name>`` for `timm_dec.adapt`."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def __post_init__(self) -> None:
        for field in ("widths", "image_widths"):
            widths = getattr(self, field)
            if isinstance(widths, Sequence) and not isinstance(widths, str):
                widths = tuple(widths)
                object.__setattr__(self, field, widths)  # lists from the command line become a tuple
            if not (isinstance(widths, tuple) and len(widths) == 2 and all(_is_int(w) and w >= 1 for w in widths)):
                raise ValueError(f"dec {field} must be two positive channel counts, got {getattr(self, field)!r}")
        for field in ("grid", "proj_chans", "max_iter", "history", "backward_max_iter", "phantom_steps"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"dec {field} must be an integer >= 1, got {value!r}")
        for field, low in (("pool_size", 2), ("image_size", 2), ("check_every", 1)):
            value = getattr(self, field)
            if value == 0 and _is_int(value):
                # timm's create_model drops keyword arguments that are None, so 0 stands for None there
                object.__setattr__(self, field, None)
            elif value is not None and (not _is_int(value) or value < low):
                raise ValueError(f"dec {field} must be None (or 0) or an integer >= {low}, got {value!r}")
        if isinstance(self.jac_reg, bool) or not isinstance(self.jac_reg, (int, float)) or not (
                0 <= self.jac_reg < float("inf")):
            raise ValueError(f"dec jac_reg must be a finite number >= 0, got {self.jac_reg!r}")
        if self.grad_tol == 0 and not isinstance(self.grad_tol, bool):
            object.__setattr__(self, "grad_tol", None)  # create_model drops None keyword arguments: 0 stands for it
        for field in ("tol", "backward_tol", "logit_bound", "beta", "min_jacobian", "jac_reg_fraction", "grad_tol"):
            value = getattr(self, field)
            if field == "grad_tol" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"dec {field} must be a positive finite number{' (or None)' * (field == 'grad_tol')}, "
                                 f"got {value!r}")
        if self.beta > 1 or self.min_jacobian >= 1 or self.jac_reg_fraction > 1:
            raise ValueError(f"dec beta and jac_reg_fraction must be in (0, 1] and min_jacobian in (0, 1), got "
                             f"{self.beta}, {self.jac_reg_fraction}, {self.min_jacobian}")
        self._check_choices()

    def _check_choices(self) -> None:
        for field in ("solver", "backward_solver"):
            value = getattr(self, field)
            if (value is not None or field == "solver") and value not in SOLVERS:
                raise ValueError(f"unknown dec {field} {value!r}; choose one of {tuple(SOLVERS)}")
        for field, choices in (("update", UPDATE_FORMS), ("backward", BACKWARD_MODES), ("input", INPUTS)):
            if getattr(self, field) not in choices:
                raise ValueError(f"unknown dec {field} {getattr(self, field)!r}; choose one of {choices}")
        if self.update == "residual" and self.backward == "implicit":
            raise ValueError(
                "dec backward 'implicit' is ill-posed for the residual update (its adjoint has no solution where "
                "dH/dz = 0, e.g. at initialisation); use dec_backward='phantom' or dec_update='absolute'")
        if not isinstance(self.act_layer, str):
            raise ValueError(f"dec act_layer must be an activation name, got {self.act_layer!r}")
        try:
            get_act_layer(self.act_layer)
        except KeyError:
            raise ValueError(
                f"unknown dec act_layer {self.act_layer!r}; use a name timm's get_act_layer knows") from None


def _near(info: SolverInfo, tol: float) -> torch.Tensor:
    """(B,) samples whose forward solve ended within ``NEAR_TOL_FACTOR`` x ``tol`` (False for failed ones)."""
    return ~info.failed & (info.residual <= NEAR_TOL_FACTOR * tol)


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


_LOSS_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("timm_dec_loss_scale", default=1.0)


@contextmanager
def loss_scale(factor: float) -> Iterator[None]:
    """Scale the Jacobian regulariser's added gradient by ``factor``, the factor by which the training loop scales its
    loss before ``backward`` (1 / N when gradient accumulation divides the loss by N, AMP's ``GradScaler.get_scale()``
    with float16 loss scaling), so that the regulariser keeps its weight relative to the loss.

    The regulariser adds the gradient of ``jac_reg`` x penalty to the backward, as if the penalty had been added to the
    loss the loop differentiates; a loop that differentiates a scaled loss scales the task's gradient but not that one.
    ``timm_dec.finetune`` sets it. timm's ``train.py`` needs none unless it scales its loss (``--grad-accum-steps``,
    float16 AMP's loss scaler): there the regulariser's effective weight is ``jac_reg`` divided by that factor.

    Example:
        >>> with loss_scale(1 / 4):  # the loop divides each micro-batch's loss by 4
        ...     pass
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise ValueError(f"loss scale must be a positive finite number, got {factor!r}")
    token = _LOSS_SCALE.set(float(factor))
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


def hutchinson_probe(fz: torch.Tensor) -> torch.Tensor:
    """A probe vector for the Hutchinson estimate, (b, ...) like ``fz``: sqrt(2) sin of a phase that scrambles each
    sample's own values (entries with mean 0 and variance 1, uncorrelated, for all practical purposes).

    Not drawn from the global RNG, so that adding the regulariser changes no other random stream (dropout, data
    order: a resumed run continues the same trajectory), and a function of the sample alone (its probe does not
    depend on its batch mates, its batch position or the DDP rank).
    """
    flat = fz.detach().flatten(1)
    index = torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype)
    return (math.sqrt(2) * torch.sin(flat * 12345.6789 + index * 2.399963)).view_as(fz)


class _AddLossGradient(torch.autograd.Function):
    """Identity on ``x`` in forward; in backward, also backpropagates a scalar ``loss`` as if it had been added to the
    objective (gradient 1), so a regulariser trains with any training loop without changing the loss it sees."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_dtype = loss.dtype
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=grad.device)


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)``; on the CPU through PyTorch's native im2col kernel, which computes each sample on its own.

    oneDNN picks convolution algorithms by batch size, which rounds differently (~1e-7) and the solve magnifies that;
    the native kernel keeps a sample's result independent of its batch (README, "Design") without touching the
    process-wide oneDNN switch, so concurrent threads are unaffected.
    """
    if x.device.type != "cpu":
        return conv(x)
    return native_conv2d(x, conv.weight, conv.kernel_size, conv.bias, conv.stride, conv.padding)


def _max_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, ceil_mode=True)`` of (b, c, h, w); without autograd as the maximum of four strided views.

    The solver's iterations run without grad: there the strided form is ~10x faster than CPU max pooling (which
    also computes the indices its backward needs) and gives the same values; with grad the pooling op keeps its
    cheaper backward.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return F.max_pool2d(x, 2, ceil_mode=True)
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    return torch.maximum(torch.maximum(x[..., ::2, ::2], x[..., 1::2, ::2]),
                         torch.maximum(x[..., ::2, 1::2], x[..., 1::2, 1::2]))


# ---------------------------------------------------------------------------------------------------------------------
# The module


# the DECConfig fields of one form of H only (`DEC.weight_options` records those of the form a DEC has)
_IMAGE_H_FIELDS = ("image_widths", "image_size")
_LATENT_H_FIELDS = ("widths", "proj_chans", "pool_size")


class DEC(nn.Module):
    """Deep Equilibrium Canonicalizer of one map: feature map or image -> knots of the equilibrium monotone scaling.

    H comes in two forms, chosen by ``cfg.input``:

    * ``"latent"`` (a block's feature map): ``proj`` (the 1x1 projection, a Linear on channels) of the map average
      pooled to ``pool_size``, then ``conv1`` -> act -> ``conv2`` -> ``norm`` (instance) -> act -> ``head``.
    * ``"image"`` (the input DEC, and latent DECs that read the image): the normalised image area-resized to at
      most ``image_size`` per side, then ``conv1`` -> act -> max pool 2 -> ``conv2`` -> act -> max pool 2 ->
      ``conv3`` -> ``norm`` -> act -> ``head``: strided enough to see a digit's or an object's extent, small
      enough to run 16 times per forward.

    ``head`` is a zero-initialised 1x1 conv to 2 channels (no bias: the row centring of `head_logits` would remove
    it). The module keeps no per-call state, so it is reentrant and safe under DDP, deepcopy (EMA) and threads.

    Example:
        >>> from timm_dec.ops import identity_knots
        >>> dec = DEC(384, grid=4, name="blocks.0.dec")
        >>> knots = dec(torch.randn(2, 1 + 14 * 14, 384), layout="tokens", num_prefix_tokens=1)
        >>> knots.shape, torch.equal(knots, identity_knots(2, 4))
        (torch.Size([2, 2, 5, 5]), True)
        >>> image_dec = DEC(3, input="image", name="dec.input")
        >>> image_dec(torch.randn(2, 3, 224, 224), layout="nchw").shape
        torch.Size([2, 2, 5, 5])
    """

    def __init__(self, in_chans: int, cfg: Optional[DECConfig] = None, name: str = "", **overrides: Any) -> None:
        """Args:
            in_chans: C, channels of the maps the DEC sees (the block's, or the image's with ``input="image"``).
            cfg: options; defaults to ``DECConfig()``.
            name: label of this DEC in `solver_stats` records, e.g. ``"dec.input"``, ``"dec.4"``.
            **overrides: any `DECConfig` field, overriding ``cfg`` (explicit keywords always win).
        """
        super().__init__()
        if not _is_int(in_chans) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
        if cfg is None:
            cfg = DECConfig()
        elif not isinstance(cfg, DECConfig):
            raise TypeError(f"cfg must be a DECConfig, got {type(cfg).__name__}")
        fields = set(DECConfig.option_names())
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown DEC option(s) {unknown}; the options are {sorted(fields)}")
        self.cfg: DECConfig = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self.in_chans = in_chans
        self.name = str(name)
        c = self.cfg
        act = get_act_layer(c.act_layer)
        if self.reads_image:
            c1, c2 = c.image_widths
            self.conv1 = nn.Conv2d(in_chans, c1, 3, padding=1)
            self.act1 = act()
            self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
            self.act2 = act()
            # no bias where it could never learn: instance norm removes conv3's
            self.conv3 = nn.Conv2d(c2, c2, 3, padding=1, bias=False)
            self.norm = nn.InstanceNorm2d(c2, affine=True)  # per sample: no batch statistics
            self.act3 = act()
        else:
            c1, c2 = c.widths
            self.proj = nn.Linear(in_chans, c.proj_chans)
            self.conv1 = nn.Conv2d(c.proj_chans, c1, 3, padding=1)
            self.act1 = act()
            # no bias where it could never learn: instance norm removes conv2's
            self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
            self.norm = nn.InstanceNorm2d(c2, affine=True)  # per sample: no batch statistics
            self.act2 = act()
        self.head = nn.Conv2d(c2, 2, 1, bias=False)
        self.reset_head()
        self.set_weight_context()

    @property
    def grid(self) -> int:
        return self.cfg.grid

    @property
    def reads_image(self) -> bool:
        """Whether H is the image H (``cfg.input == "image"``)."""
        return self.cfg.input == "image"

    def reset_head(self) -> None:
        """Zero the last layer, so that the fixed point is the identity warp."""
        nn.init.zeros_(self.head.weight)

    def reduce_input(self, x: torch.Tensor, layout: str, grid_size: Any = None, num_prefix_tokens: int = 0
                     ) -> torch.Tensor:
        """The map P that H warps, in the parameters' dtype: (B, proj_chans, h, w) with h and w at most
        ``pool_size`` for the latent H; the (B, C, h, w) image area-resized to at most ``image_size`` for the image H.

        Args:
            x: the feature map in ``layout`` (see `equilibrium`); its channels must be ``in_chans``.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        height, width = spatial_size(x, layout, grid_size, num_prefix_tokens)
        chans = x.shape[1] if layout == "nchw" else x.shape[-1]
        if chans != self.in_chans:
            raise ValueError(
                f"DEC {self.name!r} expects {self.in_chans} channels, got {chans} ({layout} {tuple(x.shape)})")
        if height * width < 2:
            raise ValueError(f"DEC needs a feature map with at least 2 positions, got {height} x {width}")
        if layout == "tokens":
            x = x[:, num_prefix_tokens:].unflatten(1, (height, width))
        elif layout == "nchw":
            x = x.permute(0, 2, 3, 1)
        x = x.to(self.head.weight.dtype).permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.reads_image:
            size = self.cfg.image_size
            if size is not None and max(height, width) > size:
                scale = size / max(height, width)
                # area resize (adaptive average pooling): an exact box filter, no aliasing, per sample
                x = F.adaptive_avg_pool2d(x, (max(2, round(height * scale)), max(2, round(width * scale))))
            return x.contiguous()
        pool = self.cfg.pool_size
        if pool is not None and (height > pool or width > pool):
            # Pooling commutes with the per-pixel projection, so pool the wide map first.
            x = F.adaptive_avg_pool2d(x, (min(height, pool), min(width, pool)))
        if x.device.type != "cpu":
            return F.conv2d(x, self.proj.weight[:, :, None, None], self.proj.bias)
        # a per-sample GEMM (a Linear folds the batch into one GEMM whose blocking, and rounding, depend on B)
        return native_conv2d(
            x.contiguous(), self.proj.weight[:, :, None, None], (1, 1), self.proj.bias, (1, 1), (0, 0))

    def knots(self, z: torch.Tensor) -> torch.Tensor:
        """(b, 2, G+1, G+1) fold-free knots of the state z (b, 2, G+1, G): bounded logits, softmax, fold guard."""
        return self.guarded_knots(z)[0]

    def guarded_knots(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`knots` of z and (b,) the fold guard's blend factor (1 where the warp needed no guard)."""
        bound = self.cfg.logit_bound
        return fold_free_knots(knots_from_logits(bound * torch.tanh(z / bound)), self.cfg.min_jacobian)

    def head_logits(self, out: torch.Tensor) -> torch.Tensor:
        """H's 2-channel output map (b, 2, h, w), rows y and columns x, read in the knots' layout: (b, 2, G+1, G).

        Channel 0 drives the row functions: pooled to (G+1, G), entry [m, n] is the segment n (along x) of the row
        function at y_m. Channel 1 drives the column functions: pooled to (G, G+1) = [segment m along y, column
        x_n] and transposed to [n, m], so the column function of x_n is moved by the content near x_n.

        The softmax of the knots ignores a constant added to a row's logits, so that component is removed: left in,
        it is a direction in which the residual update drifts without ever converging.
        """
        g = self.grid
        rows = F.adaptive_avg_pool2d(out[:, :1], (g + 1, g))
        cols = F.adaptive_avg_pool2d(out[:, 1:], (g, g + 1)).transpose(-1, -2)
        logits = torch.cat((rows, cols), dim=1)
        return logits - logits.mean(dim=-1, keepdim=True)

    def update(self, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """One application of the DEC map: f(z) = H(S^{-1}(P; knots(z))), or z + H(...) for ``update="residual"``.

        Args:
            z: (b, 2, G+1, G) state.
            p: (b, c, h, w) the map `reduce_input` made.

        Returns:
            (b, 2, G+1, G) next state.
        """
        warped = monotone_warp(p, self.knots(z), layout="nchw", check=False)
        h = self.act1(_conv(warped, self.conv1))
        if self.reads_image:
            h = _max_pool2(h)
            h = _max_pool2(self.act2(_conv(h, self.conv2)))
            h = self.act3(self.norm(_conv(h, self.conv3)))
        else:
            h = self.act2(self.norm(_conv(h, self.conv2)))
        h = self.head_logits(_conv(h, self.head))
        return z + h if self.cfg.update == "residual" else h

    def _adjoint(self, fz: torch.Tensor, z: torch.Tensor, near: torch.Tensor
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Backward of the implicit mode: v -> g solving g = J_f(z*)^T g + v, per sample (J is block diagonal).

        The implicit gradient is the gradient of the equilibrium only where the forward reached it: exact at a
        fixed point, off by O(residual) near one. A sample whose forward solve ended above ``NEAR_TOL_FACTOR`` x
        ``tol`` (or whose adjoint solve broke down) gets g = v instead: the Jacobian-free gradient of f at its best
        iterate (a one-step phantom gradient, the derivative of the f(z) the forward returned with the iterate z held
        fixed), which is bounded where (I - J)^-T of a point far from any equilibrium is not. An adjoint solve that ends
        above ``backward_tol`` keeps its best iterate, a truncated solution of the adjoint system (measured closer to
        the true gradient than g = v).

        Args:
            fz: (b, 2, G+1, G) f(z*), computed with grad from ``z``.
            z: (b, 2, G+1, G) the leaf z* that ``fz`` was computed from; the vector-Jacobian products reuse that graph.
            near: (b,) the forward solve ended within ``NEAR_TOL_FACTOR`` x ``tol``.
        """
        c = self.cfg
        solver = get_solver(c.backward_solver or c.solver)

        def adjoint(v: torch.Tensor) -> torch.Tensor:
            def vjp_step(g: torch.Tensor) -> torch.Tensor:
                (jtg,) = torch.autograd.grad(fz, z, g.to(v.dtype), retain_graph=True)
                return jtg + v

            # damped like the forward: the adjoint map's Jacobian J^T damped is (beta J + (1 - beta) I)^T, the
            # transpose of the forward's, so it contracts wherever the forward solve does
            g, _, info = solver(vjp_step, v.detach(), max_iter=c.backward_max_iter, tol=c.backward_tol,
                                history=c.history, beta=c.beta)
            implicit = near & ~info.failed
            return torch.where(implicit.view(-1, 1, 1, 1), g, v)

        return adjoint

    def equilibrium(
            self,
            x: torch.Tensor,
            *,
            layout: str,
            grid_size: Optional[Union[int, Sequence[int]]] = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Equilibrium state z* of the feature map ``x`` (the knots are `knots` of it).

        Args:
            x: (B, P + H*W, C) for ``layout="tokens"`` (the P prefix tokens are ignored), (B, H, W, C) for
                ``"nhwc"``, (B, C, H, W) for ``"nchw"``.
            layout: ``"tokens"``, ``"nhwc"`` or ``"nchw"``.
            grid_size: (H, W) of a token map (an int for square); inferred for square maps.
            num_prefix_tokens: P, class / distillation / register tokens before the patch tokens.

        Returns:
            (B, 2, G+1, G) z*, in the parameters' dtype; zero (the identity) for a sample whose solve went non-finite.
        """
        p = self.reduce_input(x, layout, grid_size, num_prefix_tokens)
        # shapes only (models built on the meta device before loading or sharding); an empty batch, as the base
        # takes one (the batch size is static: no host sync)
        if p.device.type == "meta" or p.shape[0] == 0:
            return identity_logits(p.shape[0], self.grid, device=p.device, dtype=p.dtype)
        # the differentiable path whenever autograd needs it, in eval mode too (saliency maps, robustness attacks)
        needs_graph = torch.is_grad_enabled() and (p.requires_grad or any(q.requires_grad for q in self.parameters()))
        with torch.autocast(device_type=p.device.type, enabled=False):
            return self._equilibrium(p, needs_graph)

    def _equilibrium(self, p: torch.Tensor, needs_graph: bool) -> torch.Tensor:
        c = self.cfg
        z0 = identity_logits(p.shape[0], c.grid, device=p.device, dtype=p.dtype)
        p_const = p.detach()
        # the backward differentiates the equilibrium: solve closer to it when autograd records (``grad_tol``)
        tol = min(c.tol, c.grad_tol) if needs_graph and c.grad_tol is not None else c.tol
        with torch.no_grad():
            z_star, f_star, info = get_solver(c.solver)(
                self.update, z0, args=(p_const,), max_iter=c.max_iter, tol=tol, history=c.history,
                beta=c.beta, check_every=c.check_every, compact=True)
        if tol != c.tol:  # converged means within ``tol``, whatever the solve aimed at
            info = info._replace(converged=~info.failed & (info.residual < c.tol))
        failed = info.failed.view(-1, 1, 1, 1)
        if recording():
            record_solve(self.name, info, self.guarded_knots(f_star)[1], _near(info, c.tol))
        if not needs_graph:
            return torch.where(failed, z0, f_star)
        z_start = torch.where(failed, z0, z_star)  # a failed sample's iterate is non-finite: keep it out of the graph
        if c.backward == "implicit":
            out = self._implicit_reentry(z_start, p, _near(info, c.tol))
        else:
            z_leaf = z_start.detach().requires_grad_(self._regularised)
            out = first = self.update(z_leaf, p)
            for _ in range(c.phantom_steps - 1):
                out = self.update(out, p)
            if self._regularised:
                out = self._jacobian_penalty(out, first, z_leaf, p)
        return torch.where(failed, z0, out)

    @property
    def _regularised(self) -> bool:
        """Whether this call adds the Jacobian regulariser's gradient (training mode, ``jac_reg`` > 0)."""
        return self.training and self.cfg.jac_reg > 0

    # The adjoint solve calls torch.autograd.grad inside a backward, which Dynamo cannot trace: under torch.compile
    # this one step runs eagerly (one graph break per DEC call in a training step; eval forwards stay one graph).
    @torch.compiler.disable
    def _implicit_reentry(self, z_start: torch.Tensor, p: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
        """One application of f from z* whose incoming gradient is replaced by the adjoint solution (implicit mode)."""
        z_leaf = z_start.detach().requires_grad_()
        fz = self.update(z_leaf, p)
        out = _ImplicitGrad.apply(fz, self._adjoint(fz, z_leaf, near))
        return self._jacobian_penalty(out, fz, z_leaf, p) if self._regularised else out

    @torch.compiler.disable  # torch.autograd.grad(create_graph=True) is not traceable: one graph break when training
    def _jacobian_penalty(self, out: torch.Tensor, fz: torch.Tensor, z: torch.Tensor, p: torch.Tensor
                          ) -> torch.Tensor:
        """``out``, whose backward also adds the gradient of ``jac_reg`` * mean over samples of ||v^T J||^2 / dim, with
        J = beta J_f(z) + (1 - beta) I the Jacobian of the damped map the solver iterates and v `hutchinson_probe`
        (a one-sample Hutchinson estimate of ||J||_F^2 / dim); the mean over the first ``jac_reg_fraction`` of the
        samples, whose f(z) is evaluated again from ``p`` when that is not all of them."""
        c = self.cfg
        n = math.ceil(c.jac_reg_fraction * z.shape[0])
        if n < z.shape[0]:
            z = z.detach()[:n].requires_grad_()
            fz = self.update(z, p[:n])
        v = hutchinson_probe(fz)
        (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True)
        if c.beta < 1:
            vjp = c.beta * vjp + (1 - c.beta) * v
        penalty = vjp.pow(2).flatten(1).mean(dim=1)
        return _AddLossGradient.apply(out, c.jac_reg * _LOSS_SCALE.get() * penalty.mean())

    def forward(
            self,
            x: torch.Tensor,
            *,
            layout: str,
            grid_size: Optional[Union[int, Sequence[int]]] = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Knots of the equilibrium monotone scaling of ``x`` (arguments as in `equilibrium`).

        Returns:
            (B, 2, G+1, G+1) fold-free knots (identity for a sample whose solve went non-finite), in the parameters'
            dtype.
        """
        return self.knots(self.equilibrium(x, layout=layout, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens))

    # The options that shape or interpret H's weights travel in the state dict (key ``<prefix>options``), so that
    # weights trained with others are refused on load; state dicts written before they did load as before.
    def weight_options(self) -> dict[str, Any]:
        """The ``dec_*`` options that H's weights were trained with and only mean under, with the model's context."""
        other_h = _LATENT_H_FIELDS if self.reads_image else _IMAGE_H_FIELDS  # the layers this DEC does not have
        names = [n for n in DECConfig.option_names() if n not in OVERRIDABLE and n not in other_h]
        values = {f"dec_{n}": list(v) if isinstance(v, tuple) else v for n in names for v in [getattr(self.cfg, n)]}
        return {**values, **self._weight_context}

    def set_weight_context(self, **context: Any) -> None:
        """Record model-level options (``dec_mode=...``) among the `weight_options`, in the ``options`` buffer."""
        self._weight_context = {**getattr(self, "_weight_context", {}), **context}
        old = getattr(self, "options", None)
        self.register_buffer("options", encode_options(self.weight_options()).to(
            old.device if old is not None else self.head.weight.device))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        key = prefix + "options"
        if key in state_dict:
            where = f"the state dict for {prefix.rstrip('.') or self.name}"
            recorded = decode_options(state_dict[key], where)
            own = self.weight_options()
            for name in [k for k in own if k in recorded and not same_dec_option(own[k], recorded[k])]:
                raise DECOptionError(mismatch_message(
                    name, own[name], recorded[name], where, f"create the model with {name}={recorded[name]!r}"))
        # this DEC's own (absent: written before the options were recorded, nothing to compare); a real tensor for a
        # model built on the meta device and loaded with assign=True
        state_dict[key] = encode_options(self.weight_options()) if self.options.is_meta else self.options
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"name={self.name!r}, in_chans={self.in_chans}, grid={c.grid}, input={c.input}, update={c.update}, "
                f"solver={c.solver}, max_iter={c.max_iter}, tol={c.tol}, backward={c.backward}")
