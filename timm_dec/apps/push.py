"""``timm-dec push``: a training checkpoint -> a Hub folder with a model card -> one commit on the Hub.

The command line over the library: `timm_dec.checkpoint.load_model` reads the checkpoint and rebuilds the model it
records, `timm_dec.hub` writes the folder (`save_pretrained`) and pushes it (`push_to_hub`). ``timm_dec.cli`` wires
``add_arguments`` and ``run`` as the ``push`` subcommand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from timm.utils import ParseKwargs

from .. import hub
from .._argcheck import OUTPUT_FOLDER_RULE, check_checkpoint_path, check_output_folder, named_kwarg
from .._format import read_json_object
from ..checkpoint import load_model, read_saved

__all__ = ["add_arguments", "run"]


def _read_metrics_arg(text: Optional[str]) -> Optional[dict[str, Any]]:
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--metrics is not valid JSON: {e}") from e
    else:
        data = read_json_object(Path(text), "metrics file")
    if "metrics" in data and isinstance(data["metrics"], Mapping) and "acc" not in data:
        data = data["metrics"]
    return hub.normalize_metrics(data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``timm-dec push``."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="timm train.py checkpoint (.pth.tar), timm_dec.finetune checkpoint folder, "
                             "save_pretrained folder or .safetensors file")
    parser.add_argument("--repo-id", metavar="ORG/NAME", help="Hub repo to push to (created if missing)")
    parser.add_argument("--model", metavar="NAME", help="architecture; default the one the checkpoint records")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="create_model kwargs as timm's train.py parses them, e.g. num_classes=10 dec_grid=8 "
                             "(must agree with the checkpoint)")
    parser.add_argument("--metrics", metavar="JSON",
                        help="measured metrics: a JSON file from timm-dec eval / evaluate_scale_consistency, or "
                             "inline JSON")
    parser.add_argument("--dataset", help="name of the fine-tuning / evaluation data, for the card")
    parser.add_argument("--datasets", nargs="+", default=[], metavar="ID",
                        help="Hub dataset ids for the card's metadata, e.g. imagenet-1k")
    parser.add_argument("--label-names", metavar="FILE", help="text file with one class name per line")
    parser.add_argument("--use-ema", action="store_true", help="publish timm's EMA weights (state_dict_ema)")
    parser.add_argument("--output", metavar="DIR", help=f"also keep the Hub folder here ({OUTPUT_FOLDER_RULE})")
    parser.add_argument("--dry-run", action="store_true", help="write the folder (--output) without pushing")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", help="Hub token; default the saved login or $HF_TOKEN")
    parser.add_argument("--commit-message", default="Add timm_dec model")


def _read_label_names(path: str) -> list[str]:
    """``--label-names``: one class name per non-empty line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--label-names file {file} does not exist")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_hub_reachable(repo_id: str) -> None:
    """Before anything is read: the Hub can be reached (else one line at once, not huggingface_hub's retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set: huggingface_hub is offline"
    elif not hub.hub_reachable():
        why = f"{constants.ENDPOINT} cannot be reached (offline? a proxy in HTTPS_PROXY?)"
    else:
        return
    raise OSError(f"--repo-id {repo_id}: cannot push, the Hub cannot be reached ({why}); write the folder only with "
                  f"--dry-run --output DIR and push it later")


def run(args: argparse.Namespace) -> int:
    """``timm-dec push``: checkpoint -> Hub folder with a model card -> one commit on the Hub.

    Every argument is checked before anything is loaded or written; the folder records what the checkpoint records
    (DEC options and data settings), so ``timm-dec eval --model local-dir:FOLDER`` evaluates what ``--checkpoint``
    does.
    """
    if not args.dry_run and not args.repo_id:
        raise ValueError("--repo-id is required (or --dry-run with --output)")
    if args.dry_run and not args.output:
        raise ValueError("--dry-run needs --output DIR")
    if args.repo_id:
        hub.check_repo_id(args.repo_id)
    check_checkpoint_path(args.checkpoint)
    if args.output:
        check_output_folder(args.output, "--output")
    if not args.dry_run:
        _check_hub_reachable(args.repo_id)
    save_kwargs: dict[str, Any] = {"metrics": _read_metrics_arg(args.metrics), "dataset": args.dataset,
                                   "datasets": args.datasets}
    if args.label_names:
        save_kwargs["label_names"] = _read_label_names(args.label_names)
    saved = read_saved(args.checkpoint, use_ema=args.use_ema)
    try:
        model = load_model(saved, model_name=args.model, model_kwargs=args.model_kwargs)
    except KeyError as e:  # timm's lookups (act_layer=..., norm_layer=...) say only the value they did not find
        refused = named_kwarg(args.model_kwargs or {}, e)
        if not refused:
            raise
        raise ValueError(f"--model-kwargs {refused}: the model refuses it (KeyError: {e})") from None
    if saved.data:
        save_kwargs["data"] = saved.data
    if args.output:
        folder = hub.save_pretrained(model, args.output, repo_id=args.repo_id, **save_kwargs)
        print(f"saved {hub.hub_architecture(model)} to {folder}")
    if args.dry_run:
        return 0
    info = hub.push_to_hub(model, args.repo_id, private=args.private, token=args.token,
                           commit_message=args.commit_message, **save_kwargs)
    print(f"pushed {hub.hub_architecture(model)} to {getattr(info, 'commit_url', args.repo_id)}")
    return 0
