"""``timm-dec segment``: semantic segmentation under local scaling (paper Sec. 5.1, Table 1), offline and CPU-sized.

Scenes of k digits (scikit-learn's handwritten digits, train and test glyphs disjoint; `LocallyScaledDigits`), each
digit resized by its own scale; every digit pixel is labelled with its class (1..10 for digits 0..9), the rest is
background (0). A tiny ViT (patch 4: a 12 x 12 token map at 48 px) with a pixel-shuffle + 3x3 conv decoder
(`DigitSegmenter`) is trained with cross-entropy (background weight ``bg_weight``). The shared start is made as the
demo makes its own, and as the paper trains every model to the training set before the baselines are fine-tuned
(A1): ``plain_steps`` plain steps, then ``aug_steps`` with Aug (the start of every method but Base) or plain (Base's
start). It costs more than the comparison on a CPU, so the default preset ships it: ``timm_dec/segment_start/`` was
written by ``timm-dec segment --write-start DIR`` (its configuration and SHA-256 in ``default_start.json``);
``--from-scratch`` trains it in the run instead. Every method then gets ``finetune_steps`` more backbone steps:

- **Base**: plain; **Aug**: random monotone scalings of image and mask (`random_knots`, `monotone_warp`);
- **AugL**: Aug plus the EquE loss ||S(M(I)) - M(S(I))||^2 on the class probabilities (the paper's baseline);
- **Canon**: Aug with an input canonicaliser over a bank of warps (`InputCanonicalizer`), its mask un-warped;
- **DEC**: the ``<model>_dec`` twin of the start with the input DEC (equivariant: S(M(S^{-1}(I))), the mask
  un-warped at full resolution), ``dec_warmup_steps`` DEC-only steps, then ``finetune_steps`` joint steps, on Aug's
  warped scenes (``dec_augment``, ``--no-dec-augment``: on the scenes as they are);
- **DEC(Base)** (``dec_base``, only when ``--methods`` names it): the same from Base's start;
- **Aug+time**: Aug given the DEC's training cost in Aug steps (step costs measured side by side), the equal-compute
  control.

Reported on the same test images: mIoU (per image, and over the test set's pixels), EquE (eq. 23) over random
monotone scalings on the soft masks (class probabilities) and on the hard ones (the fraction of pixels whose
predicted class changes), mIoU per per-digit scale, paired-bootstrap intervals against Aug, a figure of predicted
masks under local scaling, ``summary.json`` (the experiment runner's layout, as the demo's) and
``checkpoints/<method>.safetensors``. The sequence is the runner's (`timm_dec.apps.experiment`); this module is the
task it runs: `DigitScenesSegmentation`.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .._argcheck import check_output_folder
from ..baselines import InputCanonicalizer
from ..checkpoint import load_model, read_record, read_saved, record_wrapper, save_model
from ..data import LocallyScaledDigits
from ..dec import SolverStats, solver_stats
from ..metrics import equi_error_from_outputs, paired_bootstrap
from ..models import DECModelMixin, load_dec_state_dict
from ..ops import identity_knots, monotone_warp, random_knots
from . import _start
from ._common import add_experiment_arguments, check_dec_config, check_experiment_arguments, param_groups
from ._train import Batches, LossFn, train, training_step
from .experiment import DECS, ExperimentTask, Outcome, Run, run_experiment

__all__ = ["PRESETS", "METHODS", "DigitSegmenter", "SegDigits", "segmenter", "train_start", "load_start", "evaluate",
           "add_arguments", "resolve_config", "run", "miou_per_image", "load_checkpoint", "checkpoint_record",
           "DigitScenesSegmentation"]

METHODS = ("base", "aug", "augl", "canon", "dec", "dec_base", "aug_time")
ALWAYS = ("aug",)  # the reference: it runs whatever --methods says
OPTIONAL = ("dec_base",)  # run only when --methods names them
PRESET_HELP = {"default": "the CPU-sized comparison, ViT", "swin": "the same on a 2-stage Swin v1",
               "smoke": "seconds, checks the pipeline only"}
LABELS = {"base": "Base", "aug": "Aug", "augl": "AugL", "canon": "Canon", "dec": "DEC", "dec_base": "DEC(Base)",
          "aug_time": "Aug+time"}
NUM_CLASSES = 11  # background + 10 digits
_COMMON = dict(lr=2e-3, finetune_lr=5e-4, weight_decay=0.05, warmup_frac=0.1, bg_weight=0.1, aug_strength=0.3,
               aug_p=0.5, augl_weight=10.0, dec_lr_mult=10.0, canon_warps=32, equ_strength=0.3, seed=0,
               scale_range=(0.5, 2.0), num_digits=2, dec_augment=True)
_DEFAULT = dict(
    _COMMON, model="vit_tiny_patch16_224", canvas=48, digit_size=12,
    model_kwargs=dict(img_size=48, patch_size=4, embed_dim=64, depth=4, num_heads=2, class_token=False,
                      global_pool="avg", in_chans=1, num_classes=0),
    train_samples=6000, test_samples=1000, batch_size=32, start="shipped", plain_steps=4000, aug_steps=1000,
    finetune_steps=250,
    dec_warmup_steps=100, dec_kwargs=dict(dec_widths=(16, 32), dec_image_widths=(8, 16), dec_image_size=48),
    scales=(0.5, 0.7, 1.0, 1.4, 2.0), scale_images=300, equ_images=500, eval_batch=100, figure_images=3)
PRESETS: dict[str, dict[str, Any]] = {
    "default": _DEFAULT,
    # the same job on a two-stage Swin v1 (issue 25): patch 2 and one patch merging, so its last map has the ViT's
    # stride 4 (12 x 12 at 48 px) and the same decoder; windows of 4; stages of 32 and 64 channels
    "swin": dict(
        _DEFAULT, model="swin_tiny_patch4_window7_224",
        model_kwargs=dict(img_size=48, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                          in_chans=1, num_classes=0)),
    "smoke": dict(
        _COMMON, model="vit_tiny_patch16_224", canvas=32, digit_size=8,
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, class_token=False,
                          global_pool="avg", in_chans=1, num_classes=0),
        train_samples=16, test_samples=8, batch_size=8, start="scratch", plain_steps=2, aug_steps=1,
        finetune_steps=2, dec_warmup_steps=1,
        dec_kwargs=dict(dec_widths=(4, 4), dec_image_widths=(4, 4), dec_image_size=16, dec_grid=2, dec_max_iter=4),
        scales=(0.8, 1.2), scale_images=4, equ_images=4, eval_batch=8, figure_images=2, canon_warps=4),
}
_INT_OPTIONS = ("plain_steps", "aug_steps", "finetune_steps", "dec_warmup_steps", "train_samples", "test_samples")
START_DIR = _start.PACKAGE_DIR / "segment_start"
# the configuration values that determine the shared start (a shipped start must have been made with these)
START_KEYS = ("model", "model_kwargs", "num_digits", "canvas", "digit_size", "scale_range", "train_samples",
              "plain_steps", "aug_steps", "batch_size", "lr", "finetune_lr", "weight_decay", "warmup_frac",
              "bg_weight", "aug_strength", "aug_p", "seed")
_DEC_FIXED = dict(dec_blocks=("input",), dec_mode="invariant", dec_update="absolute", dec_backward="implicit",
                  dec_tol=1e-3)  # the segmenter un-warps the full-resolution mask itself (equivariant, eq. 21)


class SegDigits:
    """Locally scaled digit scenes with per-pixel labels, rendered once into tensors.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint glyph pools).
        num_samples: scenes.
        cfg: the run's configuration (``num_digits``, ``canvas``, ``digit_size``, ``scale_range``, ``seed``).
    """

    def __init__(self, split: str, num_samples: int, cfg: dict[str, Any]) -> None:
        self.digits = LocallyScaledDigits(split, num_samples=num_samples, num_digits=cfg["num_digits"],
                                          canvas=cfg["canvas"], digit_size=cfg["digit_size"],
                                          scale_range=tuple(cfg["scale_range"]), seed=cfg["seed"], channels=1)
        pairs = [self.render(i) for i in range(num_samples)]
        self.images = torch.stack([p[0] for p in pairs])  # (N, 1, H, W), normalised
        self.masks = torch.stack([p[1] for p in pairs])  # (N, H, W) int64 in [0, 11)

    def render(self, index: int, scales: Optional[Sequence[float]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index`` at its own per-digit scales or at ``scales``: the (1, H, W) image, normalised to [-1, 1],
        and its (H, W) mask (a pixel of digit d brighter than 0.25 is class d + 1)."""
        sample = self.digits.describe(index)
        scales = sample.scales if scales is None else tuple(scales)
        image = self.digits.render(sample.source_indices, scales)
        mask = torch.zeros(image.shape[-2:], dtype=torch.long)
        for digit, (left, top, size) in zip(sample.digits, self.digits.digit_boxes(scales)):
            box = mask[top:top + size, left:left + size]
            box[image[0, top:top + size, left:left + size] > 0.25] = digit + 1
        return (image - 0.5) / 0.5, mask


