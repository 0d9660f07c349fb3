"""The ``*_dec`` registry: one ``<base>_dec`` model per supported timm base name, built by timm's own builder.

Each ``<base>_dec`` entrypoint runs the base entrypoint of timm to learn how timm builds that base -- model class,
architecture arguments, checkpoint filter, strictness, feature config -- then calls timm's
``build_model_with_cfg`` with the matching DEC class (`timm_dec.models._base.dec_class_for`), the ``<base>_dec``
pretrained cfg (a copy of the base's, so the weights are the base's) and `dec_checkpoint_filter`. So pretrained
loading (``hf_hub_id``, ``pretrained_cfg_overlay=dict(file=...)``), ``features_only`` and every create_model keyword
work as for the base. ``dec_*`` keywords (``dec_blocks``, ``dec_grid``, ``dec_mode``, ``dec_<DECConfig field>``)
configure the DEC modules.

The base entrypoint runs in a private copy of its timm module's globals in which ``build_model_with_cfg`` records
its arguments and stops (`timm_dec._compat.capture_build_arguments`): nothing is built twice and timm's modules are
never modified.
"""
from __future__ import annotations

import json
import re
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import safetensors
import torch
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs, list_models, register_model
from torch import nn

from .._compat import DefaultCfg, capture_build_arguments
from .._options import DECOptionError, check_dec_options, overridable, same_dec_option
from ._base import DEC_PREFIX, INPUT, DECModelMixin, dec_class_for, dec_options, parse_dec_options, pop_dec_kwargs
from ._features import DECFeaturesMixin, dec_feature_class

__all__ = [
    "DEC_MODULES", "CHECKPOINT_METADATA_KEY", "DECOptionError", "check_dec_options", "read_checkpoint_record",
    "same_dec_option", "create_dec_model", "dec_checkpoint_filter", "load_dec_state_dict", "list_dec_models",
    "register_dec_models", "supported_base_names", "base_model_name",
]

# the family modules (one per timm model class); `timm_dec.models` imports each, which registers its models
DEC_MODULES = ("vit_dec", "swin_dec", "beit_dec", "eva_dec", "relpos_dec", "swinv2_dec")
# timm modules whose entrypoints build the supported classes; their helpers are re-bound when capturing
_TIMM_FAMILY_MODULES = (
    "timm.models.vision_transformer", "timm.models.vision_transformer_hybrid", "timm.models.deit",
    "timm.models.beit", "timm.models.swin_transformer", "timm.models.eva", "timm.models.vision_transformer_relpos",
    "timm.models.swin_transformer_v2", "timm.models.swin_transformer_v2_cr",
)
_BASE_OF: Dict[str, str] = {}  # <name>_dec -> base name
# the key of the safetensors metadata under which `timm_dec.checkpoint.save_model` records how to rebuild a model
CHECKPOINT_METADATA_KEY = "timm_dec"
# a DEC's options buffer (`timm_dec.dec.DEC.weight_options`; its own load hook compares it), under any prefix
_OPTIONS_KEY = re.compile(r"(^|\.)dec\.(input|\d+)\.options$")


