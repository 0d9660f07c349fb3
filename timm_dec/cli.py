"""The ``timm-dec`` command: ``demo | eval | bench | push``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__

SUBCOMMANDS = {
    "demo": ("timm_dec.demo", "train base, Aug, InvL, Canon and DEC on locally scaled digits and compare them"),
    "eval": ("timm_dec.evaluate", "accuracy, InvE and per-scale accuracy of any timm model"),
    "bench": ("timm_dec.bench", "benchmarks: 'warp' (the warp op) or 'overhead' (base vs *_dec models)"),
    "push": ("timm_dec.hub", "save a checkpoint as a Hub folder with a model card and push it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-dec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"timm-dec {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
