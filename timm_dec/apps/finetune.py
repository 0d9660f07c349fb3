"""Distributed fine-tuning of ``*_dec`` (or base) timm models with accelerate.

Run it on one process (``python -m timm_dec.finetune ...``) or many (``accelerate launch -m timm_dec.finetune
...``: multi-GPU, multi-node, or several CPU processes over gloo with ``accelerate launch --multi_gpu
--num_processes 2 -m timm_dec.finetune --cpu``; accelerate's own ``--cpu`` launch option starts one process unless
run under mpirun). The data is the locally scaled digits
(`timm_dec.data.LocallyScaledDigits`, offline, the default) or an image folder (``folder:PATH`` with ``train/`` and
``val/`` class folders, read by timm's ``create_dataset``).

The recipe follows the paper's Table A1 (ImageNet fine-tuning): AdamW with layer-wise learning-rate decay 0.75
(timm's ``create_optimizer_v2(..., layer_decay=...)``; each DEC decays with its block), cosine schedule with 5
warm-up epochs (timm's scheduler, stepped per update), weight decay 0.05, label smoothing 0.1, 20 epochs. The
paper's mixup (0.8) and random erasing (0.25) are left to the user (timm's ``train.py`` has them); ``--lr`` defaults
to the paper's 1e-4 for ViT / DeiT / BEiT on locally scaled MNIST (Swin: 8e-4).

Semantics a user can rely on:

* ``--batch-size`` is per process; the global batch is ``batch_size x processes x grad_accum``. With the same global
  batch and seed, one process and several processes see the same samples in each update and end with the same
  weights (up to float rounding of the gradient all-reduce): the sampler is accelerate's seedable sampler and the
  last incomplete global batch of an epoch is dropped.
* Every ``--checkpoint-every`` updates, ``OUTPUT/checkpoint-<step>/`` gets accelerate's ``save_state`` (weights as
  ``model.safetensors``, optimizer, RNG), the model's record as ``config.json`` (`timm_dec.checkpoint.save_model`:
  the architecture, its create_model kwargs with the DEC options, the data settings), so the folder is a saved model
  (``timm-dec eval`` / ``push --checkpoint``, ``timm.create_model("local-dir:...")``), and ``state.json`` (the
  resume state: step, schedule, the run's signature). ``--resume`` continues the same trajectory: the weights after N
  updates equal those of an uninterrupted run (exactly for deterministic data such as the digits; timm's random
  ``--aug`` transforms draw differently after a resume).
* At the end: accuracy, InvE and per-scale accuracy on the test split (`timm_dec.metrics`, sharded over processes),
  ``OUTPUT/final/`` (a `timm_dec.hub.save_pretrained` folder with the model card; the same saved folder without a
  card for a base model), ``OUTPUT/summary.json`` (metrics, and a SHA-256 of every rank's weights, which must
  agree) and, with ``--push-to-hub ORG/NAME``, the push.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from timm.data import create_transform
from timm.models import push_to_hf_hub
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ParseKwargs
from torch.utils.data import DataLoader, Dataset

from .._format import format_scale, plain
from ..checkpoint import TRAINING_STATE_NAME, save_model
from ..data import ImageFolderSplit, ImageFolderVariants, LocallyScaledDigits
from ..dec import loss_scale
from ..hub import push_to_hub, save_pretrained
from ..metrics import evaluate_scale_consistency
from ..models import dec_options
from ._common import normalize_transform

__all__ = ["TABLE_A1", "build_parser", "add_arguments", "main", "run", "weights_digest"]

# Paper Table A1 (ImageNet fine-tuning), the defaults below.
TABLE_A1 = {
    "scheduler": "cosine", "weight_decay": 0.05, "warmup_epochs": 5, "mixup_alpha": 0.8, "label_smoothing": 0.1,
    "random_erase_prob": 0.25, "layer_decay": 0.75, "epochs": 20,
}
DEFAULT_EVAL_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``timm_dec.finetune``."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_tiny_dec", help="any *_dec or base timm model name")
    model.add_argument("--pretrained", action="store_true", help="start from the base model's timm weights")
    model.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="create_model kwargs as timm's train.py parses them (Python literals), e.g. dec_grid=4 "
                            "dec_blocks=0,1 drop_path_rate=0.1")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="digits",
                      help="'digits' (offline, default) or 'folder:PATH' (PATH/train/<class>/*, PATH/val/<class>/*)")
    data.add_argument("--train-samples", type=int, default=6000, help="digits: training images")
    data.add_argument("--test-samples", type=int, default=2000, help="digits: test images")
    data.add_argument("--num-digits", type=int, default=3, help="digits: digits per image (10**k classes)")
    data.add_argument("--scale-range", type=float, nargs=2, default=(0.4, 2.0), help="digits: per-digit scales")
    data.add_argument("--digit-size", type=int, default=None, help="digits: pixels of a digit at scale 1 "
                                                                    "(default: a canvas eighth, 28 px at 224)")
    data.add_argument("--data-seed", type=int, default=0, help="digits: dataset seed")
    data.add_argument("--img-size", type=int, default=None, help="input size; default the model's")
    data.add_argument("--aug", action="store_true", help="folder: timm's random training transform")
    data.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    opt = parser.add_argument_group("optimisation (defaults: paper Table A1)")
    opt.add_argument("--epochs", type=int, default=TABLE_A1["epochs"])
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many updates (smoke runs)")
    opt.add_argument("--batch-size", type=int, default=32, help="per process")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update")
    opt.add_argument("--opt", default="adamw", help="timm optimizer name")
    opt.add_argument("--lr", type=float, default=1e-4)
    opt.add_argument("--min-lr", type=float, default=0.0)
    opt.add_argument("--warmup-lr", type=float, default=1e-6)
    opt.add_argument("--warmup-epochs", type=float, default=TABLE_A1["warmup_epochs"])
    opt.add_argument("--weight-decay", type=float, default=TABLE_A1["weight_decay"])
    opt.add_argument("--layer-decay", type=float, default=TABLE_A1["layer_decay"], help="0 or 1 to disable")
    opt.add_argument("--smoothing", type=float, default=TABLE_A1["label_smoothing"])
    opt.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    opt.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    opt.add_argument("--seed", type=int, default=42)
    run_ = parser.add_argument_group("run")
    run_.add_argument("--cpu", action="store_true",
                      help="run on CPU; several CPU processes (gloo) need it, e.g. accelerate launch --multi_gpu "
                           "--num_processes 2 -m timm_dec.finetune --cpu")
    run_.add_argument("--output", default=None, help="output folder; default runs/finetune-<model>")
    run_.add_argument("--checkpoint-every", type=int, default=0, help="updates between checkpoints; 0: each epoch")
    run_.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    run_.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' in --output")
    run_.add_argument("--log-every", type=int, default=10, help="updates between log lines")
    run_.add_argument("--eval-scales", type=float, nargs="+", default=list(DEFAULT_EVAL_SCALES),
                      help="scales of the InvE / per-scale evaluation")
    run_.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N test images")
    run_.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    run_.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="push the final model")
    run_.add_argument("--hub-private", action="store_true")
    run_.add_argument("--hub-token", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelerate launch -m timm_dec.finetune", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    positive = ("epochs", "batch_size", "grad_accum", "train_samples", "test_samples", "num_digits", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("lr", "warmup_epochs", "weight_decay", "smoothing", "checkpoint_every", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in [0, 1], got {args.layer_decay}")
    if not (args.data == "digits" or args.data.startswith("folder:")):
        raise ValueError(f"--data must be 'digits' or 'folder:PATH', got {args.data!r}")
    if args.push_to_hub and "/" not in args.push_to_hub:
        raise ValueError(f"--push-to-hub must be ORG/NAME, got {args.push_to_hub!r}")


# ---------------------------------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------------------------------

def _create_model(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the create_model kwargs that rebuild it (the DEC options included)."""
    kwargs = dict(args.model_kwargs)
    if "num_classes" in kwargs and kwargs["num_classes"] != num_classes:
        raise ValueError(f"num_classes={kwargs['num_classes']} in --model-kwargs, but the data has {num_classes}")
    kwargs["num_classes"] = num_classes
    if args.img_size is not None:
        kwargs.setdefault("img_size", args.img_size)
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    return model, {**kwargs, **dec_options(model)}


_EVAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation")


def _folder_root(args: argparse.Namespace) -> str:
    root = args.data[len("folder:"):]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data folder {root!r} does not exist")
    if not os.path.isdir(os.path.join(root, "train")) or not any(
            os.path.isdir(os.path.join(root, s)) for s in _EVAL_SPLITS):
        raise FileNotFoundError(f"--data folder {root!r} needs a train/ and a val/ sub-folder of class folders")
    return root


def _num_classes(args: argparse.Namespace) -> int:
    if args.data == "digits":
        return 10 ** args.num_digits
    return len(ImageFolderSplit(_folder_root(args), "train", None).class_names)


def _datasets(args: argparse.Namespace, model_cfg: dict[str, Any]) -> tuple[Dataset, Dataset, int, Optional[list]]:
    """(train, test, num_classes, label names) for ``--data``; ``model_cfg`` is timm's data config of the model."""
    from torchvision import transforms as T  # torchvision is not a dependency of the package, only of this path

    size = args.img_size or int(model_cfg["input_size"][-1])
    normalize = T.Normalize(model_cfg["mean"], model_cfg["std"])
    if args.data == "digits":
        common = dict(num_digits=args.num_digits, canvas=size, scale_range=tuple(args.scale_range),
                      digit_size=args.digit_size,
                      seed=args.data_seed, channels=int(model_cfg["input_size"][0]), transform=normalize)
        train = LocallyScaledDigits("train", num_samples=args.train_samples, **common)
        test = LocallyScaledDigits("test", num_samples=args.test_samples, **common)
        return train, test, train.num_classes, None
    root = _folder_root(args)
    chans = int(model_cfg["input_size"][0])
    data_cfg = dict(model_cfg, input_size=(chans, size, size))
    train = ImageFolderSplit(root, "train", create_transform(**data_cfg, is_training=args.aug, re_prob=0.0))
    # the held-out split as `timm-dec eval` reads it: resized images with local-scale variants (rescale_object
    # with masks/ + backgrounds/, else random monotone scalings), so InvE means the same in both
    val = next(os.path.join(root, s) for s in _EVAL_SPLITS if os.path.isdir(os.path.join(root, s)))
    test = ImageFolderVariants(val, (size, size), chans, normalize_transform(model_cfg, chans), seed=args.data_seed)
    if test.classes != train.class_names:
        raise ValueError(f"{root}: the classes of {val} differ from those of train/")
    return train, test, len(train.class_names), train.class_names


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes), for comparing replicas."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _run_signature(args: argparse.Namespace, model_kwargs: dict[str, Any], world: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "model": args.model, "model_kwargs": plain(model_kwargs), "data": args.data, "seed": args.seed,
        "global_batch": args.batch_size * world * args.grad_accum, "epochs": args.epochs, "lr": args.lr,
    }


