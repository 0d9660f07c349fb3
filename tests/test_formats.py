"""The one saved format (issue 23): the record, its two forms, and every format of before still loading.

Each old format is written here as the code of before wrote it -- the tensors with `safetensors.torch.save_file` and
the legacy record as JSON (`write_legacy`) -- and must load through `timm_dec.checkpoint.load_model` (or the segment
app's `load_checkpoint`) to the same weights and outputs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import pytest
import safetensors.torch
import timm
import torch
from _tiny import logits_of, off_identity

import timm_dec  # noqa: F401  (registers the *_dec models)
from timm_dec import checkpoint, hub
from timm_dec.apps import evaluate
from timm_dec.apps.segment import PRESETS, DigitSegmenter, _canon, load_checkpoint
from timm_dec.baselines import InputCanonicalizer
from timm_dec.models import dec_options

TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=20)
DEC = dict(dec_grid=2, dec_widths=(4, 4), dec_image_widths=(4, 4), dec_max_iter=4)
DATA = dict(num_digits=2, canvas=32, digit_size=8, scale_range=[0.5, 2.0], label="digits")
PREPROCESSING = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 0.9,
                 "crop_mode": "center"}


def write_legacy(path: Path, model: torch.nn.Module, key: Optional[str] = None,
                 record: Optional[Mapping[str, Any]] = None) -> Path:
    """``model``'s weights as the code of before wrote them: a ``.safetensors`` file with ``record`` as JSON under
    the metadata ``key`` (none without one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path),
                                metadata=None if key is None else {key: json.dumps(record)})
    return path


def dec_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return off_identity(timm.create_model("vit_tiny_patch16_224_dec", **TINY, **DEC))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------------------
# the record and its two forms
# ---------------------------------------------------------------------------------------------------------------------

def test_file_and_folder_carry_the_same_record_and_load_to_the_same_model(tmp_path: Path) -> None:
    model = dec_model()
    file = checkpoint.save_model(model, tmp_path / "m.safetensors", data=DATA)
    folder = checkpoint.save_model(model, tmp_path / "m", data=DATA)
    record = checkpoint.read_record(file)
    assert record == checkpoint.read_record(folder) == json.loads((folder / "config.json").read_text())
    # timm's Hub config, with every DEC option among the model_args and the timm_dec section
    assert record["architecture"] == "vit_tiny_patch16_224_dec" and record["num_classes"] == 20
    assert {"num_features", "pretrained_cfg", "model_args"} <= set(record)
    assert {k: v for k, v in record["model_args"].items() if k.startswith("dec_")} == json.loads(
        json.dumps(dec_options(model)))
    assert record["timm_dec"]["data"] == DATA and record["timm_dec"]["version"] == timm_dec.__version__
    for source in (file, folder, f"local-dir:{folder}"):
        loaded = checkpoint.load_model(source)
        assert same_weights(loaded, model)
        torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)
    # the folder is timm's saved form: timm's own loader reads it
    torch.testing.assert_close(logits_of(timm.create_model(f"local-dir:{folder}", pretrained=True)),
                               logits_of(model), rtol=0, atol=0)
    assert checkpoint.read_saved(file).data == DATA


def test_a_wrapper_is_recorded_with_where_its_model_sits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    canon = InputCanonicalizer(timm.create_model("vit_tiny_patch16_224", **TINY), num_warps=4).eval()
    path = checkpoint.save_model(canon, tmp_path / "canon.safetensors")
    assert checkpoint.read_record(path)["timm_dec"]["wrapper"] == {"class": "InputCanonicalizer", "prefix": "model."}
    with pytest.raises(ValueError, match="weights of a InputCanonicalizer around vit_tiny_patch16_224 .*--canon"):
        checkpoint.load_model(path)
    loaded = checkpoint.load_model(path, wrap=lambda m: InputCanonicalizer(m, num_warps=4))
    assert same_weights(loaded, canon)


# ---------------------------------------------------------------------------------------------------------------------
# formats of before
# ---------------------------------------------------------------------------------------------------------------------

def test_the_demos_flat_record_of_before_loads(tmp_path: Path) -> None:
    model = dec_model()
    args = {**{k: v for k, v in TINY.items()}, **json.loads(json.dumps(dec_options(model)))}
    record = {"architecture": "vit_tiny_patch16_224_dec", "model_args": args, "pretrained_cfg": PREPROCESSING,
              "timm_dec_version": "0.1.0", "data": DATA}
    path = write_legacy(tmp_path / "dec.safetensors", model, "timm_dec", record)
    saved = checkpoint.read_saved(path)
    assert saved.architecture == "vit_tiny_patch16_224_dec" and saved.data == DATA
    assert saved.record["timm_dec"]["version"] == "0.1.0"
    loaded = checkpoint.load_model(path)
    assert same_weights(loaded, model) and loaded.dec_cfg == model.dec_cfg
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)
    # the recorded options are still compared in one place
    with pytest.raises(ValueError, match="dec_grid=4 contradicts .* trained with dec_grid=2"):
        checkpoint.load_model(path, model_kwargs=dict(dec_grid=4))
    # and the Canon checkpoint of before names its wrapper
    torch.manual_seed(1)
    canon = InputCanonicalizer(timm.create_model("vit_tiny_patch16_224", **TINY), num_warps=4).eval()
    path = write_legacy(tmp_path / "canon.safetensors", canon, "timm_dec",
                        dict(record, architecture="vit_tiny_patch16_224", model_args=TINY,
                             wrapper="InputCanonicalizer"))
    assert checkpoint.read_saved(path).wrapper == "InputCanonicalizer"
    with pytest.raises(ValueError, match="weights of a InputCanonicalizer .*pass --canon"):
        checkpoint.load_model(path)
    assert same_weights(checkpoint.load_model(path, wrap=lambda m: InputCanonicalizer(m, num_warps=4)), canon)


