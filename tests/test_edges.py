"""The edges a new user meets (issue 17): no loader builds a model that contradicts the options its weights record,
arguments are checked before any work, `hf-hub:` names fail at once offline, and the README's install and offline
lines are what works. Offline; tiny models."""
from __future__ import annotations

import re
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch

import timm_dec  # noqa: F401
from timm_dec import checkpoint, cli, hub

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, dec_widths=(8, 16),
            dec_proj_chans=8)
DEC = dict(dec_blocks=(1,), dec_grid=3, dec_max_iter=6)
EVAL = ["eval", "--num-samples", "2", "--scales", "1", "--no-progress", "-b", "2"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_dec", **{**TINY, **DEC})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def saved(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hub.save_pretrained(model, tmp_path_factory.mktemp("saved") / "m", data=dict(num_digits=1, canvas=32))


@pytest.fixture(scope="module")
def ckpt(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint.save_model(model, tmp_path_factory.mktemp("ckpt") / "dec.safetensors", data=dict(num_digits=1))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, command: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"timm-dec {command}: error: ") and re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# silent wrong results
# ---------------------------------------------------------------------------------------------------------------------

def test_create_model_refuses_dec_options_that_contradict_the_saved_model(saved: Path) -> None:
    for key, value, recorded in (("dec_grid", 8, "3"), ("dec_mode", "invariant", "'equivariant'")):
        with pytest.raises(TypeError, match=f"{key}={value!r} contradicts the saved model .*{key}={recorded}"):
            timm.create_model(f"local-dir:{saved}", pretrained=True, **{key: value})
    assert timm.create_model(f"local-dir:{saved}", pretrained=True, dec_grid=3).dec_cfg.options.grid == 3
    # without the saved weights it is a new model, which may be built with any options
    assert timm.create_model(f"local-dir:{saved}", pretrained=False, dec_grid=8).dec_cfg.options.grid == 8


def test_pretrained_file_refuses_dec_options_that_contradict_its_record(ckpt: Path) -> None:
    overlay = dict(pretrained_cfg_overlay=dict(file=str(ckpt)))
    backbone = {k: v for k, v in {**TINY, **DEC}.items() if k != "dec_grid"}
    with pytest.raises(TypeError, match="dec_grid=8 contradicts the checkpoint .*dec_grid=3"):
        timm.create_model("vit_tiny_dec", pretrained=True, **overlay, **backbone, dec_grid=8)
    # left out, the default (4) would be built: as wrong as asking for it
    with pytest.raises(TypeError, match="dec_grid=4 contradicts .* trained with dec_grid=3"):
        timm.create_model("vit_tiny_dec", pretrained=True, **overlay, **backbone)
    assert timm.create_model("vit_tiny_dec", pretrained=True, **overlay, **backbone, dec_grid=3).dec_cfg.options.grid \
        == 3


def test_use_ema_without_ema_weights_is_an_error(saved: Path, ckpt: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run_cli(EVAL + ["--model", f"local-dir:{saved}", "--use-ema"], capsys)[::2], "eval",
                          "--use-ema: local-dir:.* has no EMA weights")
    for source in (ckpt, saved):
        assert_one_line_error(*run_cli(EVAL + ["--checkpoint", str(source), "--use-ema"], capsys)[::2], "eval",
                              "no EMA weights")
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(ckpt), "--use-ema", "--dry-run", "--output",
                                    str(tmp_path / "o")], capsys)[::2], "push", "no EMA weights")
    assert not (tmp_path / "o").exists()


