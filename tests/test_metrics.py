"""Tests of timm_dec.metrics against hand-computed examples."""
import math

import pytest
import torch
import torch.nn as nn

from timm_dec.data import LocallyScaledDigits, random_knots
from timm_dec.metrics import (
    accuracy,
    equi_error,
    equi_error_from_outputs,
    evaluate_equivariance,
    evaluate_scale_consistency,
    inv_error,
    inv_error_from_probs,
    per_scale_accuracy,
    prob_correct,
)

LOG3 = math.log(3.0)


class TestInvError:
    def test_from_probs_by_hand(self):
        probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
        variants = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]])
        # image 0: (0.5^2 + 0.5^2) and 0; image 1: 0 and (0.5^2 + 0.5^2)
        torch.testing.assert_close(inv_error_from_probs(probs, variants, reduction="none"),
                                   torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
        torch.testing.assert_close(inv_error_from_probs(probs, variants), torch.tensor(0.25))

    def test_from_logits_by_hand(self):
        # softmax(0, 0) = (1/2, 1/2); softmax(log 3, 0) = (3/4, 1/4): distance 2 * (1/4)^2 = 1/8
        logits = torch.zeros(1, 2)
        variants = torch.tensor([[[LOG3, 0.0], [0.0, 0.0]]])
        torch.testing.assert_close(inv_error(logits, variants, reduction="none"), torch.tensor([[0.125, 0.0]]))
        torch.testing.assert_close(inv_error(logits.half(), variants.half()), torch.tensor(0.0625), atol=1e-3, rtol=0)

    def test_bad_input(self):
        p = torch.full((2, 3), 1 / 3)
        with pytest.raises(ValueError, match=r"\(N, S, K\)"):
            inv_error_from_probs(p, torch.full((2, 1, 4), 0.25))
        with pytest.raises(ValueError, match="dims"):
            inv_error_from_probs(p, p)
        with pytest.raises(ValueError, match="S = 0"):
            inv_error_from_probs(p, torch.zeros(2, 0, 3))
        with pytest.raises(ValueError, match="reduction"):
            inv_error_from_probs(p, p[:, None], reduction="sum")
        with pytest.raises(TypeError, match="floating"):
            inv_error(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 1, 3))


class TestClassificationMetrics:
    def test_accuracy_and_per_scale_by_hand(self):
        logits = torch.tensor([[[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]],
                               [[2.0, 1.0], [0.0, 1.0], [0.0, 5.0]]])
        labels = torch.tensor([0, 1])
        torch.testing.assert_close(per_scale_accuracy(logits, labels), torch.tensor([0.5, 0.5, 1.0]))
        torch.testing.assert_close(accuracy(logits[:, 0], labels), torch.tensor(0.5))
        torch.testing.assert_close(accuracy(logits[:, 2], labels), torch.tensor(1.0))

    def test_prob_correct_by_hand(self):
        logits = torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))  # softmax: (1/4, 3/4) and (1/2, 1/2)
        torch.testing.assert_close(prob_correct(logits, torch.tensor([1, 0])), torch.tensor([0.75, 0.5]))
        torch.testing.assert_close(prob_correct(logits[:, None].expand(2, 3, 2), torch.tensor([0, 1])),
                                   torch.tensor([[0.25] * 3, [0.5] * 3]))

    def test_bad_labels(self):
        logits = torch.zeros(2, 3)
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            accuracy(logits, torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="labels for"):
            accuracy(logits, torch.tensor([0]))
        with pytest.raises(ValueError, match="integer"):
            prob_correct(logits, torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match="dims"):
            per_scale_accuracy(logits, torch.tensor([0, 1]))


def _ramp_model(x: torch.Tensor) -> torch.Tensor:
    """Adds the normalised x coordinate: a per-pixel map that depends on position, so not equivariant."""
    return x + torch.linspace(0, 1, x.shape[-1], dtype=x.dtype)


