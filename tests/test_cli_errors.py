"""`timm-dec` as a user meets it: one-line errors with exit status 2 (tracebacks with --debug), validate.py-style
eval flags, loading that is never silently wrong (weights implied by local-dir:, recorded options, class counts),
and the README snippet. Offline; tiny models."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from _tiny import logits_of, off_identity
from PIL import Image

import timm_dec  # noqa: F401
from timm_dec import checkpoint, cli, hub
from timm_dec.apps.evaluate import build_eval_model, evaluate_model, resolve_digits

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, dec_widths=(8, 16),
            dec_proj_chans=8)
DEC = dict(dec_blocks=(1,), dec_grid=3, dec_max_iter=6)
REPO = Path(__file__).resolve().parent.parent


def tiny_model(seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return off_identity(timm.create_model("vit_tiny_dec", **{**TINY, **DEC, **kwargs}))


logits = logits_of


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def saved(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "m"
    hub.save_pretrained(model, folder, data=dict(num_digits=1, canvas=32, digit_size=16, scale_range=[0.4, 2.0]))
    return folder


@pytest.fixture(scope="module")
def ckpt(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as the demo writes it (`save_model`: model, DEC options and data in its metadata)."""
    return checkpoint.save_model(model, tmp_path_factory.mktemp("ckpt") / "dec.safetensors",
                               data=dict(num_digits=1, canvas=32, digit_size=16))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, command: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"timm-dec {command}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


EVAL = ["eval", "--num-samples", "2", "--scales", "1", "--no-progress", "-b", "2"]


# ---------------------------------------------------------------------------------------------------------------------
# one-line errors
# ---------------------------------------------------------------------------------------------------------------------

def test_missing_and_corrupt_safetensors(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run_cli(EVAL + ["--checkpoint", str(tmp_path / "nope.safetensors")], capsys)[::2],
                          "eval", "does not exist")
    data = (saved / "model.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run_cli(EVAL + ["--model", "vit_tiny_dec", "--checkpoint",
                                           str(tmp_path / "half.safetensors")], capsys)[::2],
                          "eval", "not a valid safetensors file")
    (tmp_path / "junk.pth.tar").write_bytes(b"\x00" * 100)
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(tmp_path / "junk.pth.tar"), "--dry-run", "--output",
                                    str(tmp_path / "o")], capsys)[::2], "push", "could not be read")
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(saved)], capsys)[::2], "push", "--repo-id")


