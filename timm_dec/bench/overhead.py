"""``timm-dec bench overhead``: base timm models against their ``*_dec`` twins (default DEC options), in one run.

For each base name the base model and its ``*_dec`` twin (same backbone weights, random init: nothing downloads) are
measured side by side:

- forward latency: eval mode, ``torch.no_grad()``, batch ``--batch-size`` at ``--img-size``;
- training-step time: train mode, forward + cross-entropy + backward + SGD step;
- peak training memory: CUDA's peak allocation, or on the CPU the resident parameters and buffers plus the peak of the
  running sum of the allocations and frees the profiler records during one training step (activations, gradients,
  the DEC's solve and adjoint);
- mean solver iterations per DEC call (`timm_dec.solver_stats`), eval forward and training step;
- where the extra time goes: time inside the DEC modules (the equilibrium solve and, in training, the phantom steps;
  wall clock via module hooks) and, for DECs with ``backward="implicit"``, the share of the training step in the
  adjoint solve (from the profiler; None with the default phantom backward, which has no adjoint solve).

Modes (``--modes``): ``eager``; ``compile`` (``torch.compile`` of both models, ``--compile-backend``, default
Inductor; the DEC solve then runs its fixed ``max_iter`` iterations, since a compiled graph reads nothing on the
host); ``cudagraph`` (CUDA only: the eval forward of both models captured with ``torch.cuda.graphs`` and replayed, DEC
built with ``dec_check_every=None``; forward figures only). In the compiled and captured modes the time split is not
measured (module hooks do not run inside a graph) and the solver figures come from the eager model.

A fresh DEC is exactly the identity and its solve stops after one evaluation of H, which would flatter it. So every
DEC's zero-initialised last layer gets random N(0, std^2) weights (`perturb_dec_heads`): the solve then iterates.
Two solves (``--solves``, `SOLVES`): ``converging`` has heads with std 0.01, whose solves reach the default
tolerance in several iterations, as a well-posed trained DEC's do (the ``tol%`` column reports the share that did:
it is the evidence that the case converges); ``worst`` has heads with std 0.05 and an unreachable tolerance, so
every solve runs its ``max_iter`` iterations and the implicit backward's adjoint solve its ``backward_max_iter``: the
upper bound of the cost.

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
    "OVERHEAD_MODELS", "MODES", "SOLVES", "entry_key", "set_dec_options",
]

OVERHEAD_MODELS = (
    "vit_small_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224")
MODES = ("eager", "compile", "cudagraph")
# converging: heads whose solves reach the default tolerance (the share is reported); worst: larger heads and an
# unreachable tolerance, so every solve (and adjoint solve) runs to its limit
SOLVES = {"converging": {"head_std": 0.01, "dec_options": {}},
          "worst": {"head_std": 0.05, "dec_options": {"tol": 1e-12, "backward_tol": 1e-12}}}

DEC_HEAD_STD = 0.05
# targets (`timm-dec bench overhead --check`): dec / base forward, training step and training memory
FORWARD_MAX_RATIO = {"converging": 1.15, "worst": 1.25}
TRAIN_MAX_RATIO = 1.30
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


def set_dec_options(model: nn.Module, **changes: Any) -> nn.Module:
    """Change run-time DEC options (e.g. ``check_every=None``) of every DEC of ``model`` and of ``model.dec_cfg``.

    ``timm.create_model`` drops keyword arguments whose value is None, so ``dec_check_every=None`` cannot be passed
    through it (it silently keeps the default); this sets such options after the model is built.
    """
    decs = [m for m in model.modules() if isinstance(m, DEC)]
    if not decs:
        raise ValueError(f"{type(model).__name__} has no DEC modules")
    for dec in decs:
        dec.cfg = dataclasses.replace(dec.cfg, **changes)
    cfg = getattr(model, "dec_cfg", None)
    if cfg is not None:
        model.dec_cfg = dataclasses.replace(cfg, options=dataclasses.replace(cfg.options, **changes))
    return model


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


def _adjoint_share(model: nn.Module, step: Callable[[], Any]) -> Optional[float]:
    """Share of a profiled training step's CPU time spent in the implicit backward of the DECs (the adjoint solve);
    None when no DEC of ``model`` has an implicit backward (the default phantom backward has no adjoint solve)."""
    if not any(isinstance(m, DEC) and m.cfg.backward == "implicit" for m in model.modules()):
        return None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    # the autograd engine wraps each node's backward in an "evaluate_function: <Node>" event that includes its work
    adjoint = sum(e.cpu_time_total for e in events if "evaluate_function" in e.key and "_ImplicitGrad" in e.key)
    top_level = [e for e in prof.events() if e.cpu_parent is None]
    total = sum(e.cpu_time_total for e in top_level)
    return adjoint / total if total > 0 else 0.0


def _twins(name: str, img_size: int, seed: int, head_std: float, **dec_kwargs: Any) -> tuple[nn.Module, nn.Module]:
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
    if dec_kwargs:
        set_dec_options(dec, **dec_kwargs)  # create_model would drop a None
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
        "eval_within_tol": 1 - eval_stats.total_not_converged / max(1, eval_stats.total_samples),
        "train_within_tol": 1 - train_stats.total_not_converged / max(1, train_stats.total_samples),
        "eval_max_iterations": max(r.max_iterations for r in eval_stats.records),
        "train_mean_iterations": train_stats.mean_iterations,
        "fallbacks": eval_stats.total_fallbacks + train_stats.total_fallbacks,
        "per_dec": eval_stats.summary(),
    }


def overhead_targets(ratios: dict[str, Optional[float]], solve: str = "converging") -> dict[str, dict[str, Any]]:
    """The targets of one model, each ``{"value": ..., "met": ...}``, named with its bound (those measured); the
    forward's bound depends on the solve (`SOLVES`)."""
    bounds = {"forward": ("forward", FORWARD_MAX_RATIO[solve]), "train_step": ("train_step", TRAIN_MAX_RATIO),
              "memory_total": ("memory", MEMORY_MAX_RATIO)}
    return {f"{label}_<={bound}": {"value": ratios[key], "met": ratios[key] <= bound}
            for key, (label, bound) in bounds.items() if ratios.get(key) is not None}


