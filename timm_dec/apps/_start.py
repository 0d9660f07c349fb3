"""Shipped shared starts: the weights an application's default preset starts from, written by the application's own
``--write-start DIR`` command, with the configuration that made them and their SHA-256 in ``<prefix>_start.json``.

A start is loaded only if the run's configuration agrees with the recorded one on every key that determines it, and
every file's hash matches; otherwise the error names the differing keys (or the file) and the way out.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import safetensors.torch
import torch

from .._format import json_default
from ..checkpoint import write_safetensors

__all__ = ["PACKAGE_DIR", "start_record", "write_start", "load_start", "shared_start"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def start_record(cfg: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The configuration values that determine a start, as JSON would store them (tuples as lists)."""
    return json.loads(json.dumps({k: cfg[k] for k in keys}, default=json_default))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_start(folder: Path, prefix: str, record: dict[str, Any], states: Mapping[str, Mapping[str, torch.Tensor]],
                made_with: str) -> Path:
    """Write ``<prefix>_<name>.safetensors`` for each state dict in ``states`` and ``<prefix>_start.json``.

    Args:
        folder: where to write (created if missing).
        prefix: the preset's name.
        record: `start_record` of the run's configuration.
        states: name -> state dict (e.g. ``{"plain": ..., "aug": ...}``).
        made_with: the command that made the start, recorded for the reader.

    Returns:
        The path of the ``.json`` record.
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"config": record, "files": {}, "made_with": made_with}
    for name, state in states.items():
        path = folder / f"{prefix}_{name}.safetensors"
        write_safetensors(path, state)  # no metadata: the file's hash depends on the weights alone
        meta["files"][name] = {"file": path.name, "sha256": _sha256(path)}
    out = folder / f"{prefix}_start.json"
    out.write_text(json.dumps(meta, indent=2, default=json_default) + "\n", encoding="utf-8")
    return out


def load_start(folder: Path, prefix: str, record: dict[str, Any],
               scratch_flag: str = "--from-scratch") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The start ``<prefix>_start.json`` in ``folder``, checked against ``record`` and the recorded hashes.

    Returns:
        (name -> state dict, the record read with ``source`` added). `ValueError` if the start is missing, was made
        with other values of some key of ``record``, or a file's hash differs.
    """
    meta = folder / f"{prefix}_start.json"
    if not meta.is_file():
        raise ValueError(f"no shipped start for preset {prefix!r} ({meta}); run with {scratch_flag}")
    stored = json.loads(meta.read_text(encoding="utf-8"))
    differ = [k for k, v in record.items() if v != stored["config"].get(k)]
    if differ:
        raise ValueError(f"the shipped start of preset {prefix!r} was made with other values of {', '.join(differ)}; "
                         f"run with {scratch_flag} to train the start for this configuration")
    states = {}
    for name, entry in stored["files"].items():
        path = folder / entry["file"]
        if not path.is_file() or _sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} is missing or does not match the SHA-256 recorded in {meta.name}; reinstall "
                             f"timm-dec or run with {scratch_flag}")
        states[name] = safetensors.torch.load_file(str(path))
    return states, dict(stored, source=str(folder))


def shared_start(app: str, preset: str, cfg: Mapping[str, Any], keys: Sequence[str], folder: Path,
                 write_to: Optional[str], train: Callable[[], dict[str, dict[str, torch.Tensor]]]
                 ) -> Optional[tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]]:
    """The run's shared start: trained with ``train()`` when ``cfg["start"]`` is ``"scratch"`` or ``write_to`` is
    given, else the shipped one in ``folder``.

    Returns:
        (name -> state dict, where it came from), or None once the trained start is written to ``write_to`` (the
        ``--write-start`` run ends there).
    """
    if not write_to and cfg["start"] != "scratch":
        return load_start(folder, preset, start_record(cfg, keys))
    states = train()
    if not write_to:
        return states, {"source": "trained in this run"}
    meta = write_start(Path(write_to), preset, start_record(cfg, keys), states,
                       f"timm-dec {app} --preset {preset} --write-start DIR --seed {cfg['seed']}")
    print(f"wrote the shared start: {meta}")
    return None
