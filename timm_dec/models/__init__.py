"""The ``*_dec`` models: the shared machinery (`_base`), the registry (`_registry`) and one module per timm model
class (``<family>_dec``).

Importing this package imports every family module named in `_registry.DEC_MODULES`, which registers its
``<base>_dec`` names in timm's registry: adding a family is its module plus one entry there.
"""
import importlib

from ._registry import (
    CHECKPOINT_METADATA_KEY,
    DEC_MODULES,
    DECOptionError,
    base_model_name,
    check_dec_options,
    create_dec_model,
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
    "register_dec_models", "same_dec_option", "supported_base_names",
]