class TestEquiError:
    def test_from_outputs_by_hand(self):
        a = torch.zeros(1, 2, 1, 2)
        b = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]]]])  # position 0 differs by (1, 2): 5; position 1: 0
        torch.testing.assert_close(equi_error_from_outputs(a, b), torch.tensor(2.5))
        torch.testing.assert_close(equi_error_from_outputs(a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1), -1,
                                                           reduction="none"), torch.tensor([2.5]))

    def test_callable_warp_by_hand(self):
        # warp = horizontal flip on W = 3: S(M(I)) - M(S(I)) = flip(r) - r = (1, 0, -1) -> mean square 2/3
        images = torch.rand(2, 1, 1, 3, dtype=torch.float64)
        err = equi_error(_ramp_model, images, lambda t: t.flip(-1), reduction="none")
        torch.testing.assert_close(err, torch.full((2,), 2 / 3, dtype=torch.float64))
        assert float(equi_error(lambda t: 2 * t, images, lambda t: t.flip(-1))) == 0

    def test_zero_for_equivariant_models_positive_otherwise(self):
        images = torch.rand(3, 2, 12, 10, dtype=torch.float64)
        knots = random_knots(3, grid=4, strength=0.5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert float(equi_error(nn.Identity(), images, knots)) == 0
        pointwise = nn.Conv2d(2, 4, 1).double()  # a per-pixel linear map commutes with bilinear resampling
        with torch.no_grad():
            assert float(equi_error(pointwise, images, knots)) < 1e-20
            assert float(equi_error(_ramp_model, images, knots)) > 1e-3
            blur = nn.Conv2d(2, 2, 3, padding=1).double()
            assert float(equi_error(blur, images, knots)) > 1e-4

    def test_token_outputs_skip_prefix_tokens(self):
        images = torch.rand(2, 3, 4, 4)
        knots = random_knots(2, generator=torch.Generator().manual_seed(1))

        def tokens(x):  # per-pixel tokens after a class token that depends on the whole image
            return torch.cat((x.mean((2, 3))[:, None], x.flatten(2).transpose(1, 2)), dim=1)

        assert float(equi_error(tokens, images, knots, layout="tokens", num_prefix_tokens=1)) < 1e-10
        err = equi_error(lambda x: tokens(x).roll(1, dims=1), images, knots, layout="tokens", num_prefix_tokens=1)
        assert float(err) > 1e-3

    def test_gradients_flow(self):
        conv = nn.Conv2d(1, 1, 3, padding=1)
        knots = random_knots(2, generator=torch.Generator().manual_seed(2))
        equi_error(conv, torch.rand(2, 1, 8, 8), knots).backward()
        assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0

    def test_bad_input(self):
        images = torch.rand(2, 1, 4, 4)
        with pytest.raises(ValueError, match="batch size"):
            equi_error(nn.Identity(), images, random_knots(3))
        with pytest.raises(TypeError, match="callable"):
            equi_error(nn.Identity(), images, 3)
        with pytest.raises(ValueError, match="layout"):
            equi_error(nn.Identity(), images, random_knots(2), layout="nwhc")
        with pytest.raises(ValueError, match="shapes differ"):
            equi_error_from_outputs(torch.zeros(2, 3), torch.zeros(2, 4))
        with pytest.raises(ValueError, match="channel_dim"):
            equi_error_from_outputs(torch.zeros(2, 3), torch.zeros(2, 3), channel_dim=0)


class _HandDataset:
    """Two images whose 'pixels' are the logits of a flatten model (see TestEvaluate)."""

    images = {0: [LOG3, 0.0], 1: [0.0, LOG3]}
    variant_logits = {(0, 1.0): [0.0, LOG3], (0, 2.0): [LOG3, 0.0], (1, 1.0): [0.0, LOG3], (1, 2.0): [0.0, LOG3]}
    labels = {0: 0, 1: 1}

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor(self.images[i]).view(1, 1, 2), self.labels[i]

    def variants(self, i, scales):
        return torch.stack([torch.tensor(self.variant_logits[(i, s)]).view(1, 1, 2) for s in scales]), self.labels[i]


class TestEvaluate:
    def test_scale_consistency_by_hand(self):
        # probs: image 0 (3/4, 1/4) correct; variants (1/4, 3/4) wrong, (3/4, 1/4) right; InvE (2 * 0.5^2, 0) -> 1/4.
        # image 1 (1/4, 3/4) correct; variants both (1/4, 3/4), right; InvE 0. Mean InvE 1/8.
        model = nn.Flatten()
        model.train()
        for batch_size in (1, 3):
            r = evaluate_scale_consistency(model, _HandDataset(), [1.0, 2.0], batch_size=batch_size, progress=False)
            assert r["acc"] == 1.0 and r["num_samples"] == 2 and r["scales"] == [1.0, 2.0]
            assert r["per_scale_acc"] == [0.5, 1.0]
            assert r["per_scale_prob_correct"] == pytest.approx([0.5, 0.75])
            assert r["inv_e"] == pytest.approx(0.125)
        assert model.training  # restored

        r = evaluate_scale_consistency(model, _HandDataset(), [2.0], indices=[0], return_per_sample=True,
                                       progress=False)
        torch.testing.assert_close(r["prob_correct"], torch.tensor([[0.75]]))
        torch.testing.assert_close(r["inv_e_per_sample"], torch.tensor([0.0]))

    def test_on_locally_scaled_digits(self):
        ds = LocallyScaledDigits("test", num_samples=5, num_digits=2, canvas=24, digit_size=4, scale_range=(0.5, 1.5))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 24 * 24, 100))
        r = evaluate_scale_consistency(model, ds, [0.5, 1.0, (1.0, 1.5)], scale_bins=[(0.5, 1.0), (1.0, 2.0)],
                                       batch_size=4, progress=False, return_per_sample=True)
        assert len(r["per_scale_acc"]) == 3 and len(r["per_bin_acc"]) == 2 and r["scale_bins"] == [[0.5, 1.0],
                                                                                                   [1.0, 2.0]]
        assert r["prob_correct"].shape == (5, 3) and 0 < r["inv_e"] < 2
        with torch.no_grad():  # InvE and accuracy of a linear model recomputed directly
            images = torch.stack([ds[i][0] for i in range(5)])
            labels = torch.tensor([ds[i][1] for i in range(5)])
            variants = torch.stack([ds.variants(i, [0.5, 1.0, (1.0, 1.5)])[0] for i in range(5)])
            logits, logits_v = model(images), model(variants.flatten(0, 1)).view(5, 3, -1)
        assert r["inv_e"] == pytest.approx(float(inv_error(logits, logits_v)), rel=1e-5)
        assert r["acc"] == float(accuracy(logits, labels))
        assert r["per_scale_acc"] == per_scale_accuracy(logits_v, labels).tolist()
        again = evaluate_scale_consistency(model, ds, [1.0], scale_bins=[(0.5, 1.0), (1.0, 2.0)], batch_size=2,
                                           progress=False)
        assert again["per_bin_acc"] == r["per_bin_acc"]  # bin draws depend on the seed and index only

    def test_equivariance_over_a_dataset(self):
        data = [(torch.rand(1, 6, 6), 0) for _ in range(5)]
        assert evaluate_equivariance(nn.Identity(), data, num_warps=2, progress=False) == 0
        a = evaluate_equivariance(_ramp_model, data, num_warps=2, batch_size=1, progress=False)
        b = evaluate_equivariance(_ramp_model, data, num_warps=2, batch_size=4, progress=False)
        c = evaluate_equivariance(_ramp_model, data, num_warps=2, batch_size=4, seed=1, progress=False)
        assert a > 1e-4 and a == pytest.approx(b, rel=1e-6) and c != pytest.approx(a, rel=1e-3)

    def test_bad_input(self):
        with pytest.raises(TypeError, match="variants"):
            evaluate_scale_consistency(nn.Flatten(), [(torch.zeros(1, 1, 2), 0)], [1.0], progress=False)
        with pytest.raises(ValueError, match="scales"):
            evaluate_scale_consistency(nn.Flatten(), _HandDataset(), [], progress=False)
        with pytest.raises(ValueError, match="bin"):
            evaluate_scale_consistency(nn.Flatten(), _HandDataset(), [1.0], scale_bins=[(2.0, 1.0)], progress=False)
        with pytest.raises(ValueError, match="out of range"):
            evaluate_scale_consistency(nn.Flatten(), _HandDataset(), [1.0], indices=[2], progress=False)
        with pytest.raises(ValueError, match="batch_size"):
            evaluate_scale_consistency(nn.Flatten(), _HandDataset(), [1.0], batch_size=0, progress=False)
        with pytest.raises(TypeError, match="logits"):
            evaluate_scale_consistency(lambda x: (x.flatten(1),), _HandDataset(), [1.0], progress=False)
        with pytest.raises(ValueError, match="num_warps"):
            evaluate_equivariance(nn.Identity(), [torch.zeros(1, 4, 4)], num_warps=0, progress=False)
