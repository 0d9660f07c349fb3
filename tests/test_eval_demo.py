"""`timm-dec demo` and `timm-dec eval` end to end on the smoke preset, and the pieces they are made of. Offline."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from timm_dec import cli
from timm_dec.apps.demo import PRESETS, paper_lr, resolve_config
from timm_dec.apps.demo import add_arguments as demo_arguments
from timm_dec.apps.evaluate import format_per_scale_table, format_table, parse_bins, parse_scales
from timm_dec.apps.plots import warp_lines
from timm_dec.apps.presets import dec_kwargs
from timm_dec.data import ImageFolderVariants, rescale_object
from timm_dec.ops import identity_knots

METHODS = ("base", "aug", "invl", "canon", "dec")
SUMMARY_KEYS = {"command", "preset", "config", "start", "methods", "paired", "equal_time_calibration", "tables",
                "files", "task", "wall_seconds", "machine"}  # the runner's summary.json, demo's and segment's
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=16",
            "depth=1", "num_heads=2"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert cli.main(["demo", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


class TestDemo:
    def test_files_and_summary(self, demo_out: Path):
        for name in ("summary.json", "tables.txt", "per_scale_accuracy.png", "prob_correct.png", "warp_grids.png"):
            assert (demo_out / name).is_file() and (demo_out / name).stat().st_size > 0, name
        for m in METHODS + ("aug_time",):
            assert (demo_out / "checkpoints" / f"{m}.safetensors").is_file()
        s = json.loads((demo_out / "summary.json").read_text())
        assert set(s) == SUMMARY_KEYS  # the runner's layout, as segment's
        assert {"num_classes", "model_kwargs", "prob_correct", "dec_evidence"} == set(s["task"])
        assert s["command"] == "demo" and s["preset"] == "smoke"
        assert s["task"]["num_classes"] == 100  # 2-digit numbers, scored digit by digit
        assert s["files"] == ["tables.txt", "per_scale_accuracy.png", "prob_correct.png", "warp_grids.png"]
        assert s["machine"]["torch_threads"] >= 1 and len(s["machine"]["load_average"]) == 3
        for key in ("num_digits", "label", "digit_size", "canvas", "scale_range", "plain_steps", "aug_steps",
                    "finetune_steps", "dec_warmup_steps", "dec_lr_mult", "seed"):
            assert key in s["config"], key
        assert tuple(s["methods"]) == METHODS + ("aug_time",)  # + the equal-compute control
        n_scales = len(PRESETS["smoke"]["scales"])
        for m, entry in s["methods"].items():
            assert set(entry) == {"training", "results", "eval_seconds", "checkpoint", "eval_command"}, m
            assert {"steps", "dec_only_steps", "backbone_steps", "seconds", "final_loss"} == set(entry["training"])
            r = entry["results"]
            assert {"acc", "inv_e", "per_scale_acc", "per_scale_prob_correct", "per_bin_acc", "scales"} <= set(r), m
            assert 0 <= r["acc"] <= 1 and r["inv_e"] >= 0 and len(r["per_scale_acc"]) == n_scales
            assert len(r["per_bin_acc"]) == len(PRESETS["smoke"]["scale_bins"])
        # The same budget: every method took the same number of backbone steps; the DEC also its DEC-only steps;
        # Aug+time the DEC's training cost in Aug steps, from step costs timed side by side.
        training = {m: entry["training"] for m, entry in s["methods"].items()}
        acc = {m: entry["results"]["acc"] for m, entry in s["methods"].items()}
        steps = {t["backbone_steps"] for m, t in training.items() if m != "aug_time"}
        assert len(steps) == 1 and steps.pop() > 0
        calibration = s["equal_time_calibration"]
        sec, n = calibration["step_seconds"], PRESETS["smoke"]["finetune_steps"]
        expected = round((PRESETS["smoke"]["dec_warmup_steps"] * sec["dec_only"] + n * sec["dec"]) / sec["aug"])
        assert calibration["steps"] == min(max(expected, n), 20 * n)
        extra = training["aug_time"]["backbone_steps"] - training["aug"]["backbone_steps"]
        assert extra == calibration["steps"] - n == calibration["extra_steps"] >= 0
        assert training["aug_time"]["steps"] == calibration["steps"]
        control = s["paired"]["dec_vs_aug_time"]
        assert control["acc_points"] == pytest.approx(100 * (acc["dec"] - acc["aug_time"]))
        assert training["dec"]["dec_only_steps"] == PRESETS["smoke"]["dec_warmup_steps"]
        paired = s["paired"]["dec"]
        assert paired["acc_points"] == pytest.approx(100 * (acc["dec"] - acc["aug"]))
        assert paired["acc_low"] <= paired["acc_points"] <= paired["acc_high"]
        assert set(s["paired"]) == {"base", "invl", "canon", "dec", "aug_time", "dec_vs_aug_time", "dec_vs_base"}
        evidence = s["task"]["dec_evidence"]
        assert -1 <= evidence["pearson_log_scale_log_magnification"] <= 1
        # the regression slope of log m on log s shares the correlation's sign (slope = r sd(log m) / sd(log s))
        assert np.sign(evidence["slope_log_magnification_log_scale"]) == np.sign(
            evidence["pearson_log_scale_log_magnification"])
        prob = np.asarray(s["task"]["prob_correct"]["dec"])
        assert prob.shape == (PRESETS["smoke"]["prob_images"], len(PRESETS["smoke"]["prob_scales"]))
        assert ((prob >= 0) & (prob <= 1)).all()
        text = (demo_out / "tables.txt").read_text()
        for label in ("Base", "Aug", "InvL", "Canon", "DEC", "InvE (1e-2)", "Overall", "paired bootstrap"):
            assert label in text
        # the DEC's solves at test time: how many took each iteration count, and the mean's standard error
        solver = s["methods"]["dec"]["results"]["dec_solver"]
        counts = solver["iteration_counts"]
        assert sum(counts) == solver["samples"] and len(counts) <= PRESETS["smoke"]["dec_max_iter"] + 1
        assert sum(k * c for k, c in enumerate(counts)) / sum(counts) == pytest.approx(solver["mean_iterations"])
        assert f"(sd {solver['iterations_sd']:.2f}, standard error " in text

    def test_checkpoints_load_into_plain_timm_models(self, demo_out: Path):
        s = json.loads((demo_out / "summary.json").read_text())
        kwargs = s["task"]["model_kwargs"]
        for method, extra in (("base", {}), ("dec", kwargs["dec"])):
            model = timm.create_model(s["config"]["model"] + ("_dec" if method == "dec" else ""), **kwargs["base"],
                                      **extra)
            state = load_file(s["methods"][method]["checkpoint"])
            model.load_state_dict(state, strict=True)

    def test_a_subset_of_methods_trains_them_as_the_full_run_does(self, demo_out: Path, tmp_path: Path):
        """Each method draws its own augmentation and initial weights: `--methods aug,dec` trains the same models."""
        out = tmp_path / "subset"
        assert cli.main(["demo", "--preset", "smoke", "--out", str(out), "--no-progress", "--methods", "aug,dec",
                         "--no-equal-time"]) == 0
        for method in ("aug", "dec"):
            full = load_file(demo_out / "checkpoints" / f"{method}.safetensors")
            subset = load_file(out / "checkpoints" / f"{method}.safetensors")
            assert full.keys() == subset.keys()
            for key in full:
                assert torch.equal(full[key], subset[key]), (method, key)

    def test_smoke_run_warns_that_its_numbers_mean_nothing(self, tmp_path: Path, capsys: pytest.CaptureFixture):
        parser = argparse.ArgumentParser()
        demo_arguments(parser)
        args = parser.parse_args(["--preset", "smoke", "--out", str(tmp_path), "--no-progress",
                                  "--write-start", str(tmp_path / "start")])
        from timm_dec.apps.demo import run
        assert run(args) == 0
        assert "numbers mean nothing" in capsys.readouterr().out
        record = json.loads((tmp_path / "start" / "smoke_start.json").read_text())
        assert set(record["files"]) == {"plain", "aug"} and len(record["files"]["aug"]["sha256"]) == 64

    @pytest.mark.parametrize("method", ["dec", "canon"])
    def test_eval_reproduces_demo_metrics(self, demo_out: Path, tmp_path: Path, method: str):
        # `timm-dec eval` rebuilds the model by name, loads the checkpoint and must find the demo's numbers.
        entry = json.loads((demo_out / "summary.json").read_text())["methods"][method]
        argv = shlex.split(entry["eval_command"])[1:] + ["--json", str(tmp_path / "e.json"), "--no-progress"]
        assert cli.main(argv) == 0
        e, r = json.loads((tmp_path / "e.json").read_text()), entry["results"]
        for key in ("acc", "inv_e", "per_scale_acc", "per_scale_prob_correct", "per_bin_acc"):
            np.testing.assert_allclose(e[key], r[key], rtol=1e-5, atol=1e-7, err_msg=key)
        assert e["model"].endswith("_dec") == (method == "dec")
        assert (e["canon"] is not None) == (method == "canon")

    def test_base_checkpoint_into_dec_model(self, demo_out: Path, tmp_path: Path):
        # A base checkpoint loads into the *_dec model with the DEC at identity: the base model's numbers again.
        entry = json.loads((demo_out / "summary.json").read_text())["methods"]["base"]
        argv, r = shlex.split(entry["eval_command"])[1:], entry["results"]
        argv[argv.index("--model") + 1] += "_dec"
        assert cli.main(argv + ["--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
        e = json.loads((tmp_path / "e.json").read_text())
        assert e["acc"] == r["acc"]
        np.testing.assert_allclose(e["per_scale_prob_correct"], r["per_scale_prob_correct"], atol=1e-5)
        # A checkpoint of another model is refused with a clear error (one line at the CLI, the exception with
        # --debug): the Canon checkpoint records its wrapper.
        argv[argv.index("--checkpoint") + 1] = str(demo_out / "checkpoints" / "canon.safetensors")
        with pytest.raises(ValueError, match="weights of a InputCanonicalizer .* pass --canon"):
            cli.main(argv + ["--no-progress", "--debug"])

    def test_checkpoints_record_the_dec_options_and_data(self, demo_out: Path):
        # each checkpoint records its model, every DEC option and the digits, so eval/push rebuild it by themselves
        from timm_dec import checkpoint
        dec = checkpoint.read_saved(demo_out / "checkpoints" / "dec.safetensors")
        assert dec.architecture.endswith("_dec")
        assert dec.model_kwargs["dec_grid"] == PRESETS["smoke"]["dec_grid"]
        assert dec.model_kwargs["dec_blocks"] == list(PRESETS["smoke"]["dec_blocks"])
        assert dec.data["canvas"] == PRESETS["smoke"]["canvas"]
        assert checkpoint.read_saved(demo_out / "checkpoints" / "canon.safetensors").wrapper == \
            "InputCanonicalizer"

    def test_push_then_eval_of_the_folder_matches_eval_of_the_checkpoint(self, demo_out: Path, tmp_path: Path):
        # push writes everything eval reads (DEC options, the digits and label rule the demo trained with), so the
        # pushed folder evaluates as the checkpoint does, with no data flags given
        ckpt = demo_out / "checkpoints" / "dec.safetensors"
        folder = tmp_path / "pushed"
        assert cli.main(["push", "--checkpoint", str(ckpt), "--dry-run", "--output", str(folder)]) == 0
        results = []
        for source in (["--checkpoint", str(ckpt)], ["--model", f"local-dir:{folder}"]):
            out = tmp_path / f"{len(results)}.json"
            assert cli.main(["eval", *source, "--num-samples", "8", "--scales", "0.7,1,1.4", "--no-progress",
                             "--json", str(out)]) == 0
            results.append(json.loads(out.read_text()))
        by_ckpt, by_folder = results
        smoke = PRESETS["smoke"]
        assert by_ckpt["digits"]["label"] == smoke["label"] and by_ckpt["digits"]["canvas"] == smoke["canvas"]
        assert by_folder["digits"] == by_ckpt["digits"]
        for key in ("acc", "inv_e", "per_scale_acc", "per_scale_prob_correct"):
            np.testing.assert_allclose(by_folder[key], by_ckpt[key], rtol=0, atol=1e-6, err_msg=key)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="fails the demo with --device cuda on a CPU machine")
    def test_failed_demo_leaves_no_empty_checkpoints_folder(self, tmp_path: Path, capsys: pytest.CaptureFixture):
        out = tmp_path / "out"
        assert cli.main(["demo", "--preset", "smoke", "--out", str(out), "--no-progress", "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("timm-dec demo: error: ")
        assert not (out / "checkpoints").exists()

    def test_paper_preset_end_to_end_with_tiny_overrides(self, tmp_path: Path):
        """The GPU preset (3 digits, 224 px, number labels, default DEC blocks) runs through, shrunk."""
        argv = ["demo", "--preset", "paper", "--out", str(tmp_path), "--no-progress", "--model", "vit_tiny_patch16_224",
                "--model-kwargs", "img_size=224", "patch_size=32", "embed_dim=16", "depth=2", "num_heads=2",
                "--no-pretrained", "--train-samples", "8", "--test-samples", "2", "--plain-steps", "1", "--aug-steps",
                "1", "--finetune-steps", "1", "--dec-warmup-steps", "1", "--batch-size", "4", "--eval-batch", "4",
                "--prob-images", "1", "--grid-images", "1", "--stretch-images", "2", "--canon-warps", "2"]
        assert cli.main(argv) == 0
        s = json.loads((tmp_path / "summary.json").read_text())
        assert s["task"]["num_classes"] == 1000 and s["config"]["label"] == "number" and s["config"]["canvas"] == 224
        assert s["config"]["num_digits"] == 3 and tuple(s["methods"]) == METHODS + ("aug_time",)

    def test_config_overrides_preset(self):
        parser = argparse.ArgumentParser()
        demo_arguments(parser)
        cfg = resolve_config(parser.parse_args(["--preset", "smoke", "--finetune-steps", "3", "--methods", "dec"]))
        assert cfg["finetune_steps"] == 3 and cfg["plain_steps"] == PRESETS["smoke"]["plain_steps"]
        assert cfg["methods"] == ("base", "aug", "dec")  # the references always run
        # Aug+time is the method aug_time (as in segment), run by default; deprecated: --(no-)equal-time adds / drops it
        assert resolve_config(parser.parse_args([]))["methods"] == METHODS + ("aug_time",)
        assert resolve_config(parser.parse_args(["--no-equal-time"]))["methods"] == METHODS
        assert resolve_config(parser.parse_args(["--methods", "dec", "--equal-time"]))["methods"] == (
            "base", "aug", "dec", "aug_time")
        assert resolve_config(parser.parse_args(["--methods", "aug_time,dec", "--no-equal-time"]))["methods"] == (
            "base", "aug", "dec")
        assert resolve_config(parser.parse_args(["--methods", "dec,aug_time"]))["methods"] == (
            "base", "aug", "dec", "aug_time")
        assert resolve_config(parser.parse_args(["--from-scratch"]))["start"] == "scratch"
        assert resolve_config(parser.parse_args([]))["start"] == "shipped"
        # the DEC's gradient tolerance reaches the model's kwargs (0: its tol, as create_model passes None)
        assert dec_kwargs(resolve_config(parser.parse_args([])))["dec_grad_tol"] == 1e-4
        assert dec_kwargs(resolve_config(parser.parse_args(["--dec-grad-tol", "0"])))["dec_grad_tol"] == 0
        paper = resolve_config(parser.parse_args(["--preset", "paper", "--model", "swin_tiny_patch4_window7_224"]))
        assert paper["lr"] == 8e-4 and paper["finetune_lr"] == 4e-4 and paper_lr("vit_base_patch16_224") == 1e-4
        with pytest.raises(ValueError, match="unknown method"):
            resolve_config(parser.parse_args(["--methods", "aug,foo"]))
        with pytest.raises(ValueError, match="nothing would be trained"):
            resolve_config(parser.parse_args(["--plain-steps", "0", "--aug-steps", "0", "--finetune-steps", "0"]))

    def test_shipped_start_must_match_the_configuration(self):
        from timm_dec.apps.demo import load_start
        cfg = resolve_config(argparse.Namespace(**{**vars(_demo_args([])), "num_digits": 3}))
        with pytest.raises(ValueError, match="num_digits.*--from-scratch"):
            load_start(cfg, "default")

    @pytest.mark.parametrize("preset", ["default", "swin", "deit"])
    def test_each_family_preset_ships_its_start(self, preset: str):
        """The shipped start of each architecture preset loads strictly into that preset's model, hash-checked."""
        from timm_dec.apps.demo import load_start
        from timm_dec.apps.heads import num_outputs
        cfg = resolve_config(_demo_args(["--preset", preset]))
        starts, record = load_start(cfg, preset)
        assert set(starts) == {"plain", "aug"} and record["made_with"].startswith(f"timm-dec demo --preset {preset} ")
        for state in starts.values():
            model = timm.create_model(cfg["model"], **cfg["model_kwargs"],
                                      num_classes=num_outputs(cfg["label"], cfg["num_digits"]))
            model.load_state_dict(state)

    def test_warp_lines_of_identity_are_the_regular_grid(self):
        lines = warp_lines(identity_knots(1, 2, dtype=torch.float64)[0], grid=2, samples=5)
        assert len(lines) == 6
        t = torch.linspace(0, 1, 5, dtype=torch.float64)
        torch.testing.assert_close(lines[2], torch.stack((torch.full_like(t, 0.5), t), -1))  # x = 1/2, vertical
        torch.testing.assert_close(lines[3], torch.stack((t, torch.full_like(t, 0.5)), -1))  # y = 1/2, horizontal