class DigitSegmenter(nn.Module):
    """A timm backbone and a pixel-shuffle decoder on its last feature map: per-pixel logits (B, classes, H, W).

    With a ``*_dec`` backbone (input DEC, invariant mode) the model is S(M(S^{-1}(I))): the backbone's base forward
    runs on the canonical image and the full-resolution logits are un-warped with the same knots; with ``canon``
    the same, the knots chosen from Canon's bank.

    Args:
        backbone: a timm model whose ``forward_features`` gives (B, h*w, D) tokens (a ViT without prefix tokens) or
            a (B, h, w, D) map (Swin's last stage).
        patch: the backbone's output stride, H / h (the decoder's upsampling factor; a ViT's patch size).
        canon: an `InputCanonicalizer` (its wrapped model unused), or None.
    """

    def __init__(self, backbone: nn.Module, patch: int, canon: Optional[InputCanonicalizer] = None) -> None:
        super().__init__()
        self.backbone, self.patch, self.canon = backbone, patch, canon
        width = 32
        self.proj = nn.Conv2d(backbone.num_features, width * patch * patch, 1)
        self.head = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, NUM_CLASSES, 3, padding=1))

    def canonicalize(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The image the backbone sees and the knots that un-warp its mask (None: no canonicaliser)."""
        if isinstance(self.backbone, DECModelMixin):
            return self.backbone.dec_canonicalize_image(x)
        if self.canon is not None:
            canonical, index = self.canon.canonicalize(x)
            return canonical, self.canon.warps.to(x.device)[index]
        return x, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, C, H, W) images.

        Returns:
            (B, 11, H, W) logits, in the input's geometry.
        """
        x, knots = self.canonicalize(x)
        if isinstance(self.backbone, DECModelMixin):  # the base class's forward: the image is canonical already
            tokens = super(DECModelMixin, self.backbone).forward_features(x)
        else:
            tokens = self.backbone.forward_features(x)
        if tokens.ndim == 4:  # (B, h, w, D): a hierarchical backbone's last stage
            fmap = tokens.permute(0, 3, 1, 2)
        else:
            h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
            fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        logits = self.head(F.pixel_shuffle(self.proj(fmap), self.patch))
        return logits if knots is None else monotone_warp(logits, knots, inverse=True, check=False)


def miou_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mIoU (%): the mean IoU over the classes present in the image's prediction or target.

    Args:
        pred, target: (N, H, W) class indices.

    Returns:
        (N,) mIoU in percent.
    """
    p = F.one_hot(pred, NUM_CLASSES).flatten(1, 2).bool()
    t = F.one_hot(target, NUM_CLASSES).flatten(1, 2).bool()
    inter, union = (p & t).sum(1).float(), (p | t).sum(1).float()
    present = union > 0
    return 100 * torch.where(present, inter / union.clamp(min=1), 0).sum(1) / present.sum(1)


def _confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.bincount(target.flatten() * NUM_CLASSES + pred.flatten(),
                          minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def _warp_pair(images: torch.Tensor, masks: torch.Tensor, strength: float, p: float,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Aug: the same random monotone scaling S of each image (bilinear) and its mask (of the one-hot map)."""
    knots = random_knots(images.shape[0], strength=strength, generator=gen)
    keep = torch.rand(images.shape[0], generator=gen) >= p
    knots[keep] = identity_knots(int(keep.sum()), 4)
    return monotone_warp(images, knots, inverse=True, check=False), warp_masks(masks, knots, check=False)


def warp_masks(masks: torch.Tensor, knots: torch.Tensor, check: bool = True) -> torch.Tensor:
    """S applied to class masks, as to their images: (N, H, W) class indices warped through their one-hot maps
    (bilinear), each pixel the class of largest weight. ``knots``: (N, 2, G+1, G+1)."""
    onehot = F.one_hot(masks, NUM_CLASSES).permute(0, 3, 1, 2).float()
    return monotone_warp(onehot, knots, inverse=True, check=check).argmax(1)


def _batches(data: SegDigits, cfg: dict[str, Any], augment: bool, gen: torch.Generator) -> Batches:
    """Segment's batch source: ``batch_size`` training scenes and their masks drawn with replacement (``randint``)
    from ``gen``, each pair warped by Aug (`_warp_pair`, its warps from ``gen`` too) if ``augment``."""

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, data.images.shape[0], (cfg["batch_size"],), generator=gen)
        x, y = data.images[idx], data.masks[idx]
        if augment:
            x, y = _warp_pair(x, y, cfg["aug_strength"], cfg["aug_p"], gen)
        return x, y

    return next_batch


