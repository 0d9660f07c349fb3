"""The timm-dec command: demo | eval | segment | bench | push | table.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``. A user
error (a bad file, a missing folder, options that contradict a checkpoint, no CUDA, no network, ...) ends with one
line ``timm-dec <cmd>: error: <message>`` on stderr and exit status 2; ``--debug`` (or ``TIMM_DEC_DEBUG=1``) shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Optional, Sequence

from timm.utils import ParseKwargs

from . import __version__

__all__ = ["SUBCOMMANDS", "CheckedParseKwargs", "build_parser", "error_line", "main"]

SUBCOMMANDS = {
    "demo": ("timm_dec.apps.demo", "train base, Aug, InvL, Canon and DEC on locally scaled digits and compare them"),
    "segment": ("timm_dec.apps.segment", "semantic segmentation of locally scaled digit scenes: Base, Aug, AugL, "
                                         "Canon, DEC; mIoU, EquE, paired intervals"),
    "eval": ("timm_dec.apps.evaluate", "accuracy, InvE and per-scale accuracy of any timm model"),
    "bench": ("timm_dec.bench", "benchmarks: 'warp' (the warp op), 'overhead' (base vs *_dec models) or 'gpu' "
                                "(the one-shot GPU check)"),
    "push": ("timm_dec.apps.push", "save a checkpoint as a Hub folder with a model card and push it"),
    "table": ("timm_dec.apps.table", "runs of demo or segment side by side: one Markdown row per run, read from "
                                     "their summary.json"),
}
DESCRIPTION = ("timm-dec: local scale consistency for timm vision transformers with the Deep Equilibrium "
               "Canonicalizer (DEC). Run 'timm-dec COMMAND --help' for the options of a command.")


class CheckedParseKwargs(ParseKwargs):
    """timm's ``ParseKwargs`` (``--model-kwargs KEY=VALUE ...``) with argparse's error for an item without ``=`` or
    whose KEY is not a name (``=5``), instead of a traceback from inside the parser or a refusal after it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        bad = [v for v in values if v and "=" not in v]
        if bad:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE items, got {bad[0]!r} (e.g. dec_grid=8)")
        bad = [v for v in values if v and not v.split("=", 1)[0].strip().isidentifier()]
        if bad:
            raise argparse.ArgumentError(self, f"malformed KEY=VALUE item {bad[0]!r}: KEY must be a keyword argument "
                                               f"name (e.g. img_size=64)")
        super().__call__(parser, namespace, values, option_string)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` (as timm's validate.py uses) without ``(default: None)`` / ``False`` noise:
    a default is shown when it is a value, and when the help text does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default == {} or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-dec", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"timm-dec {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line (also TIMM_DEC_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        # defaults shown in --help, as timm's validate.py does (demo and bench word their defaults themselves)
        formatter = DefaultsHelpFormatter if name in ("eval", "push") else argparse.HelpFormatter
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common],
                                  formatter_class=formatter)
        sub.register("action", ParseKwargs, CheckedParseKwargs)  # action=ParseKwargs gets the checked one
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def error_line(error: BaseException) -> str:
    """An exception as one line of text: its message (a DataLoader worker's wrapper reduced to the original error),
    whitespace runs joined; the exception's type name when it has no message."""
    text = str(error).strip()
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "worker" in lines[0]:
        lines = lines[-1:]  # torch's DataLoader: "Caught X in DataLoader worker ... Original Traceback ... X: msg"
    text = " ".join(" ".join(lines).split())
    return text or type(error).__name__


def _debug_wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("TIMM_DEC_DEBUG", "") not in ("", "0")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if _debug_wanted(args):
            raise
        print(f"timm-dec {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int) or _debug_wanted(args):
            raise
        message = str(e.code)
        prefix = f"timm-dec {args.command}: "
        message = message[len(prefix):] if message.startswith(prefix) else message
        message = message[len("error: "):] if message.startswith("error: ") else message
        print(f"timm-dec {args.command}: error: {error_line(SystemExit(message))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (every error becomes one line; --debug shows the traceback)
        if _debug_wanted(args):
            raise
        print(f"timm-dec {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
