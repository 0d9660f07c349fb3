"""Baselines: InvL (eq. 25), Canon's warp bank, lowest-energy choice and straight-through gradient."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn

from timm_dec.baselines import EnergyNet, InputCanonicalizer, InvarianceLoss, invariance_loss, warp_bank
from timm_dec.ops import check_knots, identity_knots, monotone_warp


def tiny_vit(num_classes: int = 5, in_chans: int = 3) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, in_chans=in_chans, img_size=16,
        patch_size=8, embed_dim=16, depth=1, num_heads=2)


class LeftMass(nn.Module):
    """A hand-made energy: minus the mean of the left half of the image (prefers warps that pull mass left)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))


class TestInvarianceLoss:
    def test_zero_for_identical_outputs(self):
        logits = torch.randn(6, 11)
        assert invariance_loss(logits, logits.clone()).item() == 0.0
        # The loss is on class distributions: a constant shift of the logits changes nothing.
        assert invariance_loss(logits, logits + 3.0).item() == pytest.approx(0.0, abs=1e-12)

    def test_hand_example(self):
        # softmax([0, 0]) = (1/2, 1/2), softmax([ln 3, 0]) = (3/4, 1/4): squared distance 2 * (1/4)^2 = 1/8.
        logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
        scaled = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]], dtype=torch.float64)
        assert invariance_loss(logits, scaled).item() == pytest.approx(0.125 / 2, rel=1e-12)
        assert InvarianceLoss(weight=2.0)(logits, scaled).item() == pytest.approx(0.125, rel=1e-12)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="same shape"):
            invariance_loss(torch.zeros(2, 3), torch.zeros(2, 4))
        with pytest.raises(ValueError, match="weight"):
            InvarianceLoss(weight=-1.0)

    def test_trains_a_step(self):
        torch.manual_seed(0)
        model = tiny_vit()
        x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
        knots = torch.stack([warp_bank(8, seed=1)[i] for i in (1, 2, 3, 4)])
        x_scaled = monotone_warp(x, knots)
        loss = nn.functional.cross_entropy(model(x), y) + InvarianceLoss(1.0)(model(x), model(x_scaled))
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert model.head.weight.grad.abs().sum() > 0
        # The invariance term alone reaches the backbone.
        model.zero_grad()
        InvarianceLoss(1.0)(model(x), model(x_scaled)).backward()
        assert model.patch_embed.proj.weight.grad.abs().sum() > 0


class TestWarpBank:
    def test_identity_first_valid_and_seeded(self):
        state = torch.random.get_rng_state()
        bank = warp_bank(16, grid=3, strength=0.5, seed=7)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert bank.shape == (16, 2, 4, 4)
        check_knots(bank)
        torch.testing.assert_close(bank[0], identity_knots(1, 3)[0], rtol=0, atol=1e-7)
        assert torch.equal(bank, warp_bank(16, grid=3, strength=0.5, seed=7))
        assert not torch.allclose(bank[1:], warp_bank(16, grid=3, strength=0.5, seed=8)[1:])
        # All warps differ from each other.
        flat = bank.flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(16)).min() > 1e-3

    def test_bad_input(self):
        with pytest.raises(ValueError, match="num_warps"):
            warp_bank(0)
        with pytest.raises(ValueError, match="strength"):
            warp_bank(4, strength=0.0)


