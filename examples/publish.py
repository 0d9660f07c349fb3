"""Publish a ``*_dec`` model: a Hub folder with its model card, checked by loading it back; pushed only with --push.

    python examples/publish.py                                                   # a fresh tiny model, local only
    python examples/publish.py --checkpoint runs/finetune-tiny/checkpoint-000040 --metrics runs/evaluate/metrics.json
    python examples/publish.py --checkpoint train-output/model_best.pth.tar --push ORG/NAME --private

The folder (default ``runs/publish/<name>``) holds ``config.json`` (with the DEC options as ``dec_*`` model args),
``model.safetensors`` and ``README.md`` rendered from the package's card template
(``timm_dec/templates/model_card.md``). The script loads it back with ``timm.create_model("local-dir:...",
pretrained=True)`` and checks that the logits are the same before any push. ``--push ORG/NAME``
uploads it in one commit (token: ``huggingface-cli login`` or ``$HF_TOKEN``); afterwards
anyone gets the model with ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` after ``import timm_dec``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
from timm.utils import ParseKwargs

import timm_dec  # noqa: F401  (registers the *_dec models)
from timm_dec.checkpoint import load_model
from timm_dec.hub import hub_architecture, push_to_hub, save_pretrained

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, global_pool="avg", num_classes=10,
            dec_blocks=("input",), dec_image_widths=(8, 16))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_dec", help="a *_dec name or local-dir:/hf-hub: of a saved one")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                        help="create_model kwargs; default the tiny preset for a fresh vit_tiny_dec")
    parser.add_argument("--checkpoint", help="a training checkpoint (timm .pth.tar, timm_dec.finetune folder, "
                                             ".safetensors with --model)")
    parser.add_argument("--metrics", help="metrics JSON (examples/evaluate.py, timm-dec eval)")
    parser.add_argument("--dataset", default=None, help="name of the fine-tuning data, for the card")
    parser.add_argument("--output", default=None, help="the Hub folder; default runs/publish/<name>")
    parser.add_argument("--push", metavar="ORG/NAME", help="push the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        name = None if args.model == "vit_tiny_dec" else args.model
        return load_model(args.checkpoint, model_name=name, model_kwargs=args.model_kwargs)
    if args.model.startswith(("local-dir:", "hf-hub:")):
        return load_model(args.model)
    kwargs = args.model_kwargs or (TINY if args.model == "vit_tiny_dec" else {})
    return timm.create_model(args.model, **kwargs).eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = load(args)
    name = args.push.split("/")[-1] if args.push else hub_architecture(model)
    folder = Path(args.output or Path("runs/publish") / name)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None

    save_pretrained(model, folder, metrics=metrics, repo_id=args.push, dataset=args.dataset)
    print(f"saved {hub_architecture(model)} to {folder}: {sorted(p.name for p in folder.iterdir())}")

    # the check a user of the Hub repo relies on: the folder alone rebuilds the same model
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = timm.data.resolve_input_data_config(model)["input_size"]
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(x) - model(x)).abs().max().item()
    if diff != 0.0:
        raise SystemExit(f"the saved folder does not reproduce the model: max |logit difference| = {diff:g}")
    print(f"loaded it back with timm.create_model('local-dir:{folder}', pretrained=True): same logits, "
          f"DEC options {loaded.dec_cfg.blocks} / grid {loaded.dec_cfg.options.grid} / {loaded.dec_cfg.mode}")

    if args.push:
        info = push_to_hub(model, args.push, private=args.private, metrics=metrics, dataset=args.dataset)
        print(f"pushed to {info.commit_url}; load it with timm.create_model('hf-hub:{args.push}', pretrained=True)")
    else:
        print("not pushed (pass --push ORG/NAME to upload this folder to the Hugging Face Hub)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
