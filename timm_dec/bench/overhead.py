"""``timm-dec bench overhead``: base timm models against their ``*_dec`` twins (default DEC options), in one run.

For each base name the base model and its ``*_dec`` twin (same backbone weights, random init: nothing downloads) are
measured side by side:

- forward latency: eval mode, ``torch.no_grad()``, batch ``--batch-size`` at ``--img-size``;
- training-step time: train mode, forward + cross-entropy + backward + SGD step;
- peak training memory: CUDA's peak allocation, or on the CPU the resident parameters and buffers plus the peak of the
  running sum of the allocations and frees the profiler records during one training step (activations, gradients,
  the DEC's solve and adjoint);
- mean solver iterations per DEC call (`timm_dec.solver_stats`), eval forward and training step;
- where the extra time goes: time inside the DEC modules (the equilibrium solve, wall clock via module hooks) and, in
  the training step, the implicit backward (the adjoint solve, from the profiler).

A fresh DEC is exactly the identity and its solve stops after one evaluation of H, which would flatter it. So every
DEC's zero-initialised last layer gets N(0, ``DEC_HEAD_STD``^2) weights (`perturb_dec_heads`): the solve then iterates
(typically 6-8 Anderson steps at the default ``tol``), as a trained DEC's does.

Timing runs base and DEC round-robin (warm-up rounds, then ``--repeats`` timed rounds, as
`timm_dec.bench.timing.paired_times` does), so background load slows both alike; a time ratio is the median over rounds
of that round's dec / base ratio (the two calls ran back to back), and the ratio of the fastest calls is kept too.
On a CPU shared with other jobs run it with one thread per process (``OMP_NUM_THREADS=1``): with more threads than
free cores, the many small operations of the solve wait on descheduled threads and the DEC figures balloon. The load
average before and after is recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..dec import DEC, solver_stats
from ..models import load_dec_state_dict
from .timing import environment, paired_times, peak_cpu_memory

__all__ = [
    "bench_overhead", "bench_model", "format_overhead_table", "overhead_targets", "perturb_dec_heads",
    "peak_training_memory", "DEC_HEAD_STD", "FORWARD_MAX_RATIO", "TRAIN_MAX_RATIO", "MEMORY_MAX_RATIO",
    "OVERHEAD_MODELS",
]

OVERHEAD_MODELS = (
    "vit_small_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224")

DEC_HEAD_STD = 0.05
# targets (`timm-dec bench overhead --check`): dec / base forward, training step and training memory
FORWARD_MAX_RATIO = 1.20
TRAIN_MAX_RATIO = 1.35
MEMORY_MAX_RATIO = 1.15
SGD_LR = 1e-5  # small: the timed rounds barely move the weights, so every round times the same model


def perturb_dec_heads(model: nn.Module, std: float = DEC_HEAD_STD, seed: int = 0) -> None:
    """Give every DEC's zero-initialised last layer N(0, std^2) weights and bias, so its solve iterates.

    Args:
        model: a ``*_dec`` model (its DEC modules are found by type).
        std: standard deviation of the new weights.
        seed: seed of the weights.
    """
    gen = torch.Generator().manual_seed(seed)
    decs = [m for m in model.modules() if isinstance(m, DEC)]
    if not decs:
        raise ValueError(f"{type(model).__name__} has no DEC modules to perturb")
    with torch.no_grad():
        for dec in decs:
            for p in (dec.head.weight,):
                p.copy_((std * torch.randn(p.shape, generator=gen)).to(p))


def _resident_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def peak_training_memory(model: nn.Module, step: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Peak memory of one training step.

    Args:
        model: the model ``step`` trains (its parameters and buffers count as resident).
        step: one training step; it sets the gradients to None first, so they count in the step.
        device: CUDA: ``torch.cuda.max_memory_allocated`` over the step (``step_bytes`` is then the peak minus what was
            allocated before). CPU: `peak_cpu_memory` of the step.

    Returns:
        ``resident_bytes`` (parameters, buffers), ``step_bytes`` (the step's own peak) and ``total_bytes`` (their sum).
    """
    resident = _resident_bytes(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        step_bytes = torch.cuda.max_memory_allocated(device) - before
    else:
        step_bytes = peak_cpu_memory(step)
    return dict(resident_bytes=resident, step_bytes=step_bytes, total_bytes=resident + step_bytes)


def _summary(times: dict[str, list[float]]) -> dict[str, Any]:
    """Median ms per candidate, the median of the per-round dec / base ratios, and the ratio of the minima."""
    return {
        "base_ms": 1e3 * statistics.median(times["base"]),
        "dec_ms": 1e3 * statistics.median(times["dec"]),
        "ratio": statistics.median(d / b for d, b in zip(times["dec"], times["base"])),
        "ratio_of_minima": min(times["dec"]) / min(times["base"]),
        "rounds_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
    }


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def _dec_seconds(model: nn.Module, fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall seconds of ``fn()`` and of the DEC module calls inside it (forward hooks; CUDA synchronised)."""
    spent: list[float] = []
    starts: list[float] = []

    def pre(module: nn.Module, args: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        starts.append(time.perf_counter())

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent.append(time.perf_counter() - starts.pop())

    handles = []
    for module in model.modules():
        if isinstance(module, DEC):
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return total, sum(spent)


def _adjoint_share(step: Callable[[], Any]) -> float:
    """Share of a profiled training step's CPU time spent in the implicit backward of the DECs (the adjoint solve)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    # the autograd engine wraps each node's backward in an "evaluate_function: <Node>" event that includes its work
    adjoint = sum(e.cpu_time_total for e in events if "evaluate_function" in e.key and "_ImplicitGrad" in e.key)
    top_level = [e for e in prof.events() if e.cpu_parent is None]
    total = sum(e.cpu_time_total for e in top_level)
    return adjoint / total if total > 0 else 0.0


def _twins(name: str, img_size: int, seed: int, head_std: float) -> tuple[nn.Module, nn.Module]:
    """The base model and its ``*_dec`` twin with the base's weights and perturbed DEC heads.

    ``img_size`` 0 keeps the model's own resolution. A headless base (DINOv3, EVA02 MIM: ``num_classes=0``) gets a
    1000-class classifier, so that the training step has a loss.
    """
    kwargs: dict[str, Any] = {"num_classes": timm.models.get_pretrained_cfg_value(name, "num_classes") or 1000}
    if img_size:
        kwargs["img_size"] = img_size
    torch.manual_seed(seed)
    base = timm.create_model(name, pretrained=False, **kwargs)
    dec = timm.create_model(name + "_dec", pretrained=False, **kwargs)
    load_dec_state_dict(dec, base.state_dict(), source=f"{name}'s weights", target=f"{name}_dec")
    perturb_dec_heads(dec, head_std, seed)
    return base, dec


def _solver_figures(dec: nn.Module, x: torch.Tensor, train_step: Callable[[], None]) -> dict[str, Any]:
    """Solver iterations of an eval forward and a training step (also the first call of everything)."""
    dec.eval()
    with torch.no_grad(), solver_stats() as eval_stats:
        dec(x)
    dec.train()
    with solver_stats() as train_stats:
        train_step()
    return {
        "eval_mean_iterations": eval_stats.mean_iterations,
        "eval_max_iterations": max(r.max_iterations for r in eval_stats.records),
        "train_mean_iterations": train_stats.mean_iterations,
        "fallbacks": eval_stats.total_fallbacks + train_stats.total_fallbacks,
        "per_dec": eval_stats.summary(),
    }


def overhead_targets(ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The targets of one model, each ``{"value": ..., "met": ...}``, named with its bound."""
    return {
        f"forward_<={FORWARD_MAX_RATIO}": {"value": ratios["forward"], "met": ratios["forward"] <= FORWARD_MAX_RATIO},
        f"train_step_<={TRAIN_MAX_RATIO}": {
            "value": ratios["train_step"], "met": ratios["train_step"] <= TRAIN_MAX_RATIO},
        f"memory_<={MEMORY_MAX_RATIO}": {
            "value": ratios["memory_total"], "met": ratios["memory_total"] <= MEMORY_MAX_RATIO},
    }


def bench_model(
        name: str,
        *,
        device: torch.device,
        batch_size: int = 8,
        img_size: int = 224,
        repeats: int = 10,
        warmup: int = 3,
        seed: int = 0,
        head_std: float = DEC_HEAD_STD,
) -> dict[str, Any]:
    """Measure the timm model ``name`` against ``name + "_dec"`` (default DEC options, perturbed DEC heads).

    Args:
        name: a timm base model name with a registered ``_dec`` twin.
        device: where to run.
        batch_size: images per batch.
        img_size: input resolution (square); 0 for the model's own (its pretrained cfg's input size).
        repeats: timed rounds; figures are medians.
        warmup: untimed rounds first.
        seed: seed of the weights, the inputs and the DEC heads.
        head_std: standard deviation of the DEC heads (`perturb_dec_heads`).

    Returns:
        JSON-serialisable dict: ``forward`` and ``train_step`` (median ms of base and dec, the median of the per-round
        dec / base ratios, the ratio of the minima, every round), ``memory`` in bytes, ``ratios`` (dec / base: the
        per-round medians for time), ``solver`` iteration statistics, ``split`` (where the DEC model's time goes),
        the ``targets`` (`overhead_targets`) and the DEC options.
    """
    base, dec = _twins(name, img_size, seed, head_std)
    img_size = img_size or base.pretrained_cfg["input_size"][-1]
    base.to(device)
    dec.to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
    target = torch.randint(0, base.num_classes, (batch_size,), generator=gen).to(device)
    steps = {"base": _train_step(base, x, target), "dec": _train_step(dec, x, target)}
    solver = _solver_figures(dec, x, steps["dec"])  # outside the timed rounds

    base.eval()
    dec.eval()
    with torch.no_grad():
        forward = _summary(paired_times({"base": lambda: base(x), "dec": lambda: dec(x)}, device, repeats, warmup))
        fwd_total, fwd_dec = _dec_seconds(dec, lambda: dec(x), device)
    base.train()
    dec.train()
    train = _summary(paired_times(steps, device, repeats, warmup))
    train_total, train_dec_fwd = _dec_seconds(dec, steps["dec"], device)
    adjoint_share = _adjoint_share(steps["dec"]) if device.type == "cpu" else None
    memory = {"base": peak_training_memory(base, steps["base"], device),
              "dec": peak_training_memory(dec, steps["dec"], device)}

    ratios = {
        "forward": forward["ratio"],
        "train_step": train["ratio"],
        "memory_total": memory["dec"]["total_bytes"] / memory["base"]["total_bytes"],
        "memory_step": memory["dec"]["step_bytes"] / memory["base"]["step_bytes"],
    }
    return {
        "model": name,
        "img_size": img_size,
        "dec_blocks": list(dec.dec_cfg.blocks),
        "dec_options": dataclasses.asdict(dec.dec_cfg.options),
        "dec_params": sum(p.numel() for p in dec.dec.parameters()),
        "base_params": sum(p.numel() for p in base.parameters()),
        "forward": forward,
        "train_step": train,
        "memory": memory,
        "ratios": ratios,
        "solver": solver,
        "split": {
            "forward_dec_share": fwd_dec / fwd_total,
            "train_dec_forward_share": train_dec_fwd / train_total,
            "train_adjoint_share_profiled": adjoint_share,
        },
        "targets": overhead_targets(ratios),
    }


def format_overhead_table(result: dict[str, Any]) -> str:
    """The overhead result as a text table: base and DEC figures, dec / base ratios, iterations and time split."""
    env = result["environment"]
    lines = [
        f"*_dec overhead on {env['device']} ({env.get('device_name', env['machine'])}, {env['torch_threads']} threads, "
        f"torch {env['torch']}), batch {result['batch_size']}, {result['img_size'] or 'own'} px, "
        f"median of {result['repeats']}, "
        f"DEC heads ~ N(0, {result['dec_head_std']}^2), load average {result['load_average_before'][0]:.1f} -> "
        f"{result['load_average_after'][0]:.1f}",
        f"{'model':<30} {'px':>4} {'fwd ms base/dec':>17} {'x':>6} {'train ms base/dec':>19} {'x':>6} "
        f"{'mem MB base/dec':>17} {'x':>6} {'x step':>7} {'iters e/t':>10} {'DEC% fwd':>9} {'adj% trn':>9}",
    ]
    for name, r in result["models"].items():
        f, t, m, q = r["forward"], r["train_step"], r["memory"], r["ratios"]
        adjoint = r["split"]["train_adjoint_share_profiled"]
        lines.append(
            f"{name:<30} {r['img_size']:>4} {f['base_ms']:>8.0f}/{f['dec_ms']:<8.0f} {q['forward']:>6.3f} "
            f"{t['base_ms']:>9.0f}/{t['dec_ms']:<9.0f} "
            f"{q['train_step']:>6.3f} {m['base']['total_bytes'] / 2**20:>8.0f}/{m['dec']['total_bytes'] / 2**20:<8.0f} "
            f"{q['memory_total']:>6.3f} {q['memory_step']:>7.3f} "
            f"{r['solver']['eval_mean_iterations']:>4.1f}/{r['solver']['train_mean_iterations']:<5.1f} "
            f"{100 * r['split']['forward_dec_share']:>8.1f}% "
            + (f"{100 * adjoint:>8.1f}%" if adjoint is not None else f"{'-':>9}"))
    lines.append("x = dec / base (time: median of the per-round ratios; memory: parameters + the step's peak; x step: "
                 "the step's peak alone); "
                 "iters: mean solver iterations per DEC call, eval / train; DEC% fwd: share of the eval forward inside "
                 "the DEC modules; adj% trn: share of a profiled training step in the implicit backward")
    return "\n".join(lines)


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Run the overhead benchmark with the options of `timm_dec.bench.add_arguments`; print the table, return JSON.

    Uses ``args.models``, ``args.device``, ``args.batch_size``, ``args.img_size``, ``args.repeats``, ``args.warmup``
    and ``args.seed``.
    """
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available")
    if args.batch_size < 1 or not (args.img_size == 0 or args.img_size >= 32):
        raise ValueError(f"--batch-size must be >= 1 and --img-size 0 or >= 32, got {args.batch_size} and "
                         f"{args.img_size}")
    unknown = [m for m in args.models if not timm.is_model(m + "_dec")]
    if unknown:
        raise ValueError(f"no *_dec twin registered for {unknown}; see timm_dec.list_dec_models()")
    result: dict[str, Any] = {
        "benchmark": "overhead", "environment": environment(device), "batch_size": args.batch_size,
        "img_size": args.img_size, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
        "dec_head_std": DEC_HEAD_STD, "load_average_before": list(os.getloadavg()), "models": {},
    }
    start = time.perf_counter()
    for name in args.models:
        result["models"][name] = bench_model(
            name, device=device, batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats,
            warmup=args.warmup, seed=args.seed)
        print(f"{name}: done after {time.perf_counter() - start:.0f} s", flush=True)
    result["load_average_after"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - start
    print(format_overhead_table(result))
    return result
