"""DEC: per-sample solvers, identity at init, batch independence, implicit / phantom gradients, memory, robustness,
solver statistics, options and copies."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from reference_solver import reference_anderson
from torch.profiler import ProfilerActivity, profile

from timm_dec.dec import DEC, DECConfig, SolveRecord, solver_stats
from timm_dec.ops import check_knots, identity_knots, identity_logits, knots_from_logits
from timm_dec.solver import SOLVERS, anderson, fixed_point, get_solver, relative_residual

SMALL = dict(grid=3, widths=(8, 16), proj_chans=4)


def perturbed(dec: DEC, std: float = 0.05, seed: int = 1) -> DEC:
    """Give the zero-initialised last layer random weights, so the fixed point is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dec.head.weight.copy_(std * torch.randn(dec.head.weight.shape, generator=gen))
    return dec


def small_dec(in_chans: int = 6, seed: int = 0, **kw) -> DEC:
    torch.manual_seed(seed)
    return DEC(in_chans, **{**SMALL, **kw})


# ---------------------------------------------------------------------------------------------------------------------
# The solvers on toy maps with known fixed points


def linear_toy(batch: int = 5, dim: int = 24, seed: int = 0):
    """Per-sample contractive affine maps z -> A_b z + c_b with spectra up to 0.95, and their exact fixed points."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64))
    radius = torch.linspace(0.6, 0.95, batch, dtype=torch.float64)[:, None]
    eig = (2 * torch.rand(batch, dim, generator=gen, dtype=torch.float64) - 1) * radius
    a = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    c = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, c)
    return a, c, exact


class TestSolvers:
    def test_linear_fixed_point_matches_direct_solve(self):
        a, c, exact = linear_toy()
        func = lambda z: (a @ z.unsqueeze(-1)).squeeze(-1) + c
        for solver in (anderson, fixed_point):
            z, fz, info = solver(func, torch.zeros_like(c), max_iter=1000, tol=1e-10)
            assert info.converged.all() and not info.failed.any()
            torch.testing.assert_close(fz, exact, atol=1e-8, rtol=0)
            torch.testing.assert_close(info.residual, relative_residual(z, func(z)))

    def test_anderson_same_point_as_plain_iteration_and_faster(self):
        a, c, _ = linear_toy(seed=1)
        func = lambda z: torch.tanh((a @ z.unsqueeze(-1)).squeeze(-1) + c)  # contractive, nonlinear
        z0 = torch.zeros_like(c)
        _, f_plain, info_plain = fixed_point(func, z0, max_iter=5000, tol=1e-11)
        _, f_and, info_and = anderson(func, z0, max_iter=5000, tol=1e-11, history=5)
        assert info_plain.converged.all() and info_and.converged.all()
        torch.testing.assert_close(f_and, f_plain, atol=1e-9, rtol=0)
        assert (info_and.iterations < info_plain.iterations).all(), (info_and.iterations, info_plain.iterations)
        # Slower contractions need more plain iterations: the per-sample counts differ, so stopping is per sample.
        assert len(set(info_plain.iterations.tolist())) > 1

    @pytest.mark.parametrize("name", sorted(SOLVERS))
    @pytest.mark.parametrize("check_every", [1, 3, None])
    def test_each_sample_solves_alone(self, name, check_every):
        a, c, _ = linear_toy(seed=2)
        rows = []

        def func(z):
            rows.append(len(z))
            return (a @ z.unsqueeze(-1)).squeeze(-1) + c

        z0 = torch.zeros_like(c)
        _, f_all, info_all = get_solver(name)(func, z0, max_iter=400, tol=1e-9, check_every=check_every)
        assert len(set(info_all.iterations.tolist())) > 1
        # Static shapes: the map always sees the whole batch; a converged sample is frozen, not removed.
        assert set(rows) == {len(c)}
        assert len(rows) == (400 if check_every is None else info_all.iterations.max().item() + (
            -info_all.iterations.max().item() % check_every))
        for b in range(len(c)):
            sub = lambda z, b=b: (a[b:b + 1] @ z.unsqueeze(-1)).squeeze(-1) + c[b:b + 1]
            _, f_one, info_one = get_solver(name)(sub, z0[b:b + 1], max_iter=400, tol=1e-9)
            assert info_one.iterations.item() == info_all.iterations[b].item()
            torch.testing.assert_close(f_one[0], f_all[b], atol=1e-13, rtol=0)

    @pytest.mark.parametrize("history", [1, 5])
    def test_matches_the_active_set_solver(self, history):
        """The static-shape solve reproduces the old active-set solve (tests/reference_solver.py) per sample."""
        a, c, _ = linear_toy(batch=6, seed=3)
        func = lambda z: torch.tanh((a @ z.unsqueeze(-1)).squeeze(-1) + c)
        ref_func = lambda z, i: torch.tanh((a[i] @ z.unsqueeze(-1)).squeeze(-1) + c[i])
        z0 = torch.zeros_like(c)
        _, f_new, info_new = anderson(func, z0, max_iter=60, tol=1e-7, history=history, check_every=None)
        _, f_old, info_old = reference_anderson(ref_func, z0, max_iter=60, tol=1e-7, history=history)
        both = info_new.converged & info_old.converged
        assert both.sum() >= 4
        assert torch.equal(info_new.iterations[both], info_old.iterations[both])
        assert (f_new[both] - f_old[both]).abs().max() <= 1e-5

    def test_non_finite_sample_is_flagged_and_isolated(self):
        a, c, exact = linear_toy(batch=3)
        c = c.clone()
        c[1, 0] = float("nan")
        seen = []

        def func(z):
            seen.append(bool(torch.isfinite(z).all()))
            return (a @ z.unsqueeze(-1)).squeeze(-1) + c

        _, fz, info = anderson(func, torch.zeros_like(c), max_iter=500, tol=1e-10)
        assert info.failed.tolist() == [False, True, False]
        assert info.iterations[1] == 1 and torch.isinf(info.residual[1])
        assert all(seen)  # the failed sample restarts from z0: the map never sees its non-finite iterate
        torch.testing.assert_close(fz[[0, 2]], exact[[0, 2]], atol=1e-8, rtol=0)

    def test_bad_arguments(self):
        func = lambda z: z
        with pytest.raises(ValueError, match="max_iter"):
            anderson(func, torch.zeros(1, 2), max_iter=0, tol=1e-3)
        with pytest.raises(ValueError, match="tol"):
            anderson(func, torch.zeros(1, 2), max_iter=3, tol=0.0)
        with pytest.raises(ValueError, match="history"):
            anderson(func, torch.zeros(1, 2), max_iter=3, tol=1e-3, history=0)
        with pytest.raises(ValueError, match="beta"):
            anderson(func, torch.zeros(1, 2), max_iter=3, tol=1e-3, beta=1.5)
        with pytest.raises(ValueError, match="check_every"):
            anderson(func, torch.zeros(1, 2), max_iter=3, tol=1e-3, check_every=0)
        with pytest.raises(ValueError, match="unknown solver 'broyden'"):
            get_solver("broyden")


# ---------------------------------------------------------------------------------------------------------------------
# The DEC module


class TestIdentityAtInit:
    @pytest.mark.parametrize("training,update", [(False, "absolute"), (True, "absolute"), (True, "residual")])
    def test_identity_knots_in_one_iteration(self, training, update):
        dec = small_dec(update=update, backward="phantom" if update == "residual" else "implicit").train(training)
        x = torch.randn(3, 6, 7, 5, requires_grad=training)
        with solver_stats() as stats:
            knots = dec(x, layout="nchw")
            logits = dec.equilibrium(x, layout="nchw")
        assert torch.equal(logits, torch.zeros(3, 2, 4, 3))  # exactly the identity logits
        torch.testing.assert_close(knots, identity_knots(3, 3), atol=1e-7, rtol=0)
        assert stats.summary()["dec"]["max_iterations"] == 1
        if training:
            (knots * torch.randn_like(knots)).sum().backward()
            assert dec.head.weight.grad.abs().sum() > 0  # the zero layer still learns

    def test_layouts_agree(self):
        dec = perturbed(small_dec(), std=0.1).eval()
        fmap = torch.randn(2, 5, 6, 6)  # (B, H, W, C)
        tokens = torch.cat((torch.randn(2, 3, 6), fmap.flatten(1, 2)), dim=1)
        ref = dec(fmap, layout="nhwc")
        assert not torch.equal(ref, identity_knots(2, 3))
        torch.testing.assert_close(dec(fmap.permute(0, 3, 1, 2), layout="nchw"), ref)
        torch.testing.assert_close(dec(tokens, layout="tokens", grid_size=(5, 6), num_prefix_tokens=3), ref)
        # Prefix tokens are ignored.
        tokens[:, :3] = 1e3
        torch.testing.assert_close(dec(tokens, layout="tokens", grid_size=(5, 6), num_prefix_tokens=3), ref)


class TestBatchIndependence:
    @pytest.mark.parametrize("training", [False, True])
    def test_alone_vs_batch_of_8(self, training):
        dec = perturbed(small_dec(in_chans=8, pool_size=6), std=0.1).train(training)
        x = torch.randn(8, 1 + 81, 8)
        with solver_stats() as stats:
            batch = dec.equilibrium(x, layout="tokens", num_prefix_tokens=1)
        assert batch.abs().max() > 0.05 and stats.total_fallbacks == 0
        for b in range(8):
            alone = dec.equilibrium(x[b:b + 1], layout="tokens", num_prefix_tokens=1)
            assert (alone[0] - batch[b]).abs().max().item() <= 1e-5


def float64_setup(backward: str = "implicit", **kw):
    torch.manual_seed(0)
    # the absolute form: its map is a contraction here, so the implicit gradient exists (DECConfig)
    # no Jacobian regulariser: in train mode its gradient is added on purpose (tests/test_equilibrium.py)
    opts = dict(grid=2, widths=(8, 8), proj_chans=4, tol=1e-12, max_iter=100, backward_tol=1e-12,
                backward_max_iter=100, backward=backward, update="absolute", logit_bound=8.0, jac_reg=0.0)
    dec = perturbed(DEC(3, **{**opts, **kw}).double().train(), std=0.3)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    return dec, x, weight


def param_grads(dec: nn.Module) -> torch.Tensor:
    return torch.cat([q.grad.flatten() for q in dec.parameters()])


class TestGradients:
    @pytest.mark.parametrize("training", [True, False])
    def test_implicit_matches_finite_differences(self, training):
        # eval mode too: a saliency map or a gradient attack of a model in eval() must see the knots' gradient
        dec, x, _ = float64_setup()
        dec.train(training)
        assert dec.equilibrium(x, layout="nchw").abs().max() > 0.1
        assert torch.autograd.gradcheck(lambda x: dec.equilibrium(x, layout="nchw"), (x,), atol=1e-6, rtol=1e-4,
                                        fast_mode=True)

    @pytest.mark.parametrize("training", [True, False])
    def test_image_h_implicit_matches_finite_differences(self, training):
        """The image H (max pooling, three convolutions) in float64: the implicit gradient w.r.t. the image."""
        torch.manual_seed(0)
        opts = dict(grid=2, image_widths=(4, 4), tol=1e-12, max_iter=100, backward_tol=1e-12, backward_max_iter=100,
                    jac_reg=0.0,
                    logit_bound=8.0, input="image", image_size=None)
        dec = perturbed(DEC(2, **opts).double(), std=0.3).train(training)
        x = torch.randn(2, 2, 9, 10, dtype=torch.float64, requires_grad=True)
        assert dec.equilibrium(x, layout="nchw").abs().max() > 0.05
        assert torch.autograd.gradcheck(lambda x: dec.equilibrium(x, layout="nchw"), (x,), atol=1e-6, rtol=1e-4,
                                        fast_mode=True)

    def test_max_pool_without_grad_is_the_pooling_op(self):
        from timm_dec.dec import _max_pool2

        for shape in ((3, 4, 8, 8), (2, 5, 7, 9), (1, 2, 1, 3)):
            x = torch.randn(shape)
            with torch.no_grad():
                assert torch.equal(_max_pool2(x), nn.functional.max_pool2d(x, 2, ceil_mode=True))

    def test_implicit_matches_unrolled_to_convergence(self):
        dec, x, weight = float64_setup()
        (dec.equilibrium(x, layout="nchw") * weight).sum().backward()
        implicit, implicit_x = param_grads(dec), x.grad.clone()
        dec.zero_grad()
        x.grad = None
        # Reference: plain iteration from 0 with the whole graph kept, until it has converged.
        p = dec.reduce_input(x, "nchw")
        z = torch.zeros(2, 2, 3, 2, dtype=torch.float64)
        for _ in range(80):
            z = dec.update(z, p)
        (z * weight).sum().backward()
        torch.testing.assert_close(implicit, param_grads(dec), atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(implicit_x, x.grad, atol=1e-9, rtol=1e-7)

    @pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
    def test_adjoint_solver_choice(self, solver):
        dec, x, weight = float64_setup(backward_solver=solver)
        (dec.equilibrium(x, layout="nchw") * weight).sum().backward()
        got = param_grads(dec)
        dec_ref, x_ref, _ = float64_setup()
        (dec_ref.equilibrium(x_ref, layout="nchw") * weight).sum().backward()
        torch.testing.assert_close(got, param_grads(dec_ref), atol=1e-9, rtol=1e-7)

    def test_phantom_close_in_direction(self):
        dec, x, weight = float64_setup()
        (dec.equilibrium(x, layout="nchw") * weight).sum().backward()
        implicit = param_grads(dec)
        phantom, xp, _ = float64_setup(backward="phantom", phantom_steps=3)
        (phantom.equilibrium(xp, layout="nchw") * weight).sum().backward()
        cos = nn.functional.cosine_similarity(param_grads(phantom), implicit, dim=0)
        assert cos > 0.95
        # ...but not the same: three steps truncate the Neumann series of the implicit gradient.
        assert not torch.allclose(param_grads(phantom), implicit, atol=1e-6, rtol=1e-4)

    @pytest.mark.parametrize("training", [True, False])
    def test_graph_exactly_when_autograd_needs_it(self, training):
        dec = perturbed(small_dec()).train(training)
        x = torch.randn(2, 6, 5, 5, requires_grad=True)
        with torch.no_grad():
            assert dec(x, layout="nchw").grad_fn is None
        knots = dec(x, layout="nchw")
        assert knots.grad_fn is not None
        (knots * torch.randn_like(knots)).sum().backward()
        assert x.grad.abs().sum() > 0 and all(q.grad is not None for q in dec.parameters())
        dec.requires_grad_(False)
        assert dec(x.detach(), layout="nchw").grad_fn is None  # nothing requires grad: no graph, no adjoint


def peak_cpu_memory(fn) -> int:
    """Peak of the running sum of the CPU allocations and frees the profiler records during ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.slow
