"""Training checkpoints and saved folders: reading and checking them, rebuilding the model they record.

Every way a ``*_dec`` model's weights are kept comes through here before it is loaded: a `timm_dec.hub.save_pretrained`
folder (``config.json`` + ``model.safetensors``), a `timm_dec.finetune` checkpoint folder (``model.safetensors`` +
``state.json``), a ``.safetensors`` file from `save_checkpoint` (the demo's; it records the architecture, every DEC
option and the data settings in its metadata), a bare ``.safetensors`` file, and timm's ``train.py`` ``.pth.tar``
(read with ``torch.load(weights_only=True)``; argparse's ``Namespace`` of the training args allowed as plain data).
The model is rebuilt with the options the checkpoint records, options asked for that contradict them are an error,
and the weights are loaded strictly (`timm_dec.models.load_dec_state_dict`). Nothing unpickles arbitrary objects.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from . import __version__
from ._compat import timm_model_args
from ._format import plain, read_json_object
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
    "CONFIG_NAME", "WEIGHTS_NAME", "TRAINING_STATE_NAME", "CHECKPOINT_METADATA_KEY", "TrainingCheckpoint",
    "check_pretrained", "checkpoint_record", "save_checkpoint", "read_training_checkpoint", "model_from_checkpoint",
    "load_training_checkpoint", "write_safetensors",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The json state that `timm_dec.finetune` writes beside the weights of each checkpoint.
TRAINING_STATE_NAME = "state.json"

PathLike = Union[str, os.PathLike]


def _is_dec_name(arch: str) -> bool:
    try:
        base_model_name(arch)
    except ValueError:
        return False
    return True


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
    """Check a saved Hub folder before loading it, with a clear error for each way it can be broken.

    Args:
        folder: a folder from `save_pretrained` (or a Hub snapshot of one).

    Returns:
        Its parsed ``config.json``.

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
        found = dec_blocks_in(keys)
        if expected != found:
            raise ValueError(
                f"the DEC options of {config_path} (dec_blocks={expected}) do not match {folder / WEIGHTS_NAME}, "
                f"which holds DEC parameters for blocks {found}")
    return config



def _torch_load_checkpoint(path: Path) -> dict[str, Any]:
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
    return ckpt


@dataclass
class TrainingCheckpoint:
    """A training checkpoint as read by `read_training_checkpoint`.

    Attributes:
        state_dict: the weights.
        architecture: the model name it records, or None (a bare ``.safetensors`` file).
        model_kwargs: the ``create_model`` kwargs it records (the DEC options among them).
        description: names it in messages, e.g. ``"timm checkpoint last.pth.tar"``.
        data: the data settings it records (``num_digits``, ``canvas``, ``digit_size``, ``scale_range``), or {}.
        wrapper: the class name of a wrapper around the timm model (``"InputCanonicalizer"`` for Canon), or None.
        complete_options: True when ``model_kwargs`` holds every DEC option (a file written by timm_dec); False for
            timm's ``train.py``, which records only the ``--model-kwargs`` given, the others being the defaults.
        preprocessing: the input preprocessing the weights were trained with (`PREPROCESSING`: mean, std, ...), as
            far as the checkpoint records it; {} when it records none (the architecture's default cfg applies).
    """
    state_dict: dict[str, torch.Tensor]
    architecture: Optional[str]
    model_kwargs: dict[str, Any]
    description: str
    data: dict[str, Any] = field(default_factory=dict)
    wrapper: Optional[str] = None
    complete_options: bool = True
    preprocessing: dict[str, Any] = field(default_factory=dict)


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


