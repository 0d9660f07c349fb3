"""Saved models: the one record, the one writer and the one loader of timm_dec.

**The record.** `model_record` builds what every saved model carries: timm's Hub ``config.json`` (``architecture``,
``num_classes``, ``num_features``, ``global_pool``, ``pretrained_cfg`` with the preprocessing, ``model_args`` holding
the ``create_model`` kwargs and every ``dec_*`` option) plus a ``timm_dec`` section: ``version``, the ``data``
settings, ``metrics``, and for a wrapped model its ``wrapper`` (the class, the task, the arguments that rebuild it).

**The writer.** `save_model` writes a model with its record in one of two forms: a folder (``config.json`` +
``model.safetensors``: timm's own saved form, so ``timm.create_model("local-dir:FOLDER", pretrained=True)`` reads it;
`timm_dec.hub.save_pretrained` adds the model card) or a single ``.safetensors`` file with the record as JSON in its
metadata (key ``"timm_dec"``). The demo's and ``timm-dec segment``'s checkpoints, each ``timm_dec.finetune``
checkpoint folder (accelerate writes its ``model.safetensors``; `save_model` adds the ``config.json``) and
``save_pretrained`` / ``push`` all go through it; `write_safetensors` is the one place weights are written.

**The loader.** `load_model` turns any saved model into a model: a saved folder (``save_pretrained``, a finetune
checkpoint), ``local-dir:FOLDER`` / ``hf-hub:ORG/NAME``, the single-file form, timm's ``train.py`` ``.pth.tar`` (read
with ``torch.load(weights_only=True)``; argparse's ``Namespace`` of the training args allowed as plain data) and a bare
``.safetensors`` (with ``model_name``). `read_saved` reads one without building it (`read_record`: the record alone).
Files written before the unified record still load: the demo's flat record, ``timm-dec segment``'s
``"timm_dec_segment"`` record and finetune folders with only a ``state.json``. The model is rebuilt with the options
the record holds, requested ``dec_*`` options are compared with them in `timm_dec.models.check_dec_options`, and the
weights are loaded strictly (`timm_dec.models.load_dec_state_dict`). Nothing unpickles arbitrary objects.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union
from urllib.parse import urlsplit

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from . import __version__
from ._compat import hf_split, timm_hub_config, timm_model_args
from ._format import jsonable, plain, read_json_object
from ._options import mismatch_message, same_dec_option
from .models import (
    CHECKPOINT_METADATA_KEY,
    DECModelMixin,
    DECOptionError,
    base_model_name,
    check_dec_options,
    dec_blocks_in,
    dec_options,
    default_dec_options,
    load_dec_state_dict,
    read_checkpoint_record,
)

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "TRAINING_STATE_NAME", "CHECKPOINT_METADATA_KEY", "SavedModel", "model_record",
    "save_model", "write_safetensors", "check_pretrained", "read_record", "read_saved", "load_model",
    "saved_folder", "hub_reachable", "upgrade_record", "record_wrapper",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"  # also the name accelerate's save_state gives the weights of a finetune checkpoint
# the resume state (step, schedule, run signature) `timm_dec.finetune` writes beside each checkpoint's saved model
TRAINING_STATE_NAME = "state.json"
# the metadata key of ``timm-dec segment``'s checkpoints before the unified record (read, never written)
LEGACY_SEGMENT_KEY = "timm_dec_segment"

PathLike = Union[str, os.PathLike]


def _is_dec_name(arch: str) -> bool:
    try:
        base_model_name(arch)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# the record and the writer
# ---------------------------------------------------------------------------------------------------------------------

def _timm_model_inside(model: nn.Module) -> nn.Module:
    """``model`` itself when timm built it, else the first timm model inside it (a wrapper such as Canon may
    forward ``pretrained_cfg`` but is not what ``create_model`` built)."""
    for module in model.modules():
        timm_class = type(module).__module__.startswith(("timm.", "timm_dec.models"))
        if (timm_model_args(module) is not None or timm_class) and getattr(module, "pretrained_cfg", None):
            return module
    raise TypeError(f"{type(model).__name__} holds no timm model (no pretrained_cfg): create it with "
                    f"timm.create_model")


# the pretrained-cfg entries that say how the weights expect their input (timm's data config besides the input size)
PREPROCESSING = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


def _preprocessing(cfg: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The `PREPROCESSING` entries of a pretrained cfg (or train.py args) that are set."""
    return {k: cfg[k] for k in PREPROCESSING if (cfg or {}).get(k) is not None}