def _find_resume(path: str, output: Path) -> Path:
    if path == "latest":
        found = sorted(output.glob("checkpoint-*"), key=lambda p: p.name)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {output}")
        return found[-1]
    folder = Path(path)
    if not (folder / TRAINING_STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume {folder}: not a checkpoint folder (no {TRAINING_STATE_NAME})")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class _Training:
    """What the steps of `run` share: the prepared model, optimiser, loader and schedule, and the progress."""
    args: argparse.Namespace
    accelerator: Any
    output: Path
    model: nn.Module
    model_kwargs: dict[str, Any]
    optimizer: Any
    train_loader: Any
    scheduler: Any
    updates_per_epoch: int
    total_updates: int
    signature: dict[str, Any]
    data: Optional[dict[str, Any]] = None  # the data settings the saved models record
    step: int = 0

    def log(self, text: str) -> None:
        self.accelerator.print(text)


def _prepare(args: argparse.Namespace, accelerator: Any, model: nn.Module, model_kwargs: dict[str, Any],
             train_ds: Dataset) -> _Training:
    """Optimiser (layer decay), loader and per-update cosine schedule, all prepared by accelerate."""
    world = accelerator.num_processes
    layer_decay = args.layer_decay if 0 < args.layer_decay < 1 else None
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, layer_decay=layer_decay)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    batches = len(train_loader)
    if batches == 0:
        raise ValueError(f"{len(train_ds)} training images make no full global batch of "
                         f"{args.batch_size * world} images")
    updates_per_epoch = math.ceil(batches / args.grad_accum)
    total_updates = updates_per_epoch * args.epochs
    if args.max_steps is not None:
        total_updates = min(total_updates, args.max_steps)
    scheduler, _ = create_scheduler_v2(
        optimizer.optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    output = Path(args.output or f"runs/finetune-{args.model.replace('/', '_').replace(':', '_')}")
    return _Training(args, accelerator, output, model, model_kwargs, optimizer, train_loader, scheduler,
                     updates_per_epoch, total_updates, _run_signature(args, model_kwargs, world))


def _resume(t: _Training) -> None:
    """Continue from ``--resume`` (a checkpoint of the same run), else start the schedule at update 0."""
    if t.args.resume:
        folder = _find_resume(t.args.resume, t.output)
        state = json.loads((folder / TRAINING_STATE_NAME).read_text())
        differs = {k: (state["signature"].get(k), v) for k, v in t.signature.items()
                   if state["signature"].get(k) != v}
        if differs:
            raise ValueError(f"--resume {folder} was written by another run; (checkpoint, now) differ in {differs}")
        t.accelerator.load_state(str(folder))
        t.step = int(state["step"])
        t.scheduler.load_state_dict(state["scheduler"])
        t.log(f"resumed from {folder} at update {t.step}")
    t.scheduler.step_update(num_updates=t.step)


def _save_checkpoint(t: _Training) -> None:
    """``OUTPUT/checkpoint-<step>/``: accelerate's state (its ``model.safetensors`` made a saved model by the record
    `save_model` adds as ``config.json``) and the resume state ``state.json``; the oldest beyond
    ``--keep-checkpoints`` are removed."""
    args, accelerator = t.args, t.accelerator
    folder = t.output / f"checkpoint-{t.step:06d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(t.model), folder, weights=False, data=t.data)
        state = {"step": t.step, "epoch": t.step / t.updates_per_epoch, "signature": t.signature,
                 "scheduler": plain(t.scheduler.state_dict()), "world_size": accelerator.num_processes}
        (folder / TRAINING_STATE_NAME).write_text(json.dumps(state, indent=2))
        if args.keep_checkpoints:
            for old in sorted(t.output.glob("checkpoint-*"))[:-args.keep_checkpoints]:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
    accelerator.wait_for_everyone()
    t.log(f"saved {folder}")


def _train(t: _Training, criterion: Callable[..., torch.Tensor], start: float) -> None:
    """The updates from ``t.step`` to ``t.total_updates``, an epoch per pass, logging and checkpointing."""
    args, accelerator, model, optimizer = t.args, t.accelerator, t.model, t.optimizer
    running, seen = 0.0, 0
    model.train()
    while t.step < t.total_updates:
        epoch, done_in_epoch = divmod(t.step, t.updates_per_epoch)
        t.train_loader.set_epoch(epoch)
        loader = t.train_loader
        if done_in_epoch:
            loader = accelerator.skip_first_batches(t.train_loader, done_in_epoch * args.grad_accum)
        for images, labels in loader:
            # accelerate divides each micro-batch's loss by grad_accum (and scales it for float16): the DEC's Jacobian
            # regulariser, added in the backward, is scaled alike
            scale = (accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0) / args.grad_accum
            with accelerator.accumulate(model), loss_scale(scale):
                loss = criterion(model(images), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running, seen = running + loss.item(), seen + 1
            if not accelerator.sync_gradients:
                continue
            t.step += 1
            t.scheduler.step_update(num_updates=t.step)
            if t.step % args.log_every == 0 or t.step == t.total_updates:
                lr = max(g["lr"] for g in optimizer.param_groups)
                t.log(f"update {t.step}/{t.total_updates} epoch {t.step / t.updates_per_epoch:.2f} "
                      f"loss {running / max(seen, 1):.4f} lr {lr:.3g} "
                      f"{time.time() - start:.1f}s")
                running, seen = 0.0, 0
            at_epoch_end = t.step % t.updates_per_epoch == 0
            if (args.checkpoint_every and t.step % args.checkpoint_every == 0) or (
                    not args.checkpoint_every and at_epoch_end) or t.step == t.total_updates:
                _save_checkpoint(t)
            if t.step >= t.total_updates or at_epoch_end:
                break


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as ``args`` say; returns the summary (also written to ``OUTPUT/summary.json``)."""
    _check_args(args)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    world, main = accelerator.num_processes, accelerator.is_main_process
    log = accelerator.print
    set_seed(args.seed)

    model, model_kwargs = _create_model(args, _num_classes(args))
    model_cfg = timm.data.resolve_input_data_config(model)
    train_ds, test_ds, _, label_names = _datasets(args, model_cfg)
    is_dec = bool(dec_options(model))
    t = _prepare(args, accelerator, model, model_kwargs, train_ds)
    t.data = _data_settings(args, model_cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    _resume(t)

    log(f"{args.model}: {sum(p.numel() for p in t.model.parameters()) / 1e6:.2f}M params, {world} process(es), "
        f"global batch {args.batch_size * world * args.grad_accum}, {t.updates_per_epoch} updates/epoch, "
        f"{t.total_updates} updates")
    start = time.time()
    _train(t, criterion, start)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(t.model)
    unwrapped.eval()
    digests = gather_object([weights_digest(unwrapped)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' weights differ after training: {digests}")
    metrics = None if args.no_eval else _evaluate(args, unwrapped, test_ds, accelerator)
    summary = {"step": t.step, "model": args.model, "model_kwargs": plain(model_kwargs), "world_size": world,
               "rank_weight_sha256": digests, "metrics": metrics, "seconds": round(time.time() - start, 2)}
    if main:
        _save_final(args, unwrapped, t.output / "final", metrics, label_names, model_cfg, is_dec)
        (t.output / "summary.json").write_text(json.dumps(summary, indent=2))
        if metrics:
            log(f"accuracy {100 * metrics['acc']:.2f}% on {metrics['num_samples']} images, InvE "
                f"{100 * metrics['inv_e']:.3f}e-2, per-scale accuracy "
                + " ".join(f"{format_scale(s)}:{100 * a:.1f}"
                           for s, a in zip(metrics["scales"], metrics["per_scale_acc"])))
        if args.push_to_hub:
            _push(args, unwrapped, metrics, label_names, is_dec)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _evaluate(args: argparse.Namespace, model: nn.Module, test_ds: Dataset, accelerator: Any) -> dict[str, Any]:
    """Accuracy, InvE and per-scale accuracy on the test split, each process taking a shard of the images."""
    count = min(len(test_ds), args.eval_samples or len(test_ds))
    indices = list(range(count))[accelerator.process_index::accelerator.num_processes]
    part = evaluate_scale_consistency(
        model, test_ds, args.eval_scales, batch_size=args.batch_size, indices=indices, seed=args.seed,
        progress=accelerator.is_main_process, device=accelerator.device) if indices else None
    parts = [p for p in gather_object([part]) if p is not None]
    total = sum(p["num_samples"] for p in parts)

    def mean(key: str) -> Any:
        if isinstance(parts[0][key], list):
            return [sum(p[key][i] * p["num_samples"] for p in parts) / total for i in range(len(parts[0][key]))]
        return sum(p[key] * p["num_samples"] for p in parts) / total

    return {"acc": mean("acc"), "inv_e": mean("inv_e"), "per_scale_acc": mean("per_scale_acc"),
            "per_scale_prob_correct": mean("per_scale_prob_correct"), "scales": parts[0]["scales"],
            "num_samples": total, "dataset": _dataset_name(args)}


def _dataset_name(args: argparse.Namespace) -> str:
    if args.data == "digits":
        return f"locally scaled {args.num_digits}-digit numbers (timm_dec.data.LocallyScaledDigits, test split)"
    return f"image folder {Path(args.data[len('folder:'):]).name} (validation split, timm-dec eval variants)"


def _training_table(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data": args.data, "epochs": args.epochs, "updates": args.max_steps or "all", "optimizer": args.opt,
        "lr": args.lr, "weight decay": args.weight_decay, "layer decay": args.layer_decay,
        "warm-up epochs": args.warmup_epochs, "label smoothing": args.smoothing, "batch per process":
        args.batch_size, "gradient accumulation": args.grad_accum, "mixed precision": args.mixed_precision,
        "seed": args.seed, "pretrained backbone": args.pretrained,
    }


def _data_settings(args: argparse.Namespace, model_cfg: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The digits settings the saved models record, so that ``timm-dec eval`` evaluates on the same kind of images
    (None for an image folder)."""
    if args.data != "digits":
        return None
    return dict(num_digits=args.num_digits, canvas=args.img_size or int(model_cfg["input_size"][-1]),
                digit_size=args.digit_size, scale_range=list(args.scale_range))


def _save_final(args: argparse.Namespace, model: nn.Module, folder: Path, metrics: Optional[dict],
                label_names: Optional[list], model_cfg: dict[str, Any], is_dec: bool) -> None:
    data_config = {k: model_cfg[k] for k in ("mean", "std", "interpolation", "crop_pct") if k in model_cfg}
    data = _data_settings(args, model_cfg)
    if is_dec:
        save_pretrained(model, folder, metrics=metrics,
                        label_names=label_names, dataset=_dataset_name(args), training=_training_table(args),
                        data_config=data_config, repo_id=args.push_to_hub, data=data)
    else:  # the same saved folder, without the card (which describes a DEC)
        save_model(model, folder, label_names=label_names, data_config=data_config, data=data)


def _push(args: argparse.Namespace, model: nn.Module, metrics: Optional[dict], label_names: Optional[list],
          is_dec: bool) -> None:
    if not is_dec:
        push_to_hf_hub(model, args.push_to_hub, private=args.hub_private, token=args.hub_token,
                       safe_serialization=True)
        return
    push_to_hub(model, args.push_to_hub, private=args.hub_private, token=args.hub_token,
                metrics=metrics, label_names=label_names,
                dataset=_dataset_name(args), training=_training_table(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
