"""The input DEC and the image H: the DEC that canonicalises the image before the patch embedding (the default
position ``"input"``), and latent DECs that read the image (``dec_input="image"``).

What it means, tested against references built from public parts: with the input DEC away from the identity, the
model's features are the base model's features of ``monotone_warp(x, knots)`` (invariant mode), and in the
equivariant mode every spatial output (``forward_features``, ``forward_intermediates``, ``features_only``) is that
map un-warped with S; the image H reads the image
area-resized to ``image_size``; a latent image DEC's knots follow the image, not the latent map. Also: identity at
init for every family, batch independence, the error when a caller runs a unit without the image, hybrid ViTs, and
the state-dict round trip.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
from test_adapt import FAMILIES as ALL_FAMILIES
from test_adapt import SMALL_DEC, TINY, make_base, make_input, perturb_dec
from torch import nn

import timm_dec
from timm_dec.adapt import dec_options
from timm_dec.models import load_dec_state_dict
from timm_dec.ops import identity_knots, monotone_warp

# one model of every family class: ViT, distilled DeiT, BEiT, Swin, Eva, relpos ViT, Swin V2, Swin V2 cr
FAMILIES = ["vit", "deit_distilled", "beit", "swin", "eva02", "relpos_cls", "swinv2", "swinv2_cr"]
SPATIAL_LAYOUT = {"swin": "nhwc", "swinv2": "nhwc", "swinv2_cr": "nchw"}  # the others give tokens


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


def input_knots(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        knots = model.dec["input"](x, layout="nchw")
    assert (knots - identity_knots(x.shape[0], model.dec_cfg.options.grid)).abs().max() > 1e-2  # really warped
    return knots


def unwarp(family: str, base: nn.Module, y: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    layout = SPATIAL_LAYOUT.get(family, "tokens")
    grid = base.patch_embed.dynamic_feat_size(make_input(family).shape[-2:]) if layout == "tokens" else None
    return monotone_warp(y, knots, inverse=True, layout=layout, grid_size=grid,
                         num_prefix_tokens=getattr(base, "num_prefix_tokens", 0))


# ---------------------------------------------------------------------------------------------------------------------
# The input DEC


@pytest.mark.parametrize("mode", ["equivariant", "invariant"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_identity_at_init_with_the_input_dec(family, mode):
    base = make_base(family)
    model = timm_dec.adapt(copy.deepcopy(base), blocks=("input",), mode=mode, **SMALL_DEC)
    x = make_input(family)
    for training in (True, False):
        base.train(training)
        model.train(training)
        with torch.no_grad():
            torch.manual_seed(3)  # the same dropout draws (relpos, Swin V2 cr position MLPs)
            expected = base(x)
            torch.manual_seed(3)
            got = model(x)
        assert (got - expected).abs().max().item() <= 1e-5, (family, mode, training)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_runs_on_the_canonical_image(family):
    """Invariant mode: the features are the base's features of S^{-1}(x; knots); equivariant: those, un-warped."""
    base = make_base(family).eval()
    x = make_input(family)
    for mode in ("invariant", "equivariant"):
        model = timm_dec.adapt(copy.deepcopy(base), blocks=("input",), mode=mode, **SMALL_DEC).eval()
        perturb_dec(model)
        knots = input_knots(model, x)
        with torch.no_grad():
            canonical = base.forward_features(monotone_warp(x, knots))
            got = model.forward_features(x)
        expected = canonical if mode == "invariant" else unwarp(family, base, canonical, knots)
        assert (got - expected).abs().max().item() <= 1e-5, (family, mode)
        assert (got - base.forward_features(x)).abs().max().item() > 1e-3  # the warp changed something


