"""timm_dec.finetune: 2 CPU processes (gloo) match 1 process with the same global batch; resume is exact."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from timm_dec import checkpoint, finetune, hub

# a tiny vit_tiny_dec on 1-digit numbers (10 classes) at 32 px: 48 training images, 6 updates per epoch at a global
# batch of 8, 2 epochs, warm-up over the first half epoch
TINY_RUN = [
    "--model", "vit_tiny_dec", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2",
    "dec_blocks=0", "dec_widths=8,16", "dec_proj_chans=8", "--img-size", "32", "--num-digits", "1",
    "--train-samples", "48", "--test-samples", "8", "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "1e-3",
    "--eval-scales", "0.5", "1.0", "--log-every", "100", "--cpu",
]


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next in-process run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(*argv: str) -> dict:
    try:
        return finetune.run(finetune.build_parser().parse_args(list(argv)))
    finally:
        _reset_accelerate()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 1 process, batch 8, a checkpoint every 3 updates (all kept)."""
    out = tmp_path_factory.mktemp("one")
    run_in_process(*TINY_RUN, "--batch-size", "8", "--checkpoint-every", "3", "--keep-checkpoints", "0",
                   "--output", str(out))
    return out


def test_one_process_run_writes_checkpoints_final_folder_and_metrics(one_process: Path) -> None:
    assert sorted(p.name for p in one_process.glob("checkpoint-*")) == [
        "checkpoint-000003", "checkpoint-000006", "checkpoint-000009", "checkpoint-000012"]
    summary = json.loads((one_process / "summary.json").read_text())
    assert summary["step"] == 12 and summary["world_size"] == 1
    metrics = summary["metrics"]
    assert metrics["num_samples"] == 8 and metrics["scales"] == [0.5, 1.0] and 0 <= metrics["acc"] <= 1
    assert metrics["inv_e"] >= 0 and len(metrics["per_scale_acc"]) == 2
    # each checkpoint folder is a saved model (its record in config.json beside accelerate's model.safetensors) with
    # the resume state, and only that, in state.json
    state = json.loads((one_process / "checkpoint-000006" / "state.json").read_text())
    assert state["step"] == 6 and set(state) == {"step", "epoch", "signature", "scheduler", "world_size"}
    config = json.loads((one_process / "checkpoint-000006" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_dec"
    assert config["model_args"]["dec_blocks"] == [0] and config["model_args"]["dec_grid"] == 4
    assert config["timm_dec"]["data"]["num_digits"] == 1 and config["timm_dec"]["data"]["canvas"] == 32
    # training moved the weights, the DEC included
    first, last = weights(one_process / "checkpoint-000003"), weights(one_process / "final")
    assert not torch.equal(first["dec.0.head.weight"], last["dec.0.head.weight"])
    assert not torch.equal(first["head.weight"], last["head.weight"])
    # the final folder is a Hub folder with the measured metrics in its card; the checkpoint folders load too
    final = hub.load_pretrained(one_process / "final")
    assert all(torch.equal(v, last[k]) for k, v in final.state_dict().items())
    assert "| Scale | 0.5 | 1 |" in (one_process / "final" / "README.md").read_text()
    from_ckpt = checkpoint.load_model(one_process / "checkpoint-000012")
    assert all(torch.equal(v, last[k]) for k, v in from_ckpt.state_dict().items())
    from_timm = timm.create_model(f"local-dir:{one_process / 'checkpoint-000012'}", pretrained=True)
    assert all(torch.equal(v, last[k]) for k, v in from_timm.state_dict().items())


def test_resume_continues_the_same_trajectory(one_process: Path, tmp_path: Path) -> None:
    # update 9 is in the middle of epoch 2: the resumed run skips that epoch's first 3 batches
    run_in_process(*TINY_RUN, "--batch-size", "8", "--checkpoint-every", "3", "--no-eval", "--output",
                   str(tmp_path), "--resume", str(one_process / "checkpoint-000009"))
    resumed, uninterrupted = weights(tmp_path / "checkpoint-000012"), weights(one_process / "checkpoint-000012")
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # and the optimiser state came back: resuming without it (a fresh AdamW) ends elsewhere
    stripped = tmp_path / "no-opt"
    stripped.mkdir()
    src = one_process / "checkpoint-000009"
    for f in src.iterdir():
        (stripped / f.name).write_bytes(f.read_bytes())
    fresh = finetune.build_parser().parse_args(
        [*TINY_RUN, "--batch-size", "8", "--no-eval", "--output", str(tmp_path / "o2"), "--resume", str(stripped)])
    torch.save({"state": {}, "param_groups": torch.load(src / "optimizer.bin", weights_only=True)["param_groups"]},
               stripped / "optimizer.bin")
    try:
        finetune.run(fresh)
    finally:
        _reset_accelerate()
    other = weights(tmp_path / "o2" / "checkpoint-000012")
    assert not all(torch.equal(other[k], uninterrupted[k]) for k in other)


def test_resume_refuses_another_run(one_process: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="global_batch"):
        run_in_process(*TINY_RUN, "--batch-size", "4", "--no-eval", "--output", str(tmp_path), "--resume",
                       str(one_process / "checkpoint-000009"))


@pytest.mark.slow
def test_two_processes_match_one_process(one_process: Path, tmp_path: Path) -> None:
    """accelerate launch, 2 CPU processes over gloo, batch 2 x 2 micro-batches each: the same global batch of 8."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "timm_dec.finetune", *TINY_RUN, "--batch-size", "2", "--grad-accum", "2", "--checkpoint-every",
           "6", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 12
    digests = summary["rank_weight_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]          # every rank holds the same weights
    two, one = weights(tmp_path / "final"), weights(one_process / "final")
    assert sorted(two) == sorted(one)
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    assert diff < 1e-4, diff                                        # the all-reduce only reorders float sums
    # Float sums in another order are amplified by the DEC's solves (an iteration more or less) and by AdamW's
    # normalisation, so the yardstick is how far training moved the weights, over all of them: reordering leaves
    # 0.1-0.2% of that, a wrong gradient (e.g. the regulariser not scaled for the accumulation) several %.
    start = weights(one_process / "checkpoint-000003")
    apart = torch.cat([(two[k] - one[k]).flatten() for k in one]).norm()
    moved = torch.cat([(one[k] - start[k]).flatten() for k in one]).norm()
    assert apart < 0.01 * moved, (apart / moved).item()
    # the sharded evaluation saw the same 8 test images
    assert summary["metrics"]["num_samples"] == 8
    reference = json.loads((one_process / "summary.json").read_text())["metrics"]
    assert summary["metrics"]["acc"] == pytest.approx(reference["acc"])


def _image_folder(root: Path) -> Path:
    """2 classes of 4 + 2 small solid-colour PNGs in train/ and val/."""
    for split, count in (("train", 8), ("val", 4)):
        for label, colour in (("dark", (20, 20, 20)), ("light", (230, 230, 230))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count // 2):
                Image.new("RGB", (40, 40), tuple(c + 5 * i for c in colour)).save(folder / f"{i}.png")
    return root


def test_image_folder_data(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    summary = run_in_process(*TINY_RUN[:TINY_RUN.index("--num-digits")], "--data", f"folder:{root}", "--epochs", "1",
                             "--batch-size", "4", "--cpu", "--output", str(out))
    assert summary["step"] == 2 and summary["metrics"]["num_samples"] == 4 and summary["metrics"]["inv_e"] >= 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["num_classes"] == 2 and config["label_names"] == ["dark", "light"]


def test_bad_arguments(tmp_path: Path) -> None:
    parse = finetune.build_parser().parse_args
    with pytest.raises(FileNotFoundError, match="needs a train/ and a val/"):
        finetune.run(parse(["--data", f"folder:{tmp_path}", "--cpu"]))
    with pytest.raises(ValueError, match="--layer-decay"):
        finetune.run(parse(["--layer-decay", "2"]))
    with pytest.raises(ValueError, match="--data must be"):
        finetune.run(parse(["--data", "imagenet"]))
    _reset_accelerate()
