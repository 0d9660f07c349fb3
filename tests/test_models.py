"""The ``*_dec`` registry: names, pretrained cfgs, create_model keywords, pretrained loading, features_only.

Nothing downloads: pretrained loading reads local safetensors files through ``pretrained_cfg_overlay=dict(file=...)``
and ``checkpoint_path``. Structure checks of full-size models run on the meta device.
"""
from __future__ import annotations

import pytest
import timm
import torch
from _tiny import SMALL_DEC_KWARGS, tiny_table
from safetensors.torch import save_file
from timm.data import resolve_data_config

import timm_dec
from timm_dec.models import base_model_name

# the timm modules whose models are VisionTransformer, VisionTransformerDistilled, Beit, SwinTransformer, Eva,
# VisionTransformerRelPos, SwinTransformerV2 or SwinTransformerV2Cr: every model of these modules has a twin
SUPPORTED_MODULES = {
    "timm.models.vision_transformer", "timm.models.vision_transformer_hybrid", "timm.models.deit",
    "timm.models.beit", "timm.models.swin_transformer", "timm.models.eva", "timm.models.vision_transformer_relpos",
    "timm.models.swin_transformer_v2", "timm.models.swin_transformer_v2_cr",
}
SUPPORTED_CLASSES = {
    "VisionTransformer", "VisionTransformerDistilled", "Beit", "SwinTransformer", "Eva", "VisionTransformerRelPos",
    "SwinTransformerV2", "SwinTransformerV2Cr",
}
ALIASES = {
    "vit_tiny_dec": "vit_tiny_patch16_224", "vit_small_dec": "vit_small_patch16_224",
    "vit_base_dec": "vit_base_patch16_224", "vit_large_dec": "vit_large_patch16_224",
    "deit_tiny_dec": "deit_tiny_patch16_224", "deit_small_dec": "deit_small_patch16_224",
    "deit_base_dec": "deit_base_patch16_224",
    "swin_tiny_dec": "swin_tiny_patch4_window7_224", "swin_small_dec": "swin_small_patch4_window7_224",
    "swin_base_dec": "swin_base_patch4_window7_224", "swin_large_dec": "swin_large_patch4_window7_224",
    "beit_base_dec": "beit_base_patch16_224", "beit_large_dec": "beit_large_patch16_224",
    "vit_small_dinov3_dec": "vit_small_patch16_dinov3", "vit_base_dinov3_dec": "vit_base_patch16_dinov3",
    "vit_large_dinov3_dec": "vit_large_patch16_dinov3",
    "eva02_tiny_dec": "eva02_tiny_patch14_224", "eva02_small_dec": "eva02_small_patch14_224",
    "eva02_base_dec": "eva02_base_patch14_224", "eva02_large_dec": "eva02_large_patch14_224",
    "swinv2_tiny_dec": "swinv2_tiny_window8_256", "swinv2_small_dec": "swinv2_small_window8_256",
    "swinv2_base_dec": "swinv2_base_window8_256",
}
TINY = tiny_table("vit", "deit3", "beit", "swin", "eva02", "dinov3_reg", "relpos_cls", "swinv2", "swinv2_cr")
SMALL_DEC = SMALL_DEC_KWARGS


def expected_bases() -> list[str]:
    """Independent of the registry code: every timm name whose entrypoint module is supported."""
    names = timm.list_models(exclude_filters=["*_dec"])
    return [n for n in names if timm.models.model_entrypoint(n).__module__ in SUPPORTED_MODULES]


def tiny(family: str, dec: bool, **kwargs) -> torch.nn.Module:
    name, args, _ = TINY[family]
    torch.manual_seed(0)
    extra = SMALL_DEC if dec else {}
    return timm.create_model(name + ("_dec" if dec else ""), num_classes=5, **{**args, **extra, **kwargs})


