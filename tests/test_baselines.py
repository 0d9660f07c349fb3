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
        canon = InputCanonicalizer(tiny_vit(), num_warps=12, strength=0.8, energy_size=16, identity_margin=0.0).eval()
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
        canon = InputCanonicalizer(tiny_vit(), num_warps=6, energy_size=8, identity_margin=0.0)
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
        canon = InputCanonicalizer(nn.Identity(), num_warps=5, energy_size=16, temperature=0.5, identity_margin=0.0)
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
        canon = InputCanonicalizer(nn.Identity(), num_warps=4, energy_size=8, identity_margin=0.0).double()
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

    def test_identity_prior_keeps_the_identity_under_small_energy_differences(self):
        # A perturbed energy net whose energies differ by less than the margin: every sample keeps the identity, so
        # Canon is the wrapped model. Without the margin the same net leaves the identity for most samples.
        torch.manual_seed(0)
        model = tiny_vit().eval()
        canon = InputCanonicalizer(model, num_warps=16, strength=0.5, energy_size=16, identity_margin=1.0).eval()
        for p in canon.energy.parameters():
            nn.init.normal_(p, std=0.1)
        x = torch.rand(8, 3, 16, 16)
        raw = canon.energy(canon._scored(x)[1].flatten(0, 1)).reshape(8, 16)
        assert 0 < (raw - raw[:, :1]).abs().max() < 1.0
        # The prior is the identity's advantage in the energies, and is saved with the weights.
        torch.testing.assert_close(canon.energies(x), raw + 1.0 - torch.eye(16)[0])
        assert canon.identity_margin == 1.0 and "energy_prior" in canon.state_dict()
        x_canon, index = canon.canonicalize(x)
        assert torch.equal(index, torch.zeros(8, dtype=torch.long))
        torch.testing.assert_close(canon(x), model(x), rtol=0, atol=1e-5)
        canon.energy_prior.zero_()
        assert (canon.canonicalize(x)[1] != 0).sum() >= 4

    def test_checkpoint_without_prior_loads_with_zero_prior(self):
        canon = InputCanonicalizer(tiny_vit(), num_warps=4, identity_margin=2.0)
        state = {k: v for k, v in canon.state_dict().items() if k != "energy_prior"}
        fresh = InputCanonicalizer(tiny_vit(), num_warps=4)
        fresh.load_state_dict(state, strict=True)
        assert torch.equal(fresh.energy_prior, torch.zeros(4)) and fresh.identity_margin == 0.0
        # A checkpoint with a prior restores it whatever the constructor's margin.
        other = InputCanonicalizer(tiny_vit(), num_warps=4, identity_margin=0.0)
        other.load_state_dict(canon.state_dict(), strict=True)
        assert other.identity_margin == 2.0

    def test_energy_loss_scores_identity_current_choice_and_distinct_others(self):
        torch.manual_seed(0)
        canon = InputCanonicalizer(nn.Identity(), num_warps=32, strength=0.5, energy_size=16, identity_margin=0.0)
        for p in canon.energy.parameters():
            nn.init.normal_(p, std=0.3)
        x = torch.rand(6, 3, 16, 16)
        current = canon.energies(x).argmin(dim=1)
        assert (current != 0).all()  # else the current choice would be the identity, scored anyway
        seen: list[torch.Tensor] = []

        def classifier(c: torch.Tensor) -> torch.Tensor:
            seen.append(c)
            return torch.zeros(c.shape[0], 2)

        loss = canon.energy_loss(x, torch.zeros(6, dtype=torch.long), classifier, num_candidates=3)
        cands = seen[0].reshape(6, 3, 3, 16, 16)
        every = torch.stack([monotone_warp(x, canon.warps[k].expand(6, -1, -1, -1)) for k in range(32)], dim=1)
        for b in range(6):
            hit = [int((every[b] - cands[b, j]).flatten(1).abs().amax(1).argmin()) for j in range(3)]
            assert hit[:2] == [0, current[b].item()] and len(set(hit)) == 3
        # Equal classifier losses: the target is uniform over the 3 scored warps.
        energy = canon.energies(x)
        index = torch.tensor([[0, current[b].item(), hit] for b, hit in enumerate(
            int((every[b] - cands[b, 2]).flatten(1).abs().amax(1).argmin()) for b in range(6))])
        ref = -torch.log_softmax(-energy.gather(1, index), dim=1).mean(dim=1).mean()
        torch.testing.assert_close(loss, ref)

    def test_energy_loss_trains_the_energy_to_pick_the_warp_the_classifier_reads_best(self):
        # A "classifier" that reads one warp best: its loss grows with the distance to warp 5 of a fixed image, and
        # the inputs are noisy copies of that image. Trained with energy_loss alone, the energy, which starts at the
        # identity, must learn to pick warp 5 for unseen copies; the backbone gets no gradient.
        torch.manual_seed(0)
        base = nn.functional.interpolate(torch.rand(1, 1, 4, 4), size=(16, 16), mode="bilinear", align_corners=True)
        base = base.expand(1, 3, -1, -1)
        head = nn.Linear(2, 2)
        canon = InputCanonicalizer(head, num_warps=8, strength=0.8, energy_size=16, identity_margin=0.5)
        goal = monotone_warp(base, canon.warps[5:6])

        def classifier(c: torch.Tensor) -> torch.Tensor:
            dist = (c - goal).pow(2).mean(dim=(1, 2, 3))
            return torch.stack([-200 * dist, torch.zeros_like(dist)], dim=1)

        def batch(n: int) -> torch.Tensor:
            return base + 0.02 * torch.randn(n, 3, 16, 16)

        assert torch.equal(canon.canonicalize(batch(16))[1], torch.zeros(16, dtype=torch.long))
        optimizer = torch.optim.Adam(canon.energy.parameters(), lr=1e-2)
        for _ in range(150):
            loss = canon.energy_loss(batch(16), torch.zeros(16, dtype=torch.long), classifier, num_candidates=3)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert all(p.grad is None for p in head.parameters())
        with torch.no_grad():
            index = canon.canonicalize(batch(32))[1]
        assert (index == 5).float().mean() >= 0.9, index.tolist()

    def test_energy_loss_bad_input(self):
        canon = InputCanonicalizer(tiny_vit(), num_warps=4, energy_size=8)
        with pytest.raises(ValueError, match="num_candidates"):
            canon.energy_loss(torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), num_candidates=1)
        with pytest.raises(ValueError, match="identity_margin"):
            InputCanonicalizer(tiny_vit(), identity_margin=-1.0)

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
