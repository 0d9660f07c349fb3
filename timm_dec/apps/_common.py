"""What the applications share: the flags of the experiments (``timm-dec demo`` and ``segment``: ``--preset``,
``--out``, ``--methods``, ``--seed``, ``--threads``, and the runner's ``--no-progress``, ``--from-scratch``,
``--write-start``) declared and checked once, the ``--scales`` / ``--scale-bins``
parsers, the checks made before any work (option values, a model's name and kwargs built on the meta device, DEC
options, timm's pretrained weights offline), the input normalisation of a timm data config, the ``--device``
resolution, the AdamW parameter groups and learning-rate schedule, and the step-cost calibration of the equal-compute
control (Aug+time)."""
from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import timm
import torch

from .. import hub
from .._argcheck import OUTPUT_FOLDER_RULE, named_kwarg
from ..dec import DECConfig

__all__ = ["add_experiment_arguments", "method_list", "check_experiment_arguments", "set_threads",
           "parse_scales", "parse_bins", "scales_arg", "bins_arg", "normalize_transform", "resolve_device",
           "param_groups", "warmup_cosine_schedule", "measure_step_costs", "equal_compute_steps",
           "calibrate_equal_time", "calibration_line", "check_number", "check_scale_range", "check_dec_config",
           "check_model_build", "meta_build_error", "check_pretrained_offline", "hub_offline"]


