"""`timm_dec.adapt` and the DEC family classes, on tiny configs of every family.

References: the base timm model with the same weights (identity at init), and a block loop written here from
public parts -- the base's own modules, ``model.dec[k]`` and `monotone_warp` -- for a DEC away from the identity.
"""
from __future__ import annotations

import copy

import pytest
import timm
import timm.optim
import torch
from _tiny import SMALL_DEC, tiny_table
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import timm_dec
from timm_dec.ops import identity_knots, monotone_warp

# family -> (base name, tiny kwargs, image size)
TINY = tiny_table("vit", "deit_distilled", "dinov2_reg", "beit", "beitv2_shared_bias", "swin", "eva02", "dinov3_reg",
                  "relpos_cls", "swinv2", "swinv2_cr", "srelpos")
FAMILIES = list(TINY)


def make_base(family: str, **kwargs) -> nn.Module:
    name, tiny, _ = TINY[family]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, drop_path_rate=0.0, **{**tiny, **kwargs})


def make_input(family: str, batch: int = 2, size: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    size = size or TINY[family][2]
    return torch.randn(batch, 3, size, size, generator=gen)


def perturb_dec(model: nn.Module, scale: float = 0.3) -> None:
    """Move every DEC away from the identity: its zero-initialised parameters (the last layer) get random values."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.dec.parameters():
            if not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def unit_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference forward_features: the input DEC's warp of the image, then the base's modules in the base's order,
    DEC and warps applied explicitly, then (equivariant) the output un-warped with the input DEC's knots."""
    equivariant = model.dec_cfg.mode == "equivariant"
    if "input" not in model.dec:
        return _unit_loop(model, x, equivariant)
    knots = model.dec["input"](x, layout="nchw")
    assert (knots - identity_knots(knots.shape[0], knots.shape[-1] - 1)).abs().max() > 1e-3  # really warped
    out = _unit_loop(model, monotone_warp(x, knots), equivariant)
    if not equivariant:
        return out
    if out.dim() == 3:  # tokens: the prefix tokens pass through
        grid = model.patch_embed.dynamic_feat_size(x.shape[-2:])
        return monotone_warp(out, knots, inverse=True, layout="tokens", grid_size=grid,
                             num_prefix_tokens=model.num_prefix_tokens)
    return monotone_warp(out, knots, inverse=True, layout="nhwc" if hasattr(model, "layers") else "nchw")


def _unit_loop(model: nn.Module, x: torch.Tensor, equivariant: bool) -> torch.Tensor:
    # a latent DEC that reads the image reads the image the blocks run on
    image = x

    def around(k, unit, feat, layout, grid=None, prefix=0, **kw):
        if str(k) not in model.dec:
            return unit(feat, **kw)
        if model.dec[str(k)].reads_image:
            knots = model.dec[str(k)](image, layout="nchw")
        else:
            knots = model.dec[str(k)](feat, layout=layout, grid_size=grid, num_prefix_tokens=prefix)
        assert (knots - identity_knots(knots.shape[0], knots.shape[-1] - 1)).abs().max() > 1e-3  # really warped
        out = unit(monotone_warp(feat, knots, layout=layout, grid_size=grid, num_prefix_tokens=prefix), **kw)
        if not equivariant:
            return out
        return monotone_warp(out, knots, inverse=True, layout=layout, grid_size=grid if layout == "tokens" else None,
                             num_prefix_tokens=prefix)

    if hasattr(model, "layers"):  # Swin, Swin V2: stages on NHWC maps
        feat = model.patch_embed(x)
        for k, stage in enumerate(model.layers):
            feat = around(k, stage, feat, "nhwc")
        return model.norm(feat)
    if hasattr(model, "stages"):  # Swin V2 cr: stages on NCHW maps, no final norm
        feat = model.patch_embed(x)
        for k, stage in enumerate(model.stages):
            feat = around(k, stage, feat, "nchw")
        return feat
    if hasattr(model, "rope"):  # Eva: RoPE for the fixed grid, per block in mixed mode
        feat = model.patch_embed(x)
        grid = tuple(feat.shape[1:3]) if feat.dim() == 4 else model.patch_embed.dynamic_feat_size(x.shape[-2:])
        feat, rope = model._pos_embed(feat)
        feat = model.norm_pre(feat)
        for k, blk in enumerate(model.blocks):
            rope_k = rope[k] if model.rope_mixed else rope
            feat = around(k, blk, feat, "tokens", grid, model.num_prefix_tokens, rope=rope_k)
        return model.norm(feat)
    if hasattr(model, "shared_rel_pos"):  # relative-position ViT: no position embedding, optional class token
        grid = model.patch_embed.dynamic_feat_size(x.shape[-2:])
        feat = model.patch_embed(x)
        if model.cls_token is not None:
            feat = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), feat), dim=1)
        shared = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
        for k, blk in enumerate(model.blocks):
            feat = around(k, blk, feat, "tokens", grid, model.num_prefix_tokens, shared_rel_pos=shared)
        return model.norm(feat)
    grid = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    feat = model.patch_embed(x)
    if hasattr(model, "rel_pos_bias"):  # BEiT
        feat = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), feat), dim=1)
        feat = feat if model.pos_embed is None else feat + model.pos_embed
        bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        for k, blk in enumerate(model.blocks):
            feat = around(k, blk, feat, "tokens", grid, 1, shared_rel_pos_bias=bias)
        return model.norm(feat)
    feat = model.norm_pre(model._pos_embed(feat))
    for k, blk in enumerate(model.blocks):
        feat = around(k, blk, feat, "tokens", grid, model.num_prefix_tokens)
    return model.norm(feat)


