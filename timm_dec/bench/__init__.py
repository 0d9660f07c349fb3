"""``timm-dec bench warp|overhead|gpu``: benchmarks that time their candidates side by side, in one run.

``warp`` (`timm_dec.bench.warp`) times the monotone warp against the composed path of the paper's released code and
``x.clone()``; ``overhead`` (`timm_dec.bench.overhead`) times base timm models against their ``*_dec`` twins; ``gpu``
(`timm_dec.bench.gpu`) is the one-shot GPU check: the Triton kernel against the reference on CUDA, ``warp`` and
``overhead`` (eager, compiled, CUDA graph) in one JSON within a time budget (``--dry-run``: a smoke run anywhere). Each
returns a JSON-serialisable result, which `run` prints as a table and writes; with ``--check`` it also prints each
target with its verdict and exits with status 1 when one is missed. The timers live in `timm_dec.bench.timing`.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .._argcheck import OUTPUT_FOLDER_RULE, check_output_file, check_output_folder
from .gpu import GPU_MODELS, bench_gpu, gpu_targets
from .overhead import MODES, OVERHEAD_MODELS, SOLVES, bench_overhead
from .timing import environment, paired_times, peak_cpu_memory, time_interleaved, write_json
from .warp import WARP_SHAPES, bench_warp, composed_warp, format_warp_table

__all__ = [
    "add_arguments", "run", "format_targets", "bench_warp", "bench_overhead", "composed_warp", "format_warp_table",
    "paired_times", "time_interleaved", "environment", "peak_cpu_memory", "write_json", "BENCHMARKS", "WARP_SHAPES",
    "OVERHEAD_MODELS", "GPU_MODELS", "bench_gpu", "MODES",
]

BENCHMARKS = ("warp", "overhead", "gpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``timm-dec bench``: the benchmark to run, then shared, warp and overhead options."""
    parser.add_argument("which", choices=BENCHMARKS, help="'warp': the warp op; 'overhead': base vs *_dec models; "
                        "'gpu': the one-shot GPU check (kernel vs reference, warp, overhead in 3 modes)")
    parser.add_argument("--device", default="cpu", help="device to time on: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds; every figure is their median")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    parser.add_argument("--out", default=".", help="directory of the JSON result (default: the current directory; "
                                                   f"{OUTPUT_FOLDER_RULE})")
    parser.add_argument("--json", default=None,
                        help="path of the JSON result, in an existing folder (default: OUT/bench_WHICH.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads); 1 on a CPU shared with other jobs")
    parser.add_argument("--check", action="store_true",
                        help="print each target with its verdict; exit status 1 when one is missed")
    warp = parser.add_argument_group("warp")
    warp.add_argument("--shapes", nargs="+", choices=tuple(WARP_SHAPES), default=list(WARP_SHAPES),
                      help="shapes to time (default: all)")
    warp.add_argument("--grid", type=int, default=4, help="DEC grid size G")
    warp.add_argument("--batch", type=int, default=None, help="override the batch size of every warp shape")
    overhead = parser.add_argument_group("overhead")
    overhead.add_argument("--models", nargs="+", default=None,
                          help=f"timm base model names (overhead: {' '.join(OVERHEAD_MODELS)}; gpu: "
                               f"{' '.join(GPU_MODELS)})")
    overhead.add_argument("--modes", nargs="+", choices=MODES, default=None,
                          help="overhead: eager (default), compile (torch.compile of both models), cudagraph (CUDA: "
                               "the eval forward captured in a CUDA graph); gpu: all three")
    overhead.add_argument("--solves", nargs="+", choices=tuple(SOLVES), default=None,
                          help="converging (default tolerance, default) and/or worst (every solve to its iteration "
                               "limit)")
    overhead.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile mode")
    gpu = parser.add_argument_group("gpu")
    gpu.add_argument("--dry-run", action="store_true",
                     help="run every code path on tiny inputs, on any --device (CUDA-only parts: 'not measured')")
    gpu.add_argument("--budget-s", type=float, default=None,
                     help="seconds after which the remaining sections are 'not measured' (default 450)")
    overhead.add_argument("--batch-size", type=int, default=8, help="batch size of the overhead benchmark")
    overhead.add_argument("--img-size", type=int, default=224,
                          help="input resolution of the overhead benchmark; 0: each model's own")


def _check_args(args: argparse.Namespace) -> str:
    """The options every benchmark reads, checked before it starts; the path its JSON will be written to."""
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    for flag in ("batch", "grid", "batch_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    budget = getattr(args, "budget_s", None)
    if budget is not None and not budget > 0:
        raise ValueError(f"--budget-s must be > 0, got {budget}")
    if args.json:
        check_output_file(args.json, "--json", f"bench_{args.which}.json")
        return args.json
    check_output_folder(args.out, "--out")
    return os.path.join(args.out, f"bench_{args.which}.json")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.which``, print its table and write its JSON; returns the exit status."""
    path = _check_args(args)
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if args.which == "warp":
        shapes = {name: dict(WARP_SHAPES[name]) for name in args.shapes}
        if args.batch is not None:
            for shape in shapes.values():
                shape["batch"] = args.batch
        result = bench_warp(shapes, device=args.device, grid=args.grid, repeats=args.repeats, warmup=args.warmup,
                            seed=args.seed)
        print(format_warp_table(result))
    elif args.which == "overhead":
        if args.models is None:
            args.models = list(OVERHEAD_MODELS)
        result = bench_overhead(args)
    elif args.which == "gpu":
        result = bench_gpu(args)
    else:
        raise ValueError(f"unknown benchmark {args.which!r}, expected one of {BENCHMARKS}")
    write_json(result, path)
    print(f"wrote {path}")
    if not getattr(args, "check", False):
        return 0
    text, met = format_targets(result)
    print(text)
    return 0 if met else 1


def format_targets(result: dict[str, Any]) -> tuple[str, bool]:
    """One line per target of a warp or overhead result (``target NAME TARGET: VALUE met|missed``), and whether
    every target is met."""
    if result.get("benchmark") == "gpu":
        entries = gpu_targets(result)
    else:
        entries = result.get("shapes") or result.get("models") or {}
    lines, met = [], True
    for name, entry in entries.items():
        for target, check in entry["targets"].items():
            lines.append(f"target {name} {target}: {check['value']:.3f} {'met' if check['met'] else 'missed'}")
            met = met and check["met"]
    return "\n".join(lines), met
