"""Evaluate local scale consistency: accuracy, InvE and per-scale accuracy of a timm model on locally scaled digits.

    python examples/evaluate.py --model local-dir:runs/quickstart/model          # a saved *_dec model
    python examples/evaluate.py --checkpoint runs/finetune-tiny/checkpoint-000040 --compare-base
    python examples/evaluate.py --model vit_small_patch16_224 --pretrained --canvas 224 --num-digits 3

Any timm model works (base or ``*_dec``). ``--compare-base`` also evaluates the same weights without their DEC
(the base architecture with the backbone weights), which shows what the canonicaliser changes. The metrics go to
a JSON file in the format of `timm_dec.metrics.evaluate_scale_consistency`, which ``timm-dec push --metrics`` and
``examples/publish.py`` put into the model card. Without a trained model (the default: a fresh tiny ``*_dec``
model) the numbers are those of an untrained network.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import timm
import torch
from timm.utils import ParseKwargs
from torchvision.transforms import Normalize

import timm_dec  # noqa: F401  (registers the *_dec models)
from timm_dec.data import LocallyScaledDigits
from timm_dec.adapt import dec_options
from timm_dec.hub import load_training_checkpoint
from timm_dec.metrics import evaluate_scale_consistency
from timm_dec.models import base_model_name

TINY = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, global_pool="avg", dec_blocks=(0, 1),
            dec_widths=(16, 32))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_dec", help="timm name, local-dir:FOLDER or hf-hub:ORG/NAME")
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained weights for a plain name")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                        help="create_model kwargs; default the tiny preset for a fresh vit_tiny_dec")
    parser.add_argument("--checkpoint", help="a training checkpoint instead of --model (timm .pth.tar, "
                                             "timm_dec.finetune checkpoint folder, save_pretrained folder)")
    parser.add_argument("--num-digits", type=int, default=1)
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--samples", type=int, default=200, help="test images")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.5, 2.0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--compare-base", action="store_true", help="also evaluate the weights without their DEC")
    parser.add_argument("--output", default="runs/evaluate/metrics.json")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        return load_training_checkpoint(args.checkpoint, model_kwargs=args.model_kwargs)
    if args.model.startswith(("local-dir:", "hf-hub:")):
        return timm.create_model(args.model, pretrained=True)
    kwargs = args.model_kwargs or (dict(TINY, img_size=args.canvas) if args.model == "vit_tiny_dec" else {})
    return timm.create_model(args.model, pretrained=args.pretrained, num_classes=10 ** args.num_digits, **kwargs)


def without_dec(model: torch.nn.Module) -> torch.nn.Module:
    """The base architecture of a ``*_dec`` model carrying its backbone weights (loaded strictly)."""
    arch = model.pretrained_cfg["architecture"]
    base = base_model_name(arch) if arch.endswith("_dec") else arch
    kwargs = {k: v for k, v in getattr(model, "_model_args", {}).items() if not k.startswith("dec_")}
    kwargs.pop("pretrained_model_args", None)
    plain = timm.create_model(base, **kwargs)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dec.")})
    return plain.eval()


def evaluate(model: torch.nn.Module, args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """`evaluate_scale_consistency` on the digits test split, preprocessed as timm's data config ``cfg`` says."""
    size = int(cfg["input_size"][-1])
    data = LocallyScaledDigits("test", num_samples=args.samples, num_digits=args.num_digits, canvas=size,
                               digit_size=size // (2 * args.num_digits), transform=Normalize(cfg["mean"], cfg["std"]))
    if model.num_classes != data.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, {args.num_digits}-digit numbers need "
                         f"{data.num_classes}: set --num-digits")
    metrics = evaluate_scale_consistency(model.eval(), data, args.scales, batch_size=args.batch_size)
    metrics["dataset"] = f"locally scaled {args.num_digits}-digit numbers, {size} px (test split)"
    return metrics


def row(name: str, m: dict[str, Any]) -> str:
    scales = " ".join(f"{100 * a:6.1f}" for a in m["per_scale_acc"])
    return f"{name:<28} {100 * m['acc']:7.2f} {100 * m['inv_e']:10.3f}   {scales}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = load(args)
    cfg = timm.data.resolve_input_data_config(model)
    results = {"model": evaluate(model, args, cfg)}
    if args.compare_base:
        if not dec_options(model):
            raise SystemExit(f"--compare-base needs a *_dec model; {args.model} has no DEC")
        results["without DEC"] = evaluate(without_dec(model), args, cfg)
    print(f"{'':<28} {'acc %':>7} {'InvE 1e-2':>10}   per-scale acc % at " + " ".join(f"{s:g}" for s in args.scales))
    for name, metrics in results.items():
        print(row(name, metrics))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results["model"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
