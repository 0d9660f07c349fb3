"""The DEC machinery every family class shares: `DECModelMixin`, the family-class registry, the DEC options.

The DEC positions are ``"input"`` (the default) and block (Swin: stage) indices. The input DEC reads the normalised
image I and the model runs on the canonical image S^{-1}(I; knots) (paper Sec. 4.3: F_1 = I); in the equivariant
mode its spatial outputs (``forward_features``, ``forward_intermediates``, ``features_only``) are un-warped with S to
the input's geometry. An adapted block k runs as ``knots = dec[k](F)``, ``F' = S^{-1}(F; knots)``,
``out = block(F')`` and, in the equivariant mode, ``out = S(out; knots)``. Knots live in normalised coordinates, so
the same knots un-canonicalise a map of another size (a Swin stage output, the token map of the input image). Blocks
are not wrapped: the DEC modules sit in one ``nn.ModuleDict`` at ``model.dec`` keyed by position (``dec.input``,
``dec.<k>``), so the backbone's state-dict keys stay exactly the base model's.

The family classes (one ``timm_dec.models.<family>_dec`` module per timm model class) subclass timm's models and
drive their blocks through `DECModelMixin.dec_block`; each registers itself with `register_dec_family`, which is
how `timm_dec.adapt` finds the class to switch an existing instance to.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._compat import checkpoint
from .._format import jsonable
from ..dec import DEC, DECConfig
from ..ops import monotone_warp

__all__ = [
    "AdaptConfig", "DECModelMixin", "MODES", "INPUT", "register_dec_family", "dec_class_for",
    "split_dec_kwargs", "dec_options", "supported_families", "DECOptions", "DEFAULT_MODE", "DEC_PREFIX",
    "MODEL_OPTIONS", "dec_option_names", "parse_dec_options", "pop_dec_kwargs", "default_dec_options", "attach_decs",
]

MODES = ("equivariant", "invariant")
DEFAULT_MODE = MODES[0]
INPUT = "input"  # the position (and ``model.dec`` key) of the DEC that canonicalises the input image
DEC_PREFIX = "dec_"  # of the create_model keyword arguments
MODEL_OPTIONS = ("blocks", "mode")  # the options of the model; every other DEC option is a DECConfig field

# timm base class -> its DEC subclass; filled by the family modules when they are imported
_DEC_CLASSES: Dict[type, type] = {}
_FAMILY_NAMES: Dict[type, str] = {}


@dataclass(frozen=True)
class AdaptConfig:
    """The static DEC options of an adapted model, stored as ``model.dec_cfg``.

    Attributes:
        blocks: the DEC positions: ``"input"`` (the input image) first, then the sorted indices of the adapted blocks
            (ViT, DeiT, BEiT) or stages (Swin).
        mode: ``"equivariant"`` (eq. 21, un-canonicalise each adapted block's output and, with an input DEC, the
            model's spatial outputs) or ``"invariant"`` (eq. 22).
        options: the options of every DEC module (grid size G, H widths, solver limits).
    """
    blocks: Tuple[Union[str, int], ...]
    mode: str
    options: DECConfig

    @property
    def has_input(self) -> bool:
        """Whether the model canonicalises its input image."""
        return INPUT in self.blocks

    @property
    def block_indices(self) -> Tuple[int, ...]:
        """The adapted block (Swin: stage) indices, without the input position."""
        return tuple(b for b in self.blocks if b != INPUT)


def register_dec_family(base_cls: type, dec_cls: type, description: str) -> None:
    """Make `adapt` turn instances of exactly ``base_cls`` into ``dec_cls``.

    Args:
        base_cls: a timm model class.
        dec_cls: its subclass mixing in `DECModelMixin`.
        description: the models of the family, for error messages (e.g. ``"ViT, DeiT, DeiT3, DINOv2"``).
    """
    if not (issubclass(dec_cls, base_cls) and issubclass(dec_cls, DECModelMixin)):
        raise TypeError(f"{dec_cls.__name__} must subclass both {base_cls.__name__} and DECModelMixin")
    _DEC_CLASSES[base_cls] = dec_cls
    _FAMILY_NAMES[base_cls] = description


def supported_families() -> str:
    """The supported timm classes and the models they cover, one string for error messages."""
    return "; ".join(f"{cls.__module__}.{cls.__name__} ({desc})" for cls, desc in _FAMILY_NAMES.items())


def dec_class_for(base_cls: type) -> type:
    """The DEC subclass for the timm class ``base_cls``; `TypeError` naming the supported families otherwise."""
    dec_cls = _DEC_CLASSES.get(base_cls)
    if dec_cls is None:
        raise TypeError(
            f"timm_dec cannot adapt {base_cls.__module__}.{base_cls.__name__}; supported model classes: "
            f"{supported_families()}")
    return dec_cls


class DECOptions(NamedTuple):
    """The parsed ``dec_*`` options of a model: where its DECs sit, the mode and every DEC module's `DECConfig`."""
    blocks: Optional[Union[int, str, Sequence[Union[int, str]]]]  # None: the family's default positions
    mode: str
    config: DECConfig


def dec_option_names() -> Tuple[str, ...]:
    """Every DEC option name: the model's (``blocks``, ``mode``), then the `DECConfig` fields, which own the rest."""
    return MODEL_OPTIONS + DECConfig.option_names()


def parse_dec_options(options: Mapping[str, Any], prefix: str = "") -> DECOptions:
    """Check the names and values of DEC options once and freeze them: the one parser of `create_dec_model`,
    `DECModelMixin.__init__` and `timm_dec.adapt`.

    Args:
        options: ``{name: value}``; names are ``prefix`` + ``blocks``, ``mode`` or a `DECConfig` field. A missing
            option takes its default (``mode``: `DEFAULT_MODE`; a `DECConfig` field: the dataclass's default;
            ``blocks``: None, the family's `DECModelMixin.default_dec_blocks`).
        prefix: ``"dec_"`` for ``create_model`` keyword arguments, ``""`` for `adapt`'s.

    Returns:
        The positions (checked against a model by `DECModelMixin`), the mode and the `DECConfig`.

    Raises:
        TypeError: an unknown option; the message names it as given and lists the valid ones.
        ValueError: an invalid mode or `DECConfig` value.
    """
    names = dec_option_names()
    unknown = [k for k in options if not (k.startswith(prefix) and k[len(prefix):] in names)]
    if unknown:
        raise TypeError(f"unknown DEC option {unknown[0]!r}; valid: {', '.join(prefix + n for n in names)}")
    values = {k[len(prefix):]: v for k, v in options.items()}
    blocks = values.pop("blocks", None)
    mode = values.pop("mode", DEFAULT_MODE)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return DECOptions(blocks, mode, DECConfig(**values))


def pop_dec_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Pop the ``dec_*`` keyword arguments from ``kwargs`` (modified in place) and return them, names unchecked (for
    `parse_dec_options` with ``prefix="dec_"``)."""
    return {k: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(DEC_PREFIX)]}


def split_dec_kwargs(kwargs: Dict[str, Any], keep_prefix: bool = False) -> Dict[str, Any]:
    """Pop the ``dec_*`` keyword arguments of ``create_model`` from ``kwargs``, checked by `parse_dec_options`, and
    return them without the prefix (``{"grid": 8}`` for ``dec_grid=8``), or as given with ``keep_prefix``."""
    options = pop_dec_kwargs(kwargs)
    parse_dec_options(options, prefix=DEC_PREFIX)
    return options if keep_prefix else {k[len(DEC_PREFIX):]: v for k, v in options.items()}


def default_dec_options(model: nn.Module) -> Dict[str, Any]:
    """The options a ``*_dec`` model of ``model``'s class and depth gets for the ``dec_*`` options left out, in the
    format of `dec_options`: what a checkpoint that records none of them was trained with."""
    model = getattr(model, "dec_model", model)
    num_units = len(model.dec_units())
    blocks = [b for b in type(model).default_dec_blocks if b == INPUT or b < num_units]
    return _as_kwargs(blocks, DEFAULT_MODE, DECConfig())


def dec_options(model: nn.Module) -> Dict[str, Any]:
    """The static DEC options of a ``*_dec`` model as ``timm.create_model`` keyword arguments (the inverse of
    `split_dec_kwargs`).

    Args:
        model: a model from a ``*_dec`` name or `adapt`.

    Returns:
        ``{"dec_blocks": [...], "dec_mode": ..., "dec_grid": ..., "dec_<field>": ...}`` for every field of the
        model's `timm_dec.dec.DECConfig`, JSON-serialisable (tuples become lists); ``{}`` for a model without DEC.

    Raises:
        ValueError, TypeError: an option value that is not JSON data (a non-finite float, an object).

    Example:
        >>> dec_options(timm.create_model("vit_tiny_dec", dec_grid=8))["dec_grid"]
        8
    """
    model = getattr(model, "dec_model", model)  # a features_only wrapper (timm_dec.models._features)
    if not isinstance(model, DECModelMixin):
        return {}
    return _as_kwargs(model.dec_cfg.blocks, model.dec_cfg.mode, model.dec_cfg.options)


def _as_kwargs(blocks: Sequence[Union[str, int]], mode: str, config: DECConfig) -> Dict[str, Any]:
    options: Dict[str, Any] = {"dec_blocks": list(blocks), "dec_mode": mode}
    for name in DECConfig.option_names():
        options[DEC_PREFIX + name] = jsonable(getattr(config, name), f"DEC option {name}")
    return options


def _make_config(model: nn.Module, options: DECOptions) -> AdaptConfig:
    """Check the DEC positions of ``options`` against ``model`` and freeze the model's DEC options."""
    blocks, mode, dec_cfg = options
    num_units = len(model.dec_units())
    unit = model.dec_unit_name
    if blocks is None:
        chosen = tuple(b for b in model.default_dec_blocks if b == INPUT or b < num_units)
    else:
        if isinstance(blocks, (int, str)) and not isinstance(blocks, bool):
            blocks = (blocks,)
        try:
            chosen = tuple(blocks)
        except TypeError:
            raise TypeError(f"blocks must be 'input', an int or a sequence of them, got {blocks!r}") from None
        for b in chosen:
            if b == INPUT:
                continue
            if isinstance(b, bool) or not isinstance(b, int):
                raise TypeError(f"blocks must hold {INPUT!r} or {unit} indices (ints), got {b!r} in {blocks!r}")
            if not -num_units <= b < num_units:
                raise ValueError(f"{unit} index {b} is out of range for a model with {num_units} {unit}s")
    indices = sorted({b % num_units for b in chosen if b != INPUT})
    chosen = ((INPUT,) if INPUT in chosen else ()) + tuple(indices)
    if not chosen:
        raise ValueError(f"blocks must name at least one position ({INPUT!r} or a {unit} index), got {blocks!r}")
    return AdaptConfig(blocks=chosen, mode=mode, options=dec_cfg)


def _attach(model: nn.Module, cfg: AdaptConfig) -> None:
    """Add ``model.dec`` (identity-initialised DEC modules) and ``model.dec_cfg``.

    The input DEC reads the image (``in_chans = model.dec_image_chans()``, the image H); a block's DEC reads the
    unit's input features (``in_chans = model.dec_in_chans(b)``) or, with ``input="image"``, the image too.
    """
    ref = next(model.parameters(), None)

    def make(position: Union[str, int]) -> DEC:
        if position == INPUT or cfg.options.input == "image":
            options = dataclasses.replace(cfg.options, input="image")
            dec = DEC(model.dec_image_chans(), options, name=f"dec.{position}")
        else:
            dec = DEC(model.dec_in_chans(position), cfg.options, name=f"dec.{position}")
        dec.set_weight_context(dec_mode=cfg.mode)  # the mode interprets its weights too: kept in its state dict
        return dec

    decs = nn.ModuleDict({str(b): make(b) for b in cfg.blocks})
    if ref is not None:
        decs = decs.to(device=ref.device, dtype=ref.dtype)
    decs.train(model.training)  # adapting a model in eval mode gives DECs in eval mode
    model.dec = decs
    model.dec_cfg = cfg


def attach_decs(model: nn.Module, options: DECOptions) -> None:
    """Check ``options`` against ``model`` (an instance of a DEC family class) and add its DEC modules and config."""
    _attach(model, _make_config(model, options))


def _warped_block(
        block: nn.Module,
        x: torch.Tensor,
        knots: torch.Tensor,
        layout: str,
        grid_size: Optional[Tuple[int, int]],
        num_prefix_tokens: int,
        equivariant: bool,
        block_kwargs: Dict[str, Any],
) -> torch.Tensor:
    """``block(S^{-1}(x))``, followed by ``S`` in the equivariant mode; the output may have another size (Swin)."""
    x = monotone_warp(x, knots, layout=layout, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, check=False)
    out = block(x, **block_kwargs)
    if equivariant:
        # a Swin stage may downsample: for NHWC the warp reads the output's own size
        out_grid = grid_size if layout == "tokens" else None
        out = monotone_warp(
            out, knots, inverse=True, layout=layout, grid_size=out_grid, num_prefix_tokens=num_prefix_tokens,
            check=False)
    return out


def _not_traceable(kind: str) -> TypeError:
    return TypeError(
        f"timm_dec models do not support {kind}: the DEC equilibrium solve stops per sample on a data-dependent "
        f"residual. Run them eagerly or with torch.compile.")


class DECModelMixin:
    """The DEC machinery shared by the family classes; mixed in before the timm class.

    A family class sets ``dec_unit_name`` and implements ``dec_units`` and ``dec_in_chans``; its forward paths call
    `dec_canonicalize_image` on the image, `dec_block` for each unit and `dec_uncanonicalize` on each spatial output.
    Constructing a family class directly takes the ``dec_*`` keyword arguments of `parse_dec_options` besides the
    timm class's own (`create_dec_model` passes them parsed, as ``dec_parsed``).
    """
    dec_unit_name: str = "block"
    default_dec_blocks: Tuple[Union[str, int], ...] = (INPUT,)
    # ordinal suffix that puts dec.<k> in unit k's layer-decay group (see `dec_group_matcher`)
    dec_group_suffix: Optional[Tuple[int, ...]] = None
    dec: nn.ModuleDict
    dec_cfg: AdaptConfig

    def __init__(self, *args: Any, dec_parsed: Optional[DECOptions] = None, **kwargs: Any) -> None:
        # create_dec_model passes its parsed options as dec_parsed; a direct construction passes dec_* keywords
        options = dec_parsed if dec_parsed is not None else parse_dec_options(pop_dec_kwargs(kwargs), DEC_PREFIX)
        super().__init__(*args, **kwargs)
        type(self).dec_check_adaptable(self)
        attach_decs(self, options)

    @classmethod
    def dec_check_adaptable(cls, model: nn.Module) -> None:
        """Raise `ValueError` if this instance's configuration cannot take a DEC (hook for the families)."""

    def dec_units(self) -> Sequence[nn.Module]:
        """The blocks (ViT, BEiT) or stages (Swin) that DEC indices refer to."""
        raise NotImplementedError

    def dec_in_chans(self, index: int) -> int:
        """Channels of the feature map entering unit ``index``."""
        raise NotImplementedError

    def dec_image_chans(self) -> int:
        """Channels of the input image (the DEC's ``in_chans`` with ``dec_input="image"``).

        timm's ``VisionTransformer`` (and its distilled and hybrid variants), ``Beit``, ``Eva``,
        ``VisionTransformerRelPos``, ``SwinTransformer``, ``SwinTransformerV2`` and ``SwinTransformerV2Cr`` all keep
        their ``in_chans`` argument as ``self.in_chans``; that is read first. (For a hybrid ViT the patch embedding's
        ``proj`` takes the CNN backbone's features, not the image, so ``patch_embed.proj.in_channels`` would be wrong
        there.) Otherwise the patch embedding's ``in_chans``, or the input channels of a plain patch embedding's
        convolution.
        """
        chans = getattr(self, "in_chans", None)
        embed = getattr(self, "patch_embed", None)
        if chans is None and embed is not None:
            chans = getattr(embed, "in_chans", None)
            proj = getattr(embed, "proj", None)
            if chans is None and getattr(embed, "backbone", None) is None and isinstance(proj, nn.Conv2d):
                chans = proj.in_channels
        if isinstance(chans, bool) or not isinstance(chans, int) or chans < 1:
            raise ValueError(f"cannot tell the input image channels of {type(self).__name__} for dec_input='image'")
        return chans

    def dec_block(
            self,
            index: int,
            block: nn.Module,
            x: torch.Tensor,
            *,
            layout: str,
            grid_size: Optional[Tuple[int, int]] = None,
            num_prefix_tokens: int = 0,
            checkpointing: bool = False,
            image: Optional[torch.Tensor] = None,
            **block_kwargs: Any,
    ) -> torch.Tensor:
        """Run unit ``index`` on ``x``, canonicalised by its DEC when it has one.

        Args:
            index: the block (Swin: stage) index, the key of its DEC in ``self.dec``.
            block: the block or stage module.
            x: its input: (B, P + H*W, C) tokens, a (B, H, W, C) map (Swin v1, V2) or a (B, C, H, W) map (Swin V2 cr).
            layout: ``"tokens"``, ``"nhwc"`` or ``"nchw"``.
            grid_size: (H, W) of the token map (tokens layout).
            num_prefix_tokens: P class / distillation / register tokens, which pass through unwarped.
            checkpointing: recompute the block (and its warps, not the DEC solve) in the backward pass.
            image: the image the model runs on (B, C_img, H_img, W_img): the input, canonicalised when the model has an
                input DEC. A DEC with ``input="image"`` reads it (with the image H) instead of ``x``; the warp still
                acts on ``x``.
            **block_kwargs: passed to the block (``shared_rel_pos_bias``, ``attn_mask``, ...).

        Returns:
            The block output, un-canonicalised in the equivariant mode: (B, P + H*W, C), (B, H', W', C') or
            (B, C', H', W').

        Raises:
            ValueError: the unit's DEC reads the image (``dec_input="image"``) and ``image`` is None.
        """
        key = str(index)
        if key not in self.dec:
            if checkpointing:
                return checkpoint(block, x, **block_kwargs)
            return block(x, **block_kwargs)
        dec = self.dec[key]
        if dec.cfg.input == "image":
            if image is None:
                raise ValueError(
                    f"the DEC of {self.dec_unit_name} {index} reads the input image (dec_input='image'), but "
                    f"dec_block got image=None: pass the model's input image, dec_block(..., image=x), or run the "
                    f"model's forward_features / forward_intermediates")
            knots = dec(image, layout="nchw")
        else:
            knots = dec(x, layout=layout, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)
        equivariant = self.dec_cfg.mode == "equivariant"
        if checkpointing:
            # the solve stays outside: recomputing it would double its cost and its solver statistics
            return checkpoint(
                _warped_block, block, x, knots, layout, grid_size, num_prefix_tokens, equivariant, block_kwargs)
        return _warped_block(block, x, knots, layout, grid_size, num_prefix_tokens, equivariant, block_kwargs)

    def dec_canonicalize_image(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The image the model runs on: S^{-1}(x; knots) with the input DEC's knots, or ``x`` without an input DEC.

        Args:
            x: (B, C, H, W) normalised input images.

        Returns:
            The (B, C, H, W) canonical images and the (B, 2, G+1, G+1) knots (None without an input DEC), which
            `dec_uncanonicalize` takes.
        """
        self.dec_check_input(x)
        if INPUT not in self.dec:
            return x, None
        knots = self.dec[INPUT](x, layout="nchw")
        return monotone_warp(x, knots, layout="nchw", check=False), knots

    def dec_uncanonicalize(
            self,
            y: torch.Tensor,
            knots: Optional[torch.Tensor],
            layout: str,
            grid_size: Optional[Tuple[int, int]] = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """A spatial output of the model on the canonical image, un-warped to the input's geometry: S(y; knots) in
        the equivariant mode; ``y`` itself in the invariant mode or without an input DEC (``knots`` None).

        Args:
            y: (B, P + h*w, C) tokens (the P prefix tokens pass through), (B, h, w, C) or (B, C, h, w) maps.
            knots: the input DEC's knots from `dec_canonicalize_image`; normalised, so they fit any map size.
            layout: ``"tokens"``, ``"nhwc"`` or ``"nchw"``.
            grid_size: (h, w) of a token map.
            num_prefix_tokens: P.
        """
        if knots is None or self.dec_cfg.mode != "equivariant":
            return y
        return monotone_warp(y, knots, inverse=True, layout=layout, grid_size=grid_size,
                             num_prefix_tokens=num_prefix_tokens, check=False)

    def dec_check_input(self, x: Any) -> None:
        """Refuse FX symbolic tracing and ``torch.jit.trace`` with a clear `TypeError`."""
        if isinstance(x, torch.fx.Proxy):
            raise _not_traceable("FX symbolic tracing (torch.fx, timm feature_cls='fx')")
        if torch.jit.is_tracing():
            raise _not_traceable("torch.jit.trace")

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this hook first
        raise _not_traceable("TorchScript (torch.jit.script)")

    def dec_prune(self, max_index: int) -> None:
        """Drop the DEC modules of units past ``max_index`` (after ``prune_intermediate_layers``)."""
        for key in [k for k in self.dec if k != INPUT and int(k) > max_index]:
            del self.dec[key]
        kept = tuple(b for b in self.dec_cfg.blocks if b == INPUT or b <= max_index)
        self.dec_cfg = dataclasses.replace(self.dec_cfg, blocks=kept)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """timm's pruning, also dropping the DEC modules of the removed units."""
        take_indices = super().prune_intermediate_layers(  # type: ignore[misc]
            indices, prune_norm=prune_norm, prune_head=prune_head)
        self.dec_prune(len(self.dec_units()) - 1)
        return take_indices

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's groups with ``dec.<k>`` in unit k's group and ``dec.input`` in the stem's (layer-wise LR decay)."""
        return self.dec_group_matcher(super().group_matcher(coarse), suffix=self.dec_group_suffix)  # type: ignore[misc]

    @staticmethod
    def dec_group_matcher(matcher: Dict[str, Any], suffix: Optional[Tuple[int, ...]] = None) -> Dict[str, Any]:
        """Add ``dec.<k>`` to the ``blocks`` groups of a timm group matcher, so layer decay keeps DEC k with unit k,
        and ``dec.input`` to the ``stem`` group, with the patch embedding whose input it canonicalises.

        Args:
            matcher: the base class's ``group_matcher()`` output.
            suffix: the ordinal suffix that puts ``dec.<k>`` in the same group as unit k's parameters.

        Returns:
            A new matcher dict.
        """
        matcher = dict(matcher)
        blocks = matcher["blocks"]
        if isinstance(blocks, str):
            blocks = [(blocks, None)]
            suffix = None  # coarse string matchers group by the unit index alone
        matcher["blocks"] = [(r"^dec\.(\d+)\.", suffix)] + list(blocks)
        stem = matcher.get("stem")
        if isinstance(stem, str):
            matcher["stem"] = rf"^dec\.{INPUT}\.|{stem}"
        elif stem is not None:
            matcher["stem"] = [(rf"^dec\.{INPUT}\.", None)] + list(stem)
        return matcher
