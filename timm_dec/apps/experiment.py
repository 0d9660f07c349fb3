"""The one experiment runner of ``timm-dec demo`` and ``timm-dec segment``: preset -> shared start -> methods -> one
training loop -> evaluation -> paired comparisons -> tables -> ``summary.json``. The task (classification of locally
scaled digits, segmentation of digit scenes) is a plug-in, an `ExperimentTask`: it brings its configuration, data,
models, training runs, metrics, tables, checkpoints and figures; `run_experiment` runs the sequence.

The order is part of the result (it fixes the random-number streams): the methods are built in the task's order
after ``torch.manual_seed(task.methods_seed)``, then trained in that order; Aug+time (``aug_time``, last) is built and
trained once the DEC's step cost has been measured on copies of the trained Aug and DEC models. Every method is
compared with Aug on the same test images, the DEC also with Aug+time, and the DECs (from Aug's start, ``dec``, and
from Base's, ``dec_base``) also with Base.

``summary.json`` (one layout for every task): ``command``, ``preset``, ``config`` (every configuration value),
``start`` (where the shared start came from), ``methods`` (per method: ``training`` with ``steps``,
``dec_only_steps``, ``backbone_steps``, ``seconds``, ``final_loss``; ``results``, the task's metrics; ``eval_seconds``;
``checkpoint``; and the task's own entries, e.g. the demo's ``eval_command``), ``paired`` (``<method>`` against Aug,
``dec_vs_aug_time``, ``dec_vs_base``, ``dec_base_vs_base``), ``equal_time_calibration`` (null without a DEC and
Aug+time), ``tables`` (as printed), ``files`` (written beside it, checkpoints aside), ``task`` (the task's extras),
``wall_seconds`` and ``machine``.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .._format import json_default
from ._common import calibrate_equal_time, calibration_line, set_threads
from ._start import shared_start
from ._train import train

__all__ = ["REFERENCE", "CONTROL", "BASE", "DECS", "Run", "Outcome", "ExperimentTask", "run_experiment",
           "experiment_summary"]

REFERENCE = "aug"  # every method is compared with Aug on the same test images
CONTROL = "aug_time"  # the equal-compute control: Aug given the DEC's training cost in Aug steps
BASE = "base"  # the plain model: what a DEC added to it should keep
DECS = ("dec", "dec_base")  # the DEC from Aug's start (the paper's) and from Base's


@dataclass
class Run:
    """One training run of a method, as `train` runs it.

    Args:
        name: its progress bar's name.
        steps: its length.
        make_step: builds its step function (`training_step`) when the run starts.
        dec_only: the DEC's warm-up (the DEC alone trains): counted apart from the backbone's steps.
    """
    name: str
    steps: int
    make_step: Callable[[], Callable[[], float]]
    dec_only: bool = False


@dataclass
class Outcome:
    """What a run has produced so far; the task's reports (`ExperimentTask.tables`, ...) read it."""
    start: dict[str, Any]
    models: dict[str, nn.Module] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: Optional[dict[str, Any]] = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_seconds: dict[str, float] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


