"""Each DEC family class keeps its timm class's ``forward_features`` and ``forward_intermediates`` signatures
(parameter names, kinds and defaults), so a parameter timm adds upstream fails here instead of being dropped."""
import inspect

import pytest

import timm_dec  # noqa: F401  (registers the families)
from timm_dec.models._base import _DEC_CLASSES

PAIRS = sorted(_DEC_CLASSES.items(), key=lambda kv: kv[0].__name__)


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_family_is_checked():
    assert len(PAIRS) >= 8  # ViT, distilled DeiT, BEiT, Eva, relpos ViT, Swin v1, V2, V2 cr


@pytest.mark.parametrize("method", ["forward_features", "forward_intermediates"])
@pytest.mark.parametrize("base_cls, dec_cls", PAIRS, ids=[b.__name__ for b, _ in PAIRS])
def test_signature_equals_timm(base_cls, dec_cls, method):
    assert _params(getattr(dec_cls, method)) == _params(getattr(base_cls, method)), (
        f"{dec_cls.__name__}.{method} no longer matches timm's {base_cls.__name__}.{method}")