def _loss(cfg: dict[str, Any], augl: float, gen: torch.Generator) -> LossFn:
    """Segment's loss of (segmenter, images, masks): cross-entropy with the background at ``bg_weight``, plus with
    ``augl`` that weight times the EquE loss ||S(M(I)) - M(S(I))||^2 of the class probabilities under a random
    monotone scaling S drawn from ``gen`` (AugL)."""
    weight = torch.ones(NUM_CLASSES)
    weight[0] = cfg["bg_weight"]

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        loss = F.cross_entropy(logits, y, weight=weight)
        if augl:
            knots = random_knots(x.shape[0], strength=cfg["aug_strength"], generator=gen)
            probs_of_warped = model(monotone_warp(x, knots, inverse=True, check=False)).softmax(1)
            warped_probs = monotone_warp(logits.softmax(1), knots, inverse=True, check=False)
            loss = loss + augl * equi_error_from_outputs(warped_probs, probs_of_warped)
        return loss

    return loss_fn


def _step(model: nn.Module, data: SegDigits, steps: int, lr: float, cfg: dict[str, Any], *, augment: bool,
          augl: float = 0.0, only_dec: bool = False, seed: int = 0) -> Callable[[], float]:
    """One step of training ``model`` per call (`training_step`): AdamW (the DEC's H and Canon's energy at
    ``dec_lr_mult``; with ``only_dec`` they alone), warm-up + cosine over ``steps``, no gradient clipping, on
    `_batches` with the `_loss`, both drawing from one generator seeded with ``seed``."""
    groups = param_groups(model, lr, cfg["weight_decay"], new_prefixes=("backbone.dec.", "canon."),
                          new_lr_mult=cfg["dec_lr_mult"], only_new=only_dec)
    gen = torch.Generator().manual_seed(seed)
    return training_step(model, _batches(data, cfg, augment, gen), _loss(cfg, augl, gen), groups, steps=steps,
                         warmup_frac=cfg["warmup_frac"])


