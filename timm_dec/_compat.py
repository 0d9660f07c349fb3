"""Every private API of timm and torch that timm_dec uses, in one place.

Each item says why it is needed and what public API would replace it; when timm or torch moves one of them, this is
the one file to change, and `tests/test_timm_contract.py` is the test that notices.
"""
from __future__ import annotations

import inspect
import json
import logging
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from timm.models import build_model_with_cfg, model_entrypoint

# timm.models._features: ``feature_take_indices`` resolves ``forward_intermediates(indices=...)`` exactly as timm's
# own models do, and the DEC feature wrappers subclass ``FeatureGetterNet`` / ``FeatureListNet`` so that their
# state-dict keys are the base wrapper's. timm re-exports ``FeatureListNet`` from ``timm.models`` but not the other
# two; public replacement: a ``timm.models`` export of both.
from timm.models._features import FeatureGetterNet, FeatureListNet, feature_take_indices

# timm.models._hub: ``hf_split`` splits ``repo@revision`` as timm's ``hf-hub:`` loader does, so a saved folder is
# fetched from the revision timm would read. Public replacement: none in timm; huggingface_hub has no such split.
# ``save_config_for_hf``: the Hub ``config.json`` timm writes for a model (architecture, num_classes,
# num_features, global_pool, model_args from ``get_model_args``, the resolved pretrained_cfg), so the record a timm_dec
# saved model carries is the config timm's ``local-dir:`` / ``hf-hub:`` loader reads. timm builds that dict only while
# writing it to a file. Public replacement: ``timm.models.save_for_hf`` (which also writes the weights, and not as
# timm_dec's one writer of weights does).
from timm.models._hub import hf_split, save_config_for_hf

# timm.models._manipulate.checkpoint (re-exported as ``timm.models.checkpoint``): activation checkpointing with the
# arguments timm's own blocks use (use_reentrant=False), so a DEC model checkpoints as its base does.
from timm.models._manipulate import checkpoint

# timm.models._pretrained.DefaultCfg (re-exported as ``timm.models.DefaultCfg``): the container of an architecture's
# pretrained cfgs that ``register_model`` reads from a module's ``default_cfgs``, to mirror a base's cfgs under its
# ``<base>_dec`` name. Public replacement: ``generate_default_cfgs`` on a dict of cfgs (it re-parses the tags).
from timm.models._pretrained import DefaultCfg
from torch import nn

__all__ = [
    "FeatureGetterNet", "FeatureListNet", "feature_take_indices", "hf_split", "checkpoint", "DefaultCfg",
    "native_conv2d", "timm_model_args", "capture_build_arguments",
]


