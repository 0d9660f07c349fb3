"""The DEC as an equilibrium: solves that reach tol, a backward that is the gradient of what the forward computed.

- the eager solve evaluates H only on the samples still iterating, with the same per-sample results as the static
  solve;
- a sample whose forward solve ended above tol gets the Jacobian-free gradient of the f(z) it returned (the one-step
  phantom gradient), a converged one the implicit gradient;
- the Jacobian regulariser leaves the loss value alone, adds exactly the gradient of its penalty, and makes a DEC
  trained on a canonicalisation task reach tol where the unregularised one does not;
- `timm_dec.bench.equilibrium.gradient_check` agrees with finite differences where the equilibrium is reached and
  reports the error where it is not; a solve that autograd records runs to ``grad_tol``, so its backward is the
  equilibrium's even under a loose ``tol``;
- the equal-compute control's step count is bounded and never below the control's own steps.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time

import pytest
import torch
import torch.nn as nn
from test_dec import linear_toy, perturbed, small_dec
from test_dec_mechanism import WELL_POSED, train_dec

from timm_dec.apps._common import calibration_line, equal_compute_steps, measure_step_costs
from timm_dec.bench.equilibrium import convergence, gradient_check, solve_options
from timm_dec.dec import DEC, hutchinson_probe, solver_stats
from timm_dec.solver import get_solver

# ---------------------------------------------------------------------------------------------------------------------
# The compact eager solve


@pytest.mark.parametrize("name", ["anderson", "fixed_point"])
@pytest.mark.parametrize("check_every", [1, 3])
def test_compact_solve_matches_the_full_batch_solve(name, check_every):
    a, c, _ = linear_toy(batch=6, seed=2)
    seen = []

    def func(z, a_rows, c_rows):
        seen.append(len(z))
        return torch.tanh((a_rows @ z.unsqueeze(-1)).squeeze(-1) + c_rows)

    z0 = torch.zeros_like(c)
    solve = get_solver(name)
    z_full, f_full, info_full = solve(func, z0, args=(a, c), max_iter=200, tol=1e-9, check_every=check_every)
    full_calls = list(seen)
    seen.clear()
    z_c, f_c, info_c = solve(func, z0, args=(a, c), max_iter=200, tol=1e-9, check_every=check_every, compact=True)
    assert set(full_calls) == {6}
    assert min(seen) < 6 and sum(seen) < sum(full_calls)  # the converged rows stop costing evaluations
    assert torch.equal(info_c.iterations, info_full.iterations) and info_c.converged.all()
    torch.testing.assert_close(f_c, f_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(z_c, z_full, atol=1e-12, rtol=0)


def test_dec_solve_is_compact_in_eager_and_static_without_checks():
    dec = perturbed(small_dec(max_iter=30, tol=1e-6), std=0.2).eval()
    x = torch.randn(5, 6, 6, 6) * torch.linspace(0.1, 3, 5)[:, None, None, None]
    rows = []
    update = dec.update
    dec.update = lambda z, p: (rows.append(len(z)), update(z, p))[1]
    with torch.no_grad(), solver_stats() as stats:
        compact = dec(x, layout="nchw")
    assert sum(rows) == round(stats.mean_iterations * 5)  # exactly one evaluation per sample iteration
    rows.clear()
    dec.cfg = dataclasses.replace(dec.cfg, check_every=None)
    with torch.no_grad():
        static = dec(x, layout="nchw")
    assert set(rows) == {5} and len(rows) == 30
    torch.testing.assert_close(compact, static, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The backward of unconverged and converged samples


def _grads(dec: nn.Module) -> torch.Tensor:
    return torch.cat([q.grad.flatten() for q in dec.parameters()])


def _float64_dec(**kw) -> DEC:
    torch.manual_seed(0)
    # no regulariser unless asked: its gradient is added on purpose, so a training-mode backward is not the forward's
    opts = dict(grid=2, widths=(8, 8), proj_chans=4, backward_tol=1e-12, backward_max_iter=100, logit_bound=8.0,
                jac_reg=0.0)
    return perturbed(DEC(3, **{**opts, **kw}).double().train(), std=0.3)


def test_unconverged_sample_gets_the_jacobian_free_gradient():
    """Two iterations cannot come within 100 x tol 1e-12: every sample's gradient is that of f at its best iterate
    with the iterate held fixed, i.e. the one-step phantom gradient; at convergence the implicit gradient differs."""
    x = torch.randn(3, 3, 5, 6, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    grads = {}
    for name, kw in (("implicit", dict(backward="implicit")), ("phantom", dict(backward="phantom"))):
        dec = _float64_dec(max_iter=2, tol=1e-12, **kw)
        with solver_stats() as stats:
            (dec.equilibrium(x, layout="nchw") * weight).sum().backward()
        assert stats.total_not_converged == 3 and stats.summary()["dec"]["jacobian_free"] == 3
        grads[name] = _grads(dec)
    torch.testing.assert_close(grads["implicit"], grads["phantom"], atol=1e-12, rtol=1e-10)
    converged = {}
    for name in ("implicit", "phantom"):
        dec = _float64_dec(max_iter=100, tol=1e-12, backward=name)
        with solver_stats() as stats:
            (dec.equilibrium(x, layout="nchw") * weight).sum().backward()
        assert stats.total_not_converged == 0
        converged[name] = _grads(dec)
    assert not torch.allclose(converged["implicit"], converged["phantom"], atol=1e-6, rtol=1e-3)


def test_mixed_batch_each_sample_gets_its_own_rule():
    """A batch whose samples converge and do not: each sample's gradient is what it would get alone."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * torch.tensor([0.01, 3.0, 0.01, 3.0],
                                                                     dtype=torch.float64)[:, None, None, None]
    weight = torch.randn(4, 2, 3, 2, dtype=torch.float64)
    dec = _float64_dec(max_iter=4, tol=1e-4)
    with solver_stats() as stats:
        dec.equilibrium(x, layout="nchw")
    jacobian_free = stats.summary()["dec"]["jacobian_free"]
    assert 0 < jacobian_free < 4, stats.summary()
    total = torch.zeros_like(torch.cat([q.flatten() for q in dec.parameters()]))
    for b in range(4):
        dec.zero_grad()
        (dec.equilibrium(x[b:b + 1], layout="nchw") * weight[b:b + 1]).sum().backward()
        total += _grads(dec)
    dec.zero_grad()
    (dec.equilibrium(x, layout="nchw") * weight).sum().backward()
    torch.testing.assert_close(_grads(dec), total, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------------------
# The Jacobian regulariser


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_jacobian_regulariser_adds_exactly_its_gradient_and_leaves_the_loss(beta):
    """The penalty is ||v^T (beta J_f + (1 - beta) I)||^2 / dim: the Jacobian of the damped map the solver iterates."""
    x = torch.randn(3, 3, 5, 6, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    plain = _float64_dec(max_iter=200, tol=1e-12, beta=beta)
    reg = _float64_dec(max_iter=200, tol=1e-12, jac_reg=0.5, beta=beta)
    (plain.equilibrium(x, layout="nchw") * weight).sum().backward()
    out = reg.equilibrium(x, layout="nchw")
    torch.testing.assert_close(out, plain.equilibrium(x, layout="nchw"), atol=0, rtol=0)  # the forward is unchanged
    (out * weight).sum().backward()
    # the penalty by hand, with the same probe vector v
    with torch.no_grad():
        z_star = plain.equilibrium(x, layout="nchw")
    z = z_star.detach().requires_grad_()
    p = plain.reduce_input(x, "nchw")
    fz = plain.update(z, p)
    v = hutchinson_probe(fz)
    (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True)
    penalty = 0.5 * (beta * vjp + (1 - beta) * v).pow(2).flatten(1).mean(1).mean()
    penalty_grads = torch.autograd.grad(penalty, list(plain.parameters()), allow_unused=True)
    expected = _grads(plain) + torch.cat([
        (g if g is not None else torch.zeros_like(q)).flatten() for g, q in zip(penalty_grads, plain.parameters())])
    torch.testing.assert_close(_grads(reg), expected, atol=1e-10, rtol=1e-8)
    assert not torch.allclose(_grads(reg), _grads(plain), atol=1e-8, rtol=1e-6)  # the penalty's gradient is there
    # eval mode never adds it
    for dec in (reg, plain):
        dec.zero_grad()
        (dec.eval().equilibrium(x, layout="nchw") * weight).sum().backward()
    torch.testing.assert_close(_grads(reg), _grads(plain), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_jacobian_regulariser_on_a_fraction_of_the_batch_reads_its_first_samples(backward):
    """jac_reg_fraction 0.4 of 5 samples: the added gradient is the penalty's of samples 0 and 1 alone, their mean."""
    x = torch.randn(5, 3, 5, 6, dtype=torch.float64)
    weight = torch.randn(5, 2, 3, 2, dtype=torch.float64)
    opts = dict(max_iter=200, tol=1e-12, beta=0.5, backward=backward)
    plain = _float64_dec(**opts)
    part = _float64_dec(jac_reg=0.5, jac_reg_fraction=0.4, **opts)
    (plain.equilibrium(x, layout="nchw") * weight).sum().backward()
    out = part.equilibrium(x, layout="nchw")
    torch.testing.assert_close(out, plain.equilibrium(x, layout="nchw"), atol=0, rtol=0)
    (out * weight).sum().backward()
    with torch.no_grad():
        z_star = plain.equilibrium(x[:2], layout="nchw")
    z = z_star.detach().requires_grad_()
    fz = plain.update(z, plain.reduce_input(x[:2], "nchw"))
    v = hutchinson_probe(fz)
    (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True)
    penalty = 0.5 * (0.5 * vjp + 0.5 * v).pow(2).flatten(1).mean(1).mean()
    penalty_grads = torch.autograd.grad(penalty, list(plain.parameters()), allow_unused=True)
    expected = _grads(plain) + torch.cat([
        (g if g is not None else torch.zeros_like(q)).flatten() for g, q in zip(penalty_grads, plain.parameters())])
    torch.testing.assert_close(_grads(part), expected, atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="jac_reg_fraction"):
        _float64_dec(jac_reg_fraction=1.5)
    with pytest.raises(ValueError, match="jac_reg_fraction"):
        _float64_dec(jac_reg_fraction=0.0)


class Readout(nn.Module):
    """A fixed linear read of a DEC's knots (nchw input): a smooth objective of its equilibrium."""

    def __init__(self, dec: DEC, outputs: int) -> None:
        super().__init__()
        self.dec = dec
        self.proj = nn.Linear(2 * (dec.grid + 1) ** 2, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dec(x, layout="nchw").flatten(1))


@pytest.mark.slow
def test_regularised_dec_reaches_tol_and_its_backward_is_the_true_gradient():
    """Trained without the regulariser (undamped), the DEC's solves end above tol; with the damped solve and its
    regulariser they reach tol (>= 95%), and its backward matches central finite differences of its forward in
    float64 (<= 1%)."""
    free = train_dec(seed=0, steps=100, beta=1.0, jac_reg=0.0)  # the previous defaults
    reg = train_dec(seed=0, steps=100, **WELL_POSED)
    within = {k: 1 - r["stats"].total_not_converged / r["stats"].total_samples for k, r in (("free", free),
                                                                                          ("reg", reg))}
    assert within["free"] < 0.5 and within["reg"] >= 0.95, within
    assert reg["stats"].mean_iterations < free["stats"].mean_iterations
    torch.manual_seed(0)
    # steps 1e-5 and 1e-6: at 1e-4 the central difference's own truncation error is 0.16% on this DEC (measured)
    check = gradient_check(Readout(reg["dec"], 6), reg["x_test"][:8], steps=(1e-5, 1e-6))
    assert check["fd_agree"] < 1e-3, check
    assert check["configured"]["within_tol"] >= 0.95, check
    assert check["error"] <= 0.01, check
    assert check["error_at_equilibrium"] <= 1e-4, check


def test_a_differentiated_solve_runs_to_grad_tol():
    """The backward differentiates the equilibrium: with autograd recording, the forward solve runs to ``grad_tol``
    (here 1e-10 under a loose tol of 3e-2; the adjoint solved exactly) and the backward matches the true gradient;
    without (``grad_tol`` None) the same loose solve's backward is measurably off. Outputs computed without grad and
    the within-tol counts keep ``tol``."""
    torch.manual_seed(0)
    dec = perturbed(DEC(4, grid=3, widths=(8, 8), proj_chans=4, max_iter=60, tol=3e-2, grad_tol=1e-10, beta=0.5,
                        backward_tol=1e-10, backward_max_iter=60), std=0.1)  # the adjoint exact: the forward decides
    readout = Readout(dec, 5)
    x = torch.randn(6, 4, 8, 8)
    tight = gradient_check(readout, x)
    assert tight["fd_agree"] < 1e-5 and tight["error"] <= 1e-5, tight
    dec.cfg = dataclasses.replace(dec.cfg, grad_tol=None)
    loose = gradient_check(readout, x)
    assert loose["error"] > 1e-3, loose
    # train mode (the regulariser off, so the backward is the task's alone): the same against finite differences
    # of equilibria solved to 1e-10, in float64 (gradient_check runs in eval mode)
    train_dec = copy.deepcopy(readout).double().train()
    train_dec.dec.cfg = dataclasses.replace(dec.cfg, grad_tol=1e-10, jac_reg=0.0)
    xd, params = x.double(), list(train_dec.dec.parameters())
    direction = [torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(3)) for q in params]
    train_dec(xd).sum().backward()
    backward = sum(float((q.grad * d).sum()) for q, d in zip(params, direction))

    def shifted(h: float) -> float:
        with torch.no_grad(), solve_options(train_dec, tol=1e-10):
            for q, d in zip(params, direction):
                q.add_(d, alpha=h)
            value = float(train_dec(xd).sum())
            for q, d in zip(params, direction):
                q.sub_(d, alpha=h)
        return value

    fd = [(shifted(h) - shifted(-h)) / (2 * h) for h in (1e-5, 1e-6)]
    assert abs(fd[0] - fd[1]) <= 1e-6 * abs(fd[0]), fd
    assert abs(backward - fd[0]) <= 1e-5 * abs(fd[0]), (backward, fd)
    # no grad: the solve stops at tol; with grad it goes on to grad_tol, yet counts against tol (float64: 1e-10)
    dec.cfg = dataclasses.replace(dec.cfg, grad_tol=1e-10)
    dec, x = dec.double(), x.double()
    with torch.no_grad(), solver_stats() as free:
        dec(x, layout="nchw")
    with solver_stats() as recorded:
        dec(x, layout="nchw").sum().backward()
    assert recorded.mean_iterations > free.mean_iterations + 2
    worst = {k: max(r["max_residual"] for r in st.summary().values()) for k, st in (("free", free), ("rec", recorded))}
    assert worst["rec"] < 1e-10 < worst["free"], worst
    assert recorded.total_not_converged == free.total_not_converged == 0
    # a budget that reaches tol but not grad_tol: converged; one that reaches neither: not
    budget = len(free.iteration_counts)  # one more than the no-grad solve's longest
    for max_iter, not_converged in ((budget, 0), (2, 6)):
        dec.cfg = dataclasses.replace(dec.cfg, max_iter=max_iter)
        with solver_stats() as short:
            dec(x, layout="nchw").sum().backward()
        assert max(r["max_residual"] for r in short.summary().values()) > 1e-10
        assert short.total_not_converged == not_converged, max_iter


def test_gradient_check_reports_an_unconverged_backward():
    """The check is not a rubber stamp: with two iterations the configured backward is measurably off."""
    torch.manual_seed(0)
    dec = perturbed(DEC(4, grid=3, widths=(8, 8), proj_chans=4, max_iter=2, tol=1e-6), std=0.3)
    readout = Readout(dec, 5)
    x = torch.randn(6, 4, 8, 8)
    check = gradient_check(readout, x)
    assert check["configured"]["within_tol"] < 0.5
    assert check["equilibrium"]["within_tol"] == 1.0
    assert check["error_at_equilibrium"] <= 1e-5, check
    assert check["error"] > 0.01, check


def test_solve_options_restores_and_convergence_counts():
    dec = perturbed(small_dec(max_iter=3, tol=1e-9), std=0.3)
    model = nn.Module()
    model.dec = dec
    model.forward = lambda x: dec(x, layout="nchw")
    x = torch.randn(4, 6, 6, 6)
    with solve_options(model, max_iter=50, tol=1e-5):
        assert dec.cfg.max_iter == 50
        inside = convergence(model, x)
    assert dec.cfg.max_iter == 3 and dec.cfg.tol == 1e-9
    outside = convergence(model, x)
    assert inside["within_tol"] == 1.0 and outside["within_tol"] == 0.0 and outside["samples"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# The equal-compute control


def test_equal_compute_steps_bounds():
    costs = dict(aug=0.1, dec=0.2, dec_only=0.15)
    assert equal_compute_steps(costs, dict(dec=250, dec_only=100), "aug", 250) == 650
    # a DEC cheaper than Aug never gives the control fewer steps than its own
    assert equal_compute_steps(dict(aug=1.0, dec=0.5), dict(dec=100), "aug", 100) == 100
    # bounded: no runaway step count (the old control divided by a near-zero time)
    assert equal_compute_steps(dict(aug=1e-9, dec=1.0), dict(dec=10), "aug", 10) == 200
    assert equal_compute_steps(dict(aug=0.1, dec=0.2), dict(dec=0), "aug", 0) == 0
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="step costs"):
            equal_compute_steps(dict(aug=bad, dec=1.0), dict(dec=1), "aug", 1)


def test_measure_step_costs_interleaves_and_flags_a_noisy_machine():
    order = []

    def fake(name, seconds):
        def step():
            order.append(name)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return step

    costs = measure_step_costs(dict(a=fake("a", 0.002), b=fake("b", 0.004)), rounds=3, calls=2, warmup=1)
    assert order[:2] == ["a", "b"] and order[2:6] == ["a", "a", "b", "b"]  # warm-up, then interleaved rounds
    assert set(costs["seconds"]) == {"a", "b"} and all(len(v) == 3 for v in costs["rounds"].values())
    durations = itertools.cycle([0.001, 0.02])

    def noisy():
        end = time.perf_counter() + next(durations)
        while time.perf_counter() < end:
            pass

    noisy_costs = measure_step_costs(dict(a=fake("a", 0.002), b=noisy), rounds=4, calls=1, warmup=0, attempts=2)
    assert noisy_costs["noisy"] and noisy_costs["attempts"] == 2 and noisy_costs["uncertainty"] > 0.1
    line = calibration_line(dict(noisy_costs, steps=300, dec_step_ratio=2.0, dec_only_step_ratio=1.5))
    assert "NOT an equal-compute figure" in line and "300 steps" in line


def test_near_tol_sample_keeps_the_implicit_gradient():
    """A solve that ended above tol but within 100 x tol is not converged, yet gets the implicit gradient at its best
    iterate: the same gradient as the full implicit backward from that iterate, not the Jacobian-free one."""
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    weight = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    # a tolerance just below what 5 iterations reach: every sample misses tol, but by less than 100x
    short = _float64_dec(max_iter=5, tol=1e-12)
    with solver_stats() as stats:
        short.equilibrium(x, layout="nchw")
    reached = stats.summary()["dec"]["max_residual"]
    grads = {}
    for name, tol in (("near", reached / 3), ("far", reached / 300)):
        dec = _float64_dec(max_iter=5, tol=tol)
        with solver_stats() as stats:
            (dec.equilibrium(x, layout="nchw") * weight).sum().backward()
        summary = stats.summary()["dec"]
        assert summary["not_converged"] >= 1
        grads[name] = (_grads(dec), summary["jacobian_free"])
    assert grads["far"][1] >= 1
    assert grads["near"][1] < grads["far"][1]
    assert not torch.allclose(grads["near"][0], grads["far"][0], atol=1e-8, rtol=1e-5)


def test_hutchinson_probe_is_a_per_sample_unit_variance_probe_that_leaves_the_rng_alone():
    fz = torch.randn(64, 2, 5, 4, dtype=torch.float64)
    state = torch.get_rng_state()
    v = hutchinson_probe(fz)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(hutchinson_probe(fz[3:4]), v[3:4])  # a function of the sample alone
    flat = v.flatten(1)
    assert abs(flat.mean().item()) < 0.05 and abs(flat.pow(2).mean().item() - 1) < 0.05
    cov = flat.T @ flat / len(flat)  # E[v v^T] = I: the estimate of ||J||_F^2 is unbiased
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max().item() < 0.5 and (cov.diagonal() - 1).abs().mean().item() < 0.2


def test_loss_scale_scales_the_regulariser_like_the_loop_scales_its_loss():
    """A loop that differentiates loss / 2 gets half the task gradient; under loss_scale(0.5) the regulariser's added
    gradient halves too, so the two keep their ratio (gradient accumulation, float16 loss scaling)."""
    from timm_dec import loss_scale

    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    weight = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    grads = {}
    for name, jac_reg, scale in (("plain", 0.0, 1.0), ("full", 0.5, 1.0), ("half", 0.5, 0.5)):
        dec = _float64_dec(max_iter=200, tol=1e-12, jac_reg=jac_reg)
        with loss_scale(scale):
            (scale * dec.equilibrium(x, layout="nchw") * weight).sum().backward()
        grads[name] = _grads(dec)
    torch.testing.assert_close(grads["half"], 0.5 * grads["full"], atol=1e-12, rtol=1e-9)
    assert not torch.allclose(grads["full"], grads["plain"], atol=1e-8, rtol=1e-6)
    for bad in (0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="loss scale"):
            with loss_scale(bad):
                pass
