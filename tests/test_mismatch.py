"""Issue 24: bad input never costs work or gives a wrong answer -- silent mismatches and API edges of the models and
loaders (checkpoints evaluated or pushed under another architecture, DEC weights of another grid, empty batches,
solve-budget options on load). Offline; tiny models."""
from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from _tiny import SMALL_DEC, SMALL_DEC_KWARGS, tiny_table

import timm_dec  # noqa: F401
from timm_dec.dec import DEC

# ---------------------------------------------------------------------------------------------------------------------
# empty batches behave like the base
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, shape, kwargs", [
    ("nchw", (0, 3, 16, 16), dict(input="image")),
    ("tokens", (0, 1 + 16, 8), dict(num_prefix_tokens=1)),
    ("nhwc", (0, 4, 4, 8), {}),
])
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_dec_of_an_empty_batch_is_empty_identity_knots(layout: str, shape: tuple, kwargs: dict,
                                                       backward: str) -> None:
    options = {k: v for k, v in kwargs.items() if k != "num_prefix_tokens"}
    extra = dict(update="residual") if backward == "phantom" else {}
    dec = DEC(shape[1] if layout == "nchw" else shape[-1], grid=3, backward=backward, **SMALL_DEC, **options,
              **extra)
    x = torch.randn(*shape, requires_grad=True)
    prefix = {k: v for k, v in kwargs.items() if k == "num_prefix_tokens"}
    for training in (True, False):  # with grad: no solve, no backward to set up
        dec.train(training)
        assert dec(x, layout=layout, **prefix).shape == (0, 2, 4, 4)
    with torch.no_grad():
        assert dec(x, layout=layout, **prefix).shape == (0, 2, 4, 4)
    with pytest.raises(ValueError, match="expects"):  # the input is still checked
        dec(torch.randn(0, 5, 16, 16), layout="nchw")


def _outcome(fn: Any) -> Any:
    try:
        return tuple(fn().shape)
    except RuntimeError as e:  # timm's own Swin / BEiT / EVA attention cannot reshape an empty batch
        return type(e), str(e)


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "relpos_cls", "swin", "beit"])
def test_empty_batch_behaves_like_the_base(family: str) -> None:
    (base, kwargs, size), = tiny_table(family).values()
    torch.manual_seed(0)
    twin = timm.create_model(f"{base}_dec", dec_blocks=("input", 0, 1), **kwargs, **SMALL_DEC_KWARGS)
    ref = timm.create_model(base, **kwargs)
    x = torch.randn(0, 3, size, size)
    for model in (twin, ref):
        model.eval()
    with torch.no_grad():
        assert _outcome(lambda: twin(x)) == _outcome(lambda: ref(x))
        assert _outcome(lambda: twin.forward_features(x)) == _outcome(lambda: ref.forward_features(x))
    for training in (True, False):  # with grad, in train and eval mode
        twin.train(training)
        ref.train(training)
        xg = x.clone().requires_grad_()
        got, want = _outcome(lambda: twin(xg)), _outcome(lambda: ref(x))
        assert got == want
        if isinstance(got, tuple) and not isinstance(got[0], type):
            twin(xg).sum().backward()
