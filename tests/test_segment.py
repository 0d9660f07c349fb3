"""``timm-dec segment``: the smoke preset end to end, and the pieces whose meaning a run relies on."""
from __future__ import annotations

import json

import safetensors.torch
import timm
import torch

from timm_dec.apps.segment import PRESETS, DigitSegmenter, SegDigits, _dec_model, miou_per_image
from timm_dec.cli import main
from timm_dec.data import random_knots
from timm_dec.ops import monotone_warp


def test_segment_smoke_prints_the_tables_and_writes_summary_and_checkpoints(tmp_path, capsys):
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for row in ("Base", "Aug", "AugL", "Canon", "DEC", "Aug+time", "paired bootstrap", "EquE hard"):
        assert row in text, row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["paired"]) == {"base", "augl", "canon", "dec", "aug_time"}
    assert summary["paired"]["dec"]["miou"]["low"] <= summary["paired"]["dec"]["miou"]["diff"]
    assert (tmp_path / "masks.png").stat().st_size > 0
    for method, path in summary["checkpoints"].items():
        keys = safetensors.torch.load_file(path).keys()
        assert any(k.startswith("backbone.dec.input.") for k in keys) == (method == "dec")


def test_masks_label_the_digit_pixels_and_follow_the_per_digit_scales():
    data = SegDigits("test", 4, PRESETS["smoke"])
    image, mask = data.render(0)
    digits = data.digits.describe(0).digits
    assert torch.equal(image, data.images[0]) and torch.equal(mask, data.masks[0])
    assert set(mask.unique().tolist()) == {0, *(d + 1 for d in digits)}
    assert torch.equal(mask > 0, image[0] > -0.5)  # brighter than 0.25 in [0, 1] <=> labelled
    small, large = (data.render(0, (s, s))[1] for s in (0.6, 1.6))
    assert (large > 0).sum() > 3 * (small > 0).sum()


def test_miou_per_image():
    target = torch.tensor([[[0, 0, 1, 1]]])
    assert miou_per_image(target, target).item() == 100.0
    assert abs(miou_per_image(torch.tensor([[[0, 0, 0, 1]]]), target).item() - 100 * (2 / 3 + 1 / 2) / 2) < 1e-4


def test_the_dec_segmenter_unwarps_its_mask_to_the_input_geometry():
    """S(M(S^{-1}(I))): with the input DEC's knots fixed to phi, the DEC segmenter's logits are the start's logits
    of the canonical image, warped back with phi (a broken un-warp or a double canonicalisation fails)."""
    cfg = PRESETS["smoke"]
    torch.manual_seed(0)
    start = DigitSegmenter(timm.create_model(cfg["model"], **cfg["model_kwargs"]), 8).eval()
    model = _dec_model(start, cfg).eval()
    x = torch.randn(2, 1, 32, 32)
    phi = random_knots(2, grid=cfg["dec_kwargs"]["dec_grid"], strength=0.3, generator=torch.Generator().manual_seed(0))

    class Known(torch.nn.Module):
        def forward(self, image, layout="nchw"):
            return phi

    model.backbone.dec["input"] = Known()
    with torch.no_grad():
        expected = monotone_warp(start(monotone_warp(x, phi)), phi, inverse=True)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
