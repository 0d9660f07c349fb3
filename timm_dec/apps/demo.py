"""``timm-dec demo``: the paper's locally scaled digits comparison (Sec. 5.2, Tables 2 and 3, Fig. 8, Fig. A2).

The task: images of k-digit numbers whose digits are each resized by their own scale (local scale variation, Fig. 6).
The default preset uses 2 digits on a 48 px canvas, per-digit scales in [0.5, 2.0], and the ``digits`` label rule:
the model has 10 outputs per digit position and is scored on the whole number (`timm_dec.heads`), so accuracy means
"both digits right" and InvE compares distributions over the 100 numbers.

The order of training is the paper's: a shared start (a plain stage, then an Aug stage from it: "Aug also serves as
the starting weights for DEC and the other baselines"), then every method gets ``finetune_steps`` more steps from it:
**Base** continues the plain model without augmentation; **Aug** keeps training with `RandomMonotoneScale`; **InvL**
is Aug plus the eq. 25 loss; **Canon** is Aug with the model inside `InputCanonicalizer` (an identity prior; the
energy also learns, by ``energy_loss``, which warps the classifier reads best); **DEC** is Aug with the
``<model>_dec`` twin (the Aug weights, DEC at identity), which first trains its DEC alone for ``dec_warmup_steps``
(backbone frozen, as the authors do) and then trains everything with the DEC at ``dec_lr_mult`` times the backbone's
learning rate. Every method ends with the same number of backbone steps; all are evaluated on the same test images.
**Aug+time** (the method ``aug_time``), the equal-compute control, is Aug from the same start given the DEC's training
cost in Aug steps (measured side by side); without the DEC, Aug's own steps.

The shared start costs more than the rest of the demo on a CPU, so the default preset ships it: the weights in
``timm_dec/demo_start/`` were made by this command (``timm-dec demo --write-start DIR``, seeded; their SHA-256 and
configuration are in ``default_start.json``), the way the paper starts from pretrained weights. ``--from-scratch``
trains it in the run instead, identically.

Outputs, in ``--out`` (default ``demo_out/``): ``summary.json`` (every configuration value, the shared start, per
method the accuracy, InvE, per-scale and per-bin tables, the checkpoint and the ``timm-dec eval`` command that
re-evaluates it, the paired comparisons with Aug, the DEC's solver statistics and scale-stretch correlation, the
wall time); ``tables.txt``; ``per_scale_accuracy.png``; ``prob_correct.png`` (Fig. 8); ``warp_grids.png`` (Fig.
A2); ``checkpoints/<method>.safetensors`` (each loads with ``timm.create_model(name, **model_kwargs)`` +
``load_state_dict(strict=True)``). Presets: ``default`` (CPU, about 8 minutes on 2 idle cores), ``paper`` (the paper's
setting for a GPU: 224 px, 3 digits, pretrained ViT), ``smoke`` (seconds, for tests; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.utils import ParseKwargs
from tqdm.auto import tqdm

from .._argcheck import OUTPUT_FOLDER_RULE
from .._format import json_default
from ..baselines import InputCanonicalizer, InvarianceLoss
from ..bench.equilibrium import gradient_check
from ..checkpoint import save_model
from ..data import LocallyScaledDigits, RandomMonotoneScale
from ..dec import BACKWARD_MODES, UPDATE_FORMS
from ..metrics import evaluate_scale_consistency
from ..models import INPUT, load_dec_state_dict
from ..ops import monotone_warp, random_knots
from . import _start
from ._common import (
    add_experiment_arguments,
    bins_arg,
    calibrate_equal_time,
    calibration_line,
    check_experiment_arguments,
    hub_offline,
    normalize_transform,
    param_groups,
    resolve_device,
    scales_arg,
    set_threads,
)
from ._train import Batches, LossFn, train, training_step
from .demo_checks import check_before_work, check_values
from .demo_report import dec_evidence, eval_command, paired_rows, plots, tables
from .evaluate import evaluate_model
from .heads import LABEL_RULES, DigitwiseClassifier, num_outputs
from .presets import FINETUNE_LR_RATIO, PRESETS, dec_kwargs, paper_lr

__all__ = ["PRESETS", "METHODS", "LABELS", "add_arguments", "run", "resolve_config", "paper_lr"]

METHODS = ("base", "aug", "invl", "canon", "dec", "aug_time")
ALWAYS = ("base", "aug")  # the references: they run whatever --methods says
PRESET_HELP = {"default": "~8 min on 2 idle cores", "paper": "the paper's setting for a GPU", "smoke": "seconds"}
LABELS = {"base": "Base", "aug": "Aug", "invl": "InvL", "canon": "Canon", "dec": "DEC", "aug_time": "Aug+time"}
START_DIR = _start.PACKAGE_DIR / "demo_start"
# the configuration values that determine the shared start (a shipped start must have been made with these)
START_KEYS = ("model", "pretrained", "model_kwargs", "num_digits", "label", "canvas", "digit_size", "scale_range",
              "train_samples", "plain_steps", "aug_steps", "batch_size", "lr", "finetune_lr", "weight_decay",
              "warmup_frac", "aug_strength", "aug_p", "seed")

# ---------------------------------------------------------------------------------------------------------------------
# configuration


def _floats(text: str) -> tuple[float, ...]:
    return tuple(scales_arg(text))


def _bins(text: str) -> tuple[tuple[float, float], ...]:
    return tuple(bins_arg(text))


def _positions(text: str) -> tuple[Union[str, int], ...]:
    """``input,0,1`` -> ("input", 0, 1): DEC positions, the input image and block indices."""
    try:
        return tuple(v.strip() if v.strip() == INPUT else int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices and/or {INPUT!r}, got {text!r}"
                                         ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``timm-dec demo`` options; those left out come from ``--preset``."""
    add_experiment_arguments(parser, presets={name: PRESET_HELP[name] for name in PRESETS}, methods=METHODS,
                             always=ALWAYS, out="demo_out")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--from-scratch", action="store_const", const="scratch", dest="start", default=None,
                        help="train the shared start (plain, then Aug) in this run instead of loading the shipped one")
    parser.add_argument("--write-start", default=None, metavar="DIR",
                        help="only train the shared start and write it to DIR (how the shipped start was made; "
                             f"{OUTPUT_FOLDER_RULE})")
    g = parser.add_argument_group("model and data (default from the preset)")
    g.add_argument("--model", default=None, help="timm base model name; DEC uses <model>_dec")
    g.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs, metavar="KEY=VALUE",
                   help="create_model kwargs replacing the preset's (img_size=64 patch_size=8 ...); DEC options are "
                        "the --dec-* flags")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from timm's pretrained weights (needs the Hub or its cache)")
    g.add_argument("--num-digits", type=int, default=None)
    g.add_argument("--label", choices=LABEL_RULES, default=None,
                   help="number: 10**k classes; digits: 10 outputs per digit, scored on the whole number")
    for name in ("canvas", "digit-size", "train-samples", "test-samples"):
        g.add_argument(f"--{name}", type=int, default=None)
    g.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    g = parser.add_argument_group("training (the same backbone steps for every method)")
    for name, text in (("plain-steps", "shared start: plain steps"), ("aug-steps", "shared start: Aug steps"),
                       ("finetune-steps", "steps of every method from the shared start"),
                       ("dec-warmup-steps", "DEC-only steps before the DEC's joint steps"),
                       ("batch-size", None), ("canon-warps", None), ("canon-energy-size", None),
                       ("canon-candidates", "Canon: warps per image the classifier scores for the energy's ranking"),
                       ("dec-grid", None), ("dec-max-iter", None), ("dec-history", "Anderson memory of the solve")):
        g.add_argument(f"--{name}", type=int, default=None, help=text)
    for name, text in (("lr", "plain-stage peak learning rate (paper preset: A1's per model)"),
                       ("finetune-lr", "peak learning rate of the Aug stage and every method"),
                       ("dec-lr-mult", "the DEC's (and Canon's energy net's) learning rate over the backbone's"),
                       ("weight-decay", None), ("warmup-frac", "linear warm-up, as a fraction of each stage"),
                       ("aug-strength", "RandomMonotoneScale strength for Aug, InvL, Canon's bank and DEC"),
                       ("aug-p", "RandomMonotoneScale probability"), ("invl-weight", "weight of the eq. 25 loss"),
                       ("canon-margin", "Canon: energy every non-identity warp pays (identity prior)"),
                       ("canon-rank-weight", "Canon: weight of the energy's ranking loss (0: straight-through only)")):
        g.add_argument(f"--{name}", type=float, default=None, help=text)
    g.add_argument("--canon-energy-widths", type=int, nargs=2, default=None, metavar=("C1", "C2"))
    g.add_argument("--dec-blocks", type=_positions, default=None,
                   help="comma-separated DEC positions: input (the image) and/or block indices, e.g. input,0,1")
    g.add_argument("--dec-mode", choices=("equivariant", "invariant"), default=None)
    g.add_argument("--dec-tol", type=float, default=None, help="the DEC solve's relative residual tolerance")
    g.add_argument("--dec-beta", type=float, default=None, help="damping of the DEC's solver (DECConfig.beta)")
    g.add_argument("--dec-jac-reg", type=float, default=None,
                   help="weight of the DEC's Jacobian regulariser in training (DECConfig.jac_reg; 0: off)")
    g.add_argument("--dec-jac-reg-fraction", type=float, default=None,
                   help="share of each batch the Jacobian regulariser reads (DECConfig.jac_reg_fraction, in (0, 1])")
    g.add_argument("--dec-image-widths", type=int, nargs=2, default=None, metavar=("C1", "C2"),
                   help="channels of the image H (the input DEC's)")
    g.add_argument("--dec-image-size", type=int, default=None,
                   help="the image H reads the image resized to at most this side (0: full resolution)")
    g.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=None,
                   help="deprecated: use --methods (--equal-time adds aug_time, --no-equal-time leaves it out)")
    g.add_argument("--dec-update", choices=UPDATE_FORMS, default=None, help="the DEC's update form (DECConfig)")
    g.add_argument("--dec-backward", choices=BACKWARD_MODES, default=None, help="the DEC's backward (DECConfig)")
    g.add_argument("--dec-widths", type=int, nargs=2, default=None, metavar=("C1", "C2"))
    g = parser.add_argument_group("evaluation")
    g.add_argument("--scales", type=_floats, default=None, help="per-digit scales of the per-scale curve and InvE")
    g.add_argument("--scale-bins", type=_bins, default=None, help="Table 3 bins, e.g. 0.5-1.0,1.0-2.0")
    g.add_argument("--prob-scales", type=_floats, default=None, help="scales of the Fig. 8 curves")
    for name, text in (("prob-images", "test images in the Fig. 8 plot"), ("grid-images", "in the Fig. A2 plot"),
                       ("gradient-images", "test images of the DEC's float64 gradient check (0: none)"),
                       ("stretch-images", "test images for the scale-stretch correlation"), ("eval-batch", None)):
        g.add_argument(f"--{name}", type=int, default=None, help=text)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset, overridden by every option given explicitly; checked."""
    cfg = copy.deepcopy(PRESETS[args.preset])
    for key in list(cfg) + ["start"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = dict(value) if key == "model_kwargs" else value
    if cfg["lr"] is None:
        cfg["lr"] = paper_lr(cfg["model"])
    if cfg["finetune_lr"] is None:
        cfg["finetune_lr"] = cfg["lr"] * FINETUNE_LR_RATIO
    cfg["methods"] = check_experiment_arguments(args, METHODS, ALWAYS)
    equal_time = getattr(args, "equal_time", None)  # deprecated: --equal-time adds aug_time, --no-equal-time drops it
    if equal_time is not None:  # (aug_time is the last method)
        cfg["methods"] = tuple(m for m in cfg["methods"] if m != "aug_time") + (("aug_time",) if equal_time else ())
    check_values(cfg)
    cfg["seed"] = 0 if args.seed is None else args.seed
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# training


def _progress(iterable: Any, desc: str, disable: bool, **kwargs: Any) -> Any:
    return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True, **kwargs)


def _render(dataset: Any, disable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a LocallyScaledDigits (no transform): (N, C, H, W) in [0, 1] and (N,) labels."""
    images, labels = [], []
    for i in _progress(range(len(dataset)), "render train set", disable):
        image, label = dataset[i]
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@dataclass
class Stage:
    """One training run: its length, learning rate and what it trains with."""
    name: str
    steps: int
    lr: float
    augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    invl: Optional[nn.Module] = None
    invl_scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    aux_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None  # (normalised x, y) -> ()
    new_prefixes: Sequence[str] = ()
    new_lr_mult: float = 1.0
    only_new: bool = False
    seed: int = 0


