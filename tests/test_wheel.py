"""The built wheel works on its own: installed (not editable) into a fresh venv, it renders the model card from its
package data, saves a model with save_pretrained and loads it back. Offline: the venv reuses the installed torch,
timm, ... and the wheel is installed with --no-deps --no-build-isolation."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import sys, tempfile, timm, torch
import timm_dec
from timm_dec import hub
assert "site-packages" in timm_dec.__file__ and not timm_dec.__file__.startswith(sys.argv[1]), timm_dec.__file__
assert hub.MODEL_CARD_TEMPLATE.is_file(), hub.MODEL_CARD_TEMPLATE
torch.manual_seed(0)
m = timm.create_model("vit_tiny_dec", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                      dec_blocks=(0,), dec_widths=(8, 8)).eval()
folder = tempfile.mkdtemp()
hub.save_pretrained(m, folder, metrics={"acc": 0.5, "inv_e": 0.01})
back = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    assert torch.equal(m(x), back(x))
assert "timm_dec" in open(f"{folder}/README.md").read()
from timm_dec.apps import demo, segment  # the shipped starts load (hash-checked) from the installed package data
from timm_dec.cli import build_parser
assert "site-packages" in str(segment.START_DIR) and "site-packages" in str(demo.START_DIR)
assert set(segment.load_start(segment.PRESETS["default"], "default")[0]) == {"plain", "aug"}
assert set(demo.load_start(demo.resolve_config(build_parser().parse_args(["demo"])), "default")[0]) == {"plain", "aug"}
print("wheel ok", timm_dec.__file__)
"""


@pytest.mark.slow
def test_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    # build from a copy of the sources, so the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "timm_dec", src / "timm_dec", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(src)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("timm_dec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "timm_dec/templates/model_card.md" in names
    for start in ("demo_start/default", "segment_start/default"):
        assert {f"timm_dec/{start}_{f}" for f in ("start.json", "plain.safetensors", "aug.safetensors")} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the dependencies (torch, timm, ...) of this interpreter, after the venv's own site-packages; a plain path in a
    # .pth file, so the editable install's finder in those folders is not loaded
    venv_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    (venv_site / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", str(wheel)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([str(py), "-c", SCRIPT, str(REPO)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wheel ok" in proc.stdout and str(venv) in proc.stdout
