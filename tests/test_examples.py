"""Smoke tests of examples/: each runs offline on the digits with a tiny preset and does what its docstring says."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import safetensors.torch
import timm
import torch
from timm.utils import ParseKwargs

from timm_dec import hub
from timm_dec.apps import push as push_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, as a user would from a checkout (relative paths such as runs/ land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_quickstart_trains_predicts_and_draws_the_warp(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    assert example("quickstart").main(["--steps", "3", "--train-samples", "96", "--output", "qs"]) == 0
    out = capsys.readouterr().out
    assert "step    3" in out and "top-3" in out and "DEC solves:" in out and "mean |knots - identity|" in out
    assert (in_tmp / "qs" / "warp.png").stat().st_size > 1000
    model = timm.create_model(f"local-dir:{in_tmp / 'qs' / 'model'}", pretrained=True)
    assert model.dec_cfg.blocks == ("input",) and model.num_classes == 10
    # three AdamW steps moved the DEC off its zero-initialised head, so the drawn warp is a learned one
    assert model.dec["input"].head.weight.abs().max() > 0


def test_evaluate_writes_metrics_for_the_model_and_without_its_dec(in_tmp: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    assert example("evaluate").main(["--num-samples", "6", "--scales", "0.5,1.0", "--compare-base",
                                     "--results-file", "m.json"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^model\s+\d+\.\d\d\s+\d+\.\d{3}", out, re.M)
    assert re.search(r"^without DEC\s+\d+\.\d\d", out, re.M)
    metrics = json.loads((in_tmp / "m.json").read_text())
    assert metrics["num_samples"] == 6 and metrics["scales"] == [0.5, 1.0]
    assert hub.normalize_metrics(metrics)["acc"] == metrics["acc"]       # what push / publish accept


def test_publish_saves_checks_and_does_not_push_by_default(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = {"acc": 0.25, "inv_e": 0.002, "per_scale_acc": [0.2, 0.25], "scales": [0.5, 1.0], "num_samples": 8}
    (in_tmp / "m.json").write_text(json.dumps(metrics))
    assert example("publish").main(["--metrics", "m.json"]) == 0
    out = capsys.readouterr().out
    assert "same logits" in out and "not pushed" in out
    folder = in_tmp / "runs" / "publish" / "vit_tiny_dec"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "| 25.00 | 0.20 |" in (folder / "README.md").read_text()


def test_export_digits_writes_a_timm_image_folder(in_tmp: Path) -> None:
    example("export_digits").main(["--out", "d", "--num-digits", "1", "--canvas", "32", "--digit-size", "16",
                                   "--train-samples", "12", "--test-samples", "4"])
    from timm.data import create_dataset
    train = create_dataset("", root="d", split="train", class_map="d/class_map.txt")
    assert len(train) == 12
    for image, label in train:
        assert image.size == (32, 32)
    # the class index is the number itself, as the folder name says
    names = {Path(p).parent.name: t for p, t in train.reader.samples}
    assert all(int(name) == index for name, index in names.items())


def _md_commands(text: str) -> list[list[str]]:
    """The shell commands in the ```bash blocks of a markdown file, line continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(shlex.split(command))
    return commands


def _train_py_args(argv: list[str]) -> argparse.Namespace:
    """The train.py options the tiny command uses, parsed as timm's train.py parses them."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--data-dir")
    parser.add_argument("--class-map", default="")
    parser.add_argument("--device-modules", nargs="+", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("-j", "--workers", type=int, default=4)
    parser.add_argument("--model")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--input-size", nargs=3, type=int)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    parser.add_argument("--opt")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("-b", "--batch-size", type=int)
    parser.add_argument("--output")
    parser.add_argument("--experiment")
    return parser.parse_known_args(argv)[0]


def test_train_with_timm_commands(in_tmp: Path) -> None:
    """The document's commands, with train.py (not in timm's wheel) replaced by the calls it makes, in its order."""
    from timm.data import create_dataset
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver

    commands = _md_commands((EXAMPLES / "train_with_timm.md").read_text())
    export = next(c for c in commands if c[:2] == ["python", "examples/export_digits.py"])
    train = next(c for c in commands if c[:2] == ["python", "train.py"])
    evaluate = next(c for c in commands if c[:2] == ["python", "examples/evaluate.py"])
    push = next(c for c in commands if c[0] == "timm-dec")
    assert ["--device-modules", "timm_dec"] == train[train.index("--device-modules"):][:2]

    example("export_digits").main(export[2:] + ["--train-samples", "40", "--test-samples", "4"])  # > one batch
    args = _train_py_args(train[2:])
    for module in args.device_modules:            # train.py: right after parsing, before create_model
        importlib.import_module(module)
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    assert model.dec_cfg.blocks == ("input",) and model.dec_cfg.options.image_widths == (8, 16)
    data_config = timm.data.resolve_data_config(vars(args), model=model)
    assert tuple(data_config["input_size"]) == tuple(args.input_size)
    dataset = create_dataset("", root=args.data_dir, split="train", is_training=True, class_map=args.class_map)
    loader = timm.data.create_loader(dataset, input_size=data_config["input_size"], batch_size=args.batch_size,
                                     is_training=True, no_aug=True, use_prefetcher=False, num_workers=0,
                                     mean=data_config["mean"], std=data_config["std"])
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    images, labels = next(iter(loader))
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    folder = Path(args.output) / args.experiment
    folder.mkdir(parents=True)
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(epoch=0, metric=0.5)
    checkpoint = evaluate[evaluate.index("--checkpoint") + 1]
    assert (in_tmp / checkpoint).is_file()

    assert example("evaluate").main(evaluate[2:] + ["--num-samples", "4", "--scales", "1.0"]) == 0
    assert json.loads((in_tmp / evaluate[evaluate.index("--results-file") + 1]).read_text())["num_samples"] == 4
    parser = argparse.ArgumentParser()
    push_app.add_arguments(parser)
    push_args = parser.parse_args(push[2:] + ["--dry-run"])
    assert push_app.run(push_args) == 0
    saved = safetensors.torch.load_file(str(in_tmp / push_args.output / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    card = (in_tmp / push_args.output / "README.md").read_text()
    assert "locally scaled digits, 32 px" in card and 'hf-hub:ORG/vit_tiny_dec.digits' in card


@pytest.mark.slow
def test_finetune_accelerate_script(in_tmp: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TRAIN_SAMPLES": "64",
           "TEST_SAMPLES": "4", "EPOCHS": "1", "OUTPUT": "ft"}
    proc = subprocess.run(["bash", str(EXAMPLES / "finetune_accelerate.sh"), "--eval-scales", "1.0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((in_tmp / "ft" / "summary.json").read_text())
    assert summary["step"] == 2 and summary["metrics"]["num_samples"] == 4
    assert summary["model_kwargs"]["dec_blocks"] == ["input"]
    assert hub.load_pretrained(in_tmp / "ft" / "final").dec_cfg.options.image_widths == (8, 16)
