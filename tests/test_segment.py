"""``timm-dec segment``: the smoke preset end to end, and the pieces whose meaning a run relies on."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import safetensors.torch
import torch

from timm_dec.apps.segment import (
    PRESETS,
    SegDigits,
    _dec_model,
    load_checkpoint,
    miou_per_image,
    segmenter,
)
from timm_dec.cli import main
from timm_dec.data import random_knots
from timm_dec.dec import DEC
from timm_dec.ops import monotone_warp

SUMMARY_KEYS = {"command", "preset", "config", "start", "methods", "paired", "equal_time_calibration", "tables",
                "files", "task", "wall_seconds", "machine"}  # the runner's summary.json, demo's and segment's


@pytest.fixture(scope="module")
def segment_run(tmp_path_factory):
    """The smoke preset with every method: its output folder and what it printed (stdout, stderr)."""
    out = tmp_path_factory.mktemp("segment") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(["segment", "--preset", "smoke", "--threads", "1", "--out", str(out)]) == 0
    return out, stdout.getvalue(), stderr.getvalue()


def test_segment_smoke_prints_the_tables_and_writes_summary_and_checkpoints(segment_run):
    tmp_path, text, err = segment_run
    lines = text.strip().splitlines()
    assert "numbers mean nothing" in lines[0]  # said first, before any number
    # the last line lists every file written and what reads a checkpoint
    assert re.search(r"wrote .*: summary.json, tables.txt, masks.png, checkpoints/ .*timm-dec eval does not read"
                     r".*load_checkpoint\(PATH\)", lines[-1]), lines[-1]
    assert "Aug+time: 100%" in err  # a progress bar per training run, as the demo's
    for row in ("Base", "Aug", "AugL", "Canon", "DEC", "Aug+time", "bootstrap intervals", "EquE hard", "mIoU S",
                "DEC - Aug+time"):
        assert row in text, row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["command"] == "segment" and summary["task"] == {}
    assert summary["files"] == ["tables.txt", "masks.png"] and summary["machine"]["torch_threads"] == 1
    assert set(summary["paired"]) == {"base", "augl", "canon", "dec", "aug_time", "dec_vs_aug_time",
                                     "dec_vs_base"}
    assert summary["paired"]["dec"]["miou"]["low"] <= summary["paired"]["dec"]["miou"]["diff"]
    assert (tmp_path / "masks.png").stat().st_size > 0
    methods = summary["methods"]
    assert list(methods) == ["base", "aug", "augl", "canon", "dec", "aug_time"]
    for method, entry in methods.items():
        assert set(entry) == {"training", "results", "eval_seconds", "checkpoint"}, method
        assert {"steps", "dec_only_steps", "backbone_steps", "seconds", "final_loss"} == set(entry["training"])
    own = summary["config"]["finetune_steps"]
    assert methods["dec"]["training"]["dec_only_steps"] == PRESETS["smoke"]["dec_warmup_steps"]
    assert methods["aug"]["training"]["steps"] == own and methods["aug"]["training"]["dec_only_steps"] == 0
    assert methods["aug_time"]["training"]["steps"] == summary["equal_time_calibration"]["steps"] >= own
    solver = methods["dec"]["results"]["dec_solver"]  # the DEC's solves, reported beside its result
    assert solver["solves"] == summary["config"]["test_samples"] and 0 <= solver["within_tol"] <= 1
    assert sum(solver["iteration_counts"]) == solver["solves"] and solver["iterations_sd"] >= 0
    assert "solves within tol" in text and methods["aug"]["results"]["dec_solver"] is None
    x = SegDigits("test", 2, PRESETS["smoke"]).images
    for method, entry in methods.items():
        path = entry["checkpoint"]
        keys = safetensors.torch.load_file(path).keys()
        assert any(k.startswith("backbone.dec.input.") for k in keys) == (method == "dec")
        with torch.no_grad():
            assert load_checkpoint(path)(x).shape == (2, 11, 32, 32)  # rebuilt from its metadata, loaded strictly


def test_a_subset_of_methods_trains_them_as_the_full_run_does(segment_run, tmp_path):
    """The runner builds the methods in order from the start, the DEC's H from the fine-tuning seed, each method's
    batches and warps from a generator of its own: `--methods aug,dec` trains the full run's Aug and DEC bit for bit."""
    full = segment_run[0]
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--no-progress", "--methods", "aug,dec",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["methods"]) == ["aug", "dec"]  # Aug, the reference, always runs
    for method in ("aug", "dec"):
        a = safetensors.torch.load_file(full / "checkpoints" / f"{method}.safetensors")
        b = safetensors.torch.load_file(tmp_path / "checkpoints" / f"{method}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method


def test_dec_solver_options_reach_the_dec_and_its_checkpoint(tmp_path):
    """--dec-beta / --dec-jac-reg / --dec-grad-tol are the DECs' options (not the preset's): trained with, recorded,
    rebuilt."""
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--no-progress", "--methods", "aug,dec",
                 "--finetune-steps", "1", "--dec-beta", "0.25", "--dec-jac-reg", "0", "--dec-grad-tol", "1e-5",
                 "--out", str(tmp_path)]) == 0
    recorded = json.loads((tmp_path / "summary.json").read_text())["config"]["dec_kwargs"]
    assert (recorded["dec_beta"], recorded["dec_jac_reg"], recorded["dec_grad_tol"]) == (0.25, 0, 1e-5)
    decs = [m for m in load_checkpoint(tmp_path / "checkpoints" / "dec.safetensors").modules() if isinstance(m, DEC)]
    assert decs and all((d.cfg.beta, d.cfg.jac_reg, d.cfg.grad_tol) == (0.25, 0, 1e-5) for d in decs)


