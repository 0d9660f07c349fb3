"""Tests of the fused Triton warp, `timm_dec.ops.triton_warp`, against the PyTorch reference; no GPU needed.

Triton's interpreter (CPU tensors) must be switched on with ``TRITON_INTERPRET=1`` before Triton is imported, so
every check that imports Triton runs in a fresh subprocess: ``tests/_triton_check.py GROUP ...`` (see its docstring).
Measured on the interpreter (30 hypothesis examples, float32; largest error over the largest reference value):
forward 1.7e-6, grad_x 1.7e-6, grad_knots 1.5e-6, grad_logits 1.3e-6 (tolerance: rtol 1e-4).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "_triton_check.py"
TRITON_SPEC = importlib.util.find_spec("triton")
needs_triton = pytest.mark.skipif(TRITON_SPEC is None, reason="Triton is not installed")


def _python(args: list[str], interpret: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def _groups(names: list[str], interpret: bool) -> dict:
    stats = json.loads(_python([str(HELPER), *names], interpret).stdout.strip().splitlines()[-1])
    print(json.dumps(stats, indent=1))
    return stats


def test_importing_timm_dec_does_not_import_triton_or_touch_cuda():
    # timm imports torch._dynamo, which imports Triton when it is installed; so the check is that importing and
    # using timm_dec on the CPU loads no Triton module beyond those its dependencies already loaded, and never the
    # kernel module.
    code = (
        "import sys, torch, timm\n"
        "triton_modules = lambda: {m for m in sys.modules if m == 'triton' or m.startswith('triton.')}\n"
        "before = triton_modules()\n"
        "import timm_dec, timm_dec.ops\n"
        "from timm_dec.ops import knots_from_logits, monotone_warp\n"
        "x = torch.randn(2, 1 + 16, 8)\n"
        "monotone_warp(x, knots_from_logits(torch.randn(2, 2, 5, 4)), layout='tokens', num_prefix_tokens=1)\n"
        "assert 'timm_dec.ops.triton_warp' not in sys.modules\n"
        "assert triton_modules() == before, sorted(triton_modules() - before)\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    _python(["-c", code])


def test_only_the_kernel_module_imports_triton():
    """No module of the package but ops/triton_warp.py has an import of triton, at any level."""
    importers = set()
    for path in (ROOT / "timm_dec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "triton" or n.startswith("triton.") for n in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"timm_dec/ops/triton_warp.py"}


def test_package_works_without_triton_and_the_kernel_module_says_why_not():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if Triton were not installed\n"
        "import torch, timm_dec\n"
        "from timm_dec.ops import identity_knots, monotone_warp\n"
        "x = torch.randn(1, 3, 4, 4)\n"
        "assert torch.allclose(monotone_warp(x, identity_knots(1, 2)), x, atol=1e-6)\n"
        "try:\n"
        "    import timm_dec.ops.triton_warp\n"
        "except ImportError as e:\n"
        "    assert 'Triton' in str(e) and \"backend='torch'\" in str(e), str(e)\n"
        "else:\n"
        "    raise AssertionError('imported without Triton')\n"
    )
    _python(["-c", code])


@needs_triton
@pytest.mark.slow
def test_kernel_equals_reference_under_the_interpreter():
    """One interpreted process (importing timm_dec alone costs seconds), two groups of checks:

    * reference: hypothesis, every layout and direction, B, C, H, W, G in 1..16, P in 0..5; forward, grad_x,
      grad_knots and grad_logits within rtol 1e-4 of the reference, for the same random upstream gradient;
    * details: fp16 / bf16 / fp64 inputs, autocast, bit-identical prefix tokens, strided inputs and upstream
      gradients, one gradient at a time, other sweep counts, int64 offsets, identity, dispatch, empty and 1x1
      maps, bad input.
    """
    stats = _groups(["reference", "details"], interpret=True)
    assert stats["examples"] >= 30
    for name in ("forward", "grad_x", "grad_knots", "grad_logits"):
        assert stats[f"{name}_max_rel"] < 1e-4, (name, stats)
    assert stats["identity_max_abs"] <= 1e-5
    assert stats["torch.float16_err_vs_fp32"] <= 2 * stats["torch.float16_torch_err_vs_fp32"] + 1e-6


@needs_triton
@pytest.mark.slow
def test_cpu_tensors_refused_and_kernels_compile_for_gpus_without_spills():
    """Interpreter off: CPU tensors get a clear error; the kernels, specialised as the launcher launches them, build
    for sm_90 / sm_80 with no register spills and with vector loads on the nhwc / token layouts (needs ptxas)."""
    stats = _groups(["errors", "compile"], interpret=False)
    if "compile_skipped" in stats:
        pytest.skip(stats["compile_skipped"])
    assert any(key.endswith("_fwd") for key in stats) and any(key.endswith("_bwd") for key in stats)