def test_results_file_folder_is_checked_first_and_never_created(saved: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing"
    rc, out, err = run_cli(EVAL + ["--model", f"local-dir:{saved}", "--results-file", str(missing / "r.json")], capsys)
    assert_one_line_error(rc, err, "eval", f"the folder {re.escape(str(missing))} does not exist")
    assert "Acc" not in out and not missing.exists()
    assert_one_line_error(*run_cli(EVAL + ["--model", f"local-dir:{saved}", "--results-file", str(tmp_path)],
                                   capsys)[::2], "eval", "is a folder")


# ---------------------------------------------------------------------------------------------------------------------
# errors before work, in one line
# ---------------------------------------------------------------------------------------------------------------------

def test_model_kwargs_without_equals_is_an_argparse_error(capsys: pytest.CaptureFixture) -> None:
    for command in ("eval", "push", "demo"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--model-kwargs", "dec_grid"] + (["--checkpoint", "x"] if command == "push" else []))
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1] == (f"timm-dec {command}: error: argument --model-kwargs: expected "
                                                f"KEY=VALUE items, got 'dec_grid' (e.g. dec_grid=8)")


def test_demo_threads_and_device_are_checked_before_it_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["demo", "--preset", "smoke", "--out", str(tmp_path / "out"), "--no-progress"]
    rc, out, err = run_cli(base + ["--threads", "0"], capsys)
    assert_one_line_error(rc, err, "demo", "--threads must be >= 1, got 0")
    assert out == ""  # no banner: nothing started
    if not torch.cuda.is_available():  # eval's message, not torch's "Found no NVIDIA driver"
        rc, out, err = run_cli(base + ["--device", "cuda"], capsys)
        assert_one_line_error(rc, err, "demo", "CUDA is not available on this machine.*use --device cpu")
        assert out == ""
    assert not (tmp_path / "out").exists()


def test_push_checks_its_arguments_before_writing(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(ckpt), "--repo-id", "bad", "--output", str(out)],
                                   capsys)[::2], "push", "repo_id must look like 'ORG/NAME', got 'bad'")
    assert not out.exists()
    names = tmp_path / "labels.txt"
    assert_one_line_error(*run_cli(["push", "--checkpoint", str(ckpt), "--label-names", str(names), "--dry-run",
                                    "--output", str(out)], capsys)[::2], "push",
                          f"--label-names file {re.escape(str(names))} does not exist")
    assert not out.exists()


def test_checkpoint_of_another_architecture_says_so(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*run_cli(EVAL + ["--model", "swin_tiny_dec", "--checkpoint", str(ckpt)], capsys)[::2],
                          "eval", "is a checkpoint of vit_tiny_dec, not of swin_tiny_dec.*leave --model out")


# ---------------------------------------------------------------------------------------------------------------------
# hf-hub: names offline
# ---------------------------------------------------------------------------------------------------------------------



def test_hf_hub_name_offline_fails_at_once_in_one_line(unreachable_hub: None, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    assert_one_line_error(*run_cli(EVAL + ["--model", "hf-hub:org/not-cached"], capsys)[::2], "eval",
                          "hf-hub:org/not-cached is not in huggingface_hub's cache and https://huggingface.co cannot "
                          "be reached .*local-dir:FOLDER.*--checkpoint FILE")
    assert time.perf_counter() - start < 10  # no retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_one_line_error(*run_cli(EVAL + ["--model", "hf-hub:org/not-cached"], capsys)[::2], "eval",
                          "not in huggingface_hub's cache and HF_HUB_OFFLINE is set")


def test_hf_hub_name_offline_loads_from_the_cache(unreachable_hub: None, model: torch.nn.Module, saved: Path,
                                                  tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((saved / name).read_bytes())
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("c" * 40)
    loaded = hub.load_pretrained("hf-hub:org/tiny", cache_dir=cache)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# the README for a newcomer
# ---------------------------------------------------------------------------------------------------------------------

def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_has_a_plain_install_line() -> None:
    intro = _readme()[:_readme().index("## Use")]
    assert "pip install -e '.[demo]'" in intro
    assert re.search(r"pip wheel .*\n.*pip install .*dist/timm_dec-\*\.whl", intro)


def test_readme_offline_snippet_names_the_file_hf_download_writes() -> None:
    text = _readme()
    command = re.search(r"`hf download (\S+) (\S+) --local-dir (\S+)`", text)
    assert command, "the offline route names an hf download command with --local-dir"
    written = f"{command.group(3)}/{command.group(2)}"  # hf download writes FILENAME under --local-dir
    assert f'pretrained_cfg_overlay=dict(file="{written}")' in text


def test_readme_says_dinov2_has_no_classifier() -> None:
    assert timm.create_model("vit_small_patch14_dinov2", img_size=56).num_classes == 0
    assert "DINOv2 has no classifier by default (num_classes=0)" in _readme()