def image(family: str, batch: int = 2) -> torch.Tensor:
    size = TINY[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_every_supported_base_has_its_twin_and_nothing_else():
    bases = expected_bases()
    assert len(bases) == 316  # timm 1.0.31; the README states the count
    for name in ("swin_tiny_patch4_window7_224", "deit_tiny_distilled_patch16_224", "vit_7b_patch16_dinov3",
                 "eva02_tiny_patch14_224", "vit_pe_core_tiny_patch16_384", "vit_srelpos_small_patch16_224",
                 "swinv2_tiny_window8_256", "swinv2_cr_tiny_224", "eva_large_patch14_196", "aimv2_large_patch14_224"):
        assert name in bases, name
    twins = {f"{b}_dec" for b in bases}
    listed = set(timm_dec.list_dec_models())
    assert listed == twins | set(ALIASES)
    assert set(timm.list_models("*_dec")) == listed
    for base in bases:
        assert base_model_name(f"{base}_dec") == base


def test_every_twin_is_built_by_a_supported_class():
    # timm's own build arguments, captured without building: each base is one of the supported classes
    from timm_dec.models._registry import _capture_base_build

    classes = {_capture_base_build(base, False, {})["model_cls"].__name__ for base in expected_bases()}
    assert classes == SUPPORTED_CLASSES


def test_unsupported_classes_are_not_registered():
    # other ViT-like classes (NaFlexViT, SAM ViT, ViTamin, LeViT, Hiera, ...) are not supported: no twin
    skipped = set(timm.list_models(["*vit*", "*swin*", "*eva*", "*beit*", "*deit*"], exclude_filters=["*_dec"]))
    skipped -= set(expected_bases())
    assert len(skipped) > 20 and all(f"{n}_dec" not in timm.list_models("*_dec") for n in skipped)


def test_pretrained_tags_and_cfgs_mirror_the_bases():
    bases = set(expected_bases())
    base_tags = {n.replace(".", "_dec.", 1) if "." in n else n + "_dec"
                 for n in timm.list_pretrained() if n.split(".")[0] in bases}
    alias_tags = {n for n in timm.list_pretrained("*_dec") if n.split(".")[0] in ALIASES}
    assert set(timm.list_pretrained("*_dec")) - alias_tags == base_tags
    for base in ("vit_small_patch16_224", "swin_tiny_patch4_window7_224", "beitv2_base_patch16_224",
                 "vit_small_patch16_dinov3", "eva02_tiny_patch14_224", "vit_pe_core_tiny_patch16_384",
                 "vit_relpos_base_patch16_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224"):
        base_cfgs = timm.models.get_arch_pretrained_cfgs(base)
        dec_cfgs = timm.models.get_arch_pretrained_cfgs(base + "_dec")
        assert list(dec_cfgs) == [k.replace(base, base + "_dec", 1) for k in base_cfgs]  # same tags, same order
        for (bk, bcfg), dcfg in zip(base_cfgs.items(), dec_cfgs.values()):
            assert dcfg.hf_hub_id == bcfg.hf_hub_id and bcfg.hf_hub_id.startswith("timm/" + base)
            assert dcfg.architecture == base + "_dec"
            assert {**vars(dcfg), "architecture": None} == {**vars(bcfg), "architecture": None}
        default = timm.models.get_pretrained_cfg(base + "_dec")
        assert default.tag == timm.models.get_pretrained_cfg(base).tag


def test_aliases_resolve_to_the_224_bases():
    for alias, base in ALIASES.items():
        assert base_model_name(alias) == base
        assert timm.models.get_pretrained_cfg(alias).hf_hub_id == timm.models.get_pretrained_cfg(base).hf_hub_id
    for alias in ("vit_small_dec", "swin_tiny_dec", "beit_base_dec", "deit_tiny_dec", "vit_small_dinov3_dec",
                  "eva02_tiny_dec", "swinv2_tiny_dec"):
        model = timm.create_model(alias, device="meta")
        base = timm.create_model(ALIASES[alias], device="meta")
        assert isinstance(model, type(base)) and type(model).__name__.endswith("DEC")
        shapes = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("dec.")}
        assert shapes == {k: v.shape for k, v in base.state_dict().items()}


def test_unknown_dec_name_gives_timms_error():
    with pytest.raises(RuntimeError, match=r"Unknown model \(vit_nonexistent_dec\)"):
        timm.create_model("vit_nonexistent_dec")
    with pytest.raises(ValueError, match="not a registered timm_dec model"):
        base_model_name("resnet50")


