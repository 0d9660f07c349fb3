"""The checks of ``timm-dec demo``'s options, made before any work: every value of the resolved configuration
(`check_values`), then what it takes a model to see (`check_before_work`): the device, the output folder, the model
name and kwargs and the DEC options (the models built on the meta device, the DEC options as a `DECConfig`), the
digits settings, Canon's options and timm's weights offline. Each error names the flag to change."""
from __future__ import annotations

import argparse
from typing import Any

import timm
from torch import nn

from .._argcheck import check_output_folder
from ..baselines import InputCanonicalizer
from ..data import LocallyScaledDigits
from ._common import (
    check_dec_config,
    check_model_build,
    check_number,
    check_pretrained_offline,
    check_scale_range,
    meta_build_error,
    resolve_device,
)
from .experiment import DECS
from .heads import num_outputs
from .presets import dec_kwargs

__all__ = ["check_values", "check_before_work"]


def check_values(cfg: dict[str, Any]) -> None:
    """Every value of a resolved configuration that no later step checks before it costs work."""
    if cfg["test_samples"] < 2:
        raise ValueError(f"--test-samples must be >= 2 (the paired bootstrap needs 2 test images), got "
                         f"{cfg['test_samples']}")
    for key in ("train_samples", "batch_size", "eval_batch", "canon_warps", "num_digits", "canvas"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("plain_steps", "aug_steps", "finetune_steps", "dec_warmup_steps", "prob_images", "grid_images",
                "stretch_images", "gradient_images"):
        if cfg[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg["canon_candidates"] < 2 or cfg["canon_margin"] < 0 or cfg["canon_rank_weight"] < 0:
        raise ValueError("--canon-candidates must be >= 2, --canon-margin and --canon-rank-weight >= 0")
    if not 0 <= cfg["warmup_frac"] < 1:
        raise ValueError(f"--warmup-frac must be in [0, 1), got {cfg['warmup_frac']}")
    if cfg["plain_steps"] + cfg["aug_steps"] + cfg["finetune_steps"] == 0:
        raise ValueError("--plain-steps, --aug-steps and --finetune-steps are all 0: nothing would be trained")
    for key in ("lr", "finetune_lr", "dec_lr_mult"):
        check_number(f"--{key.replace('_', '-')}", cfg[key])
    for key in ("weight_decay", "aug_strength", "invl_weight"):
        check_number(f"--{key.replace('_', '-')}", cfg[key], strict=False)
    check_number("--aug-p", cfg["aug_p"], strict=False, high=1.0)
    check_scale_range(*cfg["scale_range"])
    if cfg["digit_size"] is not None and cfg["digit_size"] < 1:
        raise ValueError(f"--digit-size must be >= 1, got {cfg['digit_size']}")


def check_before_work(args: argparse.Namespace, cfg: dict[str, Any]) -> bool:
    """What `resolve_config` cannot see alone, checked before anything is trained or written: the device, the output
    folder, the model name and kwargs and the DEC options (the models built on the meta device), timm's weights
    offline. Returns whether timm's weights are to be read from huggingface_hub's cache (offline)."""
    resolve_device(args.device)
    if args.write_start:
        check_output_folder(args.write_start, "--write-start")
    else:
        check_output_folder(args.out, "--out")
    kwargs = dict(cfg["model_kwargs"], num_classes=num_outputs(cfg["label"], cfg["num_digits"]))
    dec_keys = [k for k in kwargs if k.startswith("dec_")]
    if dec_keys:
        flag = "--" + dec_keys[0].replace("_", "-")
        raise ValueError(f"--model-kwargs {dec_keys[0]}={kwargs[dec_keys[0]]!r}: the demo's DEC options are the "
                         f"--dec-* flags ({flag} ...), not --model-kwargs")
    name = cfg["model"]
    if set(DECS) & set(cfg["methods"]) and timm.is_model(name) and not timm.is_model(name + "_dec"):
        raise ValueError(f"--model {name}: the demo's DEC needs a ViT-class (ViT, DeiT, BEiT, EVA) or Swin model "
                         f"that timm_dec gives a {name}_dec twin (timm_dec.list_dec_models()), built with the "
                         f"--model-kwargs (img_size, ...)")
    what = "--model-kwargs" if args.model_kwargs is not None else (
        f"the preset's model_kwargs {cfg['model_kwargs']} (give --model-kwargs that fit --model {name})")
    check_model_build(name, kwargs, what)
    if set(DECS) & set(cfg["methods"]) and ":" not in name:  # (a hf-hub:/local-dir: name is left to its loader)
        options = dec_kwargs(cfg)
        check_dec_config(options)
        error = meta_build_error(name + "_dec", dict(kwargs, **options))
        if error is not None:
            blocks = ",".join(str(b) for b in cfg["dec_blocks"] or ())
            at_blocks = any(word in str(error) for word in ("block", "stage", "out of range"))
            raise ValueError(f"--dec-blocks {blocks}: {error}" if at_blocks else
                             f"the --dec-* options of {name}_dec: {error}")
    _check_data_and_canon(cfg, int(kwargs.get("in_chans", 3)))
    return bool(cfg["pretrained"]) and check_pretrained_offline(name, kwargs)


def _check_data_and_canon(cfg: dict[str, Any], channels: int) -> None:
    """The digits settings (that the digits fit the canvas) and Canon's options, built small before any work."""
    try:
        LocallyScaledDigits("test", num_samples=2, num_digits=cfg["num_digits"], canvas=cfg["canvas"],
                            scale_range=tuple(cfg["scale_range"]), digit_size=cfg["digit_size"], seed=cfg["seed"])
    except ValueError as e:
        raise ValueError(f"--num-digits {cfg['num_digits']}, --canvas {cfg['canvas']}, --digit-size "
                         f"{cfg['digit_size']}, --scale-range {' '.join(map(str, cfg['scale_range']))}: {e}") from None
    if "canon" not in cfg["methods"]:
        return
    try:
        InputCanonicalizer(nn.Identity(), num_warps=cfg["canon_warps"], strength=cfg["aug_strength"],
                           in_chans=channels, energy_size=cfg["canon_energy_size"],
                           energy_widths=tuple(cfg["canon_energy_widths"]), identity_margin=cfg["canon_margin"])
    except ValueError as e:
        flag = next((f for key, f in (("energy_size", "--canon-energy-size"), ("widths", "--canon-energy-widths"),
                                      ("warps", "--canon-warps")) if key in str(e)), "the --canon-* options")
        raise ValueError(f"{flag}: {e}") from None
