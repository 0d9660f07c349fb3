"""Checks of arguments that several layers share, made before any work: an output location (a folder or a file) that
can be written and a ``--checkpoint`` that is a checkpoint at all (every command line: ``apps``, ``bench``), and the
int and float arguments of the library's functions and classes (`check_int`, `check_float`: ``ops.random_knots``,
``timm_dec.data``). A leaf: the standard library and numpy only, so that every layer uses the same checks and words.

The rule for output folders: the named folder is created if missing, inside a parent folder that must exist; nothing
above the named folder is ever created. An output file goes into an existing folder (none is created).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

__all__ = ["OUTPUT_FOLDER_RULE", "check_output_folder", "check_output_file", "check_checkpoint_path", "named_kwarg",
           "check_int", "check_float"]

OUTPUT_FOLDER_RULE = "created if missing, in a parent folder that must exist"

PathLike = Union[str, "os.PathLike[str]"]


def _writable(folder: Path, flag: str, path: Path) -> None:
    """A file can be created (and is removed at once) in ``folder``."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e}); choose another path") from None


def _missing_parent(flag: str, path: Path, parent: Path, what: str) -> ValueError:
    if parent.exists():
        return ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    return ValueError(f"{flag} {path}: the folder {parent} does not exist ({what}); create it or choose another path")


def check_output_folder(path: PathLike, flag: str) -> Path:
    """An output folder, checked before any work and not created here: an existing, writable folder, or a folder that
    can be created (its parent exists and is writable; only the named folder will be created, never its parents).

    Returns:
        ``path`` as a `Path`. `ValueError` naming ``flag`` otherwise.
    """
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{flag} {out} is a file, not a folder; name a folder ({OUTPUT_FOLDER_RULE})")
        _writable(out, flag, out)
        return out
    parent = out.absolute().parent
    if not parent.is_dir():
        raise _missing_parent(flag, out, parent, "only the named folder is created, never its parents")
    _writable(parent, flag, out)
    return out


def check_output_file(path: PathLike, flag: str, example: str = "results.json") -> Path:
    """An output file, checked before any work: not a folder, in an existing folder (none is created), writable.

    Returns:
        ``path`` as a `Path`. `ValueError` naming ``flag`` otherwise.
    """
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; name a file (e.g. {out / example})")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise _missing_parent(flag, out, parent, "it is not created")
    if out.exists():
        if not os.access(out, os.W_OK):
            raise ValueError(f"{flag} {out}: the file exists and cannot be written; choose another path")
        return out
    _writable(parent, flag, out)
    return out


def _looks_like_checkpoint(head: bytes) -> bool:
    """The first bytes of a safetensors file (a little-endian header length, then a JSON object), of torch.save's
    zip format, or of a pickle (protocol 2 or later: timm's older .pth.tar)."""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return True
    return len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def check_checkpoint_path(path: PathLike, flag: str = "--checkpoint") -> Path:
    """A ``--checkpoint`` file must begin as a checkpoint does (safetensors, torch.save's zip, a pickle); a missing
    path or a folder is left to the checkpoint reader, which says what it misses, and so is the rest of a file.

    Returns:
        ``path`` as a `Path`. `ValueError` naming ``flag`` for a file that is no checkpoint (a text file, say).
    """
    ckpt = Path(path)
    if not ckpt.is_file():  # missing, or a folder: the reader says what it misses
        return ckpt
    with open(ckpt, "rb") as f:
        head = f.read(16)
    if not _looks_like_checkpoint(head):
        shown = head.decode("ascii", "replace").replace("\ufffd", "?")
        raise ValueError(f"{flag} {ckpt} could not be read as a checkpoint: it is not a safetensors file, a torch "
                         f"checkpoint (.pth, .pth.tar) or a checkpoint folder (it begins with {shown!r})")
    return ckpt


def named_kwarg(kwargs: Mapping[str, Any], error: BaseException) -> str:
    """``KEY=VALUE`` of the ``--model-kwargs`` item an error of ``timm.create_model`` is about (its name quoted, or its
    string value, in the message), or '' (timm's lookups, e.g. ``act_layer=...``, name only the value they missed)."""
    text = str(error)
    for key, value in kwargs.items():
        if f"'{key}'" in text or (isinstance(value, str) and value and value in text):
            return f"{key}={value!r}"
    return ""


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int: an int (numpy's too, not a bool) of at least ``minimum``; `TypeError` or `ValueError`
    naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float: a finite number (numpy's too, not a bool) of at least ``minimum`` (above it with
    ``strict``); `TypeError` or `ValueError` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value}")
    return value
