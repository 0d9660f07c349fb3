"""``features_only`` twins keyed like their bases, and the twins as segmentation_models_pytorch encoders.

Issue 17 ("keyed like the base") and issue 19 item 1: every family's ``features_only`` twin holds exactly its base's
``features_only`` keys plus ``dec.*``, a base encoder's state dict loads strictly into it, the DEC still runs on
that path, and in the equivariant mode a smp model's masks follow a warp of the input. Tiny models, nothing
downloads.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp  # the test extra carries it: a missing smp fails, never skips
import timm
import torch
from torch import nn

import timm_dec
from timm_dec.adapt import dec_options
from timm_dec.data import random_knots
from timm_dec.ops import identity_knots, monotone_warp

SMALL_DEC = dict(dec_widths=(8, 8), dec_proj_chans=4, dec_pool_size=8)
SWIN_ARCH = dict(img_size=64, window_size=4, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2))
TOKEN_ARCH = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)
# every family: (base name, tiny architecture, image side)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", TOKEN_ARCH, 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TOKEN_ARCH, 32),
    "beit": ("beit_base_patch16_224", TOKEN_ARCH, 32),
    "eva02": ("eva02_tiny_patch14_224", dict(TOKEN_ARCH, img_size=28, patch_size=7), 28),
    "relpos": ("vit_relpos_medium_patch16_cls_224", TOKEN_ARCH, 32),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_ARCH, 64),
    "swinv2": ("swinv2_tiny_window8_256", SWIN_ARCH, 64),
    "swinv2_cr": ("swinv2_cr_tiny_224", SWIN_ARCH, 64),
}
README = Path(__file__).resolve().parents[1] / "README.md"


def features(family: str, dec: bool, **kwargs) -> nn.Module:
    name, arch, _ = FAMILIES[family]
    torch.manual_seed(0)
    extra = SMALL_DEC if dec else {}
    return timm.create_model(name + ("_dec" if dec else ""), features_only=True, **arch, **extra, **kwargs).eval()


def perturb_input_dec(dec_model: nn.Module, scale: float = 0.3) -> None:
    """Move the input DEC's weights (its last layer starts at zero), so its warp is not the identity."""
    with torch.no_grad():
        for p in dec_model.dec["input"].parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_features_only_twin_is_keyed_like_the_base_and_loads_it_strictly(family):
    base, twin = features(family, False), features(family, True)
    base_keys, twin_keys = set(base.state_dict()), set(twin.state_dict())
    dec_keys = twin_keys - base_keys
    assert base_keys <= twin_keys and dec_keys and all(k.startswith("dec.input.") for k in dec_keys), family
    assert type(twin).__mro__[2] is type(base)  # the base's feature class (FeatureListNet / FeatureGetterNet)
    # a base encoder checkpoint loads strictly; the DEC keeps its identity start and the maps are the base's
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    kept = timm_dec.load_dec_state_dict(twin, base.state_dict())
    assert set(kept) == dec_keys
    twin.load_state_dict({**base.state_dict(), **{k: twin.state_dict()[k] for k in dec_keys}}, strict=True)
    x = torch.randn(2, 3, FAMILIES[family][2], FAMILIES[family][2])
    with torch.no_grad():
        for a, b in zip(twin(x), base(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # the DEC runs on the features_only path: a non-identity input DEC changes the maps
        perturb_input_dec(twin.dec_model)
        assert twin.dec is twin.dec_model.dec
        assert max((a - b).abs().max().item() for a, b in zip(twin(x), base(x))) > 1e-2


def test_features_only_twin_moves_copies_and_trains_as_one_module():
    twin = features("swin", True, out_indices=(0, 1))
    assert not any(k.startswith(("layers_2", "layers_3")) for k in twin.state_dict())  # cut after the last feature
    perturb_input_dec(twin.dec_model, 0.01)  # a warp whose solve converges, so float32 and float64 agree
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = twin(x)
    double = copy.deepcopy(twin).double()  # every module the forward uses is registered, DEC included
    assert double.dec_model.dec is double.dec and double.dec is not twin.dec
    with torch.no_grad():
        for a, b in zip(double(x.double()), ref):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a.float(), b, rtol=1e-3, atol=1e-3)
    twin.train()
    assert twin.dec_model.training and twin.dec.training
    loss = sum(f.square().mean() for f in twin(x))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in twin.dec.parameters())
    assert dec_options(twin)["dec_blocks"] == ["input"]


