"""``torch.compile`` of the ``*_dec`` models: one graph in eval mode for every family, the training step, and a
CUDA-graph capture of the eval forward (where a GPU is present).

What is compared, and why there. A DEC with random head weights need not converge within its trip count, and an
unconverged solve magnifies rounding differences with every iteration. So the per-family test runs a fixed, short
trip count (``dec_check_every=None``, ``dec_max_iter=3``: one plain step and one Anderson step, no host check on
either side) and a small head perturbation (std 0.02): a well-defined function of the input that both sides compute
the same way up to rounding. `tests/test_timm_contract.py` adds a solve that converges (16 iterations and host checks
in eager).

Graph breaks: ``fullgraph=True`` raises on the first one, so a test that compiles with it proves there are none (the
same thing ``torch._dynamo.explain`` reports). The default backend is ``eager`` for the family sweep (Dynamo's capture
is what breaks graphs; ~5-15 s a family on the 2-core CI machine) and ``aot_eager`` for the Swin forward and the
ViT training step (AOTAutograd's tracing and decompositions too; the ViT forward is in test_timm_contract).
``TIMM_DEC_TEST_COMPILE_BACKEND=aot_eager`` (or
``inductor``) runs the whole sweep with that backend.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from test_timm_contract import FAMILIES, images, perturb_dec
from test_timm_contract import create as create_model

import timm_dec  # noqa: F401  (registers the *_dec models)
from timm_dec import solver_stats
from timm_dec.bench.overhead import set_dec_options

SWEEP_BACKEND = os.environ.get("TIMM_DEC_TEST_COMPILE_BACKEND", "eager")
AOT_BACKEND = os.environ.get("TIMM_DEC_TEST_COMPILE_BACKEND", "aot_eager")
# a well-defined solve on both sides: fixed trip count, no host check, small head weights (module docstring)
# no Jacobian regulariser: its random probe vector would differ between the eager and the compiled run, and under
# the phantom backward it adds one eager step per DEC call (README "Use")
FIXED_SOLVE = dict(check_every=None, max_iter=3, jac_reg=0.0)
HEAD_STD = 0.02


def create(family: str, **options):
    """The tiny ``*_dec`` model of a family with DEC ``options`` (set after creation: ``timm.create_model`` drops a
    ``dec_check_every=None``)."""
    model = set_dec_options(create_model(family), **options)
    assert all(dec.cfg.check_every == options.get("check_every", 1) for dec in model.dec.values())
    return model


def _compiled_forward_matches(family: str, backend: str) -> None:
    model = create(family, **FIXED_SOLVE).eval()
    perturb_dec(model, std=HEAD_STD)
    x = images(family, 2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # raises on a graph break
    with torch.no_grad():
        expected = model(x)
        with solver_stats() as stats:
            got = compiled(x)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(stats) == 0  # by design nothing is recorded (nor read on the host) inside a compiled graph


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_forward_compiles_to_one_graph_and_matches_eager(family):
    _compiled_forward_matches(family, SWEEP_BACKEND)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["swin"])
def test_eval_forward_compiles_with_aot_autograd(family):
    _compiled_forward_matches(family, AOT_BACKEND)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["phantom", "implicit"])
def test_training_step_compiles_and_matches_eager(backward):
    """The train-mode forward compiles and the gradients of every parameter (backbone and DEC) match eager. With
    phantom gradients it is one graph (``fullgraph=True``); the implicit backward's adjoint solve calls
    ``torch.autograd.grad`` inside a backward, which Dynamo cannot trace, so its re-entry step runs eagerly: one
    graph break per DEC call and no other reason. (A break inside the block loop makes Dynamo resume the loop with
    the block index as a dynamic int, and ``str(index)`` breaks there too; the default input DEC breaks before the
    loop.)"""
    options = dict(FIXED_SOLVE, backward=backward, **({"update": "residual"} if backward == "phantom" else {}))
    model = create("vit", **options).train()
    perturb_dec(model, std=HEAD_STD)
    x, y = images("vit", 2), torch.tensor([1, 3])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=AOT_BACKEND, fullgraph=backward == "phantom")
    grads = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(fn(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    breaks = torch._dynamo.utils.counters["graph_break"]
    if backward == "phantom":
        assert not breaks
    else:
        # only the disabled re-entry, and the block index of a loop resumed after it
        assert any("_implicit_reentry" in k for k in breaks), dict(breaks)
        assert all("_implicit_reentry" in k or "tp_repr" in k for k in breaks), dict(breaks)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("dec.") for n in grads[0])
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-5, msg=name)
    assert all(grads[1][n].abs().sum() > 0 for n in grads[1] if n.startswith("dec.") and "head" in n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_forward_is_cuda_graph_capturable():
    """With ``dec_check_every=None`` nothing in the forward reads the device from the host: it captures in a CUDA
    graph, and the replay on new inputs matches eager."""
    model = create("vit", check_every=None).cuda().eval()
    perturb_dec(model, std=HEAD_STD)
    static = images("vit", 2).cuda()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        fresh = images("vit", 2, seed=5).cuda()
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, model(fresh), rtol=1e-4, atol=1e-4)
