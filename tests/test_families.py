"""The families added for timm's ``Eva`` (EVA02, RoPE ViTs, DINOv3, PE), ``VisionTransformerRelPos`` and Swin V2
(``SwinTransformerV2``, ``SwinTransformerV2Cr``): what the shared parametrised tests do not already say.

* A RoPE block adapted by a DEC sees the canonical map on the fixed token grid (latent canonicalisation, paper
  Sec. 4.3): with the DEC at the identity the adapted block is the block; with a small warp it is
  ``S(block(S^{-1}(x)))`` computed here by hand with `timm_dec.ops.monotone_warp`, the block receiving the
  base's own RoPE embedding for the grid.
* Mixed-mode RoPE hands block k its own embedding; DINOv3's dynamic image size works at another resolution.
* ``timm.create_model(name, device="meta")`` and a forward on meta tensors (shapes only), float32 and bfloat16,
  for one model of every family, old and new: how large models are built before sharding.

Identity at init, batch independence, forward_intermediates, features_only, grad checkpointing, layer decay and the
train.py contract of the new families are in the shared tests (`test_adapt`, `test_models`, `test_robustness`,
`test_timm_contract`), parametrised over every family.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
from _tiny import SMALL_DEC, tiny_table
from torch import nn

import timm_dec
from timm_dec.ops import identity_knots, knots_from_logits, monotone_warp

# family -> (timm base name, tiny architecture kwargs, image size); layer scale 1 so that the blocks matter
TINY = tiny_table("dinov3_reg", "eva02", "rope_mixed")


def make_base(family: str, **kwargs: Any) -> nn.Module:
    name, arch, _ = TINY[family]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **{**arch, **kwargs})


def make_input(family: str, batch: int = 2, size: int | None = None) -> torch.Tensor:
    size = size or TINY[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def perturb_dec(model: nn.Module, std: float) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for dec in model.dec.values():
            for p in (dec.head.weight,):
                p.copy_(std * torch.randn(p.shape, generator=gen))


def block_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Tokens entering block 0, the model's RoPE embedding for the grid and the grid, from the base's own parts."""
    feat = model.patch_embed(x)
    grid = tuple(feat.shape[1:3])  # DINOv3: dynamic image size, NHWC patch embedding
    tokens, rope = model._pos_embed(feat)
    return model.norm_pre(tokens), rope, grid


# ---------------------------------------------------------------------------------------------------------------------
# A RoPE block: the equivariant round trip


def test_rope_block_at_identity_knots_is_the_block():
    model = timm_dec.adapt(make_base("dinov3_reg"), blocks=(0,), **SMALL_DEC).eval()
    tokens, rope, grid = block_inputs(model, make_input("dinov3_reg"))
    assert rope is not None and model.num_prefix_tokens == 5  # RoPE, a class token and 4 registers
    block = model.blocks[0]
    with torch.no_grad():
        knots = model.dec["0"](tokens, layout="tokens", grid_size=grid, num_prefix_tokens=5)
        assert torch.equal(knots, identity_knots(2, model.dec["0"].cfg.grid))
        got = model.dec_block(0, block, tokens, layout="tokens", grid_size=grid, num_prefix_tokens=5, rope=rope)
        expected = block(tokens, rope=rope)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_rope_block_under_a_small_warp_is_s_block_s_inverse():
    model = timm_dec.adapt(make_base("dinov3_reg"), blocks=(0,), **SMALL_DEC).eval()
    tokens, rope, grid = block_inputs(model, make_input("dinov3_reg"))
    # a small warp, but a warp: the DEC is made to return these knots (its own equilibrium is H's zero, whatever
    # H's scale, so perturbing H gives no control over the warp's size)
    gen = torch.Generator().manual_seed(4)
    knots = knots_from_logits(0.15 * torch.randn(2, 2, 5, 4, generator=gen))
    shift = (knots - identity_knots(2, 4)).abs().max().item()
    assert 1e-3 < shift < 0.1, shift
    model.dec["0"].forward = lambda x, **kwargs: knots
    block = model.blocks[0]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    block.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args[0], kwargs["rope"])), with_kwargs=True)
    with torch.no_grad():
        got = model.dec_block(0, block, tokens, layout="tokens", grid_size=grid, num_prefix_tokens=5, rope=rope)
        canonical = monotone_warp(tokens, knots, layout="tokens", grid_size=grid, num_prefix_tokens=5)  # S^{-1}(x)
        out = block(canonical, rope=rope)
        expected = monotone_warp(out, knots, inverse=True, layout="tokens", grid_size=grid, num_prefix_tokens=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the block saw the canonical map, and the base's RoPE for the fixed grid, untouched
    block_in, block_rope = seen[0]
    torch.testing.assert_close(block_in, canonical, rtol=0, atol=0)
    assert torch.equal(block_rope, model.rope.get_embed(shape=grid))
    assert torch.equal(block_in[:, :5], tokens[:, :5])  # prefix tokens unwarped
    assert (got - block(tokens, rope=rope)).abs().max() > 1e-3  # the warp matters


def test_whole_model_matches_a_loop_with_the_fixed_grid_rope():
    model = timm_dec.adapt(make_base("dinov3_reg"), blocks=(0, 1), **SMALL_DEC).eval()
    perturb_dec(model, std=0.3)
    x = make_input("dinov3_reg")
    with torch.no_grad():
        feat, rope, grid = block_inputs(model, x)
        for k, blk in enumerate(model.blocks):
            knots = model.dec[str(k)](feat, layout="tokens", grid_size=grid, num_prefix_tokens=5)
            out = blk(monotone_warp(feat, knots, layout="tokens", grid_size=grid, num_prefix_tokens=5), rope=rope)
            feat = monotone_warp(out, knots, inverse=True, layout="tokens", grid_size=grid, num_prefix_tokens=5)
        torch.testing.assert_close(model.forward_features(x), model.norm(feat), rtol=1e-5, atol=1e-5)


def test_mixed_rope_gives_each_block_its_own_embedding():
    base = make_base("rope_mixed").eval()
    model = timm_dec.adapt(copy.deepcopy(base), blocks=(0, 1), **SMALL_DEC).eval()
    assert model.rope_mixed
    seen: dict[int, torch.Tensor] = {}
    for k, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda mod, args, kwargs, k=k: seen.__setitem__(k, kwargs["rope"]),
                                      with_kwargs=True)
    x = make_input("rope_mixed")
    with torch.no_grad():
        got, expected = model(x), base(x)
    assert (got - expected).abs().max() <= 1e-5
    table = model.rope.get_embed()
    assert all(torch.equal(seen[k], table[k]) for k in (0, 1)) and not torch.equal(table[0], table[1])