def entry_key(name: str, mode: str, solve: str = "converging") -> str:
    """Key of a model's entry in ``result["models"]``: the name in eager mode, ``name@mode`` otherwise, with
    ``+worst`` for the worst-case solve."""
    return (name if mode == "eager" else f"{name}@{mode}") + ("" if solve == "converging" else f"+{solve}")


def _cuda_graph_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The eval forward of ``model`` on ``x`` captured in a CUDA graph; returns its replay (the output tensor)."""
    static = x.clone()
    stream = torch.cuda.Stream(device=x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks
                model(static)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def _check_mode(mode: str, device: torch.device) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "cudagraph" and device.type != "cuda":
        raise ValueError(f"mode 'cudagraph' needs a CUDA device, got {device}")


def _time_forward(base: nn.Module, dec: nn.Module, run_base: Callable, run_dec: Callable, x: torch.Tensor,
                  device: torch.device, mode: str, repeats: int, warmup: int) -> tuple[dict[str, Any], tuple]:
    """Eval forwards of base and dec, round-robin; with ``mode="eager"`` also the DEC's share of a forward."""
    base.eval()
    dec.eval()
    with torch.no_grad():
        if mode == "cudagraph":
            fwd_fns = {"base": _cuda_graph_forward(base, x), "dec": _cuda_graph_forward(dec, x)}
        else:
            fwd_fns = {"base": lambda: run_base(x), "dec": lambda: run_dec(x)}
        forward = _summary(paired_times(fwd_fns, device, repeats, warmup))
        split = _dec_seconds(dec, lambda: dec(x), device) if mode == "eager" else (None, None)
    return forward, split