class TestInputCanonicalizer:
    def test_identity_at_init(self):
        torch.manual_seed(0)
        model = tiny_vit().eval()
        canon = InputCanonicalizer(model, num_warps=8, energy_size=16).eval()
        x = torch.rand(3, 3, 16, 16)
        x_canon, index = canon.canonicalize(x)
        assert torch.equal(index, torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(x_canon, x, rtol=0, atol=1e-5)  # float32 sampling rounding
        torch.testing.assert_close(canon(x), model(x), rtol=0, atol=1e-5)

    def test_picks_lowest_energy(self):
        torch.manual_seed(0)
        canon = InputCanonicalizer(tiny_vit(), num_warps=12, strength=0.8, energy_size=16).eval()
        canon.energy = LeftMass()
        x = torch.rand(3, 3, 16, 16)
        x[0, :, :, 8:] += 1.0  # mass on the right: the winner must pull the right half leftwards
        x_canon, index = canon.canonicalize(x)
        for b in range(3):
            energies = torch.stack([
                LeftMass()(monotone_warp(x[b:b + 1], canon.warps[k:k + 1]))[0] for k in range(canon.num_warps)])
            assert index[b].item() == energies.argmin().item()
            torch.testing.assert_close(x_canon[b:b + 1], monotone_warp(x[b:b + 1], canon.warps[index[b]][None]))
        assert index[0].item() != 0

    def test_energy_downsampling_and_batch_independence(self):
        torch.manual_seed(0)
        canon = InputCanonicalizer(tiny_vit(), num_warps=6, energy_size=8)
        nn.init.normal_(canon.energy.head.weight)
        x = torch.rand(4, 3, 16, 16)
        energy = canon.energies(x)
        assert energy.shape == (4, 6)
        torch.testing.assert_close(canon.energies(x[2:3]), energy[2:3])

    def test_trains_a_step_with_straight_through(self):
        torch.manual_seed(0)
        canon = InputCanonicalizer(tiny_vit(), num_warps=6, energy_size=8)
        x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
        nn.functional.cross_entropy(canon(x), y).backward()
        # At init the energy head is zero, so the first step reaches the head only; the model gets its usual grads.
        assert canon.energy.head.weight.grad.abs().sum() > 0
        assert canon.model.patch_embed.proj.weight.grad.abs().sum() > 0
        for p in canon.energy.parameters():
            nn.init.normal_(p, std=0.3)
        canon.zero_grad()
        nn.functional.cross_entropy(canon(x), y).backward()
        for name, p in canon.energy.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    def test_straight_through_matches_softmax_mixture(self):
        torch.manual_seed(1)
        canon = InputCanonicalizer(nn.Identity(), num_warps=5, energy_size=16, temperature=0.5)
        for p in canon.energy.parameters():
            nn.init.normal_(p, std=0.3)
        x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
        canon = canon.double()
        upstream = torch.randn(2, 3, 16, 16, dtype=torch.float64)

        out, index = canon.canonicalize(x)
        # Forward value: the hard choice, exactly.
        assert torch.equal(out, monotone_warp(x, canon.warps[index]))
        grads = torch.autograd.grad((out * upstream).sum(), list(canon.energy.parameters()))

        # Reference: the softmax(-E / T) mixture of the candidates, each built by its own warp call.
        energy = torch.stack([canon.energy(monotone_warp(x, canon.warps[k].expand(2, -1, -1, -1)))
                              for k in range(5)], dim=1)
        weights = torch.softmax(-energy / 0.5, dim=1)
        mixture = sum(weights[:, k, None, None, None] * monotone_warp(x, canon.warps[k].expand(2, -1, -1, -1))
                      for k in range(5))
        ref = torch.autograd.grad((mixture * upstream).sum(), list(canon.energy.parameters()))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r)

    def test_straight_through_at_the_scoring_resolution(self):
        # 16 px inputs scored at 8 px: the backward is that of the mixture of the 8 px candidates, upsampled.
        torch.manual_seed(2)
        canon = InputCanonicalizer(nn.Identity(), num_warps=4, energy_size=8).double()
        for p in canon.energy.parameters():
            nn.init.normal_(p, std=0.3)
        x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
        upstream = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        out, index = canon.canonicalize(x)
        assert torch.equal(out, monotone_warp(x, canon.warps[index]))
        grads = torch.autograd.grad((out * upstream).sum(), list(canon.energy.parameters()))

        small = x.reshape(2, 3, 8, 2, 8, 2).mean(dim=(3, 5))  # area downsampling by 2, by hand
        cands = [monotone_warp(small, canon.warps[k].expand(2, -1, -1, -1)) for k in range(4)]
        weights = torch.softmax(-torch.stack([canon.energy(c) for c in cands], dim=1), dim=1)
        mixture = sum(weights[:, k, None, None, None] * cands[k] for k in range(4))
        mixture = mixture.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest upsampling
        ref = torch.autograd.grad((mixture * upstream).sum(), list(canon.energy.parameters()))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r)

    def test_no_graph_in_eval(self):
        canon = InputCanonicalizer(tiny_vit(), num_warps=4, energy_size=8).eval()
        with torch.no_grad():
            assert not canon(torch.rand(2, 3, 16, 16)).requires_grad

    def test_state_dict_keys_and_timm_surface(self):
        model = tiny_vit(num_classes=7)
        canon = InputCanonicalizer(model, num_warps=4)
        keys = set(canon.state_dict())
        assert {f"model.{k}" for k in model.state_dict()} <= keys
        assert "warps" in keys and any(k.startswith("energy.") for k in keys)
        assert canon.num_classes == 7 and canon.get_classifier() is model.head
        canon.reset_classifier(3)
        assert canon(torch.rand(1, 3, 16, 16)).shape == (1, 3)
        assert canon.pretrained_cfg is model.pretrained_cfg

    def test_bad_input(self):
        canon = InputCanonicalizer(tiny_vit(), num_warps=4)
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            canon(torch.rand(2, 1, 16, 16))
        with pytest.raises(TypeError, match="nn.Module"):
            InputCanonicalizer(lambda x: x)
        with pytest.raises(ValueError, match="widths"):
            EnergyNet(3, widths=(8,))