def test_checkpoint_of_another_architecture(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(EVAL + ["--model", "vit_tiny_dec", "--model-kwargs", "embed_dim=48", "--checkpoint",
                                 str(ckpt)], capsys)
    assert_one_line_error(rc, err, "eval", "does not fit vit_tiny_dec.*shape mismatch")


def _folder(root: Path, classes: int, broken: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"c{c}" / "a.png")
    if broken:
        (root / "c0" / "b.png").write_bytes(b"not a png")
    return root


def test_data_folder_errors(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = EVAL + ["--model", f"local-dir:{saved}"]
    assert_one_line_error(*run_cli(base + ["--data", f"folder:{tmp_path / 'missing'}"], capsys)[::2], "eval",
                          "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(base + ["--data", f"folder:{tmp_path / 'empty'}"], capsys)[::2], "eval",
                          "no class folders")
    # fewer class folders than the model's classes: said before anything runs
    few = _folder(tmp_path / "few", 3)
    assert_one_line_error(*run_cli(base + ["--data", f"folder:{few}"], capsys)[::2], "eval",
                          "has 3 class folders, but the model has 10 classes")
    broken = _folder(tmp_path / "broken", 10, broken=True)
    assert_one_line_error(*run_cli(base + ["--data", f"folder:{broken}", "--num-samples", "20"], capsys)[::2], "eval",
                          "b.png")


def test_num_digits_must_match_the_class_count(saved: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(EVAL + ["--model", f"local-dir:{saved}", "--num-digits", "2"], capsys)
    assert_one_line_error(rc, err, "eval", "2-digit numbers have 100 classes, but the model has 10: use --num-digits 1")
    assert "Acc" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(saved: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run_cli(EVAL + ["--model", f"local-dir:{saved}", "--device", "cuda"], capsys)[::2],
                          "eval", "CUDA is not available.*--device cpu")


def test_hub_without_network(model: torch.nn.Module, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(ckpt), "--repo-id", "org/x"], capsys)[::2], "push",
                          "offline|Offline")
    assert_one_line_error(*run_cli(EVAL + ["--model", "hf-hub:org/not-cached"], capsys)[::2], "eval", ".")


def test_debug_flag_and_env_show_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    argv = EVAL + ["--checkpoint", str(tmp_path / "nope.safetensors")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(argv + ["--debug"])
    monkeypatch.setenv("TIMM_DEC_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


def test_exit_status_of_the_installed_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "timm_dec.cli", "eval", "--checkpoint", str(tmp_path / "x.pth.tar")],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "TIMM_DEC_DEBUG": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"timm-dec eval: error: checkpoint {tmp_path / 'x.pth.tar'} does "
                                                f"not exist"]


# ---------------------------------------------------------------------------------------------------------------------
# eval: validate.py's flags, help, and loading what a name points at
# ---------------------------------------------------------------------------------------------------------------------

def test_eval_help_follows_validate_py() -> None:
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices["eval"]
    text = " ".join(sub.format_help().split())
    for flag in ("-b N, --batch-size N", "-j N, --workers N", "--results-file FILE, --json FILE", "--amp",
                 "--channels-last", "--debug"):
        assert flag in text, flag
    assert "(default: 64)" in text and "(default: 0.7,0.8,0.9,1,1.1,1.2,1.3)" in text
    assert "``" not in parser.format_help() and "``" not in text
    args = parser.parse_args(["eval", "-b", "8", "-j", "1", "--json", "r.json"])
    assert (args.batch_size, args.workers, args.results_file) == (8, 1, "r.json")


def test_local_dir_implies_its_weights(model: torch.nn.Module, saved: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    loaded, recorded = build_eval_model(f"local-dir:{saved}")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert recorded["digit_size"] == 16
    out = tmp_path / "r.json"
    rc, _, err = run_cli(EVAL + ["--model", f"local-dir:{saved}", "--num-samples", "4", "--results-file", str(out)],
                         capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    # the data the model records (1 digit, 32 px, 16 px digits), not eval's generic defaults
    assert {"num_digits": 1, "canvas": 32, "digit_size": 16, "scale_range": [0.4, 2.0]}.items() <= r["digits"].items()
    args = argparse.Namespace(num_digits=None, canvas=None, digit_size=None, scale_range=None, data_seed=0,
                              num_samples=4, data="digits", mnist_root=None)
    from timm_dec.apps.evaluate import data_dataset, normalize_transform
    ds = data_dataset(args, 3, resolve_digits(args, recorded, 10, 32))
    ds.transform = normalize_transform(timm.data.resolve_data_config({}, model=model), 3)
    direct = evaluate_model(model, ds, [1.0], batch_size=2, progress=False)
    assert r["acc"] == direct["acc"] and r["inv_e"] == pytest.approx(direct["inv_e"], abs=1e-7)


def test_eval_reads_checkpoints_as_push_does(model: torch.nn.Module, saved: Path, ckpt: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from timm.utils import CheckpointSaver
    args = argparse.Namespace(model="vit_tiny_dec", num_classes=10, in_chans=None, gp=None, img_size=32,
                              input_size=None, model_kwargs={k: v for k, v in {**TINY, **DEC}.items()
                                                             if k not in ("num_classes", "img_size")})
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.5)
    results = []
    for source in (saved, ckpt, tmp_path / "last.pth.tar"):  # a save_pretrained folder, demo file, train.py output
        out = tmp_path / f"{len(results)}.json"
        rc, _, err = run_cli(EVAL + ["--checkpoint", str(source), "--num-digits", "1", "--digit-size", "16",
                                     "--results-file", str(out)], capsys)
        assert rc == 0, err
        results.append(json.loads(out.read_text()))
    assert results[0]["model"] == "vit_tiny_dec"
    assert len({json.dumps(r["per_scale_prob_correct"]) for r in results}) == 1


def test_amp_and_channels_last_run(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    rc, _, err = run_cli(EVAL + ["--model", f"local-dir:{saved}", "--amp", "--channels-last", "--json", str(out)],
                         capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["amp"] == "bfloat16"  # autocast on a CPU is bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# recorded DEC options: push and eval refuse contradictions
# ---------------------------------------------------------------------------------------------------------------------

def test_recorded_options_are_used_and_contradictions_refused(model: torch.nn.Module, ckpt: Path, saved: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    loaded = checkpoint.load_model(ckpt)  # everything comes from the file's metadata
    assert loaded.dec_cfg == model.dec_cfg
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    rc, _, err = run_cli(["push", "--checkpoint", str(ckpt), "--model-kwargs", "dec_grid=8", "--dry-run",
                          "--output", str(tmp_path / "o")], capsys)
    assert_one_line_error(rc, err, "push", "dec_grid=8 contradicts .* trained with dec_grid=3; ")
    assert not (tmp_path / "o").exists()
    rc, _, err = run_cli(EVAL + ["--checkpoint", str(ckpt), "--model-kwargs", "dec_grid=8"], capsys)
    assert_one_line_error(rc, err, "eval", "trained with dec_grid=3")
    rc, _, err = run_cli(EVAL + ["--model", f"local-dir:{saved}", "--model-kwargs", "dec_grid=8"], capsys)
    assert_one_line_error(rc, err, "eval", "dec_grid=8 contradicts the saved model .* trained with dec_grid=3; ")
    assert hub.load_pretrained(saved, dec_grid=3).dec_cfg == model.dec_cfg  # the same value is no contradiction


def test_train_py_defaults_are_recorded_options_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # train.py records only the --model-kwargs given: dec_grid was the default (4), so 8 contradicts it
    from timm.utils import CheckpointSaver
    model = timm.create_model("vit_tiny_dec", **{k: v for k, v in TINY.items()})
    args = argparse.Namespace(model="vit_tiny_dec", num_classes=10, img_size=32, input_size=None,
                              model_kwargs={k: v for k, v in TINY.items() if k not in ("num_classes", "img_size")})
    CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, checkpoint_dir=str(tmp_path),
                    recovery_dir=str(tmp_path)).save_checkpoint(epoch=0, metric=0.5)
    rc, _, err = run_cli(["push", "--checkpoint", str(tmp_path / "last.pth.tar"), "--model-kwargs", "dec_grid=8",
                          "--dry-run", "--output", str(tmp_path / "o")], capsys)
    assert_one_line_error(rc, err, "push", r"trained with dec_grid=4; it records no dec_grid, so it was trained "
                          r"with the default")
    assert run_cli(["push", "--checkpoint", str(tmp_path / "last.pth.tar"), "--model-kwargs", "dec_grid=4",
                    "--dry-run", "--output", str(tmp_path / "o")], capsys)[0] == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model_args"]["dec_grid"] == 4


def test_base_checkpoint_hint_names_a_usable_option(tmp_path: Path) -> None:
    base = timm.create_model("vit_tiny_patch16_224", **{k: v for k, v in TINY.items() if not k.startswith("dec_")})
    path = tmp_path / "base.safetensors"
    safetensors.torch.save_file(base.state_dict(), str(path))
    with pytest.raises(ValueError, match="no DEC parameters .* use the base name 'vit_tiny_patch16_224'") as info:
        checkpoint.load_model(path, model_name="vit_tiny_dec", model_kwargs=TINY)
    assert "dec_blocks=[]" not in str(info.value)
    dec = checkpoint.load_model(path, model_name="vit_tiny_dec", model_kwargs=TINY, allow_base=True)
    torch.testing.assert_close(logits(dec), logits(base), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# the README
# ---------------------------------------------------------------------------------------------------------------------

def _readme_use_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    use = text[text.index("## Use"):text.index("### The warp op")]
    return re.findall(r"```python\n(.*?)```", use, re.S)


@pytest.mark.slow
def test_readme_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, hub_block, offline = _readme_use_blocks()
    exec(compile(first, "README.md (Use)", "exec"), {})
    # the Hub lines only differ from the offline route by where the weights come from
    assert all("pretrained=True" in line or 'device="meta"' in line for line in hub_block.strip().splitlines())
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224").eval()
    Path("vit_tiny").mkdir()  # where the README's `hf download ... --local-dir vit_tiny` writes model.safetensors
    safetensors.torch.save_file(base.state_dict(), "vit_tiny/model.safetensors")
    scope: dict[str, Any] = {}
    exec(compile(offline, "README.md (offline)", "exec"), scope)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (scope["m"].eval()(x) - base(x)).abs().max() <= 1e-5   # the README's bound for a fresh DEC


def test_readme_shows_the_current_eval_help(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    shown = text[text.index("`timm-dec eval --help`"):]
    shown = shown[shown.index("```\n") + 4:]
    shown = shown[:shown.index("```")]
    monkeypatch.setenv("COLUMNS", "118")
    sub = cli.build_parser()._subparsers._group_actions[0].choices["eval"]
    assert " ".join(shown.split()) == " ".join(sub.format_help().split())


# ---------------------------------------------------------------------------------------------------------------------
# eval and push: arguments that say what is wrong, before any work
# ---------------------------------------------------------------------------------------------------------------------

def test_eval_label_that_contradicts_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint.save_model(tiny_model(num_classes=20), tmp_path / "digits.safetensors",
                               data=dict(num_digits=2, canvas=32, digit_size=8, label="digits"))
    assert_one_line_error(*run_cli(EVAL + ["--checkpoint", str(ckpt), "--label", "number"], capsys)[::2], "eval",
                          r"--label number: the checkpoint was trained with label 'digits' \(10 outputs per digit\); "
                          r"leave --label out .* or give --label digits")


def test_eval_canon_on_a_dec_checkpoint_says_what_it_holds(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run_cli(EVAL + ["--checkpoint", str(ckpt), "--canon"], capsys)[::2], "eval",
                          r"--canon: .* holds a DEC model \(vit_tiny_dec\), not a Canon-wrapped one.*leave --canon out")


def test_a_text_file_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    for argv in (EVAL + ["--checkpoint", str(text)], ["push", "--checkpoint", str(text), "--dry-run", "--output",
                                                      str(tmp_path / "o")]):
        assert_one_line_error(*run_cli(argv, capsys)[::2], argv[0],
                              r"--checkpoint .*notes.txt could not be read as a checkpoint: it is not a safetensors "
                              r"file, a torch checkpoint \(.pth, .pth.tar\) or a checkpoint folder \(it begins with "
                              r"'hello\\n'\)")
    assert not (tmp_path / "o").exists()


def test_eval_results_file_that_cannot_be_written(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(EVAL + ["--checkpoint", str(ckpt), "--results-file", "/proc/x"], capsys)
    assert_one_line_error(rc, err, "eval", r"--results-file /proc/x: cannot write in /proc")
    assert "Acc" not in out  # nothing was evaluated


def test_model_kwargs_errors_name_the_kwarg(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run_cli(EVAL + ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
                                           "act_layer=nonexistent_act"], capsys)[::2], "eval",
                          r"--model-kwargs act_layer='nonexistent_act': vit_tiny_patch16_224 refuses it")
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(ckpt), "--dry-run", "--output", str(tmp_path / "o"),
                                    "--model-kwargs", "act_layer=nonexistent_act"], capsys)[::2], "push",
                          r"--model-kwargs act_layer='nonexistent_act': the model refuses it \(KeyError")
    assert not (tmp_path / "o").exists()
    for command in ("eval", "demo", "push"):
        with pytest.raises(SystemExit):
            cli.main([command, "--model-kwargs", "=5"] + (["--checkpoint", "x"] if command == "push" else []))
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"timm-dec {command}: error: argument --model-kwargs: malformed KEY=VALUE item '=5': KEY must be a "
            f"keyword argument name (e.g. img_size=64)")


def test_push_offline_says_the_hub_cannot_be_reached(unreachable_hub: None, ckpt: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    rc, _, err = run_cli(["push", "--checkpoint", str(ckpt), "--repo-id", "org/name", "--output", str(out)], capsys)
    assert_one_line_error(rc, err, "push", r"--repo-id org/name: cannot push, the Hub cannot be reached \(https://"
                                           r"huggingface.co cannot be reached \(offline\?.*--dry-run --output DIR")
    assert "Errno" not in err and not out.exists()  # checked before the checkpoint was read or the folder written
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(ckpt), "--repo-id", "org/name"], capsys)[::2],
                          "push", r"the Hub cannot be reached \(HF_HUB_OFFLINE is set")


@pytest.mark.parametrize("extra, message", [
    (["--canon", "--canon-energy-size", "0"], r"--canon-energy-size must be >= 4, got 0"),
    (["--canon", "--canon-warps", "0"], r"--canon-warps must be >= 1, got 0"),
    (["--canon", "--canon-strength", "-1"], r"--canon-strength must be a finite number >= 0, got -1"),
    (["--scale-range", "2", "1"], r"--scale-range needs 0 < LOW <= HIGH, got 2.0 1.0"),
])
def test_eval_options_name_their_flag(extra: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run_cli(EVAL + ["--model", "vit_tiny_patch16_224", "--num-digits", "1"] + extra,
                                   capsys)[::2], "eval", message)


def test_output_and_checkpoint_checks_create_nothing(model: torch.nn.Module, ckpt: Path, tmp_path: Path) -> None:
    """The one helper every subcommand uses: it checks without creating, names the flag, and takes every
    checkpoint format the readers take."""
    from timm_dec._argcheck import check_checkpoint_path, check_output_file, check_output_folder

    assert check_output_folder(tmp_path / "new", "--out") == tmp_path / "new" and not (tmp_path / "new").exists()
    assert check_output_folder(tmp_path, "--out") == tmp_path and list(tmp_path.iterdir()) == []
    assert check_output_file(tmp_path / "r.json", "--json") == tmp_path / "r.json" and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"^--json .*r.json: the folder .*nope does not exist \(it is not created\)"):
        check_output_file(tmp_path / "nope" / "r.json", "--json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*f/sub: .*f is a file, not a folder"):
        check_output_folder(tmp_path / "f" / "sub", "--out")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "last.pth.tar")
    torch.save({"x": torch.zeros(1)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for path in (ckpt, tmp_path / "last.pth.tar", tmp_path / "legacy.pth", tmp_path, tmp_path / "missing.pth"):
        assert check_checkpoint_path(path) == Path(path)  # a missing path or a folder: the reader says what it misses
    with pytest.raises(ValueError, match=r"^--checkpoint .*f could not be read as a checkpoint"):
        check_checkpoint_path(tmp_path / "f")


def test_eval_says_what_reads_a_segment_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "dec.safetensors"
    safetensors.torch.save_file({"backbone.pos_embed": torch.zeros(1, 4, 8)}, str(path),
                                metadata={"timm_dec_segment": json.dumps({"method": "dec"})})
    assert_one_line_error(*run_cli(EVAL + ["--checkpoint", str(path)], capsys)[::2], "eval",
                          r"is a timm-dec segment checkpoint \(a segmenter, not a classifier\).*"
                          r"timm_dec.apps.segment.load_checkpoint\(PATH\)")
