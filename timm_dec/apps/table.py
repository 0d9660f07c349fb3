"""``timm-dec table``: runs of ``timm-dec demo`` or ``timm-dec segment`` side by side, one Markdown row per run.

Each argument is a run's ``--out`` folder (or its ``summary.json``). A row says which run it is (preset, model), the
score of Base, Aug and the DEC (accuracy for the demo, mIoU for ``segment``), the DEC against Aug and, where they
ran, against Aug+time and Base, with their 95% paired-bootstrap intervals, the DEC's consistency error over Aug's
(InvE for the demo, EquE for ``segment``), the share of its test solves within tol and their mean iterations, the
demo's backward-vs-true-gradient error, and the run's wall time and load average. Nothing is re-measured: every
figure is read from ``summary.json``, as the run printed it.

Example (the README's table across architectures)::

    for p in default swin deit; do timm-dec demo --preset $p --methods aug,dec,aug_time --out across/$p; done
    timm-dec table across/default across/swin across/deit
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["read_summary", "table_row", "markdown_table", "add_arguments", "run"]

# per command: the score (its key in methods.<m>.results, the factor to points), the paired entry of the score, the
# consistency ratio's key in paired.<m> and its name
_KINDS = {
    "demo": dict(score="acc", scale=100.0, name="Acc", ratio="inv_e_ratio", ratio_name="InvE / Aug"),
    "segment": dict(score="miou", scale=1.0, name="mIoU", ratio="eque_ratio", ratio_name="EquE / Aug"),
}
_PAIRS = (("dec", "DEC - Aug"), ("dec_vs_aug_time", "DEC - Aug+time"), ("dec_vs_base", "DEC - Base"),
          ("dec_base_vs_base", "DEC(Base) - Base"))


def read_summary(path: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a run (``path`` is the file or the run's ``--out`` folder); `ValueError` if there is
    none or it is not a run of ``timm-dec demo`` or ``segment`` with a DEC."""
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no summary.json (give a run's --out folder of timm-dec demo or segment)")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not JSON ({e})") from None
    if not isinstance(summary, dict) or summary.get("command") not in _KINDS:
        raise ValueError(f"{file} is not the summary of a timm-dec demo or segment run")
    if "dec" not in summary.get("methods", {}):
        raise ValueError(f"{file}: the run has no DEC (run it with --methods including dec)")
    return summary


def _interval(paired: dict[str, Any], command: str) -> tuple[float, float, float]:
    """(difference, low, high) of the score in points, from a ``paired`` entry of either command."""
    if command == "demo":
        return paired["acc_points"], paired["acc_low"], paired["acc_high"]
    d = paired["miou"]
    return d["diff"], d["low"], d["high"]


def _within_tol(solver: dict[str, Any]) -> float:
    if "within_tol" in solver:
        return float(solver["within_tol"])
    return 1.0 - solver["not_converged"] / max(1, solver["samples"])


def table_row(summary: dict[str, Any]) -> dict[str, str]:
    """One run's row: column name -> text ("-" where the run did not measure it)."""
    command, cfg = summary["command"], summary["config"]
    kind = _KINDS[command]
    methods, paired = summary["methods"], summary.get("paired", {})
    row = {"Run": f"{command} --preset {summary.get('preset')}", "Model": cfg["model"]}
    for method, label in (("base", "Base"), ("aug", "Aug"), ("dec", "DEC")):
        score = methods.get(method, {}).get("results", {}).get(kind["score"])
        row[f"{label} {kind['name']}"] = "-" if score is None else f"{kind['scale'] * score:.2f}"
    for key, label in _PAIRS:
        entry = paired.get(key)
        row[label] = "-" if entry is None else "{:+.2f} [{:+.2f}, {:+.2f}]".format(*_interval(entry, command))
    ratio = paired.get("dec", {}).get(kind["ratio"])
    row[kind["ratio_name"]] = "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.3f}"
    solver = methods["dec"]["results"].get("dec_solver")
    row["within tol"] = "-" if not solver else f"{100 * _within_tol(solver):.2f}%"
    row["iterations"] = "-" if not solver else f"{solver['mean_iterations']:.2f}"
    check = (summary.get("task") or {}).get("dec_evidence", {}).get("gradient_check")
    row["backward off"] = "-" if not check else f"{100 * check['error']:.2f}%"
    machine = summary.get("machine") or {}
    load = machine.get("load_average")
    row["wall (min)"] = f"{summary['wall_seconds'] / 60:.1f}"
    row["threads, load"] = f"{machine.get('torch_threads')}, {load[0]:.2f}" if load else "-"
    return row


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """Rows of `table_row` (of one command) as one Markdown table; a column every row leaves at "-" is left out."""
    columns = [c for c in dict.fromkeys(c for r in rows for c in r) if any(r.get(c, "-") != "-" for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r.get(c, "-") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``timm-dec table`` arguments."""
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a run's --out folder (or its summary.json) of timm-dec demo or segment")


def run(args: argparse.Namespace) -> int:
    """Print one Markdown table per command (demo runs, then segment runs), rows in the order given."""
    summaries = [read_summary(path) for path in args.runs]
    tables = []
    for command in _KINDS:
        rows = [table_row(s) for s in summaries if s["command"] == command]
        if rows:
            tables.append(markdown_table(rows))
    print("\n\n".join(tables))
    return 0