def method_list(text: str) -> tuple[str, ...]:
    """``--methods``: ``"aug, dec"`` -> ("aug", "dec"); the names are checked by `check_experiment_arguments`."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def add_experiment_arguments(parser: argparse.ArgumentParser, *, presets: Mapping[str, str], methods: Sequence[str],
                             always: Sequence[str], out: str, optional: Sequence[str] = ()) -> None:
    """The flags every experiment command (``timm-dec demo``, ``segment``) shares: ``--preset``, ``--out``,
    ``--methods``, ``--seed`` and ``--threads`` (check them with `check_experiment_arguments`), and those of the
    runner (`timm_dec.apps.experiment`): ``--no-progress``, ``--from-scratch`` (``start="scratch"``) and
    ``--write-start DIR``.

    Args:
        presets: name -> what the preset is for (the first is the default).
        methods: every method of the command, in the order they run (the default: all but ``optional``).
        always: the reference methods that run whatever ``--methods`` says.
        out: the default output folder.
        optional: the methods that run only when ``--methods`` names them.
    """
    first = next(iter(presets))
    names = ", ".join(f"{name} ({text})" for name, text in presets.items())
    parser.add_argument("--preset", choices=tuple(presets), default=first,
                        help=f"the preset the options left out come from: {names}"
                             + ("" if first == "default" else f"; default {first}"))
    parser.add_argument("--out", default=out, help=f"output folder (default {out}/; {OUTPUT_FOLDER_RULE})")
    verb = "runs" if len(always) == 1 else "run"
    parser.add_argument("--methods", type=method_list, default=None,
                        help=f"comma-separated methods to run, of {','.join(methods)} (default: all"
                             + (f" but {','.join(optional)}" if optional else "")
                             + f"; {' and '.join(always)} always {verb})")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data, the shared start and the training "
                                                               "(default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--from-scratch", action="store_const", const="scratch", dest="start", default=None,
                        help="train the shared start (plain, then Aug) in this run instead of loading the shipped one")
    parser.add_argument("--write-start", default=None, metavar="DIR",
                        help="only train the shared start and write it to DIR (how the shipped start was made; "
                             f"{OUTPUT_FOLDER_RULE})")


def check_experiment_arguments(args: argparse.Namespace, methods: Sequence[str], always: Sequence[str],
                               optional: Sequence[str] = ()) -> tuple[str, ...]:
    """The shared flags of `add_experiment_arguments`, checked before any work: ``--threads`` >= 1, ``--seed`` >= 0,
    every name of ``--methods`` one of ``methods``.

    Returns:
        The methods to run, in the order of ``methods``: those asked for (without ``--methods``, all but
        ``optional``) and ``always``.
    """
    threads, seed = getattr(args, "threads", None), getattr(args, "seed", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if seed is not None and seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    asked = tuple(m for m in methods if m not in optional) if getattr(args, "methods", None) is None else args.methods
    unknown = list(dict.fromkeys(m for m in asked if m not in methods))
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(methods)}")
    return tuple(m for m in methods if m in set(asked) | set(always))


def set_threads(args: argparse.Namespace) -> None:
    """``--threads``, when given: torch's CPU threads (`torch.set_num_threads`)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def parse_scales(text: str) -> list[float]:
    """``"0.7,0.8,1.0"`` -> [0.7, 0.8, 1.0]; every scale a finite number > 0."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"scales must be comma-separated numbers, e.g. 0.7,0.85,1.0, got {text!r}") from None
    if not scales:
        raise ValueError(f"no scales in {text!r}")
    bad = [s for s in scales if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"scales must be finite and > 0, got {bad}")
    return scales


def _scale_interval(low: float, high: float) -> bool:
    """Whether [low, high] is a finite interval of positive scales."""
    return math.isfinite(low) and math.isfinite(high) and 0 < low <= high


def check_scale_range(low: float, high: float) -> None:
    """``--scale-range LOW HIGH``: a finite interval of positive scales, else a `ValueError` naming the flag."""
    if not _scale_interval(low, high):
        raise ValueError(f"--scale-range needs 0 < LOW <= HIGH, got {low} {high}")


def parse_bins(text: str) -> list[tuple[float, float]]:
    """``"0.4-1.0,1.0-2.0"`` -> [(0.4, 1.0), (1.0, 2.0)]; each bin 0 < low <= high."""
    bins = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pieces = part.split("-")
        try:
            low, high = (float(v) for v in pieces)
        except ValueError:
            raise ValueError(f"a scale bin is LOW-HIGH, e.g. 0.4-1.0; got {part!r} in {text!r}") from None
        if not _scale_interval(low, high):
            raise ValueError(f"a scale bin needs 0 < LOW <= HIGH, got {part!r}")
        bins.append((low, high))
    if not bins:
        raise ValueError(f"no scale bins in {text!r}")
    return bins


def scales_arg(text: str) -> list[float]:
    """`parse_scales` as an argparse ``type``: its message, not argparse's "invalid value"."""
    try:
        return parse_scales(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bins_arg(text: str) -> list[tuple[float, float]]:
    """`parse_bins` as an argparse ``type``."""
    try:
        return parse_bins(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_number(flag: str, value: Any, *, low: float = 0.0, strict: bool = True, high: Optional[float] = None,
                 why: str = "") -> None:
    """A finite number above ``low`` (at least ``low`` unless ``strict``) and at most ``high``; else a `ValueError`
    naming ``flag``."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        bound += f" and <= {high:g}" if high is not None else ""
        raise ValueError(f"{flag} must be a finite number {bound}{why}, got {value}")


def check_dec_config(options: Mapping[str, Any]) -> DECConfig:
    """The `DECConfig` of ``create_model``'s ``dec_*`` options (``dec_blocks`` and ``dec_mode`` aside), built before any
    work; an invalid value is an error naming its ``--dec-*`` flag."""
    fields = {k[len("dec_"):]: v for k, v in options.items() if k not in ("dec_blocks", "dec_mode")}
    if fields.get("update") == "residual" and fields.get("backward", "implicit") == "implicit":
        raise ValueError("--dec-update residual needs --dec-backward phantom: the implicit backward is ill-posed for "
                         "the residual update (its adjoint has no solution where dH/dz = 0, e.g. at initialisation)")
    try:
        return DECConfig(**fields)
    except ValueError as e:
        for name, value in fields.items():  # the option that fails alone
            try:
                DECConfig(**{name: value})
            except ValueError:
                raise ValueError(f"--dec-{name.replace('_', '-')}: {e}") from None
        raise ValueError(f"the --dec-* options: {e}") from None


def check_model_build(name: str, kwargs: Mapping[str, Any], what: str = "--model-kwargs") -> None:
    """``timm.create_model(name, **kwargs)`` on the meta device (no memory, no weights): the name and kwargs checked
    before any work; an error names the kwarg (and its value) that the model refuses. ``what`` says where the kwargs
    come from. A ``hf-hub:``/``local-dir:`` name is left to its loader (it may need the network)."""
    if ":" in name:
        return
    if not timm.is_model(name):
        raise ValueError(f"--model {name}: no such timm model (timm.list_models() lists them)")
    e = meta_build_error(name, kwargs)
    if e is None:
        return
    message = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
    key = named_kwarg(kwargs, e)
    if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
        raise ValueError(f"{what}: {name} does not take {key or message}")
    raise ValueError(f"{what} {key + ': ' if key else ''}{name} refuses it ({message})")


def meta_build_error(name: str, kwargs: Mapping[str, Any]) -> Optional[Exception]:
    """The error of ``timm.create_model(name, **kwargs)`` on the meta device, or None (also for a model whose
    constructor computes on tensor values, which the meta device cannot: it is checked when it is built)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001  (the caller words it)
        return None if "meta" in str(e) else e
    return None


def check_pretrained_offline(name: str, kwargs: Mapping[str, Any], flag: str = "--pretrained") -> bool:
    """timm's pretrained weights of ``name``: when ``HF_HUB_OFFLINE`` is set or the Hub cannot be reached, they must
    be in huggingface_hub's cache; else an error at once (instead of huggingface_hub's retries).

    Returns:
        True when the weights are to be read from the cache (offline: build the model inside `hub_offline`, so
        that huggingface_hub does not retry the network first), False when the Hub is reachable or the weights do
        not come from it.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if ":" in name:  # hf-hub:/local-dir: names are left to their loader
        return False
    try:
        with torch.device("meta"):
            cfg = dict(getattr(timm.create_model(name, **kwargs), "pretrained_cfg", None) or {})
    except Exception:  # noqa: BLE001  (a model the meta device cannot build: its own download reports itself)
        return False
    repo = cfg.get("hf_hub_id")
    if not repo or cfg.get("file"):
        return False
    offline = constants.HF_HUB_OFFLINE
    if not offline and hub.hub_reachable():
        return False
    repo, _, revision = repo.partition("@")
    files = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in files if f):
        return True
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached (no network?)"
    raise ValueError(f"{flag}: timm's weights of {name} ({repo}) are not in huggingface_hub's cache and {why}; "
                     f"leave {flag} out, or download them once with the network")


@contextmanager
def hub_offline(active: bool = True) -> Iterator[None]:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``) inside the block, when ``active``: downloads read its cache
    at once, as `check_pretrained_offline` found the network unreachable."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or active
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def normalize_transform(data_cfg: Mapping[str, Any], chans: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(C, H, W) or (B, C, H, W) images in [0, 1] -> normalised with the data config's ``mean`` and ``std``.

    A 1-channel model with a 3-channel config uses the channel means.
    """
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32)
    if mean.numel() != chans:
        mean, std = mean.mean().expand(chans), std.mean().expand(chans)
    mean, std = mean.view(-1, 1, 1).clone(), std.view(-1, 1, 1).clone()

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    return normalize


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: default cuda when available, else cpu; a CUDA device without CUDA is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, *, new_prefixes: Sequence[str] = (),
                 new_lr_mult: float = 1.0, only_new: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``: no weight decay for biases and 1-D parameters (norms, scales; timm's habit),
    the new parameters (whose names start with one of ``new_prefixes``, e.g. ``"dec."``) at ``new_lr_mult`` times
    ``lr``; with ``only_new`` the others are left out, frozen for the run (the DEC's warm-up).

    Returns:
        Up to four groups, in the order of their first parameter in ``model.named_parameters()``, each with
        ``params``, ``lr`` and ``weight_decay``.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        new = name.startswith(tuple(new_prefixes))
        if only_new and not new:
            continue
        groups.setdefault((new, p.ndim <= 1 or name.endswith(".bias")), []).append(p)
    return [dict(params=ps, lr=lr * (new_lr_mult if new else 1.0), weight_decay=0.0 if no_decay else weight_decay)
            for (new, no_decay), ps in groups.items()]


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total: int,
                           warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to zero, per step."""
    warmup = int(round(warmup_frac * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def measure_step_costs(steps: Mapping[str, Callable[[], Any]], *, rounds: int = 5, calls: int = 5, warmup: int = 2,
                       max_uncertainty: float = 0.1, attempts: int = 3) -> dict[str, Any]:
    """Seconds per call of each training step, measured side by side in one window.

    Each step first runs ``warmup`` untimed calls; then ``rounds`` rounds run every step ``calls`` times back to back,
    in turn, so that background load slows all of them alike. A step's cost is the median over rounds of its mean
    seconds per call. The uncertainty is the largest, over the steps, relative standard error of the median of the
    per-round ratios of a step's cost to the first step's (1.2533 stdev / sqrt(rounds) / median: the ratio the
    equal-compute step count rests on is known to within it, one standard error; a DEC's step cost also varies with
    its batch's solve iterations). Above ``max_uncertainty`` the whole measurement is repeated, at most ``attempts``
    times, and the least uncertain attempt is returned, flagged ``noisy`` if even that one is above the bound.

    Args:
        steps: name -> one training step (a closure on copies of the models: calibration must not train the
            models that are compared).

    Returns:
        ``seconds`` (name -> median seconds per call), ``rounds`` (name -> per-round seconds per call),
        ``uncertainty``, ``attempts``, ``noisy`` (the machine was too busy for an equal-compute figure: say so beside
        the result), ``max_uncertainty``.
    """
    if not steps:
        raise ValueError("no steps to measure")
    if rounds < 2 or calls < 1 or warmup < 0 or attempts < 1 or not max_uncertainty > 0:
        raise ValueError("rounds must be >= 2, calls and attempts >= 1, warmup >= 0 and max_uncertainty > 0")
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    best: dict[str, Any] = {}
    for attempt in range(1, attempts + 1):
        per_round: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            for name in names:
                start = time.perf_counter()
                for _ in range(calls):
                    steps[name]()
                per_round[name].append((time.perf_counter() - start) / calls)
        uncertainty = 0.0
        for name in names[1:]:
            ratios = [t / r for t, r in zip(per_round[name], per_round[names[0]])]
            error = 1.2533 * statistics.stdev(ratios) / math.sqrt(rounds) / statistics.median(ratios)
            uncertainty = max(uncertainty, error)
        if not best or uncertainty < best["uncertainty"]:
            best = dict(seconds={n: statistics.median(v) for n, v in per_round.items()}, rounds=per_round,
                        uncertainty=uncertainty, noisy=uncertainty > max_uncertainty, max_uncertainty=max_uncertainty)
        if uncertainty <= max_uncertainty:
            break
    return dict(best, attempts=attempt)


def equal_compute_steps(costs: Mapping[str, float], work: Mapping[str, int], reference: str, own_steps: int,
                        max_factor: float = 20.0) -> int:
    """Steps of ``reference`` that cost what ``work`` costs: sum(work[k] * costs[k]) / costs[reference], rounded,
    never fewer than ``own_steps`` (the control never trains less than its method) and never more than
    ``max_factor`` times ``max(own_steps, 1)`` (a bound, whatever the measured costs).

    Args:
        costs: seconds per step of each kind of step (`measure_step_costs`), all > 0.
        work: how many steps of each kind the compared method trained.
        reference: the kind of step the control trains.
        own_steps: the control's own steps (the reference method's).
    """
    bad = {k: v for k, v in costs.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"step costs must be finite and > 0, got {bad}")
    budget = sum(n * costs[k] for k, n in work.items())
    steps = round(budget / costs[reference])
    return int(min(max(steps, own_steps), max_factor * max(own_steps, 1)))


def calibrate_equal_time(steps: Mapping[str, Callable[[], Any]], dec_only_steps: int, dec_steps: int) -> dict[str, Any]:
    """Aug+time's step count: the DEC's training (``dec_only_steps`` DEC-only and ``dec_steps`` joint steps) in Aug
    steps, from ``steps`` (``"aug"``, ``"dec_only"``, ``"dec"``: one training step each, on copies of the trained
    models) timed side by side (`measure_step_costs`); never fewer than ``dec_steps``, Aug's own.

    Returns:
        ``steps`` (Aug+time's), ``extra_steps``, ``step_seconds``, ``rounds``, the cost ratios ``dec_step_ratio`` and
        ``dec_only_step_ratio``, ``uncertainty``, ``attempts``, ``noisy``, ``max_uncertainty``.
    """
    costs = measure_step_costs(steps)
    sec = costs["seconds"]
    total = equal_compute_steps(sec, {"dec_only": dec_only_steps, "dec": dec_steps}, "aug", dec_steps)
    return dict(step_seconds=sec, rounds=costs["rounds"], uncertainty=costs["uncertainty"],
                attempts=costs["attempts"], noisy=costs["noisy"], max_uncertainty=costs["max_uncertainty"],
                steps=total, extra_steps=total - dec_steps, dec_step_ratio=sec["dec"] / sec["aug"],
                dec_only_step_ratio=sec["dec_only"] / sec["aug"])


def calibration_line(calibration: Mapping[str, Any]) -> str:
    """One line saying what an equal-compute calibration measured, and whether the machine was too busy for it."""
    line = (f"Aug+time calibration (training steps timed side by side, {calibration['attempts']} attempt(s)): a DEC "
            f"step costs {calibration['dec_step_ratio']:.2f} Aug steps (+-{100 * calibration['uncertainty']:.0f}%), "
            f"a DEC-only step {calibration['dec_only_step_ratio']:.2f}: Aug+time trains {calibration['steps']} steps")
    if calibration["noisy"]:
        line += (f" -- NOT an equal-compute figure: the step costs are uncertain by more than "
                 f"{100 * calibration['max_uncertainty']:.0f}% (the machine was busy); rerun when idle")
    return line
