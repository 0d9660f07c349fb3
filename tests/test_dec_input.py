"""``dec_input="image"``: H sees the model's input image resized to the adapted unit's map, not the unit's features.

What it means, tested on the DEC's own output (a forward hook on ``model.dec[k]``): with a DEC away from the
identity, noise added to the latent map entering unit k (a forward hook on unit k-1) leaves the knots of an
image DEC unchanged, a different image changes them, and a ``"latent"`` DEC is the control that does change. The
image DEC reads exactly ``adaptive_avg_pool2d(image, map size)`` in the ``nchw`` layout, and the warp still acts on
the unit's own features. Also: identity at init for every family, batch independence, forward_intermediates and
features_only, the error when a caller runs a unit without the image, and the ``create_model`` / state-dict round
trip (the DEC projection takes the image's channels).
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_dec
from timm_dec.adapt import dec_options, resize_image
from timm_dec.models import load_dec_state_dict
from timm_dec.ops import identity_knots

from test_adapt import SMALL_DEC, TINY, make_base, make_input, perturb_dec

# one model of every family class: ViT, distilled DeiT, BEiT, Swin, Eva, relpos ViT, Swin V2, Swin V2 cr
FAMILIES = ["vit", "deit_distilled", "beit", "swin", "eva02", "relpos_cls", "swinv2", "swinv2_cr"]


def units(model: nn.Module) -> nn.ModuleList:
    for name in ("layers", "stages", "blocks"):
        if hasattr(model, name):
            return getattr(model, name)
    raise AssertionError(type(model).__name__)


def adapted(family: str, dec_input: str = "image", base_kwargs: dict[str, Any] | None = None, **kwargs: Any
            ) -> nn.Module:
    return timm_dec.adapt(make_base(family, **(base_kwargs or {})), input=dec_input, **{**SMALL_DEC, **kwargs}).eval()


def other_image(family: str, batch: int = 2) -> torch.Tensor:
    size = TINY[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def knots_of(model: nn.Module, x: torch.Tensor, unit: int = 1, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The knots of ``model.dec[unit]`` and the map it read, in one forward; ``noise`` is added to the latent map
    entering ``unit`` (the output of unit - 1), the image left as it is."""
    seen = {}
    hooks = [
        model.dec[str(unit)].register_forward_hook(lambda m, args, kwargs, out: seen.update(knots=out, read=args[0]),
                                                   with_kwargs=True),
    ]
    if noise:
        gen = torch.Generator().manual_seed(5)

        def add_noise(m, args, out):
            return out + noise * torch.randn(out.shape, generator=gen)

        hooks.append(units(model)[unit - 1].register_forward_hook(add_noise))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return seen["knots"], seen["read"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_with_image_input(family):
    base = make_base(family)
    model = timm_dec.adapt(copy.deepcopy(base), input="image", **SMALL_DEC)
    assert all(dec.in_chans == 3 and dec.proj.weight.shape[1] == 3 for dec in model.dec.values())
    x = make_input(family)
    for training in (True, False):
        base.train(training)
        model.train(training)
        with torch.no_grad():
            torch.manual_seed(3)  # the same dropout draws (relpos, Swin V2 cr position MLPs)
            expected = base(x)
            torch.manual_seed(3)
            got = model(x)
        assert (got - expected).abs().max().item() <= 1e-5, (family, training)


@pytest.mark.parametrize("family", ["vit", "swin", "swinv2_cr", "eva02"])
def test_knots_depend_on_the_image_only(family):
    model = adapted(family, blocks=(1,))
    perturb_dec(model)
    x = make_input(family)
    knots, read = knots_of(model, x)
    g = model.dec_cfg.options.grid
    assert (knots - identity_knots(x.shape[0], g)).abs().max() > 1e-3  # really warped
    # what H read: the image, pooled to unit 1's map, channels first
    size = tuple(read.shape[-2:])
    assert read.shape[:2] == (x.shape[0], 3)
    assert torch.equal(read, F.adaptive_avg_pool2d(x, size))
    with torch.no_grad():
        feats = units(model)[0](model.patch_embed(x)) if hasattr(model, "layers") or hasattr(model, "stages") else None
    if feats is not None:  # Swin: unit 1's map is the stage-0 output, smaller than the patch grid
        assert size == (tuple(feats.shape[1:3]) if hasattr(model, "layers") else tuple(feats.shape[2:]))
    else:
        assert size == tuple(model.patch_embed.dynamic_feat_size(x.shape[-2:]))
    # other latents, the same image: the same knots; another image: other knots
    noisy, _ = knots_of(model, x, noise=0.5)
    assert (noisy - knots).abs().max().item() == 0.0
    other, _ = knots_of(model, other_image(family))
    assert (other - knots).abs().max().item() > 1e-4
    # the control: a latent DEC with the same H (but its own projection) follows the latent map
    latent = adapted(family, dec_input="latent", blocks=(1,))
    perturb_dec(latent)
    clean, _ = knots_of(latent, x)
    assert (knots_of(latent, x, noise=0.5)[0] - clean).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_the_warp_still_acts_on_the_features(family):
    """With an image DEC the output differs from the base (the features are warped) and from a latent DEC's."""
    x = make_input(family)
    image_model, latent_model = adapted(family), adapted(family, dec_input="latent")
    perturb_dec(image_model)
    perturb_dec(latent_model)
    base = make_base(family).eval()
    with torch.no_grad():
        got, plain, latent = image_model.forward_features(x), base.forward_features(x), latent_model.forward_features(x)
    assert (got - plain).abs().max().item() > 1e-3
    assert (got - latent).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["vit", "swin", "swinv2_cr"])