def test_training_memory_does_not_grow_with_iterations():
    x = torch.randn(2, 16, 10, 10)
    weight = torch.randn(5, 5)

    def peak(**kw) -> tuple[int, float]:
        # tol is unreachable, so every sample runs all max_iter iterations.
        dec = perturbed(DEC(16, widths=(8, 16), tol=1e-12, **kw).train())

        def step() -> None:
            with solver_stats() as stats:
                knots = dec(x, layout="nchw")
            (knots * weight).sum().backward()
            step.iterations = stats.mean_iterations

        step()  # warm up
        return peak_cpu_memory(step), step.iterations

    short, it_short = peak(max_iter=5)
    long, it_long = peak(max_iter=30)
    assert (it_short, it_long) == (5, 30)
    assert abs(long / short - 1) <= 0.05, (short, long)
    # The meter sees growth where there is some: a graph through 30 unrolled steps instead of 5.
    unrolled_short, _ = peak(backward="phantom", phantom_steps=3, max_iter=1)
    unrolled_long, _ = peak(backward="phantom", phantom_steps=15, max_iter=1)
    assert unrolled_long > 1.5 * unrolled_short


class TestRobustness:
    @pytest.mark.parametrize("training", [False, True])
    def test_scaled_zero_and_nan_inputs(self, training):
        dec = perturbed(small_dec(), std=0.1).train(training)
        x = torch.randn(4, 6, 6, 6)
        alone = torch.cat([dec(x[b:b + 1], layout="nchw") for b in range(4)]).detach()
        x_bad = x.clone()
        x_bad[1] *= 1e4
        x_bad[2] = 0
        x_bad[3, 0, 2, 3] = float("nan")
        with solver_stats() as stats:
            knots = dec(x_bad, layout="nchw")
        assert torch.isfinite(knots).all()
        check_knots(knots)
        torch.testing.assert_close(knots[0], alone[0], atol=1e-5, rtol=0)
        assert torch.equal(knots[3], knots_from_logits(identity_logits(1, 3))[0])
        assert stats.total_fallbacks == 1
        if training:
            (knots[:3] * torch.randn(3, 2, 4, 4)).sum().backward()

    def test_unconverged_sample_keeps_its_iterate_and_gradient(self):
        """No silent switch-off: only a non-finite solve falls back; an unconverged one keeps its best iterate."""
        dec = perturbed(small_dec(max_iter=2, tol=1e-9), std=0.2).train()
        x = torch.randn(3, 6, 6, 6)
        with solver_stats() as stats:
            knots = dec(x, layout="nchw")
        assert stats.total_fallbacks == 0 and stats.total_not_converged == 3
        assert stats.summary()["dec"]["max_residual"] > 1e-9
        assert (knots - identity_knots(3, 3)).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        knots.sum().backward()
        grads = [q.grad for q in dec.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and dec.head.weight.grad.abs().sum() > 0


class TestSolverStats:
    def test_records_only_inside(self):
        dec_a, dec_b = small_dec(), small_dec()
        dec_a.name, dec_b.name = "blocks.0.dec", "blocks.4.dec"
        x = torch.randn(3, 6, 5, 5)
        dec_a(x, layout="nchw")
        with solver_stats() as outer:
            dec_a(x, layout="nchw")
            with solver_stats() as inner:
                dec_b(x[:2], layout="nchw")
                dec_b(x, layout="nchw")
        dec_a(x, layout="nchw")
        dec_b(x, layout="nchw")
        assert outer.names == ["blocks.0.dec", "blocks.4.dec"] and len(outer) == 3
        assert inner.names == ["blocks.4.dec"] and len(inner) == 2
        summary = outer.summary()
        assert summary["blocks.4.dec"]["calls"] == 2 and summary["blocks.4.dec"]["samples"] == 5
        assert summary["blocks.0.dec"] == dict(calls=1, samples=3, mean_iterations=1.0, max_iterations=1,
                                               max_residual=0.0, fallbacks=0, not_converged=0, fold_guarded=0,
                                               jacobian_free=0)
        assert outer.records[0] == SolveRecord("blocks.0.dec", 3, 1.0, 1, 0.0, 0, 0, 0, iteration_counts=(0, 3))
        assert outer.total_fallbacks == 0 and outer.mean_iterations == 1.0
        assert outer.iteration_counts == [0, 8] and outer.iterations_sd == 0.0

    def test_iteration_counts_match_the_solver(self):
        dec = perturbed(small_dec(tol=1e-4, max_iter=40, update="absolute"), std=0.1).eval()
        x = torch.randn(4, 6, 6, 6)
        with solver_stats() as stats:
            dec(x, layout="nchw")
        p = dec.reduce_input(x, "nchw")
        with torch.no_grad():
            _, _, info = anderson(lambda z: dec.update(z, p), torch.zeros(4, 2, 4, 3), max_iter=40, tol=1e-4,
                                  beta=dec.cfg.beta)
        record = stats.records[0]
        assert record.mean_iterations == pytest.approx(info.iterations.double().mean().item())
        assert record.max_iterations == info.iterations.max().item() > 1
        assert record.max_residual == pytest.approx(info.residual.max().item())
        # the histogram is the solver's per-sample counts, and the spread is theirs
        iterations = info.iterations.long()
        assert sum(record.iteration_counts) == 4 and len(record.iteration_counts) == iterations.max().item() + 1
        assert all(record.iteration_counts[k] == (iterations == k).sum().item() for k in range(iterations.max() + 1))
        assert stats.iterations_sd == pytest.approx(iterations.double().std().item())
        assert stats.iterations_sd > 0  # the four inputs end at different iterations, or the check above is void


class TestOptionsAndCopies:
    def test_config_validation(self):
        assert DECConfig(widths=[4, 8]).widths == (4, 8)
        bad = [dict(solver="newton"), dict(backward="unrolled"), dict(grid=0), dict(widths=(64,)),
               dict(widths=(64, 0)), dict(max_iter=0), dict(tol=-1.0), dict(pool_size=1), dict(act_layer="nope"),
               dict(history=True), dict(backward_solver="x"), dict(logit_bound=float("inf")), dict(update="delta"),
               dict(beta=0.0), dict(beta=1.5), dict(check_every=-1), dict(input="pixels"), dict(min_jacobian=1.0)]
        for kw in bad:
            with pytest.raises(ValueError, match=next(iter(kw))):
                DECConfig(**kw)
        assert DECConfig(check_every=0).check_every is None and DECConfig(pool_size=0).pool_size is None
        with pytest.raises(ValueError, match="implicit.*ill-posed for the residual"):
            DECConfig(update="residual")  # the default backward is the implicit one
        assert DECConfig().update == "absolute" and DECConfig().backward == "implicit"
        assert DECConfig(update="residual", backward="phantom").backward == "phantom"
        assert DECConfig(image_widths=[4, 8]).image_widths == (4, 8) and DECConfig(image_size=0).image_size is None
        for kw in (dict(image_widths=(8,)), dict(image_size=1), dict(image_size=2.5)):
            with pytest.raises(ValueError, match=next(iter(kw))):
                DECConfig(**kw)
        with pytest.raises(TypeError, match="unknown DEC option"):
            DEC(8, gird=4)
        dec = DEC(8, DECConfig(grid=2, max_iter=3), grid=5)  # explicit keywords win over cfg
        assert dec.cfg.grid == 5 and dec.cfg.max_iter == 3

    def test_input_validation(self):
        dec = small_dec()
        with pytest.raises(ValueError, match="expects 6 channels"):
            dec(torch.randn(1, 5, 4, 4), layout="nchw")
        with pytest.raises(ValueError, match="layout"):
            dec(torch.randn(1, 6, 4, 4), layout="nwhc")
        with pytest.raises(ValueError, match="grid_size"):
            dec(torch.randn(1, 1 + 15, 6), layout="tokens", num_prefix_tokens=1)
        with pytest.raises(ValueError, match="floating point"):
            dec(torch.ones(1, 6, 4, 4, dtype=torch.long), layout="nchw")

    def test_residual_update_adds_z(self):
        absolute = perturbed(small_dec(logit_bound=1e6, update="absolute"), std=0.1)
        residual = perturbed(small_dec(logit_bound=1e6, update="residual", backward="phantom"), std=0.1)
        p, z = torch.randn(2, 4, 6, 6), 0.3 * torch.randn(2, 2, 4, 3)
        torch.testing.assert_close(residual.update(z, p), z + absolute.update(z, p), atol=1e-5, rtol=1e-5)

    def test_fixed_point_solver_and_options_agree(self):
        x = torch.randn(3, 6, 8, 8)
        base = perturbed(small_dec(tol=1e-6, max_iter=200, update="absolute"), std=0.05).eval()
        other = perturbed(small_dec(tol=1e-6, max_iter=200, update="absolute", solver="fixed_point"), std=0.05).eval()
        torch.testing.assert_close(other.equilibrium(x, layout="nchw"), base.equilibrium(x, layout="nchw"),
                                   atol=1e-5, rtol=0)
        pooled = perturbed(small_dec(pool_size=4), std=0.05).eval()
        assert pooled.reduce_input(x, "nchw").shape == (3, 4, 4, 4)

    def test_deepcopy_and_state_dict_round_trip(self):
        dec = perturbed(small_dec(), std=0.1).eval()
        x = torch.randn(2, 6, 6, 6)
        ref = dec(x, layout="nchw")
        twin = copy.deepcopy(dec)
        torch.testing.assert_close(twin(x, layout="nchw"), ref, atol=0, rtol=0)
        fresh = small_dec(seed=5).eval()
        assert set(fresh.state_dict()) == set(dec.state_dict())
        fresh.load_state_dict(dec.state_dict())
        torch.testing.assert_close(fresh(x, layout="nchw"), ref, atol=0, rtol=0)

    def test_no_per_call_state(self):
        dec = perturbed(small_dec()).train()
        before = {k: (v if not isinstance(v, dict) else dict(v)) for k, v in vars(dec).items()}
        with solver_stats():
            dec(torch.randn(2, 6, 5, 5, requires_grad=True), layout="nchw").sum().backward()
        after = {k: (v if not isinstance(v, dict) else dict(v)) for k, v in vars(dec).items()}
        assert before.keys() == after.keys()
        assert all(before[k] is after[k] or before[k] == after[k] for k in before if k != "_parameters")