def _batches(images: torch.Tensor, labels: torch.Tensor, stage: Stage, batch_size: int, channels: int,
             device: torch.device) -> Batches:
    """The demo's batch source: ``batch_size`` pre-rendered images at a time, in a permutation per epoch drawn from a
    generator seeded with ``stage.seed`` (an epoch's last incomplete batch left out), warped by ``stage.augment`` if
    the stage has one, expanded to ``channels`` and moved to ``device``; the images stay in [0, 1] (not normalised).

    Args:
        images: (N, C, H, W) training images in [0, 1].
        labels: (N,) class indices.
    """
    order = torch.Generator().manual_seed(stage.seed)
    per_epoch = max(1, len(images) // batch_size)
    state = dict(step=0, perm=torch.empty(0, dtype=torch.long))

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        k = state["step"] % per_epoch
        if k == 0:
            state["perm"] = torch.randperm(len(images), generator=order)
        idx = state["perm"][k * batch_size:(k + 1) * batch_size]
        state["step"] += 1
        x, y = images[idx], labels[idx].to(device)
        if stage.augment is not None:
            x = stage.augment(x)
        return x.expand(-1, channels, -1, -1).to(device), y

    return next_batch


def _loss(stage: Stage, normalize: Callable[[torch.Tensor], torch.Tensor]) -> LossFn:
    """The demo's loss of (classifier, images in [0, 1], labels): cross-entropy on the normalised images, plus the
    stage's InvL (eq. 25, against the logits of a random warp ``stage.invl_scale`` of the images) and its auxiliary
    loss (Canon's energy ranking) if it has them."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(normalize(x))
        loss = F.cross_entropy(logits, y)
        if stage.invl is not None and stage.invl_scale is not None:
            loss = loss + stage.invl(logits, model(normalize(stage.invl_scale(x))))
        if stage.aux_loss is not None:
            loss = loss + stage.aux_loss(normalize(x), y)
        return loss

    return loss_fn


# ---------------------------------------------------------------------------------------------------------------------
# the shared start and the methods


@dataclass
class _Setup:
    """What the steps of `run` share."""
    cfg: dict[str, Any]
    device: torch.device
    progress: bool
    out: Path
    test_set: LocallyScaledDigits
    channels: int
    normalize: Callable[[torch.Tensor], torch.Tensor]
    augment: RandomMonotoneScale
    offline: bool = False  # timm's weights from huggingface_hub's cache, the Hub unreachable

    def create(self, name: str, **extra: Any) -> nn.Module:
        """The timm classifier (seeded; timm's pretrained weights for a base model if asked for)."""
        torch.manual_seed(self.cfg["seed"])
        pretrained = self.cfg["pretrained"] and not name.endswith("_dec")
        with hub_offline(self.offline and pretrained):
            return timm.create_model(name, pretrained=pretrained, **self.cfg["model_kwargs"], **extra,
                                     num_classes=num_outputs(self.cfg["label"], self.cfg["num_digits"]))

    def augmenter(self) -> RandomMonotoneScale:
        """A fresh Aug augmentation with its own generator: every method's steps see the same warps, whichever other
        methods run (the shared start's ``augment`` is drawn from once, before them)."""
        cfg = self.cfg
        return RandomMonotoneScale(cfg["aug_strength"], p=cfg["aug_p"],
                                   generator=torch.Generator().manual_seed(cfg["seed"] + 5))

    def classifier(self, model: nn.Module) -> nn.Module:
        """``model`` scored on the whole number (`DigitwiseClassifier` for the ``digits`` label rule)."""
        return DigitwiseClassifier(model, self.cfg["num_digits"]) if self.cfg["label"] == "digits" else model

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, stage: Stage) -> Callable[[], float]:
        """One step of ``stage``'s training of ``model`` (a classifier of `classifier`) per call (`training_step`):
        AdamW on the stage's parameter groups, warm-up + cosine over ``stage.steps``, the gradient norm clipped at 1,
        on `_batches` of the pre-rendered ``images`` with the stage's `_loss`."""
        cfg = self.cfg
        model.to(self.device)
        inner = model.model if isinstance(model, DigitwiseClassifier) else model  # prefixes name the timm model's keys
        groups = param_groups(inner, stage.lr, cfg["weight_decay"], new_prefixes=stage.new_prefixes,
                              new_lr_mult=stage.new_lr_mult, only_new=stage.only_new)
        batches = _batches(images, labels, stage, cfg["batch_size"], self.channels, self.device)
        return training_step(model, batches, _loss(stage, self.normalize), groups, steps=stage.steps,
                             warmup_frac=cfg["warmup_frac"], clip_norm=1.0)

    def fit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, stage: Stage) -> dict[str, float]:
        """Train ``model`` in place for ``stage.steps`` steps (`train`): ``steps``, ``seconds``, ``final_loss``."""
        return train(self.step(model, images, labels, stage), stage.steps, stage.name, self.progress)