def _capture_base_build(base_name: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments timm's entrypoint for ``base_name`` passes to ``build_model_with_cfg``, without building
    (`timm_dec._compat.capture_build_arguments`)."""
    if kwargs.get("use_naflex"):
        raise TypeError(f"timm_dec does not support NaFlexVit (use_naflex=True for {base_name})")
    return capture_build_arguments(base_name, pretrained, kwargs, _TIMM_FAMILY_MODULES)


def dec_checkpoint_filter(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        base_filter: Optional[Callable[..., Dict[str, torch.Tensor]]] = None,
) -> Dict[str, torch.Tensor]:
    """Prepare a base or ``*_dec`` checkpoint for a strict load into a ``*_dec`` model.

    The base family's filter converts the backbone keys; ``dec.*`` keys pass through untouched; DEC keys the
    checkpoint lacks (a base checkpoint) are filled from the model's own DEC, which starts at the identity.

    Args:
        state_dict: the checkpoint (possibly wrapped in ``model`` / ``state_dict`` / ``module``).
        model: the ``*_dec`` model being loaded.
        base_filter: the base family's ``checkpoint_filter_fn`` (called as ``base_filter(state_dict, model)``).

    Returns:
        A state dict with every key of ``model.state_dict()`` under ``dec.``.

    Raises:
        ValueError: the checkpoint holds DEC weights for a block the model has no DEC for, or some but not all of
            the model's DEC weights (the missing keys are named).
    """
    for wrapper in ("model", "state_dict", "module"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            state_dict = inner
    dec_state = {k: v for k, v in state_dict.items() if k.startswith("dec.")}
    backbone = {k: v for k, v in state_dict.items() if not k.startswith("dec.")}
    own_dec = {k: v for k, v in model.state_dict().items() if k.startswith("dec.")}
    own_positions = {k.split(".")[1] for k in own_dec}
    foreign = sorted({k.split(".")[1] for k in dec_state} - own_positions)
    if foreign:
        # timm's loader only warns about unexpected keys; trained DEC weights must not vanish silently
        raise ValueError(
            f"the checkpoint has DEC weights for position(s) {foreign} that this model has no DEC at "
            f"(dec_blocks={model.dec_cfg.blocks}); create it with dec_blocks covering them")
    unexpected = sorted(k for k in dec_state if k not in own_dec)
    if unexpected:
        raise ValueError(
            f"the checkpoint's DEC weights do not fit this model's DECs: {', '.join(unexpected[:6])}"
            f"{' ...' if len(unexpected) > 6 else ''} unexpected; missing "
            f"{', '.join(sorted(k for k in own_dec if k not in dec_state)[:6])} (another dec_input: the image H and "
            f"the latent H have different layers)")
    # the options buffer of each DEC (`timm_dec.dec.DEC.weight_options`): absent from checkpoints written before it
    missing = sorted(k for k in own_dec if k not in dec_state and not _OPTIONS_KEY.search(k))
    if dec_state and missing:
        # some DEC weights but not all: filling the rest with the identity start would load silently wrong
        raise ValueError(
            f"the checkpoint has some DEC weights but not all: {len(missing)} of {len(own_dec)} are missing "
            f"({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); a *_dec checkpoint must hold every "
            f"dec.* tensor (or none, for a base checkpoint whose DEC starts at the identity)")
    out = dict(base_filter(backbone, model) if base_filter is not None else backbone)
    out.update(dec_state)
    for key, value in own_dec.items():
        out.setdefault(key, value)
    return out


def _dec_models(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(state-dict prefix, module) of ``model`` itself or of each ``*_dec`` model inside it (a Canon wrapper's, an
    smp encoder's): a ``*_dec`` model that holds its DEC modules, or a DEC ``features_only`` wrapper."""
    return [(f"{name}." if name else "", m) for name, m in model.named_modules()
            if isinstance(m, DECFeaturesMixin) or (isinstance(m, DECModelMixin) and "dec" in m._modules)]


def dec_blocks_in(keys: Iterable[str]) -> List[Union[str, int]]:
    """The DEC positions that the ``dec.<position>.`` keys among ``keys`` hold weights for: ``"input"`` (the input
    DEC) first, then the sorted block (Swin: stage) indices."""
    found = {m.group(1) for k in keys if (m := re.match(r"dec\.(input|\d+)\.", k))}
    return ([INPUT] if INPUT in found else []) + sorted(int(b) for b in found if b != INPUT)


def load_dec_state_dict(
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        *,
        source: str = "the checkpoint",
        target: Optional[str] = None,
) -> List[str]:
    """Load a base or ``*_dec`` state dict into ``model`` strictly, through `dec_checkpoint_filter`.

    A state dict without DEC weights (a base checkpoint) leaves every DEC module with the model's own weights (the
    identity, for a new model); one with DEC weights must hold all of them. ``model`` may also be a module that
    holds a ``*_dec`` model (a Canon wrapper: its keys carry the wrapper's prefix) or a model without DEC (a plain
    strict load).

    Args:
        model: the model to load into.
        state_dict: the weights (the keys of ``model.state_dict()``, DEC parameters under ``dec.``).
        source: names the weights in errors, e.g. ``"checkpoint ckpt.safetensors"``.
        target: names the model in errors; default its class name.

    Returns:
        The DEC keys that kept the model's own weights (empty unless ``state_dict`` is a base checkpoint).

    Raises:
        ValueError: DEC weights for blocks the model does not adapt, or keys that do not fit (missing, unexpected
            or of another shape; the message names them and whether DEC parameters are among them).
    """
    state = dict(state_dict)
    kept: List[str] = []
    for prefix, dec_model in _dec_models(model):
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:  # raises for DEC weights of blocks it does not adapt, and for some but not all DEC weights
            filtered = dec_checkpoint_filter(inner, dec_model)
        except ValueError as e:
            raise ValueError(f"{source} does not fit {target or type(model).__name__}: {e}") from None
        new = [k for k in filtered if k not in inner]  # a DEC options buffer absent from an older checkpoint, ...
        state.update({prefix + k: filtered[k] for k in new})
        if not any(k.startswith("dec.") for k in inner):  # ... or a base checkpoint: the DECs keep their weights
            kept += [prefix + k for k in new]
    _check_fit(model.state_dict(), state, source, target or type(model).__name__)
    model.load_state_dict(state, strict=True)
    return sorted(kept)


def _check_fit(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str, target: str) -> None:
    """A `ValueError` naming the missing, unexpected and reshaped keys of ``state``, if any."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape and not _OPTIONS_KEY.search(k)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    if shapes:
        parts.append(f"shape mismatch {shapes[:4]}")
    dec_hint = " (DEC parameters differ: check the dec_* options)" if any(
        ".dec." in f".{k}" for k in missing + unexpected + [s.split(":")[0] for s in shapes]) else ""
    raise ValueError(f"{source} does not fit {target}{dec_hint}: " + "; ".join(parts))


def read_checkpoint_record(path: Path, key: str = CHECKPOINT_METADATA_KEY) -> Dict[str, Any]:
    """The JSON record a ``.safetensors`` file keeps in its metadata under ``key`` (`timm_dec.checkpoint.save_model`'s:
    architecture, ``model_args`` with every DEC option, ...), read from its header only; {} when it has none.

    Raises:
        ValueError: the record is not valid JSON, or not a JSON object.
    """
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if key not in meta:
        return {}
    try:
        record = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its {key!r} metadata is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: its {key!r} metadata holds a {type(record).__name__}, not a record")
    return record


def _recorded_model_args(kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """What the weights a ``pretrained=True`` build loads record about the model they were trained as, and where
    they come from: the ``model_args`` of a ``local-dir:`` / ``hf-hub:`` config (timm passes them on as
    ``pretrained_model_args``), or the record of a ``timm_dec`` ``.safetensors`` file named by the pretrained cfg
    (``pretrained_cfg_overlay=dict(file=...)``, train.py's ``--pretrained-path``); ("", {}) for neither."""
    cfg = kwargs.get("pretrained_cfg")
    cfg = cfg if isinstance(cfg, Mapping) else {}
    if kwargs.get("pretrained_model_args"):
        return f"the saved model {cfg.get('file') or cfg.get('hf_hub_id') or ''}".rstrip(), \
            dict(kwargs["pretrained_model_args"])
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = overlay.get("file") or cfg.get("file")
    if file and str(file).endswith(".safetensors") and Path(file).is_file():
        return f"the checkpoint {file}", dict(read_checkpoint_record(Path(file)).get("model_args") or {})
    return "", {}


def _check_built_dec_options(model: nn.Module, recorded: Mapping[str, Any], source: str) -> None:
    """Refuse a model whose DEC options differ from the recorded ones (an option left out that the weights record
    with another value than the default)."""
    dec_model = next((getattr(m, "dec_model", m) for m in model.modules()
                      if isinstance(m, (DECModelMixin, DECFeaturesMixin))), None)
    built = dec_options(dec_model) if dec_model is not None else {}
    check_dec_options(built, recorded, source, say=False, fix="pass the recorded value, or leave the option out "
                      "where the saved config is read")


def create_dec_model(dec_name: str, base_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``dec_name``: timm's build of ``base_name`` with the DEC class, the ``dec_name`` cfgs and DEC filter.

    Args:
        dec_name: the registered ``*_dec`` name (its pretrained cfgs are looked up under it).
        base_name: the timm base model name.
        pretrained: load the base's pretrained weights (DEC starts at the identity) or a ``*_dec`` checkpoint.
        **kwargs: ``create_model`` keywords for the base, plus ``dec_*`` options.

    Returns:
        The model (or its feature wrapper for ``features_only=True``).

    Raises:
        DECOptionError: with ``pretrained=True``, a ``dec_*`` option that shapes or interprets the weights and
            contradicts the one they record (a ``local-dir:`` / ``hf-hub:`` config, a ``timm_dec`` ``.safetensors``
            file as the pretrained file, or the options buffer of each DEC in the state dict). Solve-budget options
            (`timm_dec._options.OVERRIDABLE`) may differ; the model says so once (a warning).
    """
    if pretrained:
        source, recorded = _recorded_model_args(kwargs)
        check_dec_options(kwargs, recorded, source, fix="leave it out to use the recorded one (or pretrained=False "
                          "for a new, untrained model)")
        # the solve budget the weights were trained with, unless another is asked for (`timm_dec._options`)
        kwargs.update({k: v for k, v in recorded.items() if overridable(k) and k not in kwargs})
    dec_parsed = parse_dec_options(pop_dec_kwargs(kwargs), DEC_PREFIX)  # checked once, here
    arguments = _capture_base_build(base_name, pretrained, kwargs)
    dec_cls = dec_class_for(arguments.pop("model_cls"))
    arguments.pop("variant")
    arguments.pop("pretrained")
    model_kwargs = arguments.pop("kwargs", {})
    base_filter = arguments.get("pretrained_filter_fn")
    arguments["pretrained_filter_fn"] = partial(dec_checkpoint_filter, base_filter=base_filter)
    # features go through forward_intermediates, the one feature path that runs the DEC, in a wrapper keyed like
    # the base's (FeatureGetterNet or FeatureListNet) with the DEC at dec.*
    feature_cfg = dict(arguments.get("feature_cfg") or {})
    base_feature_cls = model_kwargs.pop("feature_cls", None) or feature_cfg.get("feature_cls")
    feature_cfg["feature_cls"] = dec_feature_class(base_feature_cls)
    arguments["feature_cfg"] = feature_cfg
    model = build_model_with_cfg(dec_cls, dec_name, pretrained, **arguments, **model_kwargs, dec_parsed=dec_parsed)
    if pretrained:
        # features_only prunes the blocks past the last feature, DEC included (their weights were checked)
        skip = ("dec_blocks",) if kwargs.get("features_only") else ()
        _check_built_dec_options(model, {k: v for k, v in recorded.items() if k not in skip}, source)
    return model


def _mirrored_default_cfg(base_name: str) -> Optional[DefaultCfg]:
    """The base's pretrained cfgs (resolved: full hub ids, urls), tags in the base's order, default first."""
    cfgs = get_arch_pretrained_cfgs(base_name)
    if not cfgs:
        return None
    tags = [cfg.tag or "" for cfg in cfgs.values()]
    return DefaultCfg(tags=deque(tags), cfgs={cfg.tag or "": cfg for cfg in cfgs.values()})


def _make_entrypoint(dec_name: str, base_name: str, module_name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_dec_model(dec_name, base_name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = dec_name
    entrypoint.__module__ = module_name
    entrypoint.__doc__ = f"timm's ``{base_name}`` with DEC canonicalisers (``dec_*`` keywords configure them)."
    return entrypoint


def supported_base_names(patterns: Sequence[str], modules: Sequence[str]) -> List[str]:
    """timm model names matching ``patterns`` whose entrypoints live in the timm ``modules`` (short names)."""
    return list_models(list(patterns), module=list(modules))


def register_dec_models(
        module_globals: MutableMapping[str, Any],
        base_names: Iterable[str],
        aliases: Mapping[str, str],
) -> List[str]:
    """Register ``<base>_dec`` for each base name and each alias, in the family module whose globals are given.

    timm's ``register_model`` files a model under the module of its function and reads its pretrained cfgs from
    that module's ``default_cfgs``; so the functions are created with ``__module__`` set to the family module and
    the mirrored cfgs are put in its ``default_cfgs``.

    Args:
        module_globals: ``globals()`` of the family module (holds ``default_cfgs``).
        base_names: timm base model names.
        aliases: short ``*_dec`` name -> base name.

    Returns:
        The registered names.
    """
    module_name = module_globals["__name__"]
    default_cfgs = module_globals.setdefault("default_cfgs", {})
    pairs = [(f"{base}_dec", base) for base in base_names] + list(aliases.items())
    for dec_name, base in pairs:
        default_cfg = _mirrored_default_cfg(base)
        if default_cfg is not None:
            default_cfgs[dec_name] = default_cfg
        fn = _make_entrypoint(dec_name, base, module_name)
        module_globals[dec_name] = fn
        register_model(fn)
        _BASE_OF[dec_name] = base
    return [name for name, _ in pairs]


def base_model_name(dec_name: str) -> str:
    """The timm base of a registered ``*_dec`` name (a pretrained tag is ignored): ``vit_small_dec`` ->
    ``vit_small_patch16_224``."""
    arch = dec_name.split(".", 1)[0]
    if arch not in _BASE_OF:
        raise ValueError(f"{dec_name!r} is not a registered timm_dec model")
    return _BASE_OF[arch]


def list_dec_models(pattern: str = "", pretrained: bool = False) -> List[str]:
    """The registered ``*_dec`` model names, sorted as ``timm.list_models`` sorts them.

    Args:
        pattern: an fnmatch wildcard, e.g. ``"swin_*"``; all when empty.
        pretrained: only names with pretrained weights, with their tags (as ``timm.list_pretrained``).

    Returns:
        Model names (``name.tag`` when ``pretrained``).
    """
    return list_models(pattern, module=list(DEC_MODULES), pretrained=pretrained)