def checkpoint_record(model: nn.Module, data: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What `save_checkpoint` records about ``model``: architecture, ``create_model`` kwargs with every DEC option,
    the preprocessing its weights expect (``pretrained_cfg``: mean, std, ...), the wrapper class (Canon) if any, and
    the data settings."""
    inner = _timm_model_inside(model)
    args = {k: v for k, v in (timm_model_args(inner) or {}).items()
            if k not in ("pretrained_model_args", "device", "dtype", "pretrained_cfg_overlay", "pretrained_cfg")}
    args.update(dec_options(inner))
    args.setdefault("num_classes", inner.num_classes)
    record: dict[str, Any] = {"architecture": inner.pretrained_cfg["architecture"], "model_args": plain(args),
                              "pretrained_cfg": plain(_preprocessing(inner.pretrained_cfg)),
                              "timm_dec_version": __version__}
    if inner is not model:
        record["wrapper"] = type(model).__name__
    if data:
        record["data"] = plain(dict(data))
    return record


def write_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` (detached, on the CPU, contiguous) to a ``.safetensors`` file with ``metadata``, creating
    its parent folder: the one place timm_dec writes weights (the demo's and the segmenter's checkpoints, the shared
    starts; tests/test_layout.py keeps it so). Without ``metadata`` the file has no metadata header, so its bytes
    (and a shared start's recorded SHA-256) depend on the tensors alone.

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                                metadata=None if metadata is None else dict(metadata))
    return path


def save_checkpoint(model: nn.Module, path: PathLike, *, data: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model``'s weights to a ``.safetensors`` file that records how to rebuild it.

    The safetensors metadata (key ``"timm_dec"``) holds the architecture, the ``create_model`` kwargs with every DEC
    option, the wrapper class (Canon) and the ``data`` settings, so ``timm-dec eval --checkpoint`` and ``timm-dec
    push --checkpoint`` rebuild the trained model and refuse options that contradict it. The parent folder is
    created only now, so a run that fails before its first checkpoint leaves no empty folder.

    Returns:
        The path.
    """
    record = checkpoint_record(model, data)
    return write_safetensors(path, model.state_dict(), {CHECKPOINT_METADATA_KEY: json.dumps(record)})


def _finetune_data(args: Mapping[str, Any]) -> dict[str, Any]:
    """The digits settings a `timm_dec.finetune` run records in its args, as `TrainingCheckpoint.data`."""
    if args.get("data") != "digits":
        return {}
    data = {k: args[k] for k in ("num_digits", "digit_size", "scale_range") if args.get(k) is not None}
    if args.get("img_size"):
        data["canvas"] = args["img_size"]
    return data


def read_training_checkpoint(path: PathLike, use_ema: bool = False) -> TrainingCheckpoint:
    """Read any supported checkpoint (see `load_training_checkpoint`) without building a model.

    Raises:
        FileNotFoundError: no such checkpoint, or a folder that is neither kind of checkpoint folder.
        ValueError: an unreadable or corrupt file, or ``use_ema`` for a checkpoint without EMA weights.
    """
    path = Path(path)
    if use_ema and (path.is_dir() or path.suffix == ".safetensors"):
        raise ValueError(
            f"use_ema (--use-ema): {path} holds one set of weights and no EMA weights (only timm's train.py "
            f".pth.tar keeps them, as state_dict_ema); leave --use-ema out")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() and not (path / TRAINING_STATE_NAME).is_file():
            config = check_pretrained(path)
            return TrainingCheckpoint(
                _load_safetensors(path / WEIGHTS_NAME), config["architecture"], dict(config.get("model_args") or {}),
                f"Hub folder {path}", data=dict((config.get("timm_dec") or {}).get("data") or {}),
                preprocessing=_preprocessing(config.get("pretrained_cfg")))
        if not (path / TRAINING_STATE_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is neither a timm_dec.finetune checkpoint ({TRAINING_STATE_NAME} + {WEIGHTS_NAME}) nor a "
                f"save_pretrained folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
        state = read_json_object(path / TRAINING_STATE_NAME, "training state")
        return TrainingCheckpoint(
            _load_safetensors(path / WEIGHTS_NAME), state.get("model"), dict(state.get("model_kwargs") or {}),
            f"timm_dec.finetune checkpoint {path}", data=_finetune_data(state.get("args") or {}))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state_dict = _load_safetensors(path)
        record = read_checkpoint_record(path)
        if record:
            return TrainingCheckpoint(
                state_dict, record.get("architecture"), dict(record.get("model_args") or {}),
                f"checkpoint {path}", data=dict(record.get("data") or {}), wrapper=record.get("wrapper"),
                preprocessing=_preprocessing(record.get("pretrained_cfg")))
        sibling = path.parent / TRAINING_STATE_NAME
        if sibling.is_file():
            state = read_json_object(sibling, "training state")
            return TrainingCheckpoint(state_dict, state.get("model"), dict(state.get("model_kwargs") or {}),
                                      f"safetensors file {path}", data=_finetune_data(state.get("args") or {}))
        return TrainingCheckpoint(state_dict, None, {}, f"safetensors file {path}")
    ckpt = _torch_load_checkpoint(path)
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
    arch = ckpt.get("arch") or args.get("model")
    return TrainingCheckpoint(state_dict, arch, kwargs, f"timm checkpoint {path}", complete_options=False,
                              preprocessing=_preprocessing(args))  # train.py's --mean, --std, ... when given


def load_training_checkpoint(
        path: PathLike,
        *,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        use_ema: bool = False,
        allow_base: bool = False,
) -> nn.Module:
    """Rebuild a model from a training checkpoint and load its weights strictly.

    Supported: timm's ``train.py`` output (``.pth.tar``: a dict with ``state_dict``, ``arch`` and ``args``; read
    with ``torch.load(weights_only=True)``), a `timm_dec.finetune` checkpoint folder (``model.safetensors`` +
    ``state.json``), a folder from `save_pretrained`, a ``.safetensors`` file from `save_checkpoint` (the demo's
    checkpoints), or a bare ``.safetensors`` file (``model_name`` required unless a ``state.json`` sits beside it).

    Args:
        path: the checkpoint.
        model_name: architecture; default the one the checkpoint records, which it must be when the checkpoint
            records one (or its base, its ``*_dec`` twin or an alias; a pretrained tag is allowed, and the
            checkpoint's recorded preprocessing is used under it).
        model_kwargs: ``timm.create_model`` kwargs; they extend the recorded ones (``num_classes``, ``dec_*``, ...).
            A ``dec_*`` option that contradicts the one the checkpoint was trained with is an error -- also one the
            checkpoint does not name, when it records its training options (timm's ``train.py`` records only the
            ``--model-kwargs`` given; the others were the defaults) -- except the solve budget
            (`timm_dec._options.OVERRIDABLE`), which may differ (a warning says so once).
        use_ema: take timm's ``state_dict_ema`` instead of ``state_dict`` (an error for the other kinds of
            checkpoint, which hold no EMA weights).
        allow_base: accept a checkpoint without DEC weights for a ``*_dec`` model (its DEC starts at the identity),
            as ``timm-dec eval`` does.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: no such checkpoint, or missing weights.
        ValueError: unreadable or corrupt file, unknown architecture, another architecture than the recorded one,
            DEC options that do not match the checkpoint (`DECOptionError`, a ValueError), or weights that do not
            fit the model.
    """
    ckpt = read_training_checkpoint(path, use_ema)
    return model_from_checkpoint(ckpt, model_name=model_name, model_kwargs=model_kwargs, allow_base=allow_base)


def model_from_checkpoint(
        ckpt: TrainingCheckpoint,
        *,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        allow_base: bool = False,
        wrap: Optional[Any] = None,
) -> nn.Module:
    """The model a `TrainingCheckpoint` records, built and loaded strictly (see `load_training_checkpoint`).

    Args:
        wrap: called with the built timm model before the weights are loaded (e.g. the Canon wrapper); the
            checkpoint's weights are then the wrapper's.
    """
    what = ckpt.description
    arch = _checked_architecture(ckpt, model_name)
    recorded = {k: v for k, v in ckpt.model_kwargs.items() if k != "pretrained_model_args"}
    requested = dict(model_kwargs or {})
    check_dec_options(requested, recorded, what)
    kwargs = {**recorded, **requested}
    if ckpt.preprocessing and "pretrained_cfg_overlay" not in kwargs:
        kwargs["pretrained_cfg_overlay"] = _recorded_preprocessing(ckpt, arch)
    dec_kwargs = sorted(k for k in kwargs if k.startswith("dec_"))
    if dec_kwargs and not _is_dec_name(arch):
        raise ValueError(
            f"{what} has DEC options ({', '.join(dec_kwargs)}), but {arch} has no DEC; use its '*_dec' name")
    model = timm.create_model(arch, pretrained=False, **kwargs)
    options = dec_options(model)
    check_dec_options(options, recorded, what, say=False)
    unnamed = [k for k in requested if k.startswith("dec_") and k not in recorded]
    if unnamed and ckpt.architecture and _same_arch(arch, ckpt.architecture):
        # the checkpoint was trained with the options it records and the defaults (DECConfig's) for the others
        trained = default_dec_options(model)
        for key in unnamed:
            check_dec_options(options, trained, what, keys=[key], fix=f"it records no {key}, so it was trained "
                              f"with the default: leave {key} out")
    if wrap is not None:
        model = wrap(model)
        if ckpt.wrapper and type(model).__name__ != ckpt.wrapper:
            raise ValueError(f"{what} holds the weights of a {ckpt.wrapper}, not of a {type(model).__name__}")
    elif ckpt.wrapper:
        raise ValueError(
            f"{what} holds the weights of a {ckpt.wrapper} around {ckpt.architecture}"
            + (" (the Canon baseline): pass --canon with its options" if ckpt.wrapper == "InputCanonicalizer" else ""))
    _load_strict(model, ckpt.state_dict, what, arch, allow_base=allow_base)
    return model.eval()


def _arch_key(name: str) -> str:
    """The timm base an architecture name builds: a ``*_dec`` twin or alias counts as its base; a tag is dropped."""
    arch = name.split(".", 1)[0]
    return base_model_name(arch) if _is_dec_name(arch) else arch


def _same_arch(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one architecture (a base and its ``*_dec`` twin or alias do; tags aside)."""
    return _arch_key(a) == _arch_key(b)


def _checked_architecture(ckpt: TrainingCheckpoint, model_name: Optional[str]) -> str:
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


def _recorded_preprocessing(ckpt: TrainingCheckpoint, arch: str) -> dict[str, Any]:
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
