"""Which DEC options saved weights fix, and the one comparison of recorded with requested options.

A DEC's options are of two kinds. Those that shape or interpret its weights (grid, H's widths and activation, what H
reads and at what size, the update form, the logit bound, the fold guard, the damping the Jacobian regulariser trained
for, and the model's mode and DEC positions) must be the ones the weights were trained with. The solve budget and the
training-only options (`OVERRIDABLE`: iterations, tolerances, how often convergence is checked, Anderson memory, the
solvers, the backward and its regulariser) change no weight and no fixed point, so a loaded model may take others; it
says so once.

Every loader compares through `check_dec_options`, which raises `DECOptionError` with one message form.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Iterable, List, Mapping

import torch

__all__ = ["DECOptionError", "OVERRIDABLE", "same_dec_option", "check_dec_options", "mismatch_message", "overridable",
           "encode_options", "decode_options"]

# DECConfig fields that saved weights do not fix: the forward solve's budget and the training-only backward options
OVERRIDABLE = ("max_iter", "tol", "grad_tol", "check_every", "history", "solver", "backward", "phantom_steps",
               "backward_max_iter", "backward_tol", "backward_solver", "jac_reg", "jac_reg_fraction")
_PREFIX = "dec_"


class DECOptionError(ValueError, TypeError):
    """A DEC option that contradicts the one the weights were trained with.

    A `ValueError` (a bad value, which ``timm-dec`` reports in one line); also a `TypeError`, which
    ``timm.create_model`` raised for it before, so code that caught that keeps working.
    """


def same_dec_option(a: Any, b: Any) -> bool:
    """Whether two values of a DEC option are the same, lists and tuples alike (JSON gives lists)."""
    norm = (lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return norm(a) == norm(b)


def mismatch_message(key: str, requested: Any, recorded: Any, source: str, fix: str = "") -> str:
    """The one message form: ``dec_grid=4 contradicts SOURCE, whose DEC weights were trained with dec_grid=8; FIX``."""
    fix = fix or f"leave {key} out to use the recorded one, or pass {key}={recorded!r}"
    return f"{key}={requested!r} contradicts {source}, whose DEC weights were trained with {key}={recorded!r}; {fix}"


def overridable(key: str) -> bool:
    """Whether the ``dec_*`` option ``key`` may differ from the recorded one (`OVERRIDABLE`)."""
    return key.startswith(_PREFIX) and key[len(_PREFIX):] in OVERRIDABLE


def check_dec_options(
        requested: Mapping[str, Any],
        recorded: Mapping[str, Any],
        source: str,
        *,
        fix: str = "",
        keys: Iterable[str] = (),
        say: bool = True,
) -> List[str]:
    """Compare the ``dec_*`` options asked for with the ones the weights were trained with.

    Args:
        requested: the options asked for (or a built model's; only ``dec_*`` keys are compared).
        recorded: the options the weights record.
        source: names the weights, e.g. ``"the checkpoint ckpt.safetensors"``.
        fix: how to resolve a contradiction; default "leave it out, or pass the recorded value".
        keys: compare only these keys (default every ``dec_*`` key of ``requested`` that ``recorded`` names).
        say: warn once that the overridden solve-budget options differ from the recorded ones.

    Returns:
        The overridden solve-budget keys (they differ, and may).

    Raises:
        DECOptionError: an option that shapes or interprets the weights differs; the message names both values.
    """
    names = list(keys) or [k for k in requested if k.startswith(_PREFIX)]
    overridden = []
    for key in names:
        if key not in recorded or key not in requested or same_dec_option(requested[key], recorded[key]):
            continue
        if overridable(key):
            overridden.append(key)
            continue
        raise DECOptionError(mismatch_message(key, requested[key], recorded[key], source, fix))
    if overridden and say:
        warnings.warn(
            f"{source} was trained with {', '.join(f'{k}={recorded[k]!r}' for k in overridden)}; the model uses "
            f"{', '.join(f'{k}={requested[k]!r}' for k in overridden)} (solve-budget options, which change no "
            f"weight)", stacklevel=3)
    return overridden


def encode_options(options: Mapping[str, Any]) -> torch.Tensor:
    """``options`` as the float32 UTF-8 codes of their sorted JSON: a buffer that travels in a state dict (float, so
    that an EMA's ``decay * e + (1 - decay) * m`` cannot truncate it; 0-255 are exact in float16 and bfloat16 too)."""
    return torch.tensor(list(json.dumps(dict(options), sort_keys=True).encode()), dtype=torch.float32)


def decode_options(codes: torch.Tensor, source: str) -> dict[str, Any]:
    """The options `encode_options` wrote; `DECOptionError` naming ``source`` when they are not readable."""
    try:
        data = json.loads(bytes(int(round(float(c))) for c in codes.detach().cpu().flatten().tolist()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise DECOptionError(f"{source}: its recorded DEC options are not readable ({e})") from None
    if not isinstance(data, dict):
        raise DECOptionError(f"{source}: its recorded DEC options are not a mapping")
    return data
