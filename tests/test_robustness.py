"""Whole ``*_dec`` models, tiny configs of every family, with DECs moved off the identity: batch independence,
extreme and non-finite inputs, and training memory that does not grow with the solver's iterations.

`tests/test_dec.py` checks the same properties on a lone DEC module; here the DECs sit inside timm models, so the
backbone, the warps and every DEC of the model take part. References: the same sample run alone, the base model with
the same backbone weights, and the profiler's allocation record.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from _tiny import tiny_table
from torch import nn

from timm_dec import solver_stats
from timm_dec.bench.timing import peak_cpu_memory

# family -> (timm base name, tiny architecture kwargs, image size)
TINY = tiny_table("vit", "deit_distilled", "dinov2_reg", "beit", "swin", "eva02", "dinov3_reg", "relpos_cls",
                  "swinv2", "swinv2_cr")
FAMILIES = list(TINY)
DEC_KWARGS = dict(dec_blocks=(0, 1), dec_widths=(8, 8), dec_proj_chans=4, dec_pool_size=8)
NUM_CLASSES = 5


def create(family: str, dec: bool = True, **kwargs: Any) -> nn.Module:
    """The tiny ``<base>_dec`` (or base) model of a family, without stochastic depth (timm's Swin defaults to 0.1),
    with classifier weights that give logits of order 1 (timm's BEiT and DINOv2 heads start near zero), so that an
    absolute tolerance on the logits means the same for every family."""
    name, arch, _ = TINY[family]
    torch.manual_seed(0)
    extra = DEC_KWARGS if dec else {}
    model = timm.create_model(name + ("_dec" if dec else ""), num_classes=NUM_CLASSES, drop_path_rate=0.0,
                              **{**arch, **extra, **kwargs})
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        nn.init.normal_(head.weight, std=head.in_features ** -0.5)
    return model


def images(family: str, batch: int, seed: int = 1) -> torch.Tensor:
    size = TINY[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturb_dec(model: nn.Module, std: float = 0.3, seed: int = 2) -> nn.Module:
    """Move every DEC off the identity: its zero-initialised last layer gets random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for dec in model.dec.values():
            for p in (dec.head.weight,):
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def base_logits(family: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the base model holding ``model``'s backbone weights (eval mode)."""
    base = create(family, dec=False)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dec.")})
    with torch.no_grad():
        return base.eval()(x)


# ---------------------------------------------------------------------------------------------------------------------
# Batch independence


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sample_alone_equals_sample_in_batch_of_8(family, training):
    model = perturb_dec(create(family)).train(training)
    x = images(family, 8)
    # train mode with grad: the path that re-enters the graph after the solve; eval: the no-grad solve alone
    # the same dropout draws for every run: relpos and Swin V2 cr drop units of their position MLPs in training
    # (one mask for the whole batch, so it does not couple the samples)
    torch.manual_seed(3)
    with torch.set_grad_enabled(training), solver_stats() as stats:
        batch = model(x).detach()
    assert stats.total_fallbacks == 0 and stats.mean_iterations > 2  # a real solve, samples stopping apart
    assert (batch - base_logits(family, model, x)).abs().max() > 1e-2  # the DECs change the logits
    with torch.set_grad_enabled(training):
        for b in range(8):
            torch.manual_seed(3)
            alone = model(x[b:b + 1]).detach()
            assert (alone[0] - batch[b]).abs().max().item() <= 1e-5, (family, b)


# ---------------------------------------------------------------------------------------------------------------------
# Extreme and non-finite inputs


def fallbacks_per_dec(fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    with solver_stats() as stats:
        out = fn()
    return out, {name: s["fallbacks"] for name, s in stats.summary().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_scaled_zero_and_nan_samples_do_not_touch_the_others(family):
    model = perturb_dec(create(family)).eval()
    x = images(family, 4)
    x[1] *= 1e4
    x[2] = 0
    x[3, 0, 3, 5] = float("nan")
    with torch.no_grad():
        out, fallbacks = fallbacks_per_dec(lambda: model(x))
        alone = [fallbacks_per_dec(lambda b=b: model(x[b:b + 1])) for b in range(4)]
    assert torch.isfinite(out[:3]).all()
    for b in range(3):
        torch.testing.assert_close(out[b], alone[b][0][0], rtol=1e-5, atol=1e-5)
    # every DEC gives up on the NaN sample, and the batch counts exactly what the samples count alone
    assert alone[3][1] == {"dec.0": 1, "dec.1": 1}
    assert fallbacks == {name: sum(a[1][name] for a in alone) for name in fallbacks}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_on_scaled_and_zero_inputs_stays_finite(family):
    model = perturb_dec(create(family)).train()
    x = images(family, 3)
    x[1] *= 1e4
    x[2] = 0
    with solver_stats() as stats:
        logits = model(x)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.arange(3)).backward()
    dec_grads = [p.grad for p in model.dec.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in dec_grads)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(g.abs().sum() > 0 for g in dec_grads)
    assert len(stats.records) == 2 and stats.total_samples == 6


# ---------------------------------------------------------------------------------------------------------------------
# Training memory vs solver iterations


def training_step_peak(**dec_options: Any) -> tuple[int, float]:
    """Peak memory of one training step of a tiny ViT with the default H (a DEC as heavy as the blocks), and the
    mean solver iterations of the step."""
    model = create("vit", dec_blocks=(0,), dec_widths=(64, 128), dec_proj_chans=16, **dec_options)
    perturb_dec(model, std=0.1).train()
    x, target = images("vit", 2), torch.arange(2)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with solver_stats() as stats:
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        assert stats.total_fallbacks == 0
        step.iterations = stats.mean_iterations

    step()  # warm up: first-call allocations of the ops
    return peak_cpu_memory(step), step.iterations


def _peaks_in_a_fresh_process() -> dict[str, tuple[int, float]]:
    """`training_step_peak` of the four configurations, measured in a new interpreter.

    Inside a long pytest worker the profiler's allocation record can miss most of a step (seen once in the full
    suite: a 75 kB peak for a step that allocates megabytes), so the comparison runs where nothing ran before it.
    """
    code = """
import json, sys
sys.path.insert(0, {tests!r})
from test_robustness import training_step_peak
forced = dict(dec_tol=1e-30)  # far below float32 resolution: every sample runs every iteration
configs = dict(short=dict(dec_max_iter=5), long=dict(dec_max_iter=30),
               unrolled_short=dict(dec_max_iter=5, dec_backward="phantom", dec_phantom_steps=1),
               unrolled_long=dict(dec_max_iter=5, dec_backward="phantom", dec_phantom_steps=11))
print(json.dumps({{k: training_step_peak(**v, **forced) for k, v in configs.items()}}))
""".format(tests=str(Path(__file__).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_training_memory_does_not_grow_with_solver_iterations():
    peaks = _peaks_in_a_fresh_process()
    (short, it_short), (long, it_long) = peaks["short"], peaks["long"]
    assert it_short == 5 and it_long > 20, (it_short, it_long)
    assert abs(long / short - 1) <= 0.05, (short, long)
    # the meter sees growth where there is some: a graph through 10 more unrolled (phantom) steps of the same H
    unrolled_short, unrolled_long = peaks["unrolled_short"][0], peaks["unrolled_long"][0]
    assert unrolled_long > 1.5 * unrolled_short, (unrolled_short, unrolled_long)