class ExperimentTask:
    """What a task brings to `run_experiment`. A subclass sets the class attributes and implements the methods that
    raise `NotImplementedError`; the others have defaults.

    Attributes:
        name: the command (``timm-dec <name>``), also the shared start's name.
        labels: method -> its name in tables and progress bars.
        start_keys: the configuration values that determine the shared start.
        checkpoint_hint: what reads a checkpoint, said in the last line.
        args, cfg: the command's arguments and the resolved configuration (``seed``, ``methods``, ``start``,
            ``plain_steps``, ``aug_steps``, ``finetune_steps``, ``dec_warmup_steps``).
        out: the output folder; progress: progress bars on; device: where the models train.
    """
    name: str = ""
    labels: Mapping[str, str] = {}
    start_keys: Sequence[str] = ()
    checkpoint_hint: str = ""

    def __init__(self, args: Namespace, cfg: dict[str, Any]) -> None:
        self.args, self.cfg = args, cfg
        self.out = Path(args.out)
        self.progress = not getattr(args, "no_progress", False)
        self.device = torch.device("cpu")

    @property
    def start_dir(self) -> Path:
        """The folder of the shipped shared starts."""
        raise NotImplementedError

    @property
    def methods_seed(self) -> int:
        """The seed of what the methods add to the start (the DEC's H, Canon's energy): set before they are built."""
        return self.cfg["seed"]

    def check(self) -> None:
        """Every check that needs more than the configuration, before any work (output folders, models)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """The data (and whatever the steps share); says what the run is."""
        raise NotImplementedError

    def train_start(self) -> dict[str, dict[str, torch.Tensor]]:
        """The shared start, trained: ``{"plain": state dict, "aug": state dict}``."""
        raise NotImplementedError

    def build(self, method: str, starts: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
        """``method``'s model at the start of its training, from the shared start."""
        raise NotImplementedError

    def runs(self, method: str, model: nn.Module, models: Mapping[str, nn.Module], steps: int) -> list[Run]:
        """``method``'s training runs of ``model`` (its last of ``steps`` steps), in order; ``models`` are the methods
        built so far."""
        raise NotImplementedError

    def calibration_step(self, kind: str, model: nn.Module) -> Callable[[], float]:
        """One training step of ``kind`` (``"aug"``, ``"dec_only"``, ``"dec"``) on ``model``, a copy of the trained Aug
        or DEC model, as `runs` trains it: what the equal-compute calibration times."""
        raise NotImplementedError

    def evaluate(self, method: str, model: nn.Module) -> dict[str, Any]:
        """``method``'s metrics on the test set; entries whose key starts with ``_`` (and tensors) stay out of
        ``summary.json`` (per-sample values for the paired comparisons and figures)."""
        raise NotImplementedError

    def compare(self, results: Mapping[str, dict[str, Any]], method: str, reference: str) -> dict[str, Any]:
        """``method`` against ``reference`` on the same test images (paired-bootstrap intervals)."""
        raise NotImplementedError

    def write_checkpoint(self, method: str, model: nn.Module, path: Path) -> str:
        """Write ``model`` to ``path``; the path written."""
        raise NotImplementedError

    def method_record(self, method: str, checkpoint: str) -> dict[str, Any]:
        """The task's own entries of ``methods.<method>`` in ``summary.json``."""
        return {}

    def analyse(self, outcome: Outcome) -> dict[str, Any]:
        """What the task measures beyond each method's metrics (the demo's DEC evidence), before the tables."""
        return {}

    def tables(self, outcome: Outcome) -> str:
        """The tables, as printed and written to ``tables.txt``."""
        raise NotImplementedError

    def figures(self, outcome: Outcome) -> list[str]:
        """Draw the task's figures in `out`; their file names."""
        return []

    def summary(self, outcome: Outcome) -> dict[str, Any]:
        """The task's section of ``summary.json``."""
        return {}


def _train_method(task: ExperimentTask, method: str, model: nn.Module, models: Mapping[str, nn.Module],
                  steps: int) -> dict[str, Any]:
    """Run ``method``'s training runs with the one loop (`train`), leave the model in eval mode; what it took."""
    cfg, done = task.cfg, []
    for run in task.runs(method, model, models, steps):
        done.append((run, train(run.make_step(), run.steps, run.name, task.progress)))
    model.eval()
    joint = sum(result["steps"] for run, result in done if not run.dec_only)
    record = dict(steps=joint, dec_only_steps=sum(result["steps"] for run, result in done if run.dec_only),
                  backbone_steps=cfg["plain_steps"] + cfg["aug_steps"] + joint,
                  seconds=sum(result["seconds"] for _, result in done), final_loss=done[-1][1]["final_loss"])
    print(f"  {task.labels[method]:<9} {joint:>4} steps  {record['seconds']:6.1f} s  loss {record['final_loss']:.3f}")
    return record


