"""``timm-dec bench gpu`` (the one-shot GPU check) and the compiled / CUDA-graph modes of ``bench overhead``: what can
be checked without a GPU. The argument parsing, a ``--device cpu --dry-run`` smoke run of every CPU-side code path
(the JSON it writes, sections that need CUDA recorded as "not measured" with the reason), the refusals, and the
compile mode of the overhead benchmark. On a machine with CUDA the kernel check itself runs too."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from timm_dec import bench
from timm_dec.bench.gpu import GPU_MODELS, triton_kernel_check
from timm_dec.bench.overhead import bench_model


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_gpu_arguments_and_defaults():
    args = parse("gpu")
    assert args.which == "gpu" and args.device == "cpu" and args.models is None and args.modes is None
    assert not args.dry_run and args.budget_s is None and args.compile_backend == "inductor"
    args = parse("gpu", "--device", "cuda:1", "--modes", "eager", "cudagraph", "--budget-s", "300", "--dry-run")
    assert (args.device, args.modes, args.budget_s, args.dry_run) == ("cuda:1", ["eager", "cudagraph"], 300.0, True)
    with pytest.raises(SystemExit):
        parse("gpu", "--modes", "graph")
    assert set(GPU_MODELS) == {"vit_small_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224"}


def test_gpu_check_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="--dry-run"):
        bench.run(parse("gpu", "--device", "cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            bench.run(parse("gpu", "--device", "cuda"))
    with pytest.raises(ValueError, match="CUDA only"):
        bench.run(parse("overhead", "--models", "vit_tiny_patch16_224", "--modes", "cudagraph"))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        triton_kernel_check("cpu")


@pytest.mark.slow
def test_gpu_dry_run_on_cpu_writes_one_json(tmp_path):
    """The CLI end to end, in a fresh process as a user runs it: every section recorded, CUDA-only ones as "not
    measured" with the reason, figures only where they were measured."""
    path = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "timm_dec.cli", "bench", "gpu", "--device", "cpu", "--dry-run", "--modes", "eager",
         "--json", str(path), "--check"], capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a target missed (tiny inputs, no figures)
    result = json.loads(path.read_text())
    assert result["benchmark"] == "gpu" and result["dry_run"] and len(result["load_average_before"]) == 3
    assert result["kernel"] == {"status": "not measured", "reason": "needs a CUDA device (ran on cpu)"}
    assert result["warp"]["status"] == "measured" and set(result["warp"]["shapes"]) == set(bench.WARP_SHAPES)
    assert result["overhead"]["status"] == {"vit_tiny_patch16_224": "measured"}
    entry = result["overhead"]["models"]["vit_tiny_patch16_224"]
    assert entry["mode"] == "eager" and entry["ratios"]["forward"] > 0
    assert "not measured" in proc.stdout and "dry run" in proc.stdout


@pytest.mark.slow
def test_overhead_compile_mode_runs_and_reports_no_split():
    """The compile mode (Dynamo's capture only here; Inductor on the real run): every figure but the hooks' split.
    On timm's 6-block test ViT (the same class and input DEC as vit_tiny's 12 blocks, half the graph to capture)."""
    entry = bench_model("test_vit", device=torch.device("cpu"), batch_size=2, img_size=32, repeats=1,
                        warmup=1, mode="compile", compile_backend="eager", dec_options={"max_iter": 2})
    assert entry["mode"] == "compile" and entry["dec_options"]["check_every"] is None
    assert entry["dec_options"]["max_iter"] == 2
    assert entry["ratios"]["forward"] > 0 and entry["ratios"]["train_step"] > 0 and entry["ratios"]["memory_total"] > 0
    assert entry["split"] == {"forward_dec_share": None, "train_dec_forward_share": None,
                              "train_adjoint_share_profiled": None}
    assert set(entry["targets"]) == {"forward_<=1.15", "train_step_<=1.3", "memory_<=1.15"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_matches_reference_on_cuda():
    out = triton_kernel_check("cuda", random_draws=6, with_bench_shapes=True)
    assert out["cases"] > 0 and not out["failures"], out["failures"][:5]