def _fit(model: nn.Module, data: SegDigits, steps: int, lr: float, cfg: dict[str, Any], *, name: str,
         progress: bool, **options: Any) -> dict[str, float]:
    """Train ``model`` for ``steps`` steps of `_step` (``options``: its ``augment``, ``augl``, ``only_dec``,
    ``seed``) with a progress bar named ``name`` (`train`); the model is left in eval mode.

    Returns:
        ``steps``, ``seconds`` and ``final_loss`` (the last 20 steps' mean).
    """
    result = train(_step(model, data, steps, lr, cfg, **options), steps, name, progress)
    model.eval()
    return result


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def evaluate(model: nn.Module, test: SegDigits, cfg: dict[str, Any]) -> dict[str, Any]:
    """mIoU (per image and over the pixels), mIoU of warped scenes S(I) against their warped masks, soft and hard
    EquE, mIoU per per-digit scale."""
    model.eval()
    batch = cfg["eval_batch"]
    with solver_stats() as stats:
        logits = _predict(model, test.images, batch)
    pred = logits.argmax(1)
    per_image = miou_per_image(pred, test.masks)
    conf = _confusion(pred, test.masks).double()
    iou = 100 * conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag()).clamp(min=1)
    n = min(cfg["equ_images"], test.images.shape[0])
    images = test.images[:n]
    knots = random_knots(n, strength=cfg["equ_strength"], generator=torch.Generator().manual_seed(cfg["seed"] + 7))
    probs = logits[:n].softmax(1)
    probs_of_warped = torch.cat([model(monotone_warp(images[i:i + batch], knots[i:i + batch], inverse=True))
                                 for i in range(0, n, batch)]).softmax(1)
    warped_probs = monotone_warp(probs, knots, inverse=True)
    warped_miou = miou_per_image(probs_of_warped.argmax(1), warp_masks(test.masks[:n], knots))
    soft = equi_error_from_outputs(warped_probs, probs_of_warped, reduction="none")
    hard = (warped_probs.argmax(1) != probs_of_warped.argmax(1)).flatten(1).float().mean(1)
    per_scale = {}
    m = min(cfg["scale_images"], test.images.shape[0])
    for s in cfg["scales"]:
        pairs = [test.render(i, (s,) * cfg["num_digits"]) for i in range(m)]
        x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        per_scale[str(s)] = miou_per_image(_predict(model, x, batch).argmax(1), y).mean().item()
    return dict(miou=per_image.mean().item(), miou_pixels=iou.mean().item(), iou_background=iou[0].item(),
                iou_digits=iou[1:].mean().item(), miou_warped=warped_miou.mean().item(),
                eque_soft=soft.mean().item(), eque_hard=100 * hard.mean().item(), per_scale=per_scale,
                dec_solver=_solver_summary(stats), _per_image=per_image, _warped=warped_miou, _soft=soft, _hard=hard)