def _calibrate(task: ExperimentTask, models: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Aug+time's step count (`calibrate_equal_time`), timed on copies of the trained Aug and DEC models; the trained
    DEC's solves are the training's most expensive, so this errs toward more Aug+time steps."""
    steps = {kind: task.calibration_step(kind, copy.deepcopy(models[REFERENCE if kind == "aug" else "dec"]))
             for kind in ("aug", "dec_only", "dec")}
    return calibrate_equal_time(steps, task.cfg["dec_warmup_steps"], task.cfg["finetune_steps"])


def _train_methods(task: ExperimentTask, starts: Mapping[str, Mapping[str, torch.Tensor]], outcome: Outcome) -> None:
    """Build every method from the start, train them in order, then Aug+time: given the DEC's training cost in Aug
    steps (measured side by side), so that a gain of the DEC is not only a gain of compute; without a DEC, Aug's own
    ``finetune_steps``."""
    cfg, models = task.cfg, outcome.models
    torch.manual_seed(task.methods_seed)
    for method in cfg["methods"]:
        if method != CONTROL:
            models[method] = task.build(method, starts)
    for method, model in list(models.items()):
        outcome.training[method] = _train_method(task, method, model, models, cfg["finetune_steps"])
    if CONTROL not in cfg["methods"]:
        return
    steps = cfg["finetune_steps"]
    if "dec" in models:
        outcome.calibration = _calibrate(task, models)
        print("  " + calibration_line(outcome.calibration))
        steps = outcome.calibration["steps"]
    models[CONTROL] = task.build(CONTROL, starts)
    outcome.training[CONTROL] = _train_method(task, CONTROL, models[CONTROL], models, steps)


def _evaluate(task: ExperimentTask, outcome: Outcome) -> None:
    """Every method on the same test images; each checkpoint written beside its result."""
    for method, model in outcome.models.items():
        start = time.perf_counter()
        outcome.results[method] = task.evaluate(method, model)
        outcome.eval_seconds[method] = time.perf_counter() - start
        outcome.checkpoints[method] = task.write_checkpoint(method, model,
                                                            task.out / "checkpoints" / f"{method}.safetensors")


def _paired(task: ExperimentTask, results: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every method against Aug (keyed by the method), the DEC against Aug+time (``dec_vs_aug_time``) and each DEC
    against Base (``dec_vs_base``, ``dec_base_vs_base``)."""
    pairs = [(m, REFERENCE) for m in results if m != REFERENCE] if REFERENCE in results else []
    if "dec" in results and CONTROL in results:
        pairs.append(("dec", CONTROL))
    if BASE in results:
        pairs += [(m, BASE) for m in DECS if m in results]
    return {m if ref == REFERENCE else f"{m}_vs_{ref}": task.compare(results, m, ref) for m, ref in pairs}


def _public(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result as ``summary.json`` keeps it: without per-sample tensors and ``_private`` entries."""
    return {k: v for k, v in result.items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}


def experiment_summary(task: ExperimentTask, outcome: Outcome, text: str, wall: float) -> dict[str, Any]:
    """The content of ``summary.json`` (the module docstring lists its keys)."""
    methods = {m: dict(training=outcome.training[m], results=_public(outcome.results[m]),
                       eval_seconds=outcome.eval_seconds[m], checkpoint=outcome.checkpoints[m],
                       **task.method_record(m, outcome.checkpoints[m])) for m in outcome.models}
    return {
        "command": task.name, "preset": task.args.preset, "config": task.cfg, "start": outcome.start,
        "methods": methods, "paired": outcome.paired, "equal_time_calibration": outcome.calibration, "tables": text,
        "files": outcome.files, "task": task.summary(outcome), "wall_seconds": wall,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(task.device),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }


def run_experiment(task: ExperimentTask) -> int:
    """Check, make or load the shared start, train and evaluate every method, compare them with Aug, print the tables
    and write ``summary.json``, ``tables.txt``, the figures and ``checkpoints/<method>.safetensors`` in ``task.out``
    (only the shared start, to ``--write-start DIR``, when that is given). Returns the exit status."""
    args = task.args
    task.check()
    if args.preset == "smoke":
        print(f"timm-dec {task.name}: the smoke preset only checks that the pipeline runs; its numbers mean nothing")
    wall_start = time.perf_counter()
    set_threads(args)
    task.prepare()
    start = shared_start(task.name, args.preset, task.cfg, task.start_keys, task.start_dir, args.write_start,
                         task.train_start)
    if start is None:
        return 0
    starts, start_info = start
    print("  start: " + (f"the shipped one, made by {start_info['made_with']}" if "made_with" in start_info
                         else start_info["source"]))
    outcome = Outcome(start=start_info)
    _train_methods(task, starts, outcome)
    _evaluate(task, outcome)
    outcome.analysis = task.analyse(outcome)
    outcome.paired = _paired(task, outcome.results)
    text = task.tables(outcome)
    print("\n" + text)
    (task.out / "tables.txt").write_text(text + "\n", encoding="utf-8")
    outcome.files = ["tables.txt"] + task.figures(outcome)
    wall = time.perf_counter() - wall_start
    summary = experiment_summary(task, outcome, text, wall)
    (task.out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n",
                                           encoding="utf-8")
    print(f"\nwall time {wall / 60:.1f} min; wrote {task.out}/: {', '.join(['summary.json'] + outcome.files)}, "
          f"checkpoints/ ({task.checkpoint_hint})")
    return 0
