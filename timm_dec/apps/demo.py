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
learning rate; **DEC(Base)** (``dec_base``, run only when ``--methods`` names it) is the same from Base's start,
compared with Base as well as with Aug. Every method ends with the same number of backbone steps; all are evaluated
on the same test images.
**Aug+time** (the method ``aug_time``), the equal-compute control, is Aug from the same start given the DEC's training
cost in Aug steps (measured side by side); without the DEC, Aug's own steps.

The shared start costs more than the rest of the demo on a CPU, so the default preset ships it: the weights in
``timm_dec/demo_start/`` were made by this command (``timm-dec demo --write-start DIR``, seeded; their SHA-256 and
configuration are in ``default_start.json``), the way the paper starts from pretrained weights. ``--from-scratch``
trains it in the run instead, identically.

The sequence (shared start, methods, one training loop, evaluation, paired comparisons, tables) is the experiment
runner's (`timm_dec.apps.experiment`); this module is the task it runs: `DigitsClassification`.

Outputs, in ``--out`` (default ``demo_out/``): ``summary.json`` (the runner's layout: every configuration value, the
shared start, per method its training, its accuracy, InvE, per-scale and per-bin tables, its checkpoint and the
``timm-dec eval`` command that re-evaluates it (``methods.<name>.eval_command``), the paired comparisons with Aug;
in ``task``, the DEC's solver statistics and scale-stretch correlation and the ``create_model`` kwargs; the wall
time); ``tables.txt``; ``per_scale_accuracy.png``; ``prob_correct.png`` (Fig. 8); ``warp_grids.png`` (Fig.
A2); ``checkpoints/<method>.safetensors`` (each loads with ``timm.create_model(name, **model_kwargs)`` +
``load_state_dict(strict=True)``). Presets: ``default`` (CPU, about 8 minutes on 2 idle cores), ``paper`` (the paper's
setting for a GPU: 224 px, 3 digits, pretrained ViT), ``smoke`` (seconds, for tests; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import copy
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.utils import ParseKwargs
from tqdm.auto import tqdm

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
    check_experiment_arguments,
    hub_offline,
    normalize_transform,
    param_groups,
    resolve_device,
    scales_arg,
)
from ._train import Batches, LossFn, train, training_step
from .demo_checks import check_before_work, check_values
from .demo_report import dec_evidence, eval_command, paired_rows, plots, tables
from .evaluate import evaluate_model
from .experiment import DECS, ExperimentTask, Outcome, Run, run_experiment
from .heads import LABEL_RULES, DigitwiseClassifier, num_outputs
from .presets import FINETUNE_LR_RATIO, PRESETS, dec_kwargs, paper_lr

__all__ = ["PRESETS", "METHODS", "LABELS", "add_arguments", "run", "resolve_config", "paper_lr", "load_start",
           "DigitsClassification"]

METHODS = ("base", "aug", "invl", "canon", "dec", "dec_base", "aug_time")
ALWAYS = ("base", "aug")  # the references: they run whatever --methods says
OPTIONAL = ("dec_base",)  # run only when --methods names them
PRESET_HELP = {"default": "ViT, ~15 min on 2 idle cores", "swin": "the default job on a 3-stage Swin v1",
               "deit": "the default job on DeiT (distilled)", "paper": "the paper's setting for a GPU",
               "smoke": "seconds"}
LABELS = {"base": "Base", "aug": "Aug", "invl": "InvL", "canon": "Canon", "dec": "DEC", "dec_base": "DEC(Base)",
          "aug_time": "Aug+time"}
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
                             always=ALWAYS, out="demo_out", optional=OPTIONAL)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
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
    g.add_argument("--dec-backward-tol", type=float, default=None,
                   help="relative residual at which the DEC's adjoint solve stops (DECConfig.backward_tol)")
    g.add_argument("--dec-grad-tol", type=float, default=None,
                   help="the DEC's forward tolerance when it is differentiated (DECConfig.grad_tol; 0: --dec-tol)")
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
    cfg["methods"] = check_experiment_arguments(args, METHODS, ALWAYS, OPTIONAL)
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
# the task: classification of locally scaled digits, run by `run_experiment`