SEG = PRESETS["smoke"]


def segmenter(method: str, seed: int = 0) -> tuple[DigitSegmenter, dict[str, Any]]:
    """A smoke-preset segmenter of ``method`` (off the identity) and the record of before that rebuilt it."""
    torch.manual_seed(seed)
    dec = dict(dec_blocks=["input"], dec_mode="invariant", **SEG["dec_kwargs"]) if method == "dec" else {}
    arch = SEG["model"] + ("_dec" if method == "dec" else "")
    model = DigitSegmenter(timm.create_model(arch, **SEG["model_kwargs"], **dec), SEG["model_kwargs"]["patch_size"])
    if method == "canon":
        model.canon = _canon(SEG["canon_warps"], seed=2)
    off_identity(model)
    record = dict(method=method, model=arch, model_kwargs={**SEG["model_kwargs"], **dec},
                  canon_warps=SEG["canon_warps"] if method == "canon" else None)
    return model, json.loads(json.dumps(record))


@pytest.mark.parametrize("method", ["aug", "canon", "dec"])
def test_the_segment_record_of_before_loads(method: str, tmp_path: Path) -> None:
    model, record = segmenter(method)
    path = write_legacy(tmp_path / f"{method}.safetensors", model, "timm_dec_segment", record)
    loaded = load_checkpoint(path)
    assert same_weights(loaded, model)
    x = torch.randn(2, 1, SEG["canvas"], SEG["canvas"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    # timm-dec eval says what reads it, from the upgraded record
    with pytest.raises(ValueError, match=r"is a timm-dec segment checkpoint .*segment.load_checkpoint\(PATH\)"):
        evaluate._refuse_segmenter(str(path))
    with pytest.raises(ValueError, match=r"DigitSegmenter around .*: load it with .*segment.load_checkpoint"):
        checkpoint.load_model(path)


def test_a_segment_checkpoint_records_how_to_rebuild_it(tmp_path: Path) -> None:
    from timm_dec.apps.segment import _checkpoint

    model, _ = segmenter("canon")
    cfg = dict(SEG, finetune_seed=2)
    path = _checkpoint(model, tmp_path / "canon.safetensors", cfg, "canon")
    wrapper = checkpoint.read_record(path)["timm_dec"]["wrapper"]
    assert (wrapper["class"], wrapper["task"], wrapper["prefix"]) == ("DigitSegmenter", "segmentation", "backbone.")
    assert wrapper["args"] == {"patch": SEG["model_kwargs"]["patch_size"], "canon": {"num_warps": 4, "seed": 2}}
    assert same_weights(load_checkpoint(path), model)
    with pytest.raises(ValueError, match="is a timm-dec segment checkpoint"):
        evaluate._refuse_segmenter(path)


def test_the_finetune_folder_of_before_loads(tmp_path: Path) -> None:
    model = dec_model(seed=3)
    folder = tmp_path / "checkpoint-000012"
    write_legacy(folder / "model.safetensors", model)
    kwargs = {**TINY, **json.loads(json.dumps(dec_options(model)))}
    args = dict(data="digits", num_digits=2, digit_size=8, scale_range=[0.5, 2.0], img_size=32)
    (folder / "state.json").write_text(json.dumps(dict(step=12, model="vit_tiny_dec", model_kwargs=kwargs, args=args,
                                                       signature={}, scheduler={})))
    saved = checkpoint.read_saved(folder)
    assert saved.description.startswith("timm_dec.finetune checkpoint")
    assert saved.data == dict(num_digits=2, digit_size=8, scale_range=[0.5, 2.0], canvas=32)
    loaded = checkpoint.load_model(folder)
    assert same_weights(loaded, model)
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)


def test_a_save_pretrained_folder_loads_by_every_name(tmp_path: Path) -> None:
    model = dec_model(seed=4)
    folder = hub.save_pretrained(model, tmp_path / "m", data=DATA)
    assert (folder / "README.md").is_file()
    for loaded in (checkpoint.load_model(folder), checkpoint.load_model(f"local-dir:{folder}"),
                   hub.load_pretrained(folder), timm.create_model(f"local-dir:{folder}", pretrained=True)):
        assert same_weights(loaded, model)
        torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)
    assert checkpoint.read_saved(folder).data == DATA


def test_the_shipped_starts_load_unchanged() -> None:
    """The shipped starts (hash-checked, no record) are not saved models; they load as before."""
    from timm_dec.apps import demo, segment
    from timm_dec.cli import build_parser

    assert set(segment.load_start(segment.PRESETS["default"], "default")[0]) == {"plain", "aug"}
    cfg = demo.resolve_config(build_parser().parse_args(["demo"]))
    assert set(demo.load_start(cfg, "default")[0]) == {"plain", "aug"}