def test_dec_kwargs_pass_through_create_model():
    model = tiny("vit", True, dec_blocks=(1,), dec_grid=3, dec_mode="invariant", dec_max_iter=4, dec_tol=1e-2)
    cfg = model.dec_cfg
    assert cfg.blocks == (1,) and cfg.mode == "invariant"
    assert (cfg.options.grid, cfg.options.max_iter, cfg.options.tol, cfg.options.widths) == (3, 4, 1e-2, (8, 8))
    assert list(model.dec) == ["1"]
    assert model._model_args["dec_grid"] == 3  # recorded by create_model for reconstruction
    assert model.pretrained_cfg["architecture"] == "vit_tiny_patch16_224_dec"
    with pytest.raises(TypeError, match="unknown DEC option 'dec_gird'"):
        tiny("vit", True, dec_gird=8)


@pytest.mark.parametrize("family", list(TINY))
def test_base_checkpoint_loads_strictly_via_overlay_file(family, tmp_path):
    base = tiny(family, False).eval()
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    # num_classes in the overlay: a classifier mismatch would make timm's loader non-strict
    overlay = dict(file=str(path), num_classes=5)
    model = tiny(family, True, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = image(family)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() <= 1e-5
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_base_filter_still_applies(tmp_path):
    # a 32 px checkpoint into a 48 px model: the ViT filter resamples pos_embed, as for the base model
    base = tiny("vit", False)
    path = tmp_path / "base32.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    overlay = dict(file=str(path), num_classes=5)
    base48 = tiny("vit", False, img_size=48, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    model48 = tiny("vit", True, img_size=48, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    torch.testing.assert_close(model48.pos_embed, base48.pos_embed)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (model48(x) - base48(x)).abs().max() <= 1e-5


def test_full_dec_checkpoint_loads_strictly(tmp_path):
    model = tiny("swin", True, dec_blocks=(0, 1)).eval()
    with torch.no_grad():
        for p in model.dec.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "dec.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    overlay = dict(file=str(path), num_classes=5)
    via_overlay = tiny("swin", True, dec_blocks=(0, 1), pretrained=True, pretrained_cfg_overlay=overlay)
    via_path = tiny("swin", True, dec_blocks=(0, 1), checkpoint_path=str(path))
    for other in (via_overlay, via_path):
        assert other.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
    # a DEC the model does not have is an error, not silently dropped
    with pytest.raises(ValueError, match=r"position\(s\) \['1'\].*dec_blocks=\(0,\)"):
        tiny("swin", True, dec_blocks=(0,), pretrained=True, pretrained_cfg_overlay=overlay)
    # and a strict load of a base-only checkpoint through checkpoint_path names the missing DEC keys
    base_path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("dec.")}, str(base_path))
    with pytest.raises(RuntimeError, match=r"Missing key.*dec\.input\."):
        tiny("swin", True, checkpoint_path=str(base_path))


@pytest.mark.parametrize("family", ["vit", "beit", "swin", "eva02", "dinov3_reg", "relpos_cls", "swinv2", "swinv2_cr"])
def test_features_only_matches_base(family):
    base = tiny(family, False, features_only=True, out_indices=(0, 1)).eval()
    model = tiny(family, True, features_only=True, out_indices=(0, 1)).eval()
    x = image(family)
    with torch.no_grad():
        feats_b, feats_m = base(x), model(x)
    assert [f.shape for f in feats_m] == [f.shape for f in feats_b]
    for a, b in zip(feats_m, feats_b):
        # un-normalised stage maps (magnitude ~3): the identity warps' float rounding scales with the map
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    assert model.feature_info.channels() == base.feature_info.channels()
    assert model.feature_info.reduction() == base.feature_info.reduction()


def test_timm_model_api_on_a_dec_model():
    model = tiny("deit3", True, drop_rate=0.1, drop_path_rate=0.1, global_pool="avg")
    assert model.get_classifier().out_features == 5
    model.reset_classifier(7)
    assert model(image("deit3")).shape == (2, 7)
    assert model.forward_head(model.forward_features(image("deit3")), pre_logits=True).shape == (2, 32)
    assert resolve_data_config({}, model=model) == resolve_data_config({}, model=tiny("deit3", False))
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