@pytest.mark.parametrize("mode", ["equivariant", "invariant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_matches_base(family, mode):
    base = make_base(family)
    model = timm_dec.adapt(copy.deepcopy(base), mode=mode, **SMALL_DEC)
    x = make_input(family)
    for training in (True, False):
        base.train(training)
        model.train(training)
        with torch.no_grad():
            # the same dropout draws: relpos and Swin V2 cr drop units of their position MLPs in training
            torch.manual_seed(3)
            expected = base(x)
            torch.manual_seed(3)
            got = model(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5, (family, mode, training)


@pytest.mark.parametrize("mode", ["equivariant", "invariant"])
@pytest.mark.parametrize(
    "family", ["vit", "dinov2_reg", "beitv2_shared_bias", "swin", "eva02", "dinov3_reg", "relpos_cls", "srelpos",
               "swinv2", "swinv2_cr"])
def test_adapted_blocks_match_explicit_loop(family, mode):
    blocks = ("input", 0, 1)
    model = timm_dec.adapt(make_base(family), blocks=blocks, mode=mode, **SMALL_DEC).eval()
    perturb_dec(model)
    x = make_input(family)
    with torch.no_grad():
        got = model.forward_features(x)
        expected = unit_loop(model, x)
        plain = timm_dec.adapt(make_base(family), blocks=blocks, mode=mode, **SMALL_DEC).eval().forward_features(x)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3  # the perturbed DEC changes the features


def test_prefix_tokens_pass_through_block_input():
    model = timm_dec.adapt(make_base("dinov2_reg"), blocks=(0,), **SMALL_DEC).eval()
    perturb_dec(model)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = make_input("dinov2_reg")
    with torch.no_grad():
        model(x)
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    prefix = model.num_prefix_tokens
    assert prefix == 5  # class + 4 registers
    assert torch.equal(seen[0][:, :prefix], tokens[:, :prefix])
    assert (seen[0][:, prefix:] - tokens[:, prefix:]).abs().max() > 1e-3


def test_state_dict_keys_and_dec_prefix():
    for family in ("vit", "swin"):
        base = make_base(family)
        model = timm_dec.adapt(copy.deepcopy(base), blocks=(0, 2), **SMALL_DEC)
        keys = list(model.state_dict())
        assert [k for k in keys if not k.startswith("dec.")] == list(base.state_dict())
        dec_keys = [k for k in keys if k.startswith("dec.")]
        assert dec_keys and {k.split(".")[1] for k in dec_keys} == {"0", "2"}
        assert isinstance(model.dec, nn.ModuleDict) and isinstance(model.dec["0"], timm_dec.DEC)


def test_adapt_switches_class_and_stores_frozen_config():
    base = make_base("vit")
    model = timm_dec.adapt(base, grid=3, mode="invariant", max_iter=5, **SMALL_DEC)
    assert model is base and isinstance(model, VisionTransformer) and type(model).__name__ == "VisionTransformerDEC"
    cfg = model.dec_cfg
    assert cfg.blocks == ("input",) and cfg.mode == "invariant" and cfg.options.grid == 3
    assert cfg.options.max_iter == 5 and cfg.has_input and cfg.block_indices == ()
    with pytest.raises(Exception):
        cfg.mode = "equivariant"  # frozen
    knots = model.dec["input"](torch.randn(2, 3, 32, 32), layout="nchw")
    assert knots.shape == (2, 2, 4, 4) and model.dec["input"].reads_image


def test_dec_modules_follow_the_model_device_dtype_and_mode():
    model = timm_dec.adapt(make_base("vit").eval().double(), **SMALL_DEC)
    assert not any(m.training for m in model.dec.modules())
    assert all(p.dtype == torch.float64 for p in model.dec.parameters())
    model.train()
    assert all(m.training for m in model.dec.modules())


def test_default_and_chosen_positions():
    for family in FAMILIES:  # one input DEC for every family, reading the image with the image H
        model = timm_dec.adapt(make_base(family))
        assert model.dec_cfg.blocks == ("input",) and list(model.dec) == ["input"], family
        assert model.dec["input"].in_chans == 3 and model.dec["input"].cfg.input == "image"
    assert timm_dec.adapt(make_base("vit"), blocks=-1, **SMALL_DEC).dec_cfg.blocks == (2,)
    model = timm_dec.adapt(make_base("vit"), blocks=(1, "input", 0, 1), **SMALL_DEC)
    assert model.dec_cfg.blocks == ("input", 0, 1) and list(model.dec) == ["input", "0", "1"]
    assert not model.dec["0"].reads_image and model.dec["0"].in_chans == 32  # latent DECs read the tokens
    assert timm_dec.adapt(make_base("swin"), blocks="input", **SMALL_DEC).dec_cfg.blocks == ("input",)


def test_unsupported_models_raise_type_error_listing_families():
    class MyViT(VisionTransformer):
        pass

    my_vit = MyViT(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2)
    for model in (nn.Sequential(nn.Conv2d(3, 4, 3)), my_vit):
        with pytest.raises(TypeError, match="VisionTransformer.*SwinTransformer|SwinTransformer.*VisionTransformer"):
            timm_dec.adapt(model)
    with pytest.raises(TypeError, match="nn.Module"):
        timm_dec.adapt("vit_tiny_patch16_224")


def test_bad_options_raise_clear_errors():
    base = make_base("vit")
    with pytest.raises(ValueError, match="mode"):
        timm_dec.adapt(base, mode="equivalent")
    assert type(base) is VisionTransformer and not hasattr(base, "dec")  # a rejected adapt leaves the model as is
    with pytest.raises(ValueError, match="out of range"):
        timm_dec.adapt(base, blocks=(0, 3))
    with pytest.raises(TypeError, match="unknown DEC option"):
        timm_dec.adapt(base, grdi=4)
    with pytest.raises(ValueError, match="grid"):
        timm_dec.adapt(base, grid=0)
    with pytest.raises(ValueError, match="at least one"):
        timm_dec.adapt(base, blocks=())
    with pytest.raises(TypeError, match="'input' or block indices"):
        timm_dec.adapt(base, blocks=("inputs", 0))
    timm_dec.adapt(base, **SMALL_DEC)
    with pytest.raises(ValueError, match="already adapted"):
        timm_dec.adapt(base)
    with pytest.raises(ValueError, match="patch dropout"):
        timm_dec.adapt(make_base("vit", patch_drop_rate=0.25))


def test_deepcopy_and_state_dict_round_trip():
    model = timm_dec.adapt(make_base("vit"), blocks=(0, 2), **SMALL_DEC).eval()
    perturb_dec(model)
    x = make_input("vit")
    clone = copy.deepcopy(model)
    fresh = timm_dec.adapt(make_base("vit"), blocks=(0, 2), **SMALL_DEC).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(clone(x), ref) and torch.equal(fresh(x), ref)
    assert clone.dec_cfg == model.dec_cfg and type(clone) is type(model)


def test_dynamic_img_size_at_another_resolution():
    base = make_base("vit", dynamic_img_size=True).eval()
    model = timm_dec.adapt(copy.deepcopy(base), **SMALL_DEC).eval()
    x = make_input("vit", size=48)  # 6 x 6 patches, the model was built for 4 x 4
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() <= 1e-5
        perturb_dec(model)
        assert (model.forward_features(x) - unit_loop(model, x)).abs().max() <= 1e-5
        feats = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert feats[0].shape == (2, 32, 6, 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates_match_base(family):
    base = make_base(family).eval()
    model = timm_dec.adapt(copy.deepcopy(base), blocks=(0,), **SMALL_DEC).eval()
    x = make_input(family)
    with torch.no_grad():
        final_b, inter_b = base.forward_intermediates(x)
        final_m, inter_m = model.forward_intermediates(x)
        last_b = base.forward_intermediates(x, indices=1, norm=True, stop_early=True, intermediates_only=True)
        last_m = model.forward_intermediates(x, indices=1, norm=True, stop_early=True, intermediates_only=True)
    # un-normalised maps of magnitude ~3: the identity warps' float rounding allows a relative 1e-5 here
    for a, b in zip([final_m] + inter_m + last_m, [final_b] + inter_b + last_b):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(inter_m) == len(inter_b) and len(last_m) == len(last_b) == 1


@pytest.mark.parametrize("family", ["vit", "beit", "swin", "eva02", "relpos_cls", "swinv2", "swinv2_cr"])
def test_grad_checkpointing_gives_the_same_gradients(family):
    model = timm_dec.adapt(make_base(family), blocks=(0, 1), **SMALL_DEC).train()
    perturb_dec(model)
    x = make_input(family)

    def grads(enable):
        torch.manual_seed(3)  # the same dropout draws (relpos and Swin V2 cr position MLPs)
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any(k.startswith("dec.") for k in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_pruning_drops_dec_of_removed_blocks():
    model = timm_dec.adapt(make_base("vit"), blocks=("input", 0, 2), **SMALL_DEC)
    model.prune_intermediate_layers(indices=(1,))
    assert len(model.blocks) == 2 and list(model.dec) == ["input", "0"] and model.dec_cfg.blocks == ("input", 0)


@pytest.mark.parametrize("family", ["vit", "swin", "beit", "eva02", "relpos_cls", "swinv2", "swinv2_cr"])
def test_layer_decay_groups_each_dec_with_its_block(family):
    model = timm_dec.adapt(make_base(family), blocks=("input", 0, 1), **SMALL_DEC)
    groups = timm.optim.create_optimizer_v2(model, "sgd", lr=1.0, layer_decay=0.5).param_groups
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    for k in ("0", "1"):
        unit = {"swin": f"layers.{k}.blocks.0", "swinv2": f"layers.{k}.blocks.0",
                "swinv2_cr": f"stages.{k}.blocks.0"}.get(family, f"blocks.{k}")
        block_scale = {scale[id(p)] for n, p in params.items() if n.startswith(unit + ".")}
        dec_scale = {scale[id(p)] for n, p in params.items() if n.startswith(f"dec.{k}.")}
        assert len(block_scale) == 1 and dec_scale == block_scale, (k, dec_scale, block_scale)
    # the input DEC joins the stem, with the patch embedding whose input it canonicalises
    stem_scale = {scale[id(p)] for n, p in params.items() if n.startswith("patch_embed.")}
    assert {scale[id(p)] for n, p in params.items() if n.startswith("dec.input.")} == stem_scale
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert any(any(n.startswith("dec.1.") for n in names) and any(n.startswith(("blocks.1.", "layers.1.", "stages.1."))
               for n in names) for names in coarse.values())


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_and_fx_raise_clear_errors():
    model = timm_dec.adapt(make_base("vit"), blocks=(0,), **SMALL_DEC).eval()
    with pytest.raises(TypeError, match="TorchScript"):
        torch.jit.script(model)
    with pytest.raises(TypeError, match="FX symbolic tracing"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(TypeError, match="torch.jit.trace"):
        torch.jit.trace(model, make_input("vit"))
    swin = timm_dec.adapt(make_base("swin"), **SMALL_DEC)
    with pytest.raises(TypeError, match="FX symbolic tracing"):
        torch.fx.symbolic_trace(swin)