def model_record(
        model: nn.Module,
        *,
        data: Optional[Mapping[str, Any]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        wrapper: Optional[Mapping[str, Any]] = None,
        architecture: Optional[str] = None,
        label_names: Optional[list[str]] = None,
        label_descriptions: Optional[Mapping[str, str]] = None,
        data_config: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The record a saved ``model`` carries: the ``config.json`` of its folder, or the metadata of its single file.

    Args:
        model: a timm model, or a module wrapping one (Canon's `InputCanonicalizer`, a segmenter): the record
            describes the first timm model inside it, and names the wrapper.
        data: the data settings the weights were trained with (``num_digits``, ``canvas``, ...; ``timm-dec eval``
            takes its defaults from them), under ``timm_dec.data``.
        metrics: measured metrics (already checked), under ``timm_dec.metrics``.
        wrapper: for a wrapped model, what rebuilds the wrapper: ``task`` (default ``"classification"``), ``args``
            (its constructor arguments besides the timm model), ``load_with`` (the function that rebuilds it), ...;
            its ``class`` and ``prefix`` (where the timm model's weights sit in its state dict) are added.
        architecture: the name to record instead of ``pretrained_cfg["architecture"]`` (an adapted instance's
            ``*_dec`` name).
        label_names, label_descriptions: the class names, where timm's loader reads them.
        data_config: the preprocessing used in training, recorded in ``pretrained_cfg``; default the model's own.

    Returns:
        timm's Hub config (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``, ``model_args``
        with every ``dec_*`` option) with a ``timm_dec`` section: ``version``, ``metrics``, ``data``, ``wrapper``.

    Raises:
        TypeError: no timm model inside ``model``, or a DEC option or data setting that is not JSON data.
    """
    inner = _timm_model_inside(model)
    section: dict[str, Any] = {"version": __version__, "metrics": dict(metrics) if metrics is not None else None}
    if data:
        section["data"] = {str(k): jsonable(v, f"data setting {k}") for k, v in data.items()}
    if inner is not model or wrapper:
        prefix = next(name for name, module in model.named_modules() if module is inner)
        section["wrapper"] = {"class": type(model).__name__, "prefix": f"{prefix}." if prefix else "",
                              **plain(dict(wrapper or {}))}
    model_config: dict[str, Any] = {"timm_dec": section}
    if architecture:
        model_config["pretrained_cfg"] = {"architecture": architecture}
    if label_names is not None:
        model_config["label_names"] = list(label_names)
    if label_descriptions is not None:
        model_config["label_descriptions"] = dict(label_descriptions)
    options = {k: jsonable(v, k) for k, v in dec_options(inner).items()}
    return timm_hub_config(inner, model_config=model_config, model_args=options,
                           data_config=dict(data_config) if data_config is not None else None)


def write_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` (detached, on the CPU, contiguous) to a ``.safetensors`` file with ``metadata``, creating
    its parent folder: the one place timm_dec writes weights (`save_model`, the shared starts; tests/test_layout.py
    keeps it so). Without ``metadata`` the file has no metadata header, so its bytes (and a shared start's recorded
    SHA-256) depend on the tensors alone.

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                                metadata=None if metadata is None else dict(metadata))
    return path


def save_model(model: nn.Module, path: PathLike, *, record: Optional[Mapping[str, Any]] = None,
               weights: bool = True, **record_kwargs: Any) -> Path:
    """Write ``model`` with its record (`model_record`): the one writer of saved models.

    Args:
        model: the model (a timm model, or a wrapper around one).
        path: a ``.safetensors`` file (the single-file form: the record as JSON under the metadata key
            ``"timm_dec"``), or a folder (``config.json`` + ``model.safetensors``, timm's saved form). Parent folders
            are created only now, so a run that fails before its first save leaves no empty folder.
        record: the record to write; default ``model_record(model, **record_kwargs)``.
        weights: write the weights; False for a folder whose ``model.safetensors`` another writer made
            (accelerate's ``save_state`` in a finetune checkpoint).
        **record_kwargs: `model_record`'s options (``data``, ``metrics``, ``wrapper``, ...).

    Returns:
        The path.
    """
    path = Path(path)
    record = dict(record) if record is not None else model_record(model, **record_kwargs)
    if path.suffix == ".safetensors":
        return write_safetensors(path, model.state_dict(), {CHECKPOINT_METADATA_KEY: json.dumps(record)})
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
    if weights:
        write_safetensors(path / WEIGHTS_NAME, model.state_dict())
    return path


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------

def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, reading only its header; ValueError if it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing (timm_dec reads only {WEIGHTS_NAME})")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _safetensors_keys(path)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e


def _check_architecture(arch: Any, source: str) -> str:
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{source} names no architecture")
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch.split('.')[0][-12:]}*")[:5]
        raise ValueError(
            f"{source} names architecture {arch!r}, which neither timm nor timm_dec {__version__} registers"
            + (f" (similar: {near})" if near else "")
            + "; check the name, or update timm / timm_dec if it comes from a newer version")
    return arch


def check_pretrained(folder: PathLike) -> dict[str, Any]:
    """Check a saved folder before loading it, with a clear error for each way it can be broken.

    Args:
        folder: a folder from `save_model` / `save_pretrained` (or a Hub snapshot of one, a finetune checkpoint).

    Returns:
        Its parsed ``config.json`` (the record).

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: unreadable config, unknown architecture, a weights file that is not safetensors, or DEC
            parameters for other blocks than the config's ``dec_blocks``.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it a folder written by save_pretrained?")
    config = read_json_object(config_path, "config")
    _check_architecture(config.get("architecture"), f"{config_path}")
    keys = _safetensors_keys(folder / WEIGHTS_NAME)
    model_args = config.get("model_args") or {}
    if "dec_blocks" in model_args:
        expected = dec_blocks_in(f"dec.{b}." for b in model_args["dec_blocks"])  # "input" first, then sorted
        found = dec_blocks_in(k[len(_prefix(config)):] for k in keys if k.startswith(_prefix(config)))
        if expected != found:
            raise ValueError(
                f"the DEC options of {config_path} (dec_blocks={expected}) do not match {folder / WEIGHTS_NAME}, "
                f"which holds DEC parameters for blocks {found}")
    return config


def record_wrapper(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``timm_dec.wrapper`` entry of a record (`model_record`): what wraps the timm model (``class``, ``prefix``,
    and for a task model ``task``, ``args``, ``load_with``); {} for an unwrapped model."""
    return dict((record.get("timm_dec") or {}).get("wrapper") or {})


def _prefix(record: Mapping[str, Any]) -> str:
    """Where a wrapper keeps the timm model's weights in its state dict (``""`` for an unwrapped model)."""
    return str(record_wrapper(record).get("prefix") or "")


# --- the records written before the unified one --------------------------------------------------------------------

def _finetune_data(args: Mapping[str, Any]) -> dict[str, Any]:
    """The digits settings a `timm_dec.finetune` run recorded in its args (a ``state.json`` of before the record)."""
    if args.get("data") != "digits":
        return {}
    data = {k: args[k] for k in ("num_digits", "digit_size", "scale_range") if args.get(k) is not None}
    if args.get("img_size"):
        data["canvas"] = args["img_size"]
    return data


def upgrade_record(record: Mapping[str, Any], kind: str = "timm_dec") -> dict[str, Any]:
    """A record in today's layout (see `model_record`), from any layout timm_dec has written.

    Args:
        record: the JSON record.
        kind: what it is: ``"timm_dec"`` (a single file's metadata: the demo's flat layout of before --
            ``architecture``, ``model_args``, ``pretrained_cfg``, ``timm_dec_version``, ``wrapper``, ``data`` -- or
            today's), ``"timm_dec_segment"`` (``timm-dec segment``'s: ``method``, ``model``, ``model_kwargs``,
            ``canon_warps``) or ``"state"`` (a finetune ``state.json`` of before: ``model``, ``model_kwargs``,
            ``args``).
    """
    if kind == "timm_dec" and isinstance(record.get("timm_dec"), Mapping):
        return dict(record)
    if kind == LEGACY_SEGMENT_KEY:
        kwargs = dict(record.get("model_kwargs") or {})
        canon = {"num_warps": record["canon_warps"]} if record.get("canon_warps") else None
        wrapper = {"class": "DigitSegmenter", "task": "segmentation", "method": record.get("method"),
                   "args": {"patch": kwargs.get("patch_size"), "canon": canon},
                   "load_with": "timm_dec.apps.segment.load_checkpoint"}
        return {"architecture": record.get("model"), "model_args": kwargs,
                "timm_dec": {"version": None, "metrics": None, "wrapper": wrapper}}
    if kind == "state":
        return {"architecture": record.get("model"), "model_args": dict(record.get("model_kwargs") or {}),
                "timm_dec": {"version": None, "metrics": None, "data": _finetune_data(record.get("args") or {})}}
    section: dict[str, Any] = {"version": record.get("timm_dec_version"), "metrics": None,
                               "data": dict(record.get("data") or {})}
    if record.get("wrapper"):
        section["wrapper"] = {"class": record["wrapper"]}
    return {"architecture": record.get("architecture"), "model_args": dict(record.get("model_args") or {}),
            "pretrained_cfg": dict(record.get("pretrained_cfg") or {}), "timm_dec": section}


def _file_record(path: Path) -> dict[str, Any]:
    """The record in a ``.safetensors`` file's metadata (today's or a legacy one), upgraded; {} for none."""
    _safetensors_keys(path)
    for key in (CHECKPOINT_METADATA_KEY, LEGACY_SEGMENT_KEY):
        record = read_checkpoint_record(path, key)
        if record:
            return upgrade_record(record, key)
    return {}


def read_record(source: PathLike) -> dict[str, Any]:
    """The record of a saved model, read without its weights and upgraded to today's layout (`upgrade_record`):
    a folder's ``config.json`` (or a finetune ``state.json`` of before), a ``.safetensors`` file's metadata; {} for a
    file that records nothing (a bare ``.safetensors``, timm's ``.pth.tar``).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: an unreadable record or file.
    """
    path = Path(os.fspath(source).removeprefix("local-dir:"))
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return read_json_object(path / CONFIG_NAME, "config")
        if (path / TRAINING_STATE_NAME).is_file():
            return upgrade_record(read_json_object(path / TRAINING_STATE_NAME, "training state"), "state")
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return _file_record(path) if path.suffix == ".safetensors" else {}


@dataclass
class SavedModel:
    """A saved model as read by `read_saved`, not yet built.

    Attributes:
        state_dict: the weights (a wrapper's, for a wrapped model).
        architecture: the timm model name it records, or None (a bare ``.safetensors`` file).
        model_kwargs: the ``create_model`` kwargs it records (the DEC options among them).
        description: names it in messages, e.g. ``"timm checkpoint last.pth.tar"``.
        data: the data settings it records (``num_digits``, ``canvas``, ``digit_size``, ``scale_range``), or {}.
        wrapper: the class name of a wrapper around the timm model (``"InputCanonicalizer"`` for Canon,
            ``"DigitSegmenter"``), or None.
        preprocessing: the input preprocessing the weights were trained with (`PREPROCESSING`: mean, std, ...), as
            far as it records it; {} when it records none (the architecture's default cfg applies).
        record: the whole record (see `model_record`), {} for a file that records nothing.
    """
    state_dict: dict[str, torch.Tensor]
    architecture: Optional[str]
    model_kwargs: dict[str, Any]
    description: str
    data: dict[str, Any] = field(default_factory=dict)
    wrapper: Optional[str] = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def _saved(state_dict: dict[str, torch.Tensor], record: Mapping[str, Any], description: str) -> SavedModel:
    section = record.get("timm_dec") or {}
    return SavedModel(state_dict, record.get("architecture"),
                      {k: v for k, v in (record.get("model_args") or {}).items() if k != "pretrained_model_args"},
                      description, data=dict(section.get("data") or {}),
                      wrapper=record_wrapper(record).get("class"),
                      preprocessing=_preprocessing(record.get("pretrained_cfg")), record=dict(record))


def read_saved(source: Union[PathLike, SavedModel], use_ema: bool = False,
               cache_dir: Optional[PathLike] = None) -> SavedModel:
    """Read any saved model or checkpoint (see `load_model`) without building a model.

    Raises:
        FileNotFoundError: no such checkpoint, or a folder that is no saved model.
        ValueError: an unreadable or corrupt file, or ``use_ema`` for a checkpoint without EMA weights.
        OSError: an ``hf-hub:`` model that is not cached, offline.
    """
    if isinstance(source, SavedModel):
        return source
    text = os.fspath(source)
    named = text.startswith(("local-dir:", "hf-hub:"))
    path = saved_folder(text, cache_dir)[0] if named else Path(text)
    if use_ema and (path.is_dir() or path.suffix == ".safetensors"):
        raise ValueError(
            f"use_ema (--use-ema): {path} holds one set of weights and no EMA weights (only timm's train.py "
            f".pth.tar keeps them, as state_dict_ema); leave --use-ema out")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            what = (f"timm_dec.finetune checkpoint {path}" if (path / TRAINING_STATE_NAME).is_file()
                    else f"the saved model {text}")
            return _saved(_load_safetensors(path / WEIGHTS_NAME), check_pretrained(path), what)
        if not (path / TRAINING_STATE_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is neither a saved model ({CONFIG_NAME} + {WEIGHTS_NAME}: save_pretrained, timm_dec.finetune) "
                f"nor a timm_dec.finetune checkpoint of before ({TRAINING_STATE_NAME} + {WEIGHTS_NAME})")
        return _saved(_load_safetensors(path / WEIGHTS_NAME), read_record(path),
                      f"timm_dec.finetune checkpoint {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state_dict = _load_safetensors(path)
        record = _file_record(path)
        if not record and path.name == WEIGHTS_NAME and read_record(path.parent):
            return _saved(state_dict, read_record(path.parent), f"safetensors file {path}")  # in a saved folder
        return _saved(state_dict, record, f"{'checkpoint' if record else 'safetensors file'} {path}")
    return _read_timm_checkpoint(path, use_ema)


def _read_timm_checkpoint(path: Path, use_ema: bool) -> SavedModel:
    """A timm train.py checkpoint, unpickled with ``weights_only=True`` (tensors and plain data only)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} could not be read as a timm checkpoint with torch.load(weights_only=True), which refuses "
            f"anything but tensors and plain data (truncated or corrupt, or not a checkpoint?): {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    key = "state_dict_ema" if use_ema else "state_dict"
    if key not in ckpt:
        available = [k for k in ("state_dict", "state_dict_ema") if k in ckpt]
        raise ValueError(f"{path} has no {key!r} (it has {available or list(ckpt)[:8]})")
    from timm.models import clean_state_dict
    state_dict = clean_state_dict(ckpt[key])
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    # what timm's train.py passes to create_model besides its --model-kwargs
    kwargs = dict(args.get("model_kwargs") or {})
    for arg_name, kwarg in (("num_classes", "num_classes"), ("in_chans", "in_chans"), ("gp", "global_pool")):
        if args.get(arg_name) is not None:
            kwargs.setdefault(kwarg, args[arg_name])
    input_size = args.get("input_size")
    img_size = args.get("img_size") or (tuple(input_size[1:]) if input_size else None)
    if img_size is not None:
        kwargs.setdefault("img_size", img_size)
    return SavedModel(state_dict, ckpt.get("arch") or args.get("model"), kwargs, f"timm checkpoint {path}",
                      preprocessing=_preprocessing(args))  # train.py's --mean, --std, ... when given


# ---------------------------------------------------------------------------------------------------------------------
# hf-hub: sources
# ---------------------------------------------------------------------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface_hub's endpoint (``HF_ENDPOINT``, default https://huggingface.co) accepts a TCP connection
    within ``timeout`` seconds; no request is made. Behind a proxy (``HTTPS_PROXY``, ``ALL_PROXY``) it is assumed
    reachable, as only the proxy knows."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def saved_folder(source: PathLike, cache_dir: Optional[PathLike] = None) -> tuple[Path, bool]:
    """The folder a saved-model source names (``local-dir:FOLDER``, ``hf-hub:ORG/NAME[@REV]`` or a folder), and
    whether it was read offline: an ``hf-hub:`` model is downloaded (``config.json`` and the weights), or read from
    huggingface_hub's cache when ``HF_HUB_OFFLINE`` is set or the Hub cannot be reached.

    Raises:
        OSError: an ``hf-hub:`` model that is not cached while offline (said at once, not after retries).
    """
    source = os.fspath(source)
    if not source.startswith("hf-hub:"):
        return Path(source.removeprefix("local-dir:")), False
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = hf_split(source[len("hf-hub:"):])
    offline = constants.HF_HUB_OFFLINE or not hub_reachable()
    try:
        paths = [hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir, local_files_only=offline)
                 for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except LocalEntryNotFoundError:
        if not offline:
            raise
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               f"{constants.ENDPOINT} cannot be reached (offline?)")
        raise OSError(f"{source} is not in huggingface_hub's cache and {why}: load a downloaded folder with "
                      f"local-dir:FOLDER, or a weights file with --checkpoint FILE") from None
    return Path(paths[0]).parent, offline


# ---------------------------------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------------------------------

def load_model(
        source: Union[PathLike, SavedModel],
        *,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        use_ema: bool = False,
        allow_base: bool = False,
        wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
        cache_dir: Optional[PathLike] = None,
) -> nn.Module:
    """Rebuild the model a saved model or checkpoint records and load its weights strictly: the one loader.

    Supported: a saved folder (``config.json`` + ``model.safetensors``: `save_model`, ``save_pretrained``, a
    `timm_dec.finetune` checkpoint), ``local-dir:FOLDER`` / ``hf-hub:ORG/NAME`` (downloaded, or read from the cache
    offline), a ``.safetensors`` file from `save_model` (the demo's and the segmenter's checkpoints), timm's
    ``train.py`` output (``.pth.tar``: ``state_dict``, ``arch`` and ``args``; read with
    ``torch.load(weights_only=True)``), a bare ``.safetensors`` file (``model_name`` required), the formats of before
    the unified record (see `upgrade_record`), or a `SavedModel` already read (`read_saved`).

    Args:
        source: the saved model.
        model_name: architecture; default the one recorded, which it must be when one is (or its base, its ``*_dec``
            twin or an alias; a pretrained tag is allowed, and the recorded preprocessing is used under it).
        model_kwargs: ``timm.create_model`` kwargs; they extend the recorded ones (``num_classes``, ``dec_*``, ...).
            A ``dec_*`` option that contradicts the one the weights were trained with is an error -- also one the
            record does not name, when it records the architecture (the others were the defaults) -- except the
            solve budget (`timm_dec._options.OVERRIDABLE`), which may differ (a warning says so once).
        use_ema: take timm's ``state_dict_ema`` instead of ``state_dict`` (an error for the other kinds, which hold
            no EMA weights).
        allow_base: accept weights without DEC weights for a ``*_dec`` model (its DEC starts at the identity), as
            ``timm-dec eval`` does.
        wrap: called with the built timm model before the weights are loaded, returning the module the weights are
            for (Canon's `InputCanonicalizer`, a segmenter); needed when the record names a wrapper.
        cache_dir: huggingface_hub's cache for an ``hf-hub:`` source.

    Returns:
        The model (the wrapper, with ``wrap``) in eval mode.

    Raises:
        FileNotFoundError: no such checkpoint, or missing weights.
        ValueError: unreadable or corrupt file, unknown architecture, another architecture than the recorded one,
            DEC options that do not match the record (`DECOptionError`, a ValueError), a wrapper's weights without
            ``wrap``, or weights that do not fit the model.
    """
    saved = read_saved(source, use_ema, cache_dir)
    what = saved.description
    arch = _checked_architecture(saved, model_name)
    recorded = dict(saved.model_kwargs)
    requested = dict(model_kwargs or {})
    check_dec_options(requested, recorded, what)
    kwargs = {**recorded, **requested}
    if saved.preprocessing and "pretrained_cfg_overlay" not in kwargs:
        kwargs["pretrained_cfg_overlay"] = _recorded_preprocessing(saved, arch)
    dec_kwargs = sorted(k for k in kwargs if k.startswith("dec_"))
    if dec_kwargs and not _is_dec_name(arch):
        raise ValueError(
            f"{what} has DEC options ({', '.join(dec_kwargs)}), but {arch} has no DEC; use its '*_dec' name")
    model = timm.create_model(arch, pretrained=False, **kwargs)
    options = dec_options(model)
    check_dec_options(options, recorded, what, say=False)
    unnamed = [k for k in requested if k.startswith("dec_") and k not in recorded]
    if unnamed and saved.architecture and _same_arch(arch, saved.architecture):
        # the weights were trained with the options recorded and the defaults (DECConfig's) for the others
        trained = default_dec_options(model)
        for key in unnamed:
            check_dec_options(options, trained, what, keys=[key], fix=f"it records no {key}, so it was trained "
                              f"with the default: leave {key} out")
    model = _wrapped(model, saved, wrap)
    _load_strict(model, saved.state_dict, what, arch, allow_base=allow_base)
    return model.eval()


def _wrapped(model: nn.Module, saved: SavedModel, wrap: Optional[Callable[[nn.Module], nn.Module]]) -> nn.Module:
    """``wrap(model)``, which must be the wrapper the record names; without ``wrap``, a wrapper's weights are refused
    with what reads them."""
    what = saved.description
    if wrap is not None:
        model = wrap(model)
        if saved.wrapper and type(model).__name__ != saved.wrapper:
            raise ValueError(f"{what} holds the weights of a {saved.wrapper}, not of a {type(model).__name__}")
        return model
    if saved.wrapper:
        loader = record_wrapper(saved.record).get("load_with")
        hint = (" (the Canon baseline): pass --canon with its options" if saved.wrapper == "InputCanonicalizer" else
                f": load it with {loader}(PATH)" if loader else ": pass wrap= to rebuild the wrapper")
        raise ValueError(f"{what} holds the weights of a {saved.wrapper} around {saved.architecture}{hint}")
    return model


def _arch_key(name: str) -> str:
    """The timm base an architecture name builds: a ``*_dec`` twin or alias counts as its base; a tag is dropped."""
    arch = name.split(".", 1)[0]
    return base_model_name(arch) if _is_dec_name(arch) else arch


def _same_arch(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one architecture (a base and its ``*_dec`` twin or alias do; tags aside)."""
    return _arch_key(a) == _arch_key(b)


def _checked_architecture(ckpt: SavedModel, model_name: Optional[str]) -> str:
    """The architecture to rebuild: ``model_name``, which must be the one ``ckpt`` records (or its base / twin), else
    the recorded one.

    Another architecture is refused even when the weights would fit it (vit_tiny's fit deit_tiny, and recorded
    ``embed_dim``/``depth`` make vit_small's entrypoint build a vit_tiny): it would read the weights with its own
    preprocessing and publish them under its name.
    """
    what = ckpt.description
    if model_name and ckpt.architecture and not _same_arch(model_name, ckpt.architecture):
        raise ValueError(
            f"{what} is a checkpoint of {ckpt.architecture}, not of {model_name}: under another architecture its "
            f"weights would be read with that model's settings (and published under its name); leave --model out "
            f"(model_name=None) to rebuild {ckpt.architecture}, or name it (or its base / *_dec twin)")
    arch = model_name or ckpt.architecture
    if not arch:
        raise ValueError(f"{what} does not record its architecture; pass model_name (--model NAME)")
    return _check_architecture(arch, f"{what} (model {arch!r})" if not model_name else f"model {arch!r}")


def _recorded_preprocessing(ckpt: SavedModel, arch: str) -> dict[str, Any]:
    """The checkpoint's preprocessing, as a ``pretrained_cfg_overlay``; said once (stderr) where ``arch`` (a
    pretrained tag of the same architecture) would have used another."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    own = _preprocessing(cfg.to_dict() if cfg is not None else {})
    differ = [k for k, v in ckpt.preprocessing.items() if k in own and not same_dec_option(own[k], v)]
    if differ:
        print(f"note: {ckpt.description} records the preprocessing its weights were trained with "
              f"({', '.join(f'{k}={ckpt.preprocessing[k]}' for k in differ)}); it is used instead of {arch}'s "
              f"({', '.join(f'{k}={own[k]}' for k in differ)})", file=sys.stderr)
    return dict(ckpt.preprocessing)


def _load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, arch: str,
                 allow_base: bool = False) -> None:
    """`load_dec_state_dict`, after errors that say whether the DEC options are what differs."""
    if isinstance(model, DECModelMixin):
        ckpt_dec, model_dec = dec_blocks_in(list(state_dict)), dec_blocks_in(list(model.state_dict()))
        if not ckpt_dec and model_dec and not allow_base:
            raise ValueError(
                f"{what} holds no DEC parameters (a base model's checkpoint), but {arch} has DEC on blocks "
                f"{model_dec}: use the base name {base_model_name(arch)!r}, or fine-tune {arch} first (timm-dec "
                f"eval accepts it with the DEC at the identity)")
        if ckpt_dec and ckpt_dec != model_dec:
            raise DECOptionError(mismatch_message(
                "dec_blocks", model_dec, ckpt_dec, what,
                f"set dec_blocks={ckpt_dec}"))
    elif dec_blocks_in(list(state_dict)) and not _dec_models_in(model):
        raise ValueError(
            f"{what} holds DEC parameters for blocks {dec_blocks_in(list(state_dict))}, but {arch} has no DEC; use "
            f"its '*_dec' name")
    kept = load_dec_state_dict(model, state_dict, source=what, target=arch)
    if kept:
        print(f"note: {what} has no DEC weights (a base checkpoint); the DEC modules of {arch} start at the "
              f"identity", file=sys.stderr)


def _dec_models_in(model: nn.Module) -> bool:
    return any(isinstance(m, DECModelMixin) for m in model.modules())