@pytest.mark.parametrize("family", ["vit", "beit", "swin", "eva02", "relpos_cls", "swinv2", "swinv2_cr"])
def test_features_only_maps_are_unwarped_to_the_input_geometry(family):
    """features_only: each map is S(M(S^{-1}(x))) in the equivariant mode, M the base's feature extractor: the
    base's map of the canonical image, un-warped to the input's geometry; the invariant model's maps are M's."""
    name, arch, _ = TINY[family]
    x = make_input(family)
    kwargs = dict(features_only=True, out_indices=(0, 1), num_classes=5, drop_path_rate=0.0, **arch)
    layout = "nhwc" if family in ("swin", "swinv2") else "nchw"  # timm's Swin features_only keeps NHWC maps
    torch.manual_seed(0)
    base = timm.create_model(name, **kwargs).eval()
    for mode in ("equivariant", "invariant"):
        torch.manual_seed(0)  # the same backbone weights: the DECs are built after the backbone
        model = timm.create_model(name + "_dec", dec_mode=mode, **kwargs,
                                  **{f"dec_{k}": v for k, v in SMALL_DEC.items()}).eval()
        with torch.no_grad():
            for a, b in zip(model(x), base(x)):  # identity at init: the same backbone
                # the identity warp resamples at coordinates rounded in float32 (~1e-6 px at 64 px), which on a
                # noise image moves pixels by ~5e-5; raw stage maps carry that through (logits stay within 1e-5)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        inner = model.dec_model  # the wrapped *_dec model; its dec is the wrapper's
        perturb_dec(inner)
        knots = input_knots(inner, x)
        with torch.no_grad():
            maps, canonical = model(x), base(monotone_warp(x, knots))
        assert len(maps) == len(canonical) == 2
        for got, ref in zip(maps, canonical):
            assert got.shape == ref.shape
            if mode == "invariant":
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
                continue
            torch.testing.assert_close(got, monotone_warp(ref, knots, inverse=True, layout=layout),
                                       rtol=1e-5, atol=1e-5)
            assert (got - ref).abs().max().item() > 1e-3  # really un-warped


def test_the_image_h_reads_the_image_at_image_size():
    seen = {}
    model = timm_dec.adapt(make_base("vit", img_size=64, patch_size=8), blocks=("input",), image_size=16,
                           **{k: v for k, v in SMALL_DEC.items() if k != "image_size"}).eval()
    dec = model.dec["input"]
    x = torch.randn(2, 3, 64, 64)
    reduced = dec.reduce_input(x, "nchw")
    assert reduced.shape == (2, 3, 16, 16)
    torch.testing.assert_close(reduced[:, :, 2, 3], x[:, :, 8:12, 12:16].mean(dim=(-1, -2)))  # an area filter
    dec.register_forward_hook(lambda m, args, kwargs, out: seen.update(read=args[0]), with_kwargs=True)
    with torch.no_grad():
        model(x)
    assert torch.equal(seen["read"], x)  # H reads the image itself (reduced inside the DEC)
    full = timm_dec.DEC(3, input="image", image_size=None)
    assert full.reduce_input(x, "nchw").shape == (2, 3, 64, 64)
    wide = timm_dec.DEC(3, input="image", image_size=16)
    assert wide.reduce_input(torch.randn(1, 3, 32, 64), "nchw").shape == (1, 3, 8, 16)  # the aspect kept


def test_input_dec_is_batch_independent_and_gets_gradients():
    model = timm_dec.adapt(make_base("vit"), blocks=("input",), **SMALL_DEC).eval()
    perturb_dec(model)
    x = torch.cat([make_input("vit"), other_image("vit")])
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
    assert (batched - single).abs().max().item() <= 1e-5
    model.train()
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dec["input"].parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Latent DECs that read the image


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