def native_conv2d(x: torch.Tensor, weight: torch.Tensor, kernel_size: Sequence[int], bias: Optional[torch.Tensor],
                  stride: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """A CPU convolution through PyTorch's native im2col kernel (``torch._C._nn.thnn_conv2d``).

    Why: oneDNN picks its algorithm by batch size, which rounds differently (~1e-7) and the DEC's solve magnifies
    that; the native kernel computes each sample on its own, so a sample's result does not depend on its batch
    (README, "Design") without touching the process-wide ``torch.backends.mkldnn`` switch. Public replacement: a
    per-call oneDNN switch, or a documented batch-invariant CPU convolution.
    """
    return torch._C._nn.thnn_conv2d(x, weight, kernel_size, bias, stride, padding)


def timm_model_args(module: nn.Module) -> Optional[Dict[str, Any]]:
    """The keyword arguments ``timm.create_model`` recorded on a model it built (``module._model_args``, set by timm's
    builder for ``push_to_hub``'s config.json), None when it recorded none. Public replacement: none yet; timm
    reads the attribute itself in ``save_for_hf``."""
    args = vars(module).get("_model_args")
    return dict(args) if isinstance(args, Mapping) else None


def timm_hub_config(model: nn.Module, model_config: Optional[Dict[str, Any]] = None,
                    model_args: Optional[Dict[str, Any]] = None,
                    data_config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``config.json`` dict that timm's ``save_for_hf`` writes for ``model`` (``save_config_for_hf``, which
    writes only to a file: written to a temporary one and read back). timm's note that a 3-channel pretrained mean
    is averaged for a model of other channels (a 1-channel model) is for whoever resolves a data config, not for a
    writer of records: it is filtered out here."""
    logger = logging.getLogger("timm.data.model_config")
    quiet = _ChannelMeanNote()
    logger.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.json"
            save_config_for_hf(model, str(path), model_config=model_config, model_args=model_args,
                               data_config=data_config)
            return json.loads(path.read_text(encoding="utf-8"))
    finally:
        logger.removeFilter(quiet)


class _ChannelMeanNote(logging.Filter):
    """Drops timm's "Pretrained mean does not match N channels; using its mean value." (see `timm_hub_config`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "channels; using its mean value" not in record.getMessage()


# --- capturing how timm builds a base model ------------------------------------------------------------------------
# Why: a ``<base>_dec`` model must be built exactly as timm builds its base (model class, architecture arguments,
# checkpoint filter, feature cfg), and those live only inside the base's entrypoint, which calls
# ``build_model_with_cfg``. The entrypoint runs in a private copy of its module's globals in which that builder
# records its arguments and stops: nothing is built twice and timm's modules are never modified. Public replacement:
# a timm API returning an entrypoint's build arguments (or a ``model_cls`` override of ``create_model``).

_BUILDER_SIGNATURE = inspect.signature(build_model_with_cfg)


class _Captured(Exception):
    """Raised by the recording builder to stop the base entrypoint once its build arguments are known."""

    def __init__(self, arguments: Dict[str, Any]) -> None:
        super().__init__("build arguments captured")
        self.arguments = arguments


def _recording_builder(*args: Any, **kwargs: Any) -> nn.Module:
    bound = _BUILDER_SIGNATURE.bind(*args, **kwargs)
    raise _Captured(dict(bound.arguments))


def _shadow_globals(module_name: str, family_modules: Sequence[str],
                    shadows: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """A copy of a timm family module's globals with ``build_model_with_cfg`` recording instead of building.

    Functions of the family modules found in it (the entrypoints, ``_create_*`` helpers, also when imported from
    another family module, as the hybrid ViTs do) are re-bound to the shadow globals of their own module.
    """
    if module_name in shadows:
        return shadows[module_name]
    module = __import__(module_name, fromlist=["_"])
    shadow: Dict[str, Any] = dict(vars(module))
    shadows[module_name] = shadow
    shadow["build_model_with_cfg"] = _recording_builder
    for name, obj in list(shadow.items()):
        if isinstance(obj, types.FunctionType) and obj.__module__ in family_modules:
            target = shadow if obj.__module__ == module_name else _shadow_globals(obj.__module__, family_modules,
                                                                                  shadows)
            rebound = types.FunctionType(obj.__code__, target, obj.__name__, obj.__defaults__, obj.__closure__)
            rebound.__kwdefaults__ = obj.__kwdefaults__
            shadow[name] = rebound
    return shadow


def capture_build_arguments(base_name: str, pretrained: bool, kwargs: Dict[str, Any],
                            family_modules: Sequence[str]) -> Dict[str, Any]:
    """The arguments timm's entrypoint for ``base_name`` passes to ``build_model_with_cfg``, without building.

    Args:
        base_name: a timm model name.
        pretrained, kwargs: as for the entrypoint.
        family_modules: the timm modules whose entrypoints may be captured (and whose helpers are re-bound).

    Raises:
        TypeError: the entrypoint lives elsewhere, or it builds its model without ``build_model_with_cfg``.
    """
    entrypoint: Callable[..., nn.Module] = model_entrypoint(base_name)
    if entrypoint.__module__ not in family_modules:
        raise TypeError(f"{base_name} is defined in {entrypoint.__module__}, which timm_dec does not support")
    shadow = _shadow_globals(entrypoint.__module__, family_modules, {})
    try:
        model = shadow[base_name](pretrained=pretrained, **kwargs)
    except _Captured as captured:
        return captured.arguments
    raise TypeError(f"{base_name} was built as {type(model).__name__} outside build_model_with_cfg, which timm_dec "
                    f"does not support")
