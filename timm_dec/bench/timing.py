"""Timing helpers of the benchmarks: round-robin timers, the environment, peak CPU memory and the JSON writer.

Timing: the candidates run round-robin (warm-up rounds, then the timed rounds), so a machine shared with other jobs
slows them alike; CUDA is synchronised around every call.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .._format import json_default

__all__ = ["paired_times", "time_interleaved", "environment", "write_json", "peak_cpu_memory"]


def paired_times(
        fns: dict[str, Callable[[], Any]],
        device: torch.device,
        repeats: int,
        warmup: int,
) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, timed round-robin so that background load hits all alike.

    Keeping every round (not only the median) lets a ratio be taken per round, between calls that ran back to back
    under the same background load, and the median taken over those ratios. The order rotates by one each round, so
    that no function always runs right after the same one: on the CPU, a call right after one that freed a large
    buffer pays for faulting that memory back in (measured: 13-15 ms on the warp benchmark's ViT-S shape, where the
    composed path frees ~80 MB), which a fixed order charged to one candidate every round.

    Args:
        fns: name -> function of no arguments.
        device: synchronised before and after every call when it is a CUDA device.
        repeats: timed rounds.
        warmup: untimed rounds first.

    Returns:
        name -> ``repeats`` seconds, in round order.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def time_interleaved(
        fns: dict[str, Callable[[], Any]],
        device: torch.device,
        repeats: int,
        warmup: int,
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (see `paired_times`).

    Returns:
        name -> median seconds.
    """
    return {name: statistics.median(t) for name, t in paired_times(fns, device, repeats, warmup).items()}


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_cpu_memory(fn: Callable[[], Any]) -> int:
    """Peak, in bytes, of the running sum of the CPU allocations and frees the profiler records while ``fn()`` runs.

    Memory allocated before the call (parameters, buffers) is not included; an operation's own allocations count at
    its start.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def write_json(result: dict[str, Any], path: str) -> None:
    """Write a benchmark result as indented JSON, creating its folder (not the folders above it)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.mkdir(parent)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=json_default)
        f.write("\n")