def test_progress_bars_and_no_progress(tmp_path, capsys):
    argv = ["segment", "--preset", "smoke", "--threads", "1", "--methods", "aug", "--finetune-steps", "2"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert re.search(r"Aug: 100%.*2/2", capsys.readouterr().err)
    assert main(argv + ["--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "100%" not in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--train-samples", "1"], r"--train-samples must be >= 2, got 1"),
    (["--test-samples", "1"], r"--test-samples must be >= 2 \(the paired bootstrap needs 2 test scenes\), got 1"),
    (["--out", "/proc/x"], r"--out /proc/x: cannot write in /proc"),
    (["--write-start", "/proc/x"], r"--write-start /proc/x: cannot write in /proc"),
    (["--out", "{tmp}/a_file"], r"--out .*a_file is a file, not a folder"),
    (["--out", "{tmp}/missing/out"], r"the folder .*missing does not exist \(only the named folder is created"),
    (["--methods", "dec,invl"], r"--methods: unknown method\(s\) \['invl'\]; choose from base, aug, augl, canon, dec, "
                                r"dec_base, aug_time$"),
    (["--seed", "-1"], r"--seed must be >= 0, got -1$"),
    (["--threads", "0"], r"--threads must be >= 1, got 0$"),
    (["--dec-beta", "1.5"], r"--dec-beta: dec beta .* must be in \(0, 1\] .*got 1.5"),
    (["--dec-jac-reg", "-1"], r"--dec-jac-reg: dec jac_reg must be a finite number >= 0, got -1.0$"),
    (["--dec-grad-tol", "-1"], r"--dec-grad-tol: dec grad_tol must be a positive finite number \(or None\), got -1.0$"),
])
def test_segment_options_are_checked_before_any_work(extra, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--no-progress", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing started
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timm-dec segment: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "missing").exists()


def test_masks_label_the_digit_pixels_and_follow_the_per_digit_scales():
    data = SegDigits("test", 4, PRESETS["smoke"])
    image, mask = data.render(0)
    digits = data.digits.describe(0).digits
    assert torch.equal(image, data.images[0]) and torch.equal(mask, data.masks[0])
    assert set(mask.unique().tolist()) == {0, *(d + 1 for d in digits)}
    assert torch.equal(mask > 0, image[0] > -0.5)  # brighter than 0.25 in [0, 1] <=> labelled
    small, large = (data.render(0, (s, s))[1] for s in (0.6, 1.6))
    assert (large > 0).sum() > 3 * (small > 0).sum()


def test_equivariance_errors_vanish_for_a_pointwise_model_and_not_for_a_shifted_one():
    """A per-pixel model commutes with every warp (up to interpolation): soft and hard EquE near 0, and its mIoU on
    warped scenes against their warped masks is its mIoU. The same model shifted by 5 px does not commute."""
    from timm_dec.apps.segment import evaluate

    cfg = dict(PRESETS["smoke"], equ_images=32, scale_images=2, eval_batch=32, equ_strength=0.5)
    data = SegDigits("test", 32, cfg)

    class Pointwise(torch.nn.Module):
        def __init__(self, shift: int = 0) -> None:
            super().__init__()
            self.shift = shift

        def forward(self, x):
            x = x + 0.5  # the masks label pixels brighter than 0.25, -0.5 once normalised
            logits = torch.cat([-4 * x, 4 * x.expand(-1, 10, -1, -1) - torch.arange(10.0).view(1, 10, 1, 1)], 1)
            return torch.roll(logits, self.shift, dims=-1)

    same, shifted = evaluate(Pointwise(), data, cfg), evaluate(Pointwise(5), data, cfg)
    assert same["eque_hard"] < 0.25 * shifted["eque_hard"] and same["eque_soft"] < 0.25 * shifted["eque_soft"]
    assert abs(same["miou_warped"] - same["miou"]) < 3  # 0.9 measured; masks warped the other way: 6.9


def test_miou_per_image():
    target = torch.tensor([[[0, 0, 1, 1]]])
    assert miou_per_image(target, target).item() == 100.0
    assert abs(miou_per_image(torch.tensor([[[0, 0, 0, 1]]]), target).item() - 100 * (2 / 3 + 1 / 2) / 2) < 1e-4


SWIN_SMOKE = dict(PRESETS["smoke"], model="swin_tiny_patch4_window7_224",
                  model_kwargs=dict(img_size=32, patch_size=2, window_size=4, embed_dim=8, depths=(1, 1),
                                    num_heads=(1, 2), in_chans=1, num_classes=0))


