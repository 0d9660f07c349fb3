"""``python -m timm_dec.finetune`` / ``accelerate launch -m timm_dec.finetune``: the fine-tuning app, which lives in
`timm_dec.apps.finetune`; importing this module gives that module itself."""
import sys

from .apps import finetune as _finetune

if __name__ == "__main__":
    sys.exit(_finetune.main())
else:
    sys.modules[__name__] = _finetune