def _train_start(s: _Setup, images: torch.Tensor, labels: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The shared start: ``plain_steps`` plain; from there ``aug_steps`` with Aug (the start of Aug, InvL, Canon and
    DEC) and ``aug_steps`` more plain (the start of Base, so that Base has had as many steps)."""
    cfg, seed = s.cfg, s.cfg["seed"]
    model = s.create(cfg["model"])
    s.fit(s.classifier(model), images, labels, Stage("start: plain", cfg["plain_steps"], cfg["lr"], seed=seed))
    plain = copy.deepcopy(model)
    s.fit(s.classifier(plain), images, labels, Stage("start: plain +", cfg["aug_steps"], cfg["finetune_lr"],
                                                     seed=seed + 1))
    s.fit(s.classifier(model), images, labels, Stage("start: Aug", cfg["aug_steps"], cfg["finetune_lr"],
                                                     augment=s.augment, seed=seed + 1))
    return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for name, m in (("plain", plain), ("aug", model))}


def load_start(cfg: dict[str, Any], preset: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The shipped shared start of ``preset`` (``demo_start/<preset>_start.json``), checked against ``cfg``."""
    return _start.load_start(START_DIR, preset, _start.start_record(cfg, START_KEYS))


def _methods(s: _Setup, starts: dict[str, dict[str, torch.Tensor]]) -> dict[str, nn.Module]:
    """Every method's model at the start of its steps: Base from the plain start, the rest from the Aug start."""
    cfg, seed = s.cfg, s.cfg["seed"]
    models: dict[str, nn.Module] = {}
    for method in (m for m in cfg["methods"] if m != "aug_time"):  # Aug+time trains once the DEC's cost is known
        if method == "dec":
            # the DEC's initial weights from the run's seed, not from what the methods before it drew
            torch.manual_seed(seed)
            model = s.create(cfg["model"] + "_dec", **dec_kwargs(cfg))
            load_dec_state_dict(model, starts["aug"], source="the Aug start", target=f"{cfg['model']}_dec")
        else:
            model = s.create(cfg["model"])
            model.load_state_dict(starts["plain" if method == "base" else "aug"])
        if method == "canon":
            torch.manual_seed(seed)
            model = InputCanonicalizer(
                model, num_warps=cfg["canon_warps"], strength=cfg["aug_strength"], in_chans=s.channels,
                energy_size=cfg["canon_energy_size"], energy_widths=tuple(cfg["canon_energy_widths"]), seed=seed,
                identity_margin=cfg["canon_margin"])
        models[method] = model
    return models


def _train_methods(s: _Setup, models: dict[str, nn.Module], images: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """``finetune_steps`` for every method (the DEC after its DEC-only warm-up); their timings and step counts."""
    cfg, seed = s.cfg, s.cfg["seed"]
    aug_rng = torch.Generator().manual_seed(seed + 2)

    def invl_scale(x: torch.Tensor) -> torch.Tensor:
        knots = random_knots(x.shape[0], s.augment.grid, cfg["aug_strength"], generator=aug_rng).to(x.device)
        return monotone_warp(x, knots, inverse=True, check=False)

    n, lr, mult = cfg["finetune_steps"], cfg["finetune_lr"], cfg["dec_lr_mult"]

    def canon_rank(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # Canon's energy learns what the model reads
        canon = models["canon"]
        return cfg["canon_rank_weight"] * canon.energy_loss(x, y, s.classifier(canon.model), cfg["canon_candidates"])

    stages = {
        "base": [Stage("Base", n, lr, seed=seed + 3)],
        "aug": [Stage("Aug", n, lr, augment=s.augmenter(), seed=seed + 3)],
        "invl": [Stage("InvL", n, lr, augment=s.augmenter(), invl=InvarianceLoss(cfg["invl_weight"]),
                       invl_scale=invl_scale, seed=seed + 3)],
        "canon": [Stage("Canon", n, lr, augment=s.augmenter(), new_prefixes=("energy.",), new_lr_mult=mult,
                        aux_loss=canon_rank if cfg["canon_rank_weight"] > 0 else None, seed=seed + 3)],
        "dec": [Stage("DEC warm-up", cfg["dec_warmup_steps"], lr, augment=s.augmenter(), new_prefixes=("dec.",),
                      new_lr_mult=mult, only_new=True, seed=seed + 4),
                Stage("DEC", n, lr, augment=s.augmenter(), new_prefixes=("dec.",), new_lr_mult=mult, seed=seed + 3)],
    }
    timings = {}
    for method, model in models.items():
        clf = s.classifier(model)
        runs = [s.fit(clf, images, labels, stage) for stage in stages[method]]
        timings[method] = dict(seconds=sum(r["seconds"] for r in runs),
                               backbone_steps=cfg["plain_steps"] + cfg["aug_steps"] + n,
                               dec_only_steps=cfg["dec_warmup_steps"] if method == "dec" else 0)
    return timings


def _calibration_stages(s: _Setup) -> dict[str, Stage]:
    """The kinds of training step the equal-compute control compares, as `_train_methods` runs them."""
    lr, mult = s.cfg["finetune_lr"], s.cfg["dec_lr_mult"]
    return {"aug": Stage("Aug", 1, lr, augment=copy.deepcopy(s.augment)),
            "dec_only": Stage("DEC warm-up", 1, lr, augment=copy.deepcopy(s.augment), new_prefixes=("dec.",),
                              new_lr_mult=mult, only_new=True),
            "dec": Stage("DEC", 1, lr, augment=copy.deepcopy(s.augment), new_prefixes=("dec.",), new_lr_mult=mult)}


def _calibrate_equal_time(s: _Setup, models: dict[str, nn.Module], images: torch.Tensor,
                          labels: torch.Tensor) -> dict[str, Any]:
    """Aug+time's step count (`calibrate_equal_time`), timed on copies of the trained Aug and DEC models; the trained
    DEC's solves are the training's most expensive, so this errs toward more Aug+time steps."""
    cfg = s.cfg
    steps = {kind: s.step(s.classifier(copy.deepcopy(models["aug" if kind == "aug" else "dec"])), images, labels,
                          stage) for kind, stage in _calibration_stages(s).items()}
    return calibrate_equal_time(steps, cfg["dec_warmup_steps"], cfg["finetune_steps"])


def _equal_time_control(s: _Setup, starts: dict[str, dict[str, torch.Tensor]], calibration: Optional[dict[str, Any]],
                        images: torch.Tensor, labels: torch.Tensor) -> tuple[nn.Module, dict[str, float]]:
    """Aug+time: Aug from the same start trained for ``calibration["steps"]`` steps (one schedule over all of them),
    the cost of the DEC's training in Aug steps, so that a gain of the DEC is not only a gain of compute; without a
    calibration (no DEC to match), Aug's own ``finetune_steps``."""
    cfg = s.cfg
    steps = cfg["finetune_steps"] if calibration is None else calibration["steps"]
    model = s.create(cfg["model"])
    model.load_state_dict(starts["aug"])
    stage = Stage("Aug+time", steps, cfg["finetune_lr"], augment=s.augmenter(), seed=cfg["seed"] + 3)
    run = s.fit(s.classifier(model), images, labels, stage)
    timing = dict(seconds=run["seconds"], backbone_steps=cfg["plain_steps"] + cfg["aug_steps"] + steps,
                  dec_only_steps=0)
    if calibration is not None:
        timing.update(calibration_noisy=calibration["noisy"], calibration_uncertainty=calibration["uncertainty"])
    return model, timing


def _evaluate(s: _Setup, models: dict[str, nn.Module], timings: dict[str, dict[str, float]],
              prob_idx: list[int]) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The same test images, scales and bins for every method; each checkpoint saved beside its result."""
    cfg = s.cfg
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, torch.Tensor] = {}
    data = dict(num_digits=cfg["num_digits"], canvas=cfg["canvas"], digit_size=cfg["digit_size"],
                scale_range=list(cfg["scale_range"]), label=cfg["label"])
    for method, model in models.items():
        clf = s.classifier(model)
        start = time.perf_counter()
        r = evaluate_model(clf, s.test_set, cfg["scales"], scale_bins=cfg["scale_bins"], batch_size=cfg["eval_batch"],
                           device=s.device, seed=cfg["seed"], progress=s.progress, return_per_sample=True)
        if prob_idx:
            curves[method] = evaluate_scale_consistency(
                clf, s.test_set, list(cfg["prob_scales"]), indices=prob_idx, batch_size=cfg["eval_batch"],
                device=s.device, progress=False, return_per_sample=True)["prob_correct"]
        ckpt = save_model(model, s.out / "checkpoints" / f"{method}.safetensors", data=data)  # creates the folder
        r.update(checkpoint=str(ckpt), eval_command=eval_command(cfg, method, ckpt), **timings[method],
                 eval_seconds=time.perf_counter() - start)
        results[method] = r
    return results, curves


def _summary(args: argparse.Namespace, s: _Setup, results: dict[str, dict[str, Any]], extra: dict[str, Any],
             wall: float) -> dict[str, Any]:
    """The content of ``summary.json``."""
    return {
        "preset": args.preset,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.cfg.items()},
        "num_classes": 10 ** s.cfg["num_digits"],
        "model_kwargs": {"base": dict(s.cfg["model_kwargs"], num_classes=num_outputs(s.cfg["label"],
                                                                                     s.cfg["num_digits"])),
                         "dec": dec_kwargs(s.cfg)},
        "methods": {m: {k: v for k, v in r.items() if not isinstance(v, torch.Tensor)} for m, r in results.items()},
        **extra,
        "wall_seconds": wall,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(s.device),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }


def _setup(args: argparse.Namespace, cfg: dict[str, Any],
           offline: bool = False) -> tuple[_Setup, LocallyScaledDigits]:
    set_threads(args)
    device = resolve_device(args.device)
    channels = int(cfg["model_kwargs"].get("in_chans", 3))
    data_kw = dict(num_digits=cfg["num_digits"], canvas=cfg["canvas"], scale_range=tuple(cfg["scale_range"]),
                   digit_size=cfg["digit_size"], seed=cfg["seed"])
    # stored with one channel (the digits are grey), expanded per batch
    train_set = LocallyScaledDigits("train", num_samples=cfg["train_samples"], channels=1, **data_kw)
    test_set = LocallyScaledDigits("test", num_samples=cfg["test_samples"], channels=channels, **data_kw)
    augment = RandomMonotoneScale(cfg["aug_strength"], p=cfg["aug_p"],
                                  generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    s = _Setup(cfg, device, not args.no_progress, Path(args.out), test_set, channels, lambda x: x, augment, offline)
    s.normalize = normalize_transform(resolve_data_config({}, model=s.create(cfg["model"])), channels)
    test_set.transform = s.normalize
    return s, train_set


def run(args: argparse.Namespace) -> int:
    """Train and evaluate every method; print Tables 2 and 3; write the plots, checkpoints and summary."""
    cfg = resolve_config(args)
    offline = check_before_work(args, cfg)
    if args.preset == "smoke":
        print("timm-dec demo: the smoke preset only checks that the pipeline runs; its numbers mean nothing")
    wall_start = time.perf_counter()
    s, train_set = _setup(args, cfg, offline)
    print(f"timm-dec demo (preset {args.preset}): {cfg['model']} on locally scaled {cfg['num_digits']}-digit numbers "
          f"({10 ** cfg['num_digits']} classes, label rule {cfg['label']!r}, {cfg['canvas']} px), {len(train_set)} "
          f"train / {len(s.test_set)} test images, seed {cfg['seed']}, {torch.get_num_threads()} CPU threads")
    images, labels = _render(train_set, not s.progress)
    start = _start.shared_start("demo", args.preset, cfg, START_KEYS, START_DIR, args.write_start,
                                lambda: _train_start(s, images, labels))
    if start is None:
        return 0
    starts, start_info = start
    models = _methods(s, starts)
    timings = _train_methods(s, models, images, labels)
    calibration: Optional[dict[str, Any]] = None
    if "aug_time" in cfg["methods"]:
        if "dec" in models:
            calibration = _calibrate_equal_time(s, models, images, labels)
            print(calibration_line(calibration))
        models["aug_time"], timings["aug_time"] = _equal_time_control(s, starts, calibration, images, labels)
    prob_idx = list(range(min(cfg["prob_images"], len(s.test_set))))
    results, curves = _evaluate(s, models, timings, prob_idx)
    evidence = dec_evidence(models["dec"], s.test_set, cfg, s.device) if "dec" in models else {}
    if "dec" in models and cfg["gradient_images"] > 0:
        x = torch.stack([s.test_set[i][0] for i in range(min(cfg["gradient_images"], len(s.test_set)))])
        start = time.perf_counter()
        evidence["gradient_check"] = gradient_check(s.classifier(models["dec"]).cpu(), x, seed=cfg["seed"])
        evidence["gradient_check"]["seconds"] = time.perf_counter() - start
        models["dec"].to(s.device)
    paired = paired_rows(results, seed=cfg["seed"])
    if "aug_time" in results and "dec" in results:
        paired["dec_vs_aug_time"] = paired_rows(results, seed=cfg["seed"], reference="aug_time", methods=["dec"])["dec"]
    text = tables(cfg, results, paired, evidence, LABELS)
    print("\n" + text)
    files = plots(s.out, cfg, results, curves, models.get("dec"), s.test_set, s.normalize, s.device, prob_idx, LABELS)
    wall = time.perf_counter() - wall_start
    summary = _summary(args, s, results, dict(start=start_info, paired_vs_aug=paired, dec_evidence=evidence,
                                              equal_time_calibration=calibration,
                                              tables=text, plots=files, prob_correct={m: c.tolist() for m, c in
                                                                                      curves.items()}), wall)
    (s.out / "tables.txt").write_text(text + "\n", encoding="utf-8")
    (s.out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n", encoding="utf-8")
    print(f"\nwall time {wall / 60:.1f} min; wrote {s.out}/summary.json, tables.txt, {', '.join(files)} and "
          f"checkpoints/ (re-evaluate one with its methods.<name>.eval_command in summary.json, e.g. "
          f"methods.dec.eval_command)")
    return 0