def _solver_summary(stats: SolverStats) -> Optional[dict[str, float]]:
    """The DEC solves of an evaluation: how many, the share within tol, mean iterations, their sd and how many
    solves took each count; None without a DEC."""
    if not stats.total_samples:
        return None
    return dict(solves=stats.total_samples, within_tol=1 - stats.total_not_converged / stats.total_samples,
                mean_iterations=stats.mean_iterations, iterations_sd=stats.iterations_sd,
                iteration_counts=stats.iteration_counts, fallbacks=stats.total_fallbacks)


def _canon(num_warps: int, seed: int = 0) -> InputCanonicalizer:
    """The Canon bank of the segmenter (identity model inside: the segmenter runs the canonical image itself)."""
    return InputCanonicalizer(nn.Identity(), num_warps=num_warps, in_chans=1, energy_size=16, energy_widths=(8, 16),
                              seed=seed)


def checkpoint_record(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The record (`timm_dec.checkpoint.read_record`) of a ``timm-dec segment`` checkpoint: the backbone's
    architecture and ``model_args``, and under ``timm_dec.wrapper`` the `DigitSegmenter`'s arguments (``patch``, the
    Canon bank's ``num_warps`` and ``seed``); None for a saved model that is no segmenter."""
    record = read_record(path)
    wrapper = record_wrapper(record)
    return record if wrapper.get("class") == DigitSegmenter.__name__ else None


def _checkpoint(model: DigitSegmenter, path: Path, cfg: dict[str, Any], method: str) -> str:
    """``model`` as a single ``.safetensors`` file with the record that rebuilds it (`timm_dec.checkpoint.save_model`):
    the backbone (architecture, ``model_args`` with the DEC options), the segmenter's arguments, the Canon bank."""
    canon = None if model.canon is None else dict(num_warps=int(model.canon.warps.shape[0]), seed=cfg["finetune_seed"])
    wrapper = dict(task="segmentation", method=method, args=dict(patch=model.patch, canon=canon),
                   load_with="timm_dec.apps.segment.load_checkpoint")
    data = {k: cfg[k] for k in ("num_digits", "canvas", "digit_size", "scale_range")}
    return str(save_model(model, path, data=data, wrapper=wrapper))


def segmenter(cfg: dict[str, Any]) -> DigitSegmenter:
    """A fresh `DigitSegmenter` of the configuration's backbone, decoded from its last feature map's stride."""
    backbone = timm.create_model(cfg["model"], **cfg["model_kwargs"])
    return DigitSegmenter(backbone, int(backbone.feature_info[-1]["reduction"]))


def _dec_model(start: DigitSegmenter, cfg: dict[str, Any]) -> DigitSegmenter:
    """The start with its backbone replaced by the ``*_dec`` twin (the start's weights, the DEC at the identity)."""
    twin = timm.create_model(cfg["model"] + "_dec", **cfg["model_kwargs"], **_DEC_FIXED, **cfg["dec_kwargs"])
    load_dec_state_dict(twin, start.backbone.state_dict(), source="the shared start")
    model = copy.deepcopy(start)
    model.backbone = twin
    return model


def train_start(train_set: SegDigits, cfg: dict[str, Any], log: Callable[[str], None],
                progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The shared start, as the demo makes its own: ``plain_steps`` plain at ``lr``; from there ``aug_steps`` with Aug
    at ``finetune_lr`` (the start of Aug, AugL, Canon, DEC and Aug+time) and ``aug_steps`` more plain (the start of
    Base, so that Base has had as many steps)."""
    model = segmenter(cfg)
    r = _fit(model, train_set, cfg["plain_steps"], cfg["lr"], cfg, name="start: plain", progress=progress,
             augment=False, seed=cfg["seed"])
    log(f"  start: plain  {r['steps']:>5} steps  {r['seconds']:6.1f} s  loss {r['final_loss']:.3f}")
    plain = copy.deepcopy(model)
    for name, m, augment in (("plain+", plain, False), ("Aug", model, True)):
        r = _fit(m, train_set, cfg["aug_steps"], cfg["finetune_lr"], cfg, name=f"start: {name}", progress=progress,
                 augment=augment, seed=cfg["seed"] + 1)
        log(f"  start: {name:<6} {r['steps']:>5} steps  {r['seconds']:6.1f} s  loss {r['final_loss']:.3f}")
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in (("plain", plain),
                                                                                               ("aug", model))}


def _paired(r: dict[str, Any], ref: dict[str, Any], seed: int) -> dict[str, Any]:
    """``r`` against ``ref`` on the same test images: paired-bootstrap intervals of every per-image metric."""
    return dict(miou=paired_bootstrap(r["_per_image"], ref["_per_image"], seed=seed),
                miou_warped=paired_bootstrap(r["_warped"], ref["_warped"], seed=seed),
                eque_soft_1e3=paired_bootstrap(1e3 * r["_soft"], 1e3 * ref["_soft"], seed=seed),
                eque_hard_pct=paired_bootstrap(100 * r["_hard"], 100 * ref["_hard"], seed=seed),
                eque_ratio=r["eque_soft"] / max(ref["eque_soft"], 1e-12),
                eque_hard_ratio=r["eque_hard"] / max(ref["eque_hard"], 1e-12))


def _interval(d: dict[str, float], digits: int, width: int) -> str:
    return f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]".ljust(width)


def _tables(results: dict[str, dict[str, Any]], paired: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> str:
    """The printed tables: the metrics, the DEC's solves, mIoU per scale and the paired comparisons (`_paired`: every
    method against Aug, the DEC against Aug+time as ``dec_vs_aug_time``, the DECs against Base as ``*_vs_base``)."""
    lines = [f"Segmentation under local scaling ({len(next(iter(results.values()))['_per_image'])} test images; "
             f"mIoU S and EquE over one random monotone scaling S per image, strength {cfg['equ_strength']})",
             f"{'Method':<10}{'mIoU':>7}{'mIoU px':>9}{'IoU dig':>9}{'IoU bg':>8}{'mIoU S':>8}{'EquE 1e-3':>11}"
             f"{'EquE hard %':>13}"]
    for m, r in results.items():
        lines.append(f"{LABELS[m]:<10}{r['miou']:7.2f}{r['miou_pixels']:9.2f}{r['iou_digits']:9.2f}"
                     f"{r['iou_background']:8.2f}{r['miou_warped']:8.2f}{1e3 * r['eque_soft']:11.3f}"
                     f"{r['eque_hard']:13.3f}")
    for m, r in results.items():
        if r.get("dec_solver"):
            d = r["dec_solver"]
            lines.append(f"{LABELS[m]} solver on the clean test images: {100 * d['within_tol']:.2f}% of "
                         f"{d['solves']} solves within tol, {d['mean_iterations']:.2f} iterations on average"
                         + (f" (sd {d['iterations_sd']:.2f})" if "iterations_sd" in d else "")
                         + f", {d['fallbacks']} fallbacks")
    lines += ["", "mIoU (%) per per-digit scale (every digit at that scale)",
              f"{'Method':<10}" + "".join(f"{s:>8}" for s in cfg["scales"])]
    for m, r in results.items():
        lines.append(f"{LABELS[m]:<10}" + "".join(f"{v:8.2f}" for v in r["per_scale"].values()))
    if paired:
        lines += ["", "Paired differences on the same test images (95% bootstrap intervals)",
                  f"{'Methods':<20}{'dmIoU':<24}{'dmIoU S':<24}{'dEquE 1e-3':<30}{'EquE ratio':<12}dEquE hard %"]
    for key, p in paired.items():
        m, _, ref = key.partition("_vs_")
        label = LABELS[m] + " - " + LABELS[ref or "aug"]
        lines.append(f"{label:<20}{_interval(p['miou'], 2, 24)}"
                     f"{_interval(p['miou_warped'], 2, 24)}{_interval(p['eque_soft_1e3'], 3, 30)}"
                     f"{p['eque_ratio']:<12.3f}{_interval(p['eque_hard_pct'], 3, 0)}")
    return "\n".join(lines)


def _figure(models: dict[str, DigitSegmenter], test: SegDigits, cfg: dict[str, Any], path: Path) -> Optional[str]:
    """Predicted masks of a few test scenes, each at a small, its own and a large per-digit scale."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scales = (cfg["scales"][0], None, cfg["scales"][-1])
    rows = [(i, s) for i in range(min(cfg["figure_images"], len(test.images))) for s in scales]
    cols = ["image", "truth"] + [LABELS[m] for m in models]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.3 * len(rows)), squeeze=False)
    for r, (i, s) in enumerate(rows):
        image, mask = test.render(i, None if s is None else (s,) * cfg["num_digits"])
        with torch.no_grad():
            preds = [m.eval()(image[None])[0].argmax(0) for m in models.values()]
        panels = [(image[0], "gray", None)] + [(p, "tab20", NUM_CLASSES - 1) for p in [mask] + preds]
        for c, (panel, cmap, vmax) in enumerate(panels):
            axes[r, c].imshow(panel, cmap=cmap, vmin=0 if vmax else None, vmax=vmax, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=8)
        axes[r, 0].set_ylabel("own" if s is None else f"s={s}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``timm-dec segment`` options; those left out come from ``--preset``."""
    add_experiment_arguments(parser, presets={name: PRESET_HELP[name] for name in PRESETS}, methods=METHODS,
                             always=ALWAYS, out="segment_out", optional=OPTIONAL)
    parser.add_argument("--finetune-seed", type=int, default=None,
                        help="seed of the methods' batches and warps only, so that the shipped start can serve several "
                             "training seeds (default: --seed + 2)")
    for key in _INT_OPTIONS:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None, help="default: the preset's")
    parser.add_argument("--dec-beta", type=float, default=None,
                        help="damping of the DECs' solver (DECConfig.beta; default: the library's)")
    parser.add_argument("--dec-jac-reg", type=float, default=None,
                        help="weight of the DECs' Jacobian regulariser in training (DECConfig.jac_reg; 0: off)")
    parser.add_argument("--dec-grad-tol", type=float, default=None,
                        help="the DECs' forward tolerance when differentiated, in training (DECConfig.grad_tol; "
                             "0: their tol)")
    parser.add_argument("--dec-augment", action=argparse.BooleanOptionalAction, default=None,
                        help="train the DECs (dec, dec_base) on Aug's warped scenes (default) or, with "
                             "--no-dec-augment, on the scenes as they are, as Base trains")


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with the options given on the command line; `ValueError` for a bad one."""
    cfg = copy.deepcopy(PRESETS[args.preset])
    methods = check_experiment_arguments(args, METHODS, ALWAYS, OPTIONAL)  # --seed, --threads, --methods
    if getattr(args, "seed", None) is not None:
        cfg["seed"] = args.seed
    for key in _INT_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            low = 0 if key.endswith("steps") else 2
            if value < low:
                why = " (the paired bootstrap needs 2 test scenes)" if key == "test_samples" else ""
                raise ValueError(f"--{key.replace('_', '-')} must be >= {low}{why}, got {value}")
            cfg[key] = value
    if getattr(args, "dec_augment", None) is not None:
        cfg["dec_augment"] = args.dec_augment
    for key in ("dec_beta", "dec_jac_reg", "dec_grad_tol"):
        if getattr(args, key, None) is not None:
            cfg["dec_kwargs"][key] = getattr(args, key)
    check_dec_config(cfg["dec_kwargs"])  # before any work; a bad value names its --dec-* flag
    if getattr(args, "start", None):  # --from-scratch (--write-start trains its start whatever the preset says)
        cfg["start"] = args.start
    cfg["methods"] = list(methods)
    seed = getattr(args, "finetune_seed", None)
    if seed is not None and seed < 0:
        raise ValueError(f"--finetune-seed must be >= 0, got {seed}")
    cfg["finetune_seed"] = cfg["seed"] + 2 if seed is None else seed
    return cfg


def load_start(cfg: dict[str, Any], preset: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The shipped shared start of ``preset`` (``segment_start/<preset>_start.json``), checked against ``cfg``."""
    return _start.load_start(START_DIR, preset, _start.start_record(cfg, START_KEYS))