def load_start(cfg: dict[str, Any], preset: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The shipped shared start of ``preset`` (``demo_start/<preset>_start.json``), checked against ``cfg``."""
    return _start.load_start(START_DIR, preset, _start.start_record(cfg, START_KEYS))


class DigitsClassification(ExperimentTask):
    """The demo's task for `run_experiment`: timm classifiers of locally scaled k-digit numbers, scored on the whole
    number; accuracy, InvE, per-scale and per-bin accuracy; Tables 2 and 3 and the DEC's evidence."""
    name = "demo"
    labels = LABELS
    start_keys = START_KEYS
    checkpoint_hint = ("re-evaluate one with its methods.<name>.eval_command in summary.json, e.g. "
                       "methods.dec.eval_command")

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any]) -> None:
        super().__init__(args, cfg)
        self.offline = False  # timm's weights from huggingface_hub's cache, the Hub unreachable
        self.normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    @property
    def start_dir(self) -> Path:
        return START_DIR

    def check(self) -> None:
        self.offline = check_before_work(self.args, self.cfg)

    def prepare(self) -> None:
        """The digits (the training set rendered once), the start's Aug and the input normalisation of the model."""
        cfg = self.cfg
        self.device = resolve_device(self.args.device)
        self.channels = int(cfg["model_kwargs"].get("in_chans", 3))
        data_kw = dict(num_digits=cfg["num_digits"], canvas=cfg["canvas"], scale_range=tuple(cfg["scale_range"]),
                       digit_size=cfg["digit_size"], seed=cfg["seed"])
        # stored with one channel (the digits are grey), expanded per batch
        train_set = LocallyScaledDigits("train", num_samples=cfg["train_samples"], channels=1, **data_kw)
        self.test_set = LocallyScaledDigits("test", num_samples=cfg["test_samples"], channels=self.channels, **data_kw)
        self.augment = RandomMonotoneScale(cfg["aug_strength"], p=cfg["aug_p"],
                                           generator=torch.Generator().manual_seed(cfg["seed"] + 1))
        self.normalize = normalize_transform(resolve_data_config({}, model=self.create(cfg["model"])), self.channels)
        self.test_set.transform = self.normalize
        self.prob_idx = list(range(min(cfg["prob_images"], len(self.test_set))))
        print(f"timm-dec demo (preset {self.args.preset}): {cfg['model']} on locally scaled {cfg['num_digits']}-digit "
              f"numbers ({10 ** cfg['num_digits']} classes, label rule {cfg['label']!r}, {cfg['canvas']} px), "
              f"{len(train_set)} train / {len(self.test_set)} test images, seed {cfg['seed']}, "
              f"{torch.get_num_threads()} CPU threads")
        self.images, self.targets = _render(train_set, not self.progress)

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

    def step(self, model: nn.Module, stage: Stage) -> Callable[[], float]:
        """One step of ``stage``'s training of ``model`` (a classifier of `classifier`) per call (`training_step`):
        AdamW on the stage's parameter groups, warm-up + cosine over ``stage.steps``, the gradient norm clipped at 1,
        on `_batches` of the pre-rendered training images with the stage's `_loss`."""
        cfg = self.cfg
        model.to(self.device)
        inner = model.model if isinstance(model, DigitwiseClassifier) else model  # prefixes name the timm model's keys
        groups = param_groups(inner, stage.lr, cfg["weight_decay"], new_prefixes=stage.new_prefixes,
                              new_lr_mult=stage.new_lr_mult, only_new=stage.only_new)
        batches = _batches(self.images, self.targets, stage, cfg["batch_size"], self.channels, self.device)
        return training_step(model, batches, _loss(stage, self.normalize), groups, steps=stage.steps,
                             warmup_frac=cfg["warmup_frac"], clip_norm=1.0)

    def fit(self, model: nn.Module, stage: Stage) -> dict[str, float]:
        """Train ``model`` in place for ``stage.steps`` steps (`train`): ``steps``, ``seconds``, ``final_loss``."""
        return train(self.step(model, stage), stage.steps, stage.name, self.progress)

    def train_start(self) -> dict[str, dict[str, torch.Tensor]]:
        """The shared start: ``plain_steps`` plain; from there ``aug_steps`` with Aug (the start of Aug, InvL, Canon and
        DEC) and ``aug_steps`` more plain (the start of Base, so that Base has had as many steps)."""
        cfg, seed = self.cfg, self.cfg["seed"]
        model = self.create(cfg["model"])
        self.fit(self.classifier(model), Stage("start: plain", cfg["plain_steps"], cfg["lr"], seed=seed))
        plain = copy.deepcopy(model)
        self.fit(self.classifier(plain), Stage("start: plain +", cfg["aug_steps"], cfg["finetune_lr"], seed=seed + 1))
        self.fit(self.classifier(model), Stage("start: Aug", cfg["aug_steps"], cfg["finetune_lr"], augment=self.augment,
                                               seed=seed + 1))
        return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                for name, m in (("plain", plain), ("aug", model))}

    def build(self, method: str, starts: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
        """Base and DEC(Base) from the plain start, the rest from the Aug start; the DECs the ``<model>_dec`` twin,
        Canon the model inside `InputCanonicalizer`, their new parts' initial weights from the run's seed."""
        cfg, seed = self.cfg, self.cfg["seed"]
        if method in DECS:
            # the DEC's initial weights from the run's seed, not from what the methods before it drew
            torch.manual_seed(seed)
            model = self.create(cfg["model"] + "_dec", **dec_kwargs(cfg))
            start, what = ("aug", "Aug") if method == "dec" else ("plain", "Base")
            load_dec_state_dict(model, starts[start], source=f"the {what} start", target=f"{cfg['model']}_dec")
            return model
        model = self.create(cfg["model"])
        model.load_state_dict(starts["plain" if method == "base" else "aug"])
        if method == "canon":
            torch.manual_seed(seed)
            model = InputCanonicalizer(
                model, num_warps=cfg["canon_warps"], strength=cfg["aug_strength"], in_chans=self.channels,
                energy_size=cfg["canon_energy_size"], energy_widths=tuple(cfg["canon_energy_widths"]), seed=seed,
                identity_margin=cfg["canon_margin"])
        return model

    def _stages(self, method: str, model: nn.Module, steps: int) -> list[Stage]:
        """``method``'s training: ``steps`` steps (the DECs after their DEC-only warm-up, both trained alike)."""
        cfg, seed, lr, mult = self.cfg, self.cfg["seed"], self.cfg["finetune_lr"], self.cfg["dec_lr_mult"]
        if method == "base":
            return [Stage("Base", steps, lr, seed=seed + 3)]
        if method in ("aug", "aug_time"):
            return [Stage(LABELS[method], steps, lr, augment=self.augmenter(), seed=seed + 3)]
        if method == "invl":
            aug_rng = torch.Generator().manual_seed(seed + 2)

            def invl_scale(x: torch.Tensor) -> torch.Tensor:
                knots = random_knots(x.shape[0], self.augment.grid, cfg["aug_strength"], generator=aug_rng).to(x.device)
                return monotone_warp(x, knots, inverse=True, check=False)

            return [Stage("InvL", steps, lr, augment=self.augmenter(), invl=InvarianceLoss(cfg["invl_weight"]),
                          invl_scale=invl_scale, seed=seed + 3)]
        if method == "canon":
            def canon_rank(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the energy learns what the model reads
                return cfg["canon_rank_weight"] * model.energy_loss(x, y, self.classifier(model.model),
                                                                    cfg["canon_candidates"])

            return [Stage("Canon", steps, lr, augment=self.augmenter(), new_prefixes=("energy.",), new_lr_mult=mult,
                          aux_loss=canon_rank if cfg["canon_rank_weight"] > 0 else None, seed=seed + 3)]
        return [Stage("DEC warm-up", cfg["dec_warmup_steps"], lr, augment=self.augmenter(), new_prefixes=("dec.",),
                      new_lr_mult=mult, only_new=True, seed=seed + 4),
                Stage("DEC", steps, lr, augment=self.augmenter(), new_prefixes=("dec.",), new_lr_mult=mult,
                      seed=seed + 3)]

    def runs(self, method: str, model: nn.Module, models: Mapping[str, nn.Module], steps: int) -> list[Run]:
        clf = self.classifier(model)
        return [Run(stage.name, stage.steps, functools.partial(self.step, clf, stage), dec_only=stage.only_new)
                for stage in self._stages(method, model, steps)]

    def calibration_step(self, kind: str, model: nn.Module) -> Callable[[], float]:
        lr, mult = self.cfg["finetune_lr"], self.cfg["dec_lr_mult"]
        dec = dict(new_prefixes=("dec.",), new_lr_mult=mult, only_new=kind == "dec_only")
        stage = Stage(kind, 1, lr, augment=copy.deepcopy(self.augment), **(dec if kind != "aug" else {}))
        return self.step(self.classifier(model), stage)

    def evaluate(self, method: str, model: nn.Module) -> dict[str, Any]:
        """`evaluate_model` on the test set (the same images, scales and bins for every method); with
        ``prob_images``, the probability of the correct class across ``prob_scales`` (Fig. 8) as ``_prob_correct``."""
        cfg, clf = self.cfg, self.classifier(model)
        r = evaluate_model(clf, self.test_set, cfg["scales"], scale_bins=cfg["scale_bins"],
                           batch_size=cfg["eval_batch"], device=self.device, seed=cfg["seed"], progress=self.progress,
                           return_per_sample=True)
        if self.prob_idx:
            r["_prob_correct"] = evaluate_scale_consistency(
                clf, self.test_set, list(cfg["prob_scales"]), indices=self.prob_idx, batch_size=cfg["eval_batch"],
                device=self.device, progress=False, return_per_sample=True)["prob_correct"]
        return r

    def compare(self, results: Mapping[str, dict[str, Any]], method: str, reference: str) -> dict[str, Any]:
        return paired_rows(dict(results), seed=self.cfg["seed"], reference=reference, methods=[method])[method]

    def write_checkpoint(self, method: str, model: nn.Module, path: Path) -> str:
        cfg = self.cfg
        data = dict(num_digits=cfg["num_digits"], canvas=cfg["canvas"], digit_size=cfg["digit_size"],
                    scale_range=list(cfg["scale_range"]), label=cfg["label"])
        return str(save_model(model, path, data=data))  # creates the folder

    def method_record(self, method: str, checkpoint: str) -> dict[str, Any]:
        return {"eval_command": eval_command(self.cfg, method, Path(checkpoint))}

    def analyse(self, outcome: Outcome) -> dict[str, Any]:
        """Whether the DEC learned to canonicalise (`dec_evidence`) and its backward against the true gradient."""
        cfg, dec = self.cfg, outcome.models.get("dec")
        if dec is None:
            return {}
        evidence = dec_evidence(dec, self.test_set, cfg, self.device)
        if cfg["gradient_images"] > 0:
            x = torch.stack([self.test_set[i][0] for i in range(min(cfg["gradient_images"], len(self.test_set)))])
            start = time.perf_counter()
            evidence["gradient_check"] = gradient_check(self.classifier(dec).cpu(), x, seed=cfg["seed"])
            evidence["gradient_check"]["seconds"] = time.perf_counter() - start
            dec.to(self.device)
        return evidence

    def tables(self, outcome: Outcome) -> str:
        return tables(self.cfg, outcome.results, outcome.paired, outcome.analysis, LABELS, outcome.calibration)

    def figures(self, outcome: Outcome) -> list[str]:
        curves = {m: r["_prob_correct"] for m, r in outcome.results.items() if "_prob_correct" in r}
        return plots(self.out, self.cfg, outcome.results, curves, outcome.models.get("dec"), self.test_set,
                     self.normalize, self.device, self.prob_idx, LABELS)

    def summary(self, outcome: Outcome) -> dict[str, Any]:
        """The number of classes, the ``create_model`` kwargs of the checkpoints, the DEC's evidence, the Fig. 8
        curves."""
        cfg = self.cfg
        return {"num_classes": 10 ** cfg["num_digits"],
                "model_kwargs": {"base": dict(cfg["model_kwargs"], num_classes=num_outputs(cfg["label"],
                                                                                           cfg["num_digits"])),
                                 "dec": dec_kwargs(cfg)},
                "dec_evidence": outcome.analysis,
                "prob_correct": {m: r["_prob_correct"].tolist() for m, r in outcome.results.items()
                                 if "_prob_correct" in r}}


def run(args: argparse.Namespace) -> int:
    """Train and evaluate every method; print Tables 2 and 3; write the plots, checkpoints and summary."""
    return run_experiment(DigitsClassification(args, resolve_config(args)))
