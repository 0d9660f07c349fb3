"""Evaluate local scale consistency: accuracy, InvE and per-scale accuracy of a timm model on locally scaled digits.

    python examples/evaluate.py --model local-dir:runs/quickstart/model          # a saved *_dec model
    python examples/evaluate.py --checkpoint runs/finetune-tiny/checkpoint-000040 --compare-base
    python examples/evaluate.py --model vit_small_patch16_224 --pretrained --canvas 224 --num-digits 3

The flags are those of ``timm-dec eval`` for the same things (``--scales 0.5,1,2``, ``--num-samples``,
``-b/--batch-size``, ``--results-file`` / ``--json``, ``--num-digits``, ``--canvas``, ``--digit-size``), and the model
and data come from the same functions: a ``local-dir:``/``hf-hub:`` model or a ``--checkpoint`` is evaluated on the
digits settings it records (the ones it was trained with). Any timm model works (base or ``*_dec``).
``--compare-base`` also evaluates the same weights without their DEC (the base architecture with the backbone
weights), which shows what the canonicaliser changes. The metrics go to a JSON file in the format of
`timm_dec.metrics.evaluate_scale_consistency`, which ``timm-dec push --metrics`` and ``examples/publish.py`` put into
the model card. Without a trained model (the default: a fresh tiny ``*_dec`` model on 1-digit numbers, 32 px) the
numbers are those of an untrained network.
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
from timm_dec.adapt import dec_options
from timm_dec.apps.evaluate import build_eval_model, check_class_count, parse_scales, resolve_digits
from timm_dec.data import LocallyScaledDigits
from timm_dec.metrics import evaluate_scale_consistency
from timm_dec.models import base_model_name

TINY = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, global_pool="avg", dec_blocks=("input",),
            dec_image_widths=(8, 16))
FRESH_DIGITS, FRESH_CANVAS = 1, 32  # the fresh tiny model's data when no flag says otherwise


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="timm name, local-dir:FOLDER or hf-hub:ORG/NAME; default a fresh tiny vit_tiny_dec, or "
                             "the architecture --checkpoint records")
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained weights for a plain name")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="create_model kwargs; default the tiny preset for a fresh vit_tiny_dec")
    parser.add_argument("--checkpoint", help="a training checkpoint (timm .pth.tar, timm_dec.finetune checkpoint "
                                             "folder, save_pretrained folder, .safetensors)")
    parser.add_argument("--num-digits", type=int, default=None,
                        help="digits per number; default what the model records, else from its class count")
    parser.add_argument("--canvas", type=int, default=None, help="image side; default the model's input size")
    parser.add_argument("--digit-size", type=int, default=None,
                        help="digit side at scale 1; default what the model records, else canvas // 8")
    parser.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="per-digit scales of the test images; default what the model records, else 0.4 2.0")
    parser.add_argument("--num-samples", type=int, default=200, help="test images")
    parser.add_argument("--scales", type=parse_scales, default="0.5,0.75,1,1.5,2", metavar="S,S,...",
                        help="comma-separated scales of the variants")
    parser.add_argument("-b", "--batch-size", type=int, default=50)
    parser.add_argument("--compare-base", action="store_true", help="also evaluate the weights without their DEC")
    parser.add_argument("--results-file", "--json", dest="results_file", default="runs/evaluate/metrics.json",
                        help="the metrics JSON (--json is an alias)")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and the digits settings it records, as ``timm-dec eval`` loads them."""
    if args.model is None and not args.checkpoint:  # the fresh tiny model of the docstring
        num_digits, canvas = args.num_digits or FRESH_DIGITS, args.canvas or FRESH_CANVAS
        kwargs = args.model_kwargs or dict(TINY, img_size=canvas)
        model = timm.create_model("vit_tiny_dec", num_classes=10 ** num_digits, **kwargs)
        return model.eval(), {"num_digits": num_digits, "canvas": canvas}
    return build_eval_model(args.model, num_classes=lambda rec: 10 ** (args.num_digits or rec.get("num_digits", 1)),
                            checkpoint=args.checkpoint, model_kwargs=args.model_kwargs, pretrained=args.pretrained)


def without_dec(model: torch.nn.Module) -> torch.nn.Module:
    """The base architecture of a ``*_dec`` model carrying its backbone weights (loaded strictly)."""
    arch = model.pretrained_cfg["architecture"]
    base = base_model_name(arch) if arch.endswith("_dec") else arch
    kwargs = {k: v for k, v in getattr(model, "_model_args", {}).items() if not k.startswith("dec_")}
    kwargs.pop("pretrained_model_args", None)
    plain = timm.create_model(base, **kwargs)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dec.")})
    return plain.eval()


def evaluate(model: torch.nn.Module, args: argparse.Namespace, cfg: dict[str, Any],
             digits: dict[str, Any]) -> dict[str, Any]:
    """`evaluate_scale_consistency` on the digits test split, preprocessed as timm's data config ``cfg`` says."""
    data = LocallyScaledDigits("test", num_samples=args.num_samples, num_digits=digits["num_digits"],
                               canvas=digits["canvas"], digit_size=digits["digit_size"],
                               scale_range=tuple(digits["scale_range"]), transform=Normalize(cfg["mean"], cfg["std"]))
    check_class_count(model, data, "digits")
    metrics = evaluate_scale_consistency(model.eval(), data, args.scales, batch_size=args.batch_size)
    metrics["dataset"] = f"locally scaled {digits['num_digits']}-digit numbers, {digits['canvas']} px (test split)"
    return metrics


def row(name: str, m: dict[str, Any]) -> str:
    scales = " ".join(f"{100 * a:6.1f}" for a in m["per_scale_acc"])
    return f"{name:<28} {100 * m['acc']:7.2f} {100 * m['inv_e']:10.3f}   {scales}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    model, recorded = load(args)
    cfg = timm.data.resolve_input_data_config(model)
    digits = resolve_digits(args, recorded, model.num_classes, int(cfg["input_size"][-1]))
    results = {"model": evaluate(model, args, cfg, digits)}
    if args.compare_base:
        if not dec_options(model):
            raise SystemExit(f"--compare-base needs a *_dec model; {args.model} has no DEC")
        results["without DEC"] = evaluate(without_dec(model), args, cfg, digits)
    print(f"{'':<28} {'acc %':>7} {'InvE 1e-2':>10}   per-scale acc % at " + " ".join(f"{s:g}" for s in args.scales))
    for name, metrics in results.items():
        print(row(name, metrics))
    out = Path(args.results_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results["model"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