@pytest.mark.parametrize("family", ["vit", "swin", "swinv2_cr", "eva02"])
def test_latent_image_dec_knots_depend_on_the_image_only(family):
    model = adapted(family, blocks=(1,))
    assert model.dec["1"].reads_image and model.dec["1"].in_chans == 3
    perturb_dec(model)
    x = make_input(family)
    knots, read = knots_of(model, x)
    g = model.dec_cfg.options.grid
    assert (knots - identity_knots(x.shape[0], g)).abs().max() > 1e-3  # really warped
    assert torch.equal(read, x)  # the image the blocks run on (no input DEC here: the input itself)
    # other latents, the same image: the same knots; another image: other knots
    noisy, _ = knots_of(model, x, noise=0.5)
    assert (noisy - knots).abs().max().item() == 0.0
    other, _ = knots_of(model, other_image(family))
    assert (other - knots).abs().max().item() > 1e-4
    # the control: a latent DEC follows the latent map
    latent = adapted(family, dec_input="latent", blocks=(1,))
    perturb_dec(latent)
    clean, _ = knots_of(latent, x)
    assert (knots_of(latent, x, noise=0.5)[0] - clean).abs().max().item() > 1e-4


def test_latent_image_dec_reads_the_canonical_image():
    model = adapted("vit", blocks=("input", 1))
    perturb_dec(model)
    x = make_input("vit")
    knots = input_knots(model, x)
    _, read = knots_of(model, x)
    assert (read - monotone_warp(x, knots)).abs().max().item() <= 1e-6


def test_missing_image_is_a_clear_error():
    model = adapted("vit", blocks=(0,))
    x = make_input("vit")
    tokens, grid, _ = model._dec_embed(x)
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


def test_image_channels_follow_in_chans_and_hybrid_vits():
    one = adapted("vit", base_kwargs=dict(in_chans=1), blocks=("input", 0))
    assert one.dec_image_chans() == 1 and all(d.conv1.in_channels == 1 for d in one.dec.values())
    with torch.no_grad():
        assert torch.isfinite(one(torch.randn(2, 1, 32, 32))).all()
    # a hybrid ViT: its patch embedding's proj reads CNN features, the DECs the image
    torch.manual_seed(0)
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224_dec", img_size=64, depth=2, num_classes=5, dec_input="image",
                               dec_blocks=("input", 0), **{f"dec_{k}": v for k, v in SMALL_DEC.items()}).eval()
    assert hybrid.patch_embed.proj.in_channels != 3 and hybrid.dec["input"].in_chans == hybrid.dec["0"].in_chans == 3
    torch.manual_seed(0)
    hybrid_base = timm.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (hybrid(x) - hybrid_base(x)).abs().max().item() <= 1e-5


def test_create_model_state_dict_round_trip_with_the_input_dec():
    name, arch, _ = TINY["swin"]
    kwargs = dict(num_classes=5, dec_input="image", dec_blocks=("input", 0, 1), **arch,
                  **{f"dec_{k}": v for k, v in SMALL_DEC.items()})
    torch.manual_seed(0)
    model = timm.create_model(name + "_dec", **kwargs).eval()
    perturb_dec(model)
    state = model.state_dict()
    conv1 = sorted(k for k in state if k.startswith("dec.") and k.endswith("conv1.weight"))
    assert conv1 == ["dec.0.conv1.weight", "dec.1.conv1.weight", "dec.input.conv1.weight"]
    assert all(state[k].shape == (SMALL_DEC["image_widths"][0], 3, 3, 3) for k in conv1)
    assert dec_options(model)["dec_blocks"] == ["input", 0, 1]

    torch.manual_seed(1)
    fresh = timm.create_model(name + "_dec", **kwargs).eval()
    assert load_dec_state_dict(fresh, state) == []
    x = make_input("swin")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # a model without the input DEC cannot take these weights, and the error names the position
    without = timm.create_model(name + "_dec", **{**kwargs, "dec_blocks": (0, 1)})
    with pytest.raises(ValueError, match=r"\['input'\]"):
        load_dec_state_dict(without, state)
    # a latent model's DECs read the stage's channels: the image H's weights do not fit, and the error says so
    latent = timm.create_model(name + "_dec", **{**kwargs, "dec_input": "latent", "dec_blocks": ("input", 0, 1)})
    with pytest.raises(ValueError, match="dec.0.proj.weight"):
        load_dec_state_dict(latent, state)
