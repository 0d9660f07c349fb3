"""`timm_dec.bench.timing.paired_times`: every function timed once per round, rounds kept in order, and an order that
rotates so that no function always runs right after the same one (on the CPU a call after one that freed a large
buffer pays for faulting it back in; a fixed order charged that to one candidate every round)."""
from __future__ import annotations

import torch

from timm_dec.bench.timing import paired_times


def test_each_round_runs_every_function_once_in_a_rotating_order():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = paired_times(fns, torch.device("cpu"), repeats=6, warmup=1)
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6, "c": 6}
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 7 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    # each function follows each other one in some round, and each runs first in some round
    follows = {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert {r[0] for r in rounds} == {"a", "b", "c"}
    assert {("c", "a"), ("a", "b"), ("b", "c")} <= follows  # with a fixed order "a" never follows "c"
