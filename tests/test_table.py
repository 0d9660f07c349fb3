"""``timm-dec table`` and the DEC from Base's start (``dec_base``): read back from real smoke runs."""
from __future__ import annotations

import argparse
import json

import pytest
import safetensors.torch

from timm_dec.cli import main


@pytest.fixture(scope="module")
def segment_both_decs(tmp_path_factory):
    """A segment smoke run with Base, Aug, both DECs and Aug+time, no fine-tuning steps: each method is its start."""
    out = tmp_path_factory.mktemp("table") / "seg"
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--no-progress", "--finetune-steps", "0",
                 "--dec-warmup-steps", "0", "--methods", "base,aug,dec,dec_base,aug_time", "--out", str(out)]) == 0
    return out


def _backbone_weights(path):
    """A checkpoint's weights but the DEC's (the DEC twin's keys are the base model's plus ``backbone.dec.*``)."""
    return {k: v for k, v in safetensors.torch.load_file(path).items() if not k.startswith("backbone.dec.")}


def test_dec_base_starts_from_base_and_dec_from_aug(segment_both_decs):
    """With no steps, each DEC's backbone and decoder are its start's: DEC(Base)'s Base's, the DEC's Aug's; the two
    starts differ, so a DEC built from the wrong one fails."""
    ckpt = segment_both_decs / "checkpoints"
    weights = {m: _backbone_weights(ckpt / f"{m}.safetensors") for m in ("base", "aug", "dec", "dec_base")}
    for dec, start in (("dec_base", "base"), ("dec", "aug")):
        assert weights[dec].keys() == weights[start].keys()
        assert all(weights[dec][k].equal(weights[start][k]) for k in weights[dec]), dec
    assert any(not weights["base"][k].equal(weights["aug"][k]) for k in weights["base"])


def test_the_demo_builds_dec_base_from_base_too(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", "--threads", "1", "--no-progress", "--finetune-steps", "0",
                 "--dec-warmup-steps", "0", "--methods", "dec,dec_base", "--out", str(out)]) == 0
    weights = {m: {k: v for k, v in safetensors.torch.load_file(out / "checkpoints" / f"{m}.safetensors").items()
                   if not k.startswith("dec.")} for m in ("base", "aug", "dec", "dec_base")}
    for dec, start in (("dec_base", "base"), ("dec", "aug")):
        assert weights[dec].keys() == weights[start].keys()
        assert all(weights[dec][k].equal(weights[start][k]) for k in weights[dec]), dec
    text = (out / "tables.txt").read_text()
    assert "Against Base on the same" in text and "DEC(Base) solver at test time" in text
    capsys.readouterr()
    assert main(["table", str(out)]) == 0  # the demo's columns: accuracy, InvE, the backward check
    row = _cells(capsys.readouterr().out, "demo --preset smoke")
    summary = json.loads((out / "summary.json").read_text())
    p = summary["paired"]["dec"]
    assert row["DEC - Aug"] == f"{p['acc_points']:+.2f} [{p['acc_low']:+.2f}, {p['acc_high']:+.2f}]"
    assert row["InvE / Aug"] == f"{p['inv_e_ratio']:.3f}"
    error = summary["task"]["dec_evidence"]["gradient_check"]["error"]
    assert row["backward off"] == f"{100 * error:.2f}%"


def test_both_decs_are_compared_with_base(segment_both_decs):
    summary = json.loads((segment_both_decs / "summary.json").read_text())
    assert list(summary["methods"]) == ["base", "aug", "dec", "dec_base", "aug_time"]
    assert {"dec_vs_base", "dec_base_vs_base", "dec_vs_aug_time", "dec_base"} <= set(summary["paired"])
    assert "DEC(Base) - Base" in summary["tables"] and "DEC - Base" in summary["tables"]


def test_dec_base_runs_only_when_asked_for(tmp_path):
    from timm_dec.apps import demo, segment

    for module in (demo, segment):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert "dec_base" not in module.resolve_config(parser.parse_args(["--preset", "smoke"]))["methods"]
        asked = module.resolve_config(parser.parse_args(["--preset", "smoke", "--methods", "dec_base"]))["methods"]
        assert "dec_base" in asked


def _cells(text: str, run: str) -> dict[str, str]:
    """The Markdown row of ``run`` in ``text``, by column."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == run:
            return dict(zip(header, cells))
    raise AssertionError(f"no row {run!r} in\n{text}")


def test_table_reads_the_figures_of_the_summary(segment_both_decs, capsys):
    assert main(["table", str(segment_both_decs)]) == 0
    row = _cells(capsys.readouterr().out, "segment --preset smoke")
    summary = json.loads((segment_both_decs / "summary.json").read_text())
    p = summary["paired"]
    assert row["DEC - Aug"] == f"{p['dec']['miou']['diff']:+.2f} [{p['dec']['miou']['low']:+.2f}, " \
                               f"{p['dec']['miou']['high']:+.2f}]"
    assert row["DEC(Base) - Base"].startswith(f"{p['dec_base_vs_base']['miou']['diff']:+.2f} [")
    assert row["EquE / Aug"] == f"{p['dec']['eque_ratio']:.3f}"
    solver = summary["methods"]["dec"]["results"]["dec_solver"]
    assert row["within tol"] == f"{100 * solver['within_tol']:.2f}%"
    assert row["DEC mIoU"] == f"{summary['methods']['dec']['results']['miou']:.2f}"
    assert row["Model"] == summary["config"]["model"]


def test_table_errors_name_the_run(tmp_path, segment_both_decs, capsys):
    assert main(["table", str(tmp_path / "nowhere")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    summary = json.loads((segment_both_decs / "summary.json").read_text())
    del summary["methods"]["dec"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["table", str(tmp_path)]) == 2
    assert "has no DEC" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text("{")
    assert main(["table", str(tmp_path)]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_no_dec_augment_trains_the_decs_on_the_scenes_as_they_are(tmp_path, monkeypatch):
    """``--no-dec-augment``: every training step of both DECs (warm-up, joint, and the steps the equal-compute
    calibration times) reads unwarped scenes; Aug's and Aug+time's still read warped ones."""
    from timm_dec.apps import segment

    seen, real = [], segment._step

    def spy(model, data, steps, lr, cfg, *, augment, **kwargs):
        if kwargs["seed"] == 2:  # the methods' steps (the fine-tuning seed), not the shared start's
            seen.append((type(model.backbone).__name__.endswith("DEC"), augment))
        return real(model, data, steps, lr, cfg, augment=augment, **kwargs)

    monkeypatch.setattr(segment, "_step", spy)
    assert main(["segment", "--preset", "smoke", "--threads", "1", "--no-progress", "--no-dec-augment",
                 "--methods", "dec,dec_base,aug_time", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["dec_augment"] is False
    assert {augment for is_dec, augment in seen if is_dec} == {False}
    assert {augment for is_dec, augment in seen if not is_dec} == {True}
    assert sum(is_dec for is_dec, _ in seen) >= 4 + 2  # two runs per DEC and the calibration's DEC steps
