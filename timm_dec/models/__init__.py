"""The ``*_dec`` models: the shared machinery (`_base`), the registry (`_registry`) and one module per timm model
class (``<family>_dec``).

Other layers import the names in ``__all__`` from here, never from the ``_private`` modules.

Importing this package imports every family module named in `_registry.DEC_MODULES`, which registers its
``<base>_dec`` names in timm's registry: adding a family is its module plus one entry there.
"""
import importlib

from ._base import (
    DEFAULT_MODE,
    INPUT,
    MODES,
    AdaptConfig,
    DECModelMixin,
    attach_decs,
    dec_class_for,
    dec_options,
    default_dec_options,
    parse_dec_options,
    register_dec_family,
    split_dec_kwargs,
    supported_families,
)
from ._registry import (
    CHECKPOINT_METADATA_KEY,
    DEC_MODULES,
    DECOptionError,
    base_model_name,
    check_dec_options,
    create_dec_model,
    dec_blocks_in,
    dec_checkpoint_filter,
    list_dec_models,
    load_dec_state_dict,
    read_checkpoint_record,
    register_dec_models,
    same_dec_option,
    supported_base_names,
)

for _family in DEC_MODULES:
    importlib.import_module(f".{_family}", __name__)  # registers the family's models

__all__ = [
    "CHECKPOINT_METADATA_KEY", "DEC_MODULES", "DECOptionError", "base_model_name", "check_dec_options",
    "create_dec_model", "dec_checkpoint_filter", "list_dec_models", "load_dec_state_dict", "read_checkpoint_record",
    "register_dec_models", "same_dec_option", "supported_base_names", "dec_blocks_in",
    # the shared machinery of `_base`: the DEC positions and modes, the family classes' mixin and registry, the options
    "INPUT", "MODES", "DEFAULT_MODE", "AdaptConfig", "DECModelMixin", "attach_decs", "dec_class_for", "dec_options",
    "default_dec_options", "parse_dec_options", "register_dec_family", "split_dec_kwargs", "supported_families",
]