def _demo_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_arguments(parser)
    return parser.parse_args(argv)


def _write_folder(root: Path, masks: bool, backgrounds: bool) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for k in range(2):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"im{k}.png")
            if masks:
                (root / "masks" / c).mkdir(parents=True, exist_ok=True)
                m = np.zeros((20, 20), dtype=np.uint8)
                m[5:13, 6:14] = 255
                Image.fromarray(m).save(root / "masks" / c / f"im{k}.png")
            if backgrounds:
                (root / "backgrounds" / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((20, 20, 3), 40 * (k + 1), dtype=np.uint8)).save(
                    root / "backgrounds" / c / f"im{k}.jpg")


class TestEvalFolder:
    def test_masks_use_rescale_object(self, tmp_path: Path):
        _write_folder(tmp_path, masks=True, backgrounds=True)
        ds = ImageFolderVariants(tmp_path, (16, 16))
        assert ds.classes == ["cat", "dog"] and len(ds) == 4 and ds.variant_kind == "rescale_object"
        variants, label = ds.variants(3, [0.8, 1.25])
        image, label0 = ds[3]
        assert label == label0 == 1 and variants.shape == (2, 3, 16, 16)
        # Independent reference: the files read with PIL and resized the same way, then rescale_object.
        def load(p: Path, mode: str) -> torch.Tensor:
            arr = np.asarray(Image.open(p).convert(mode).resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
            t = torch.from_numpy(arr.copy())
            return t.permute(2, 0, 1) if t.dim() == 3 else t
        img = load(tmp_path / "dog" / "im1.png", "RGB")
        torch.testing.assert_close(image, img)
        mask = load(tmp_path / "masks" / "dog" / "im1.png", "L")
        bg = load(tmp_path / "backgrounds" / "dog" / "im1.jpg", "RGB")
        for v, s in zip(variants, (0.8, 1.25)):
            torch.testing.assert_close(v, rescale_object(img, mask / mask.max(), bg, s))

    def test_no_masks_use_random_monotone_scaling(self, tmp_path: Path):
        _write_folder(tmp_path, masks=False, backgrounds=False)
        ds = ImageFolderVariants(tmp_path, (16, 16), seed=3)
        assert ds.variant_kind == "random_monotone_scale"
        variants, _ = ds.variants(0, [1.0, 1.3, 0.7])
        image, _ = ds[0]
        assert torch.equal(variants[0], image)  # scale 1: strength |ln 1| = 0, the identity
        assert (variants[1] - image).abs().max() > 1e-3 and (variants[2] - image).abs().max() > 1e-3
        again, _ = ds.variants(0, [1.0, 1.3, 0.7])
        assert torch.equal(again, variants)  # seeded per (seed, image, variant)
        other, _ = ImageFolderVariants(tmp_path, (16, 16), seed=4).variants(0, [1.3])
        assert not torch.equal(other[0], variants[1])

    def test_masks_without_backgrounds_is_an_error(self, tmp_path: Path):
        _write_folder(tmp_path, masks=True, backgrounds=False)
        with pytest.raises(FileNotFoundError, match="backgrounds"):
            ImageFolderVariants(tmp_path, (16, 16))
        with pytest.raises(FileNotFoundError, match="does not exist"):
            ImageFolderVariants(tmp_path / "nope", (16, 16))

    def test_cli_on_folder(self, tmp_path: Path):
        _write_folder(tmp_path / "data", masks=True, backgrounds=True)
        out = tmp_path / "r.json"
        argv = ["eval", *TINY_VIT, "--data", f"folder:{tmp_path / 'data'}", "--img-size", "32", "--scales", "0.9,1.1",
                "--batch-size", "2", "--json", str(out), "--no-progress"]
        assert cli.main(argv) == 0
        r = json.loads(out.read_text())
        assert r["variants"] == "rescale_object" and r["num_samples"] == 4 and len(r["per_scale_acc"]) == 2
        assert 0 <= r["acc"] <= 1 and r["inv_e"] >= 0 and "per_bin_acc" not in r


class TestEvalPieces:
    def test_parse(self):
        assert parse_scales("0.7, 1,1.3") == [0.7, 1.0, 1.3]
        assert parse_bins("0.4-1.0,1.0-2") == [(0.4, 1.0), (1.0, 2.0)]
        for bad in ("", "a", "0,1", "-1"):
            with pytest.raises(ValueError):
                parse_scales(bad)
        for bad in ("1.0", "2-1", "0-1"):
            with pytest.raises(ValueError):
                parse_bins(bad)

    def test_tables(self):
        results = {"Aug": dict(acc=0.5, inv_e=0.0123, per_scale_acc=[0.25, 0.75], scales=[0.5, 1.5]),
                   "DEC": dict(acc=1.0, inv_e=0.0, per_scale_acc=[1.0, 1.0], scales=[0.5, 1.5])}
        t2 = format_table(results).splitlines()
        assert t2[1].split() == ["Aug", "50.00", "1.23"] and t2[2].split() == ["DEC", "100.00", "0.00"]
        t3 = format_per_scale_table(results).splitlines()
        assert t3[0].split() == ["Scale", "0.5", "1.5", "Overall"]
        # mean 50, population std 25, as the paper's "Overall" column
        assert t3[1].split() == ["Aug", "25.00", "75.00", "50.00", "±", "25.00"]

    def test_unknown_data_and_missing_checkpoint(self, tmp_path: Path, capsys: pytest.CaptureFixture):
        assert cli.main(["eval", *TINY_VIT, "--data", "imagenet"]) == 2
        assert capsys.readouterr().err == (
            "timm-dec eval: error: --data must be 'digits', 'mnist' or 'folder:PATH', got 'imagenet'\n")
        with pytest.raises(FileNotFoundError, match="checkpoint"):
            cli.main(["eval", *TINY_VIT, "--num-digits", "1", "--canvas", "32", "--num-samples", "2", "--debug",
                      "--checkpoint", str(tmp_path / "missing.safetensors")])


# ---------------------------------------------------------------------------------------------------------------------
# the demo's options: checked before any work, each error one line naming what is wrong
# ---------------------------------------------------------------------------------------------------------------------

SMOKE = ["demo", "--preset", "smoke", "--no-progress", "--from-scratch"]


@pytest.mark.parametrize("extra, message", [
    (["--dec-lr-mult", "-1"], r"--dec-lr-mult must be a finite number > 0, got -1"),
    (["--weight-decay", "-1"], r"--weight-decay must be a finite number >= 0, got -1"),
    (["--lr", "-1"], r"--lr must be a finite number > 0, got -1"),
    (["--finetune-lr", "0"], r"--finetune-lr must be a finite number > 0, got 0"),
    (["--aug-p", "1.5"], r"--aug-p must be a finite number >= 0 and <= 1, got 1.5"),
    (["--dec-grid", "0"], r"--dec-grid: .*integer >= 1, got 0"),
    (["--dec-tol", "-1"], r"--dec-tol: .*positive finite number, got -1"),
    (["--dec-tol", "nan"], r"--dec-tol: .*positive finite number, got nan"),
    (["--dec-max-iter", "0"], r"--dec-max-iter: .*integer >= 1, got 0"),
    (["--dec-blocks", "7"], r"--dec-blocks 7: block index 7 is out of range for a model with 1 blocks"),
    (["--dec-image-size", "1"], r"--dec-image-size: .*integer >= 2, got 1"),
    (["--dec-update", "residual"], r"--dec-update residual needs --dec-backward phantom"),
    (["--model", "swin_tiny_patch4_window7_224", "--model-kwargs", "img_size=32", "window_size=4", "--dec-blocks",
      "9"], r"--dec-blocks 9: stage index 9 is out of range for a model with 4 stages"),
    (["--model", "resnet18", "--methods", "base,aug"], r"the preset's model_kwargs .*\(give --model-kwargs that fit "
                                                       r"--model resnet18\): resnet18 does not take img_size=32"),
    (["--canon-energy-size", "0"], r"--canon-energy-size: energy_size must be >= 4, got 0"),
    (["--canon-energy-widths", "0", "4"], r"--canon-energy-widths: widths must be two positive channel counts"),
    (["--num-digits", "9"], r"--num-digits 9, --canvas 32, .*9 digits of .* do not fit side by side on a 32 px"),
    (["--test-samples", "1"], r"--test-samples must be >= 2 \(the paired bootstrap needs 2 test images\), got 1"),
    (["--model", "resnet18"], r"--model resnet18: the demo's DEC needs a ViT-class .* or Swin model .*resnet18_dec"),
    (["--model", "no_such_model"], r"--model no_such_model: no such timm model"),
    (["--model-kwargs", "dec_grid=8"], r"--model-kwargs dec_grid=8: the demo's DEC options are the --dec-\* flags "
                                       r"\(--dec-grid"),
    (["--model-kwargs", "img_size=32", "act_layer=nonexistent_act"],
     r"--model-kwargs act_layer='nonexistent_act': vit_tiny_patch16_224 refuses it \(KeyError"),
    (["--model-kwargs", "img_sz=32"], r"--model-kwargs: vit_tiny_patch16_224 does not take img_sz=32"),
    (["--methods", "aug,foo,augl"], r"--methods: unknown method\(s\) \['foo', 'augl'\]; choose from base, aug, invl, "
                                    r"canon, dec, dec_base, aug_time$"),
    (["--seed", "-1"], r"--seed must be >= 0, got -1$"),
    (["--threads", "0"], r"--threads must be >= 1, got 0$"),
])
def test_demo_options_are_checked_before_any_work(extra: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Each of these used to train first (the shared start, with --from-scratch minutes), run silently wrong
    (a negative learning-rate multiplier or weight decay) or fail with a message that named no flag."""
    out = tmp_path / "out"
    assert cli.main(SMOKE + ["--out", str(out)] + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no banner: nothing started
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timm-dec demo: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--out", "--write-start"])
def test_demo_output_folder_is_checked_first_and_nothing_above_it_is_created(flag: str, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [("/proc/x", r"cannot write in /proc"), (str(a_file), r"is a file, not a folder"),
             (str(tmp_path / "missing" / "out"), r"the folder .*missing does not exist \(only the named folder is "
                                                 r"created, never its parents\)")]
    for path, message in cases:
        assert cli.main(SMOKE + [flag, path]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and re.search(rf"^timm-dec demo: error: {flag} .*{message}", captured.err), \
            captured.err
    assert not (tmp_path / "missing").exists()


def test_scales_errors_say_what_is_wrong(capsys: pytest.CaptureFixture) -> None:
    for argv in (SMOKE + ["--scales", "0,1"], ["eval", "--scales", "0,1"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "argument --scales: scales must be finite and > 0, got [0.0]" in capsys.readouterr().err


def test_demo_pretrained_offline_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    assert cli.main(SMOKE + ["--out", str(tmp_path / "out"), "--pretrained"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.search(r"^timm-dec demo: error: --pretrained: timm's weights of vit_tiny_patch16_224 \(timm/.*\) are "
                     r"not in huggingface_hub's cache and HF_HUB_OFFLINE is set", captured.err), captured.err


def test_demo_pretrained_offline_reads_the_cache_without_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Hub unreachable and timm's weights cached, the demo builds its models in huggingface_hub's offline
    mode (the cache at once, no retries of the network)."""
    import huggingface_hub

    from timm_dec import hub
    from timm_dec.apps import _common

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: f"/cache/{repo}/{name}")
    kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    assert _common.check_pretrained_offline("vit_tiny_patch16_224", kwargs) is True
    seen = []
    with _common.hub_offline(True):
        seen.append(huggingface_hub.constants.HF_HUB_OFFLINE)
    assert seen == [True] and huggingface_hub.constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert _common.check_pretrained_offline("vit_tiny_patch16_224", kwargs) is False