class DigitScenesSegmentation(ExperimentTask):
    """The segmentation task for `run_experiment`: `DigitSegmenter` on locally scaled digit scenes; mIoU, EquE, mIoU
    per scale, and a figure of predicted masks."""
    name = "segment"
    labels = LABELS
    start_keys = START_KEYS
    checkpoint_hint = ("one checkpoint per method: a DigitSegmenter, which timm-dec eval does not read; load one with "
                       "timm_dec.apps.segment.load_checkpoint(PATH)")

    @property
    def start_dir(self) -> Path:
        return START_DIR

    @property
    def methods_seed(self) -> int:
        return self.cfg["finetune_seed"]

    def check(self) -> None:
        if self.args.write_start:
            check_output_folder(self.args.write_start, "--write-start")
        else:
            check_output_folder(self.args.out, "--out")

    def prepare(self) -> None:
        cfg = self.cfg
        print(f"timm-dec segment: preset {self.args.preset}, seed {cfg['seed']} (fine-tuning seed "
              f"{cfg['finetune_seed']}), {torch.get_num_threads()} CPU threads")
        torch.manual_seed(cfg["seed"])  # the start's initial weights (the scenes draw from generators of their own)
        self.train_set = SegDigits("train", cfg["train_samples"], cfg)
        self.test_set = SegDigits("test", cfg["test_samples"], cfg)

    def train_start(self) -> dict[str, dict[str, torch.Tensor]]:
        return train_start(self.train_set, self.cfg, print, self.progress)

    def build(self, method: str, starts: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
        """A segmenter of the start (Base's and DEC(Base)'s the plain one); the DECs' backbone the ``*_dec`` twin,
        its DEC's initial weights from the fine-tuning seed; Canon's with its bank."""
        cfg = self.cfg
        model = segmenter(cfg)
        model.load_state_dict(starts["plain" if method in ("base", "dec_base") else "aug"])
        if method in DECS:
            # the DEC's initial weights from the fine-tuning seed, not from what the methods before it drew
            torch.manual_seed(cfg["finetune_seed"])
            model = _dec_model(model, cfg)
        elif method == "canon":
            model.canon = _canon(cfg["canon_warps"], seed=cfg["finetune_seed"])
        return model

    def runs(self, method: str, model: nn.Module, models: Mapping[str, nn.Module], steps: int) -> list[Run]:
        """`_step` runs: Aug (image and mask warped) for all but Base, AugL's loss, the DEC's DEC-only warm-up."""
        cfg = self.cfg

        def run(name: str, n: int, **options: Any) -> Run:
            return Run(name, n, lambda: _step(model, self.train_set, n, cfg["finetune_lr"], cfg,
                                              seed=cfg["finetune_seed"], **options),
                       dec_only=options.get("only_dec", False))

        if method in DECS:  # both DECs trained alike, whichever start they have
            augment = cfg["dec_augment"]
            return [run(f"{LABELS[method]} warm-up", cfg["dec_warmup_steps"], augment=augment, only_dec=True),
                    run(LABELS[method], steps, augment=augment)]
        return [run(LABELS[method], steps, augment=method != "base",
                    augl=cfg["augl_weight"] if method == "augl" else 0.0)]

    def calibration_step(self, kind: str, model: nn.Module) -> Callable[[], float]:
        return _step(model, self.train_set, 1, self.cfg["finetune_lr"], self.cfg,
                     augment=kind == "aug" or self.cfg["dec_augment"],
                     only_dec=kind == "dec_only", seed=self.cfg["finetune_seed"])

    def evaluate(self, method: str, model: nn.Module) -> dict[str, Any]:
        return evaluate(model, self.test_set, self.cfg)

    def compare(self, results: Mapping[str, dict[str, Any]], method: str, reference: str) -> dict[str, Any]:
        return _paired(results[method], results[reference], self.cfg["seed"])

    def write_checkpoint(self, method: str, model: nn.Module, path: Path) -> str:
        return _checkpoint(model, path, self.cfg, method)

    def tables(self, outcome: Outcome) -> str:
        return _tables(outcome.results, outcome.paired, self.cfg)

    def figures(self, outcome: Outcome) -> list[str]:
        figure = _figure(outcome.models, self.test_set, self.cfg, self.out / "masks.png")
        return ["masks.png"] if figure else []


def run(args: argparse.Namespace) -> int:
    """Train the methods, evaluate them, print the tables and write ``--out`` (`run_experiment`)."""
    return run_experiment(DigitScenesSegmentation(args, resolve_config(args)))


def load_checkpoint(path: Union[str, Path]) -> DigitSegmenter:
    """A segmenter that ``timm-dec segment`` saved (``checkpoints/<method>.safetensors``, or a file of before the
    unified record), rebuilt from its record alone by `timm_dec.checkpoint.load_model` (backbone, `DigitSegmenter`
    arguments, Canon bank) and loaded strictly, in eval mode.

    Raises:
        ValueError: ``path`` holds no segmenter (the message says what its record names).
    """
    saved = read_saved(path)
    wrapper = record_wrapper(saved.record)
    if wrapper.get("class") != DigitSegmenter.__name__:
        names = wrapper.get("class") or saved.architecture or "no model"
        raise ValueError(f"{path} is not a checkpoint of timm-dec segment (its record names {names}, not a "
                         f"{DigitSegmenter.__name__})")
    args = wrapper.get("args") or {}
    canon = args.get("canon")

    def rebuild(backbone: nn.Module) -> DigitSegmenter:
        bank = _canon(int(canon["num_warps"]), seed=int(canon.get("seed", 0))) if canon else None
        return DigitSegmenter(backbone, int(args["patch"]), bank)

    return load_model(saved, wrap=rebuild)
