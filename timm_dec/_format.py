"""JSON and text formatting shared by the library, the I/O modules, the benchmarks and the applications.

Three JSON rules, one per use, each for its own reason:

* `jsonable`: strict, for the DEC options written to ``config.json`` and checkpoint records, which must rebuild the
  model: a non-finite float or an object is an error naming the option.
* `plain`: lenient, for records that only describe (training args, data settings, run signatures): tuples become
  lists, a non-finite float and any other object become their ``repr`` (``'nan'``, ``'inf'``).
* `json_default`: the ``default=`` hook of ``json.dumps`` for metric and benchmark results: tensors and numpy values
  become numbers and lists; non-finite floats are written as JSON's ``NaN`` / ``Infinity`` by ``json.dumps`` itself.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

__all__ = ["jsonable", "plain", "json_default", "read_json_object", "format_scale", "format_table",
           "format_per_scale_table"]


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in the file ``path``; a `ValueError` naming it as ``what`` (e.g. "config") if it cannot be read,
    is not JSON or holds something other than an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def jsonable(value: Any, what: str) -> Any:
    """``value`` as JSON data (tuples become lists); `ValueError` / `TypeError` naming ``what`` if it is not data."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v, what) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what} = {value} cannot be written to config.json")
        return value
    raise TypeError(f"{what} = {value!r} ({type(value).__name__}) cannot be written to config.json")


def plain(value: Any) -> Any:
    """JSON data for a descriptive record: mappings get string keys, tuples become lists, a non-finite float or any
    other object becomes its repr."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return repr(value)


def json_default(obj: Any) -> Any:
    """``json.dumps(..., default=json_default)`` for metric and benchmark results: tensors and numpy scalars and
    arrays become numbers and lists."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def format_scale(scale: Union[float, Sequence[float]]) -> str:
    """A scale as tables, cards and logs print it: ``0.7``, or ``(0.7,1.3)`` for per-part scales."""
    if isinstance(scale, (list, tuple)):
        return "(" + ",".join(f"{float(v):g}" for v in scale) + ")"
    return f"{float(scale):g}"


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Paper Table 2 layout: one row per method, Acc (%) and InvE (1e-2, i.e. 100 x the raw value)."""
    width = max(8, *(len(n) for n in results))
    lines = [f"{'Method':<{width}}  {'Acc (%)':>8}  {'InvE (1e-2)':>11}"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {100 * r['acc']:>8.2f}  {100 * r['inv_e']:>11.2f}")
    return "\n".join(lines)


def format_per_scale_table(results: Mapping[str, Mapping[str, Any]], key: str = "per_scale_acc") -> str:
    """Paper Table 3 layout: accuracy (%) per scale (or per bin with ``key="per_bin_acc"``) and their mean +- std."""
    first = next(iter(results.values()))
    cols = ([f"[{lo:g},{hi:g}]" for lo, hi in first["scale_bins"]] if key == "per_bin_acc"
            else [format_scale(s) for s in first["scales"]])
    width = max(8, *(len(n) for n in results))
    cw = max(6, *(len(c) for c in cols))
    lines = [f"{'Scale':<{width}}  " + "  ".join(f"{c:>{cw}}" for c in cols) + f"  {'Overall':>14}"]
    for name, r in results.items():
        accs = [100 * a for a in r[key]]
        spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        overall = f"{statistics.fmean(accs):.2f} ± {spread:.2f}"
        lines.append(f"{name:<{width}}  " + "  ".join(f"{a:>{cw}.2f}" for a in accs) + f"  {overall:>14}")
    return "\n".join(lines)