def test_batch_independence_with_image_input(family):
    model = adapted(family)
    perturb_dec(model)
    x = torch.cat([make_input(family), other_image(family)])
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
    assert (batched - single).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["vit", "beit", "swin", "eva02", "relpos_cls", "swinv2", "swinv2_cr"])
def test_forward_intermediates_and_features_only_with_image_input(family):
    model = adapted(family, blocks=(0, 1))
    perturb_dec(model)
    x = make_input(family)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=2)
        expected = model.forward_features(x)
    assert len(inter) == 2
    assert (final - expected).abs().max().item() <= 1e-5  # the image reaches the DEC on both paths

    name, arch, _ = TINY[family]
    torch.manual_seed(0)
    feats_model = timm.create_model(
        name + "_dec", features_only=True, out_indices=(0, 1), dec_input="image", dec_blocks=(0, 1),
        **{**arch, **{f"dec_{k}": v for k, v in SMALL_DEC.items()}}).eval()
    assert [dec.in_chans for dec in feats_model.model.dec.values()] == [3, 3]  # timm's FeatureGetterNet
    with torch.no_grad():
        feats = feats_model(x)
    assert len(feats) == 2 and all(torch.isfinite(f).all() for f in feats)


def test_missing_image_is_a_clear_error():
    model = adapted("vit", blocks=(0,))
    x = make_input("vit")
    tokens, grid = model._dec_embed(x)
    with pytest.raises(ValueError, match=r"block 0 reads the input image \(dec_input='image'\).*image=None"):
        model.dec_block(0, model.blocks[0], tokens, layout="tokens", grid_size=grid,
                        num_prefix_tokens=model.num_prefix_tokens)
    with torch.no_grad():  # given the image, the same call runs; a latent DEC needs none
        out = model.dec_block(0, model.blocks[0], tokens, layout="tokens", grid_size=grid,
                              num_prefix_tokens=model.num_prefix_tokens, image=x)
        latent = adapted("vit", dec_input="latent", blocks=(0,))
        ref = latent.dec_block(0, latent.blocks[0], tokens, layout="tokens", grid_size=grid,
                               num_prefix_tokens=latent.num_prefix_tokens)
    assert out.shape == ref.shape == tokens.shape
    swin = adapted("swin", blocks=(0,))
    with pytest.raises(ValueError, match="stage 0 reads the input image"):
        swin.dec_block(0, swin.layers[0], swin.patch_embed(make_input("swin")), layout="nhwc")


def test_resize_image_is_the_patch_mean():
    x = torch.randn(2, 3, 32, 32)
    pooled = resize_image(x, (4, 4))
    assert torch.allclose(pooled[:, :, 1, 2], x[:, :, 8:16, 16:24].mean(dim=(-1, -2)), atol=1e-6)
    assert resize_image(x, (32, 32)) is x
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        resize_image(x[0], (4, 4))


def test_image_channels_follow_in_chans_and_hybrid_vits():
    one = adapted("vit", base_kwargs=dict(in_chans=1))
    assert one.dec_image_chans() == 1 and one.dec["0"].proj.weight.shape[1] == 1
    with torch.no_grad():
        assert torch.isfinite(one(torch.randn(2, 1, 32, 32))).all()
    # a hybrid ViT: its patch embedding's proj reads CNN features, the DEC the image
    torch.manual_seed(0)
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224_dec", img_size=64, depth=2, num_classes=5, dec_input="image",
                               dec_blocks=(0,), **{f"dec_{k}": v for k, v in SMALL_DEC.items()}).eval()
    assert hybrid.patch_embed.proj.in_channels != 3 and hybrid.dec["0"].in_chans == 3
    torch.manual_seed(0)
    hybrid_base = timm.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (hybrid(x) - hybrid_base(x)).abs().max().item() <= 1e-5


def test_create_model_state_dict_round_trip_with_image_input():
    name, arch, _ = TINY["swin"]
    kwargs = dict(num_classes=5, dec_input="image", **arch, **{f"dec_{k}": v for k, v in SMALL_DEC.items()})
    torch.manual_seed(0)
    model = timm.create_model(name + "_dec", **kwargs).eval()
    perturb_dec(model)
    state = model.state_dict()
    proj = sorted(k for k in state if k.startswith("dec.") and k.endswith("proj.weight"))
    assert proj == ["dec.0.proj.weight", "dec.1.proj.weight"]
    assert all(state[k].shape == (SMALL_DEC["proj_chans"], 3) for k in proj)
    assert dec_options(model)["dec_input"] == "image"

    torch.manual_seed(1)
    fresh = timm.create_model(name + "_dec", **kwargs).eval()
    assert load_dec_state_dict(fresh, state) == []
    x = make_input("swin")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # a latent model's DEC reads the stage's channels: the image DEC's weights do not fit, and the error says so
    latent = timm.create_model(name + "_dec", **{**kwargs, "dec_input": "latent"})
    with pytest.raises(ValueError, match="dec.0.proj.weight"):
        load_dec_state_dict(latent, state)