def _smooth_image(size: int) -> torch.Tensor:
    """A smooth (1, 3, size, size) image, so that resampling it is nearly exact."""
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(1, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


class _KnownKnots(nn.Module):
    """Stands in for the input DEC: returns the knots it is given (an oracle canonicaliser)."""

    def __init__(self, knots: torch.Tensor) -> None:
        super().__init__()
        self.knots = knots

    def forward(self, x: torch.Tensor, layout: str = "nchw") -> torch.Tensor:
        return self.knots.expand(x.shape[0], -1, -1, -1)


def _follows_the_warp(seg: nn.Module, dec_model: nn.Module, size: int, pool: int = 1) -> list:
    """Relative error of seg(S(x; phi)) against S(seg(x); phi), per output map, when the input DEC returns phi on
    S(x; phi) and the identity on x (an oracle canonicaliser): 0 up to interpolation when seg's maps are un-warped to
    the input's geometry; about 1 when they stay canonical (then seg(S(x)) = seg(x))."""
    x = _smooth_image(size)
    phi = random_knots(1, grid=4, strength=0.3, generator=torch.Generator().manual_seed(0))  # fold-free
    with torch.no_grad():
        dec_model.dec["input"] = _KnownKnots(identity_knots(1, 4))
        outs = seg(x)
        dec_model.dec["input"] = _KnownKnots(phi)
        outs_of_warped = seg(monotone_warp(x, phi, inverse=True))
    errors = []
    for out, out_of_warped in zip(*(o if isinstance(o, (list, tuple)) else [o] for o in (outs, outs_of_warped))):
        if out.shape[1] == 0 or out.shape[-1] == size and out.shape[1] == 3 and pool == 1:
            continue  # smp's empty placeholder and the input image it passes on
        warped = monotone_warp(out, phi, inverse=True)
        warped, out, out_of_warped = (nn.functional.avg_pool2d(t, pool) for t in (warped, out, out_of_warped))
        change = (warped - out).norm()
        assert change > 0.05 * out.norm()  # the warp moves the map
        errors.append(((out_of_warped - warped).norm() / change).item())
    return errors


@pytest.mark.parametrize("mode", ["equivariant", "invariant"])
def test_smp_unet_on_a_swin_twin_maps_and_masks_follow_a_warp_of_the_input(mode):
    """The encoder's maps of a warped input are the warped maps (to interpolation: 3%); the U-Net's mask follows
    the warp as far as its decoder allows (convolutions are translation-, not scale-equivariant)."""
    torch.manual_seed(0)
    unet = smp.Unet("tu-swin_tiny_patch4_window7_224_dec", encoder_weights=None, classes=3, encoder_depth=4,
                    decoder_channels=(32, 16, 16, 8), decoder_interpolation="bilinear", dec_mode=mode,
                    **dict(SWIN_ARCH, img_size=128), **SMALL_DEC).eval()
    encoder = unet.encoder.model
    assert set(encoder.state_dict()) - set(features("swin", False).state_dict()) == {
        k for k in encoder.state_dict() if k.startswith("dec.")}
    map_errors = _follows_the_warp(unet.encoder, encoder.dec_model, 128)
    (mask_error,) = _follows_the_warp(unet, encoder.dec_model, 128, pool=8)
    assert len(map_errors) == 3
    if mode == "equivariant":
        assert max(map_errors) < 0.06, map_errors
        assert mask_error < 0.75, mask_error
    else:
        assert min(map_errors) > 0.9 and mask_error > 0.9, (map_errors, mask_error)  # canonical: not un-warped


def test_smp_dpt_on_a_vit_twin_loads_the_base_encoder_and_follows_a_warp():
    # timm's test_vit (6 blocks of width 64); smp's DPT takes the whole model and calls forward_intermediates
    kwargs = dict(encoder_weights=None, classes=3, decoder_intermediate_channels=(16, 16, 16, 16),
                  decoder_fusion_channels=16, img_size=64, patch_size=4)
    torch.manual_seed(0)
    base = smp.DPT("tu-test_vit", **kwargs).eval()
    torch.manual_seed(0)
    dpt = smp.DPT("tu-test_vit_dec", **kwargs, **SMALL_DEC).eval()
    kept = timm_dec.load_dec_state_dict(dpt.encoder, base.encoder.state_dict())
    assert kept and all(k.startswith("model.dec.input.") for k in kept)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dpt.encoder(x)[0], base.encoder(x)[0], rtol=1e-4, atol=1e-4)
    features_of = (lambda t: dpt.encoder(t)[0])  # noqa: E731  (the token maps; prefix tokens are not spatial)
    assert max(_follows_the_warp(features_of, dpt.encoder.model, 64)) < 0.06


def test_readme_segmentation_snippet_runs_as_written():
    text = README.read_text()
    section = text[text.index("## Segmentation"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md:Segmentation", "exec"), namespace)
    assert namespace["masks"].shape[:2] == (1, 11)