def test_dinov3_dynamic_img_size_at_another_resolution():
    base = make_base("dinov3_reg").eval()
    assert base.dynamic_img_size
    model = timm_dec.adapt(copy.deepcopy(base), **SMALL_DEC).eval()
    x = make_input("dinov3_reg", size=48)  # 6 x 6 patches; the model was built for 4 x 4
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() <= 1e-5
        feats = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert feats[0].shape == (2, 32, 6, 6)


def test_patch_dropout_is_refused():
    with pytest.raises(ValueError, match="patch dropout"):
        timm_dec.adapt(make_base("eva02", patch_drop_rate=0.25))


# ---------------------------------------------------------------------------------------------------------------------
# Meta device: build and forward with shapes only


META_MODELS = [
    "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "beit_base_patch16_224", "swin_tiny_patch4_window7_224",
    "eva02_tiny_patch14_224", "vit_small_patch16_dinov3", "vit_relpos_small_patch16_224", "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224",
]


@pytest.mark.parametrize("name", META_MODELS)
def test_meta_device_build_and_forward_fp32_and_bf16(name):
    model = timm.create_model(name + "_dec", device="meta").eval()
    assert all(p.is_meta for p in model.parameters()) and len(model.dec) > 0
    _, height, width = model.pretrained_cfg["input_size"]
    out_dim = model.num_classes or model.num_features
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        x = torch.empty(2, 3, height, width, device="meta", dtype=dtype)
        with torch.no_grad():
            out = model(x)
            feats = model.forward_intermediates(x, intermediates_only=True)
        assert out.is_meta and out.shape == (2, out_dim) and out.dtype == dtype
        # every unit's map, NCHW, with timm's channels and reduction
        expected = [(2, info["num_chs"], height // info["reduction"], width // info["reduction"])
                    for info in model.feature_info]
        assert [tuple(f.shape) for f in feats] == expected
        assert all(f.is_meta and f.dtype == dtype for f in feats)


def test_meta_device_builds_the_7b_dinov3_without_memory():
    model = timm.create_model("vit_7b_patch16_dinov3_dec", device="meta")
    assert type(model).__name__ == "EvaDEC" and all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("dec.")) > 6e9
    x = torch.empty(1, 3, 64, 64, device="meta")
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)  # headless (num_classes=0)


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile on a RoPE model (the ViT compile test in test_timm_contract covers the solve's graph break)


@pytest.mark.slow
def test_torch_compile_of_a_rope_model_matches_eager():
    # the absolute update with this head is a contraction, so eager and compiled agree to rounding (measured: equal);
    # an unconverged residual solve from random heads magnifies AOTAutograd's rounding changes (tests/test_compile.py).
    # 4 iterations: Dynamo unrolls each one (8 took 85 s here, 4 take 53 s), and the graphs are the same whatever the
    # count: every sample runs all of them in eager too (at 8, one sample of two reached tol at the eighth), and a
    # compiled solve reads nothing on the host
    model = timm_dec.adapt(make_base("dinov3_reg"), blocks=(0, 1), update="absolute", max_iter=4,
                           **SMALL_DEC).eval()
    perturb_dec(model, std=0.3)
    x = make_input("dinov3_reg")
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        expected = model(x)
        got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    model.train()
    compiled(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.dec.parameters())
