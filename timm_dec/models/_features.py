"""``features_only`` for the ``*_dec`` models: keyed like the base's feature wrapper, run through the DEC.

timm wraps a ``features_only`` model in one of two classes: ``FeatureGetterNet`` (ViT, DeiT, BEiT, Eva, relpos ViT:
keys ``model.<backbone>``), which calls ``forward_intermediates``, or ``FeatureListNet`` (Swin v1, V2, V2 cr: keys
``patch_embed.*``, ``layers_0.*``, ...), which runs the model's modules one by one and so would bypass the DEC. The
twins use `DECFeatureGetterNet` and `DECFeatureListNet`: the same module structure and keys as the base's wrapper,
plus the DEC modules under ``dec.*``, and a forward through the ``*_dec`` model's ``forward_intermediates``, which
canonicalises the input and, in the equivariant mode, un-warps every map to the input's geometry. So a base encoder
checkpoint loads strictly into the twin (`timm_dec.load_dec_state_dict` keeps the identity DEC), and
segmentation_models_pytorch's ``tu-<name>_dec`` encoders hold the base encoder's keys.

The DEC modules are owned by the wrapper (registered as ``dec``, so their keys are ``dec.*``, not ``model.dec.*``);
the wrapped model still reads them as ``model.dec``, an unregistered reference to the same ``ModuleDict``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from .._compat import FeatureGetterNet, FeatureListNet
from ._base import AdaptConfig, DECModelMixin

__all__ = ["DECFeaturesMixin", "DECFeatureGetterNet", "DECFeatureListNet", "dec_feature_class"]


def _take_dec(model: nn.Module) -> nn.ModuleDict:
    """Unregister ``model.dec`` (the wrapper registers it) and leave the model a plain reference to it."""
    if not isinstance(model, DECModelMixin) or "dec" not in model._modules:
        raise TypeError(f"a DEC feature wrapper takes a *_dec model with its DEC modules, got {type(model).__name__}")
    decs = model._modules.pop("dec")
    object.__setattr__(model, "dec", decs)  # read by the model's forward; owned (registered) by the wrapper
    return decs


class DECFeaturesMixin:
    """What both DEC feature wrappers share: the DEC modules at ``dec``, the wrapped model and its options."""
    dec: nn.ModuleDict

    def _dec_own(self, model: nn.Module, decs: nn.ModuleDict) -> None:
        self.dec = decs
        object.__setattr__(self, "_dec_model", model)  # not a submodule: its modules are registered as the base's are

    @property
    def dec_model(self) -> nn.Module:
        """The wrapped ``*_dec`` model (its ``dec`` is this wrapper's ``dec``)."""
        return self.__dict__["_dec_model"]

    @property
    def dec_cfg(self) -> AdaptConfig:
        """The wrapped model's DEC options."""
        return self.dec_model.dec_cfg

    def train(self, mode: bool = True) -> nn.Module:
        super().train(mode)  # type: ignore[misc]
        self.dec_model.train(mode)  # its unregistered modules (if any) and its own flag
        return self  # type: ignore[return-value]


class DECFeatureGetterNet(DECFeaturesMixin, FeatureGetterNet):
    """timm's ``FeatureGetterNet`` for a ``*_dec`` model: keys ``model.<backbone>`` as the base's, DEC at ``dec.*``.

    Args:
        model: the ``*_dec`` model; its DEC modules move to the wrapper.
        out_indices, out_map, return_dict, output_fmt, norm, prune: as for ``FeatureGetterNet``.
    """

    def __init__(
            self,
            model: nn.Module,
            out_indices: Union[int, Sequence[int]] = 4,
            out_map: Optional[Sequence[Union[int, str]]] = None,
            return_dict: bool = False,
            output_fmt: str = 'NCHW',
            norm: bool = False,
            prune: bool = True,
    ) -> None:
        decs = _take_dec(model)  # before the prune, which drops the DECs of pruned blocks
        super().__init__(model, out_indices=out_indices, out_map=out_map, return_dict=return_dict,
                         output_fmt=output_fmt, norm=norm, prune=prune)
        self._dec_own(model, decs)


class DECFeatureListNet(DECFeaturesMixin, FeatureListNet):
    """timm's ``FeatureListNet`` keys for a ``*_dec`` Swin, with a forward through ``forward_intermediates``.

    The modules are registered as ``FeatureListNet`` registers them (``patch_embed``, ``layers_0``, ... up to the last
    feature), so a base ``features_only`` state dict loads strictly; the forward returns the maps the base's
    ``FeatureListNet`` returns (the stages' own layout: NHWC for Swin v1/V2, NCHW for V2 cr), computed on the
    canonical image and un-warped in the equivariant mode. DECs of stages past the last feature are dropped.

    Args:
        model: the ``*_dec`` model; its DEC modules move to the wrapper.
        out_indices, output_fmt, feature_concat, flatten_sequential: as for ``FeatureListNet``.
    """

    def __init__(
            self,
            model: nn.Module,
            out_indices: Sequence[int] = (0, 1, 2, 3, 4),
            output_fmt: str = 'NCHW',
            feature_concat: bool = False,
            flatten_sequential: bool = False,
    ) -> None:
        decs = _take_dec(model)
        super().__init__(model, out_indices=out_indices, output_fmt=output_fmt, feature_concat=feature_concat,
                         flatten_sequential=flatten_sequential)
        self.take_indices: List[int] = list(self.feature_info.out_indices)
        model.dec_prune(max(self.take_indices))
        self._dec_own(model, decs)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The feature maps (B, C_i, H_i, W_i) or (B, H_i, W_i, C_i), in the layout the base's wrapper returns."""
        return self.dec_model.forward_intermediates(
            x, indices=self.take_indices, stop_early=True, output_fmt=self.output_fmt, intermediates_only=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the wrapped model's blocks (its own switch: the forward runs the model)."""
        self.grad_checkpointing = enable
        self.dec_model.set_grad_checkpointing(enable)


def dec_feature_class(base_feature_cls: Any) -> type:
    """The DEC feature wrapper for the base's ``feature_cls`` (timm's ``'getter'`` / ``'list'`` or the classes).

    Raises:
        TypeError: a feature class that cannot run the DEC (``'hook'``, ``'fx'``, ``'dict'``).
    """
    if base_feature_cls is None or base_feature_cls in ("list", FeatureListNet):
        return DECFeatureListNet
    if base_feature_cls in ("getter", FeatureGetterNet):
        return DECFeatureGetterNet
    if isinstance(base_feature_cls, type) and issubclass(base_feature_cls, DECFeaturesMixin):
        return base_feature_cls
    raise TypeError(f"feature_cls={base_feature_cls!r} is not supported by timm_dec models: use 'getter' or 'list' "
                    f"(both run the DEC through forward_intermediates)")