@pytest.mark.parametrize("cfg, stride", [(PRESETS["smoke"], 8), (SWIN_SMOKE, 4)], ids=["vit", "swin"])
def test_the_dec_segmenter_unwarps_its_mask_to_the_input_geometry(cfg, stride):
    """S(M(S^{-1}(I))): with the input DEC's knots fixed to phi, the DEC segmenter's logits are the start's logits
    of the canonical image, warped back with phi (a broken un-warp or a double canonicalisation fails); on a ViT's
    tokens and on a Swin's last stage (NHWC), each decoded from its own stride."""
    torch.manual_seed(0)
    start = segmenter(cfg).eval()
    assert start.patch == stride
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
        assert expected.shape == (2, 11, 32, 32)


def test_write_start_then_a_run_from_it(tmp_path, monkeypatch, capsys):
    """``--write-start`` writes the plain and Aug starts with their hashes; a run loads them (checked) and starts every
    method from them: Aug's checkpoint, with no fine-tuning steps, is the Aug start."""
    from timm_dec.apps import segment

    folder = tmp_path / "start"
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--write-start", str(folder)]) == 0
    record = json.loads((folder / "smoke_start.json").read_text())
    assert set(record["files"]) == {"plain", "aug"}
    assert record["config"]["plain_steps"] == PRESETS["smoke"]["plain_steps"]
    monkeypatch.setattr(segment, "START_DIR", folder)
    monkeypatch.setitem(PRESETS["smoke"], "start", "shipped")
    out = tmp_path / "run"
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--methods", "base,aug", "--finetune-steps", "0",
                 "--out", str(out)]) == 0
    assert "the shipped one" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start"]["made_with"].startswith("timm-dec segment --preset smoke --write-start")
    for method, name in (("aug", "aug"), ("base", "plain")):
        saved = safetensors.torch.load_file(summary["methods"][method]["checkpoint"])
        shipped = safetensors.torch.load_file(str(folder / f"smoke_{name}.safetensors"))
        assert saved.keys() == shipped.keys() and all(torch.equal(saved[k], shipped[k]) for k in saved)
    assert main(["segment", "--preset", "smoke", "--plain-steps", "3", "--out", str(out)]) == 2
    assert re.search(r"made with other values of plain_steps.*--from-scratch", capsys.readouterr().err)
    (folder / "smoke_aug.safetensors").write_bytes(b"not the start")
    assert main(["segment", "--preset", "smoke", "--out", str(out)]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["default", "swin"])
def test_the_shipped_start_loads_for_each_family_preset(preset):
    from timm_dec.apps.segment import load_start

    cfg = PRESETS[preset]
    starts, record = load_start(cfg, preset)
    for state in starts.values():
        segmenter(cfg).load_state_dict(state)  # strict
    assert record["config"]["plain_steps"] == cfg["plain_steps"]


@pytest.mark.parametrize("extra", [["--finetune-steps", "0"],
                                   ["--methods", "aug,dec,aug_time", "--plain-steps", "0", "--aug-steps", "0"]])
def test_zero_steps_end_and_aug_time_is_bounded(tmp_path, extra, monkeypatch):
    """Aug+time's steps come from step costs measured side by side, never a time divided by ~0 seconds: a run with
    nothing to fine-tune ends, and even an Aug step measured at 1 ns gives at most 20x Aug's own steps (at least 1)."""
    from timm_dec.apps import _common

    def measured(steps, **kw):
        for step in steps.values():
            step()  # the calibration's steps run on copies
        return dict(seconds=dict(aug=1e-9, dec_only=1.0, dec=1.0), rounds={}, uncertainty=0.0, attempts=1,
                    noisy=False, max_uncertainty=0.1)

    monkeypatch.setattr(_common, "measure_step_costs", measured)
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--out", str(tmp_path), *extra]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    own = summary["config"]["finetune_steps"]
    assert summary["methods"]["aug_time"]["training"]["steps"] == 20 * max(own, 1)
    assert summary["equal_time_calibration"]["extra_steps"] == 20 * max(own, 1) - own


def test_param_groups_of_demo_and_segment():
    """The one AdamW group builder of both experiments: no decay for biases and 1-D parameters, the new parameters at
    the learning-rate multiple, alone with ``only_new``; groups in the order of their first parameter."""
    from timm_dec.apps._common import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.add_module("dec", torch.nn.Conv2d(2, 2, 3))
    groups = param_groups(model, 1e-3, 0.05, new_prefixes=("dec.",), new_lr_mult=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups] == [
        (["0.weight"], 1e-3, 0.05), (["0.bias", "1.weight", "1.bias"], 1e-3, 0.0), (["dec.weight"], 1e-2, 0.05),
        (["dec.bias"], 1e-2, 0.0)]
    only = param_groups(model, 1e-3, 0.05, new_prefixes=("dec.",), new_lr_mult=10.0, only_new=True)
    assert [[names[id(p)] for p in g["params"]] for g in only] == [["dec.weight"], ["dec.bias"]]
    assert [g["lr"] for g in param_groups(model, 1e-3, 0.05)] == [1e-3, 1e-3]  # nothing new: two groups