def _time_training(base: nn.Module, dec: nn.Module, steps: dict[str, Callable], device: torch.device, mode: str,
                   repeats: int, warmup: int) -> tuple[Optional[dict], Optional[dict], tuple]:
    """Training steps of base and dec, round-robin, and their peak memory; none for a CUDA-graph run."""
    if mode == "cudagraph":
        return None, None, (None, None, None)
    base.train()
    dec.train()
    train = _summary(paired_times(steps, device, repeats, warmup))
    train_total = train_dec_fwd = adjoint_share = None
    if mode == "eager":
        train_total, train_dec_fwd = _dec_seconds(dec, steps["dec"], device)
        adjoint_share = _adjoint_share(dec, steps["dec"]) if device.type == "cpu" else None
    memory = {"base": peak_training_memory(base, steps["base"], device),
              "dec": peak_training_memory(dec, steps["dec"], device)}
    return train, memory, (train_total, train_dec_fwd, adjoint_share)


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
        mode: str = "eager",
        compile_backend: str = "inductor",
        dec_options: Optional[dict[str, Any]] = None,
        solve: str = "converging",
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
        mode: ``"eager"``, ``"compile"`` or ``"cudagraph"`` (module docstring).
        compile_backend: ``torch.compile`` backend of the compile mode.
        dec_options: DEC options to change from the defaults (`set_dec_options`), e.g. ``{"max_iter": 8}``.
        solve: the `SOLVES` key these heads and options stand for (it picks the forward target).

    Returns:
        JSON-serialisable dict: ``forward`` and ``train_step`` (median ms of base and dec, the median of the per-round
        dec / base ratios, the ratio of the minima, every round), ``memory`` in bytes, ``ratios`` (dec / base: the
        per-round medians for time), ``solver`` iteration statistics, ``split`` (where the DEC model's time goes),
        the ``targets`` (`overhead_targets`) and the DEC options.
    """
    _check_mode(mode, device)
    # a compiled or captured graph reads nothing on the host: the solve runs max_iter iterations either way
    options = {**({} if mode == "eager" else {"check_every": None}), **(dec_options or {})}
    base, dec = _twins(name, img_size, seed, head_std, **options)
    img_size = img_size or base.pretrained_cfg["input_size"][-1]
    base.to(device)
    dec.to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
    target = torch.randint(0, base.num_classes, (batch_size,), generator=gen).to(device)
    solver = _solver_figures(dec, x, _train_step(dec, x, target))  # eager, outside the timed rounds
    if mode == "compile":
        run_base, run_dec = torch.compile(base, backend=compile_backend), torch.compile(dec, backend=compile_backend)
    else:
        run_base, run_dec = base, dec
    steps = {"base": _train_step(run_base, x, target), "dec": _train_step(run_dec, x, target)}

    forward, (fwd_total, fwd_dec) = _time_forward(base, dec, run_base, run_dec, x, device, mode, repeats, warmup)
    train, memory, (train_total, train_dec_fwd, adjoint_share) = _time_training(
        base, dec, steps, device, mode, repeats, warmup)
    ratios = {
        "forward": forward["ratio"], "train_step": train["ratio"] if train else None,
        "memory_total": memory["dec"]["total_bytes"] / memory["base"]["total_bytes"] if memory else None,
        "memory_step": memory["dec"]["step_bytes"] / memory["base"]["step_bytes"] if memory else None,
    }
    return {
        "model": name,
        "mode": mode,
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
        "split": {"forward_dec_share": fwd_dec / fwd_total if fwd_total else None,
                  "train_dec_forward_share": train_dec_fwd / train_total if train_total else None,
                  "train_adjoint_share_profiled": adjoint_share},
        "targets": overhead_targets(ratios, solve),
    }


def format_overhead_table(result: dict[str, Any]) -> str:
    """The overhead result as a text table: base and DEC figures, dec / base ratios, iterations and time split."""
    env = result["environment"]
    lines = [
        f"*_dec overhead on {env['device']} ({env.get('device_name', env['machine'])}, {env['torch_threads']} threads, "
        f"torch {env['torch']}), batch {result['batch_size']}, {result['img_size'] or 'own'} px, "
        f"median of {result['repeats']}, "
        f"DEC heads ~ N(0, std^2) with std {result['dec_head_std']}, "
        f"load average {result['load_average_before'][0]:.1f} -> "
        f"{result['load_average_after'][0]:.1f}",
        f"{'model':<30} {'px':>4} {'fwd ms base/dec':>17} {'x':>6} {'train ms base/dec':>19} {'x':>6} "
        f"{'mem MB base/dec':>17} {'x':>6} {'x step':>7} {'iters e/t':>10} {'tol% e/t':>9} {'DEC% fwd':>9} "
        f"{'adj% trn':>9}",
    ]
    for name, r in result["models"].items():
        f, t, m, q, split = r["forward"], r["train_step"], r["memory"], r["ratios"], r["split"]
        ms = 2 if f["base_ms"] < 10 else 0  # GPU figures are a few ms
        train = (f"{t['base_ms']:>9.{ms}f}/{t['dec_ms']:<9.{ms}f} {q['train_step']:>6.3f}" if t else
                 f"{'-':>19} {'-':>6}")
        mem = (f"{m['base']['total_bytes'] / 2**20:>8.0f}/{m['dec']['total_bytes'] / 2**20:<8.0f} "
               f"{q['memory_total']:>6.3f} {q['memory_step']:>7.3f}" if m else f"{'-':>17} {'-':>6} {'-':>7}")
        pct = [f"{100 * v:>8.1f}%" if v is not None else f"{'-':>9}"
               for v in (split["forward_dec_share"], split["train_adjoint_share_profiled"])]
        lines.append(
            f"{name:<30} {r['img_size']:>4} {f['base_ms']:>8.{ms}f}/{f['dec_ms']:<8.{ms}f} {q['forward']:>6.3f} "
            f"{train} {mem} "
            f"{r['solver']['eval_mean_iterations']:>4.1f}/{r['solver']['train_mean_iterations']:<5.1f} "
            f"{100 * r['solver']['eval_within_tol']:>4.0f}/{100 * r['solver']['train_within_tol']:<4.0f} "
            f"{pct[0]} {pct[1]}")
    lines.append("x = dec / base (time: median of the per-round ratios; memory: parameters + the step's peak; x step: "
                 "the step's peak alone); "
                 "iters: mean solver iterations per DEC call, eval / train; tol%: share of those solves within tol; "
                 "DEC% fwd: share of the eval forward inside "
                 "the DEC modules (eager only); adj% trn: share of a profiled training step in the implicit backward "
                 "('-': phantom backward, no adjoint solve); NAME@compile / NAME@cudagraph: compiled / CUDA-graph "
                 "modes; "
                 "NAME+worst: every solve runs to its iteration limit")
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
        "dec_head_std": {k: v["head_std"] for k, v in SOLVES.items()},
        "load_average_before": list(os.getloadavg()), "models": {},
    }
    modes = list(getattr(args, "modes", None) or ["eager"])
    bad = [m for m in modes if m not in MODES]
    if bad or ("cudagraph" in modes and device.type != "cuda"):
        raise ValueError(f"--modes must be among {MODES} ('cudagraph' on CUDA only), got {modes}")
    solves = list(getattr(args, "solves", None) or ["converging"])
    if any(v not in SOLVES for v in solves):
        raise ValueError(f"--solves must be among {tuple(SOLVES)}, got {solves}")
    result["modes"], result["solves"] = modes, solves
    start = time.perf_counter()
    for name in args.models:
        for mode in modes:
            for solve in solves:
                key = entry_key(name, mode, solve)
                result["models"][key] = bench_model(
                    name, device=device, batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats,
                    warmup=args.warmup, seed=args.seed, mode=mode, head_std=SOLVES[solve]["head_std"],
                    dec_options=SOLVES[solve]["dec_options"], solve=solve,
                    compile_backend=getattr(args, "compile_backend", "inductor"))
                print(f"{key}: done after {time.perf_counter() - start:.0f} s", flush=True)
    result["load_average_after"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - start
    print(format_overhead_table(result))
    return result
