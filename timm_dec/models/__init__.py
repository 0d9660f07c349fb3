"""The ``*_dec`` models: the registry (`_registry`) and one module per timm model class (``<family>_dec``).

Importing this package imports every family module, which registers its ``<base>_dec`` names in timm's registry.
"""
from . import beit_dec, eva_dec, relpos_dec, swin_dec, swinv2_dec, vit_dec  # noqa: F401  (registers the models)
from ._registry import (
    CHECKPOINT_METADATA_KEY,
    DEC_MODULES,
    base_model_name,
    check_recorded_dec_options,
    create_dec_model,
    dec_checkpoint_filter,
    list_dec_models,
    load_dec_state_dict,
    read_checkpoint_record,
    register_dec_models,
    same_dec_option,
    supported_base_names,
)

__all__ = [
    "CHECKPOINT_METADATA_KEY", "DEC_MODULES", "base_model_name", "check_recorded_dec_options", "create_dec_model",
    "dec_checkpoint_filter", "list_dec_models", "load_dec_state_dict", "read_checkpoint_record",
    "register_dec_models", "same_dec_option", "supported_base_names",
]
