"""The paper's baselines for local scale consistency (Sec. 5.1-5.2): Aug, InvL and Canon.

* **Aug** trains the plain model with `timm_dec.data.RandomMonotoneScale` in the training transform; there is
  nothing to wrap, so this module has no class for it.
* **InvL** adds the invariance loss of eq. 25, `InvarianceLoss`, to any training loop: the squared L2 distance
  between the softmax outputs of an image and of a randomly monotone-scaled copy.
* **Canon** canonicalises the *input*: `InputCanonicalizer` wraps any timm classifier, scores a fixed, seeded bank
  of monotone warps (64 by default, the identity first) with a 3-layer energy CNN, applies the lowest-energy warp
  per sample, S^{-1}(I; Phi*), and runs the model on the result. The hard choice passes gradients to the energy net
  with a straight-through estimator: forward is the argmin, backward is that of the softmax-weighted mixture of all
  (scored) candidates with weights softmax(-energy / temperature). Two additions make the choice mean something
  (measured in the README): an identity prior (every non-identity warp pays ``identity_margin``, so Canon starts
  as the wrapped model and leaves the identity only where its energy says so by more than the margin), and
  `InputCanonicalizer.energy_loss`, which teaches the energy to rank candidates as the classifier reads them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import identity_logits, knots_from_logits, monotone_warp

__all__ = ["invariance_loss", "InvarianceLoss", "warp_bank", "EnergyNet", "InputCanonicalizer", "BASELINES"]

# Names the demo and `timm-dec eval` use for the methods compared in the paper's Tables 2 and 3.
BASELINES = ("base", "aug", "invl", "canon", "dec")


def invariance_loss(logits: torch.Tensor, scaled_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 25 for one batch: mean over samples of ||softmax(logits) - softmax(scaled_logits)||^2.

    Args:
        logits: (..., K) logits of the images.
        scaled_logits: (..., K) logits of their monotone-scaled copies, same shape.

    Returns:
        () the mean over all leading positions of the squared L2 distance between the two class distributions.
    """
    if logits.shape != scaled_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and scaled_logits {tuple(scaled_logits.shape)} must have the same shape")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., K) with K >= 1 classes, got {tuple(logits.shape)}")
    diff = logits.softmax(dim=-1) - scaled_logits.softmax(dim=-1)
    return diff.pow(2).sum(dim=-1).mean()


class InvarianceLoss(nn.Module):
    """InvL (paper eq. 25): ``weight * invariance_loss(logits, scaled_logits)``, for any training loop.

    Example:
        >>> criterion, invl = nn.CrossEntropyLoss(), InvarianceLoss(weight=1.0)
        >>> logits, scaled = torch.randn(4, 10), torch.randn(4, 10)     # model(x), model(S(x; Phi))
        >>> loss = criterion(logits, torch.arange(4)) + invl(logits, scaled)
    """

    def __init__(self, weight: float = 1.0) -> None:
        """Args:
            weight: multiplier of the loss; >= 0.
        """
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def forward(self, logits: torch.Tensor, scaled_logits: torch.Tensor) -> torch.Tensor:
        """Args:
            logits: (..., K) logits of the images.
            scaled_logits: (..., K) logits of their monotone-scaled copies.

        Returns:
            () the weighted loss.
        """
        return self.weight * invariance_loss(logits, scaled_logits)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def warp_bank(
        num_warps: int = 64,
        grid: int = 4,
        strength: float = 0.5,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A fixed, seeded set of monotone warps, the identity first (Canon's discretised group).

    Warp k > 0 has logits ``strength * z`` with z standard normal from a generator seeded with ``seed``, so the
    local scale factors of adjacent grid cells differ by about exp(+-strength). Global RNG state is not touched.

    Args:
        num_warps: K, the number of warps including the identity; >= 1.
        grid: G, cells per side of the warp grid.
        strength: standard deviation of the segment logits; > 0.
        seed: seed of the private generator.
        dtype: floating dtype of the result.

    Returns:
        (K, 2, G+1, G+1) knot tables; entry 0 is the identity.
    """
    if num_warps < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if not strength > 0:
        raise ValueError(f"strength must be > 0, got {strength}")
    generator = torch.Generator().manual_seed(seed)
    logits = strength * torch.randn(num_warps - 1, 2, grid + 1, grid, generator=generator, dtype=torch.float64)
    logits = torch.cat((identity_logits(1, grid, dtype=torch.float64), logits))
    return knots_from_logits(logits).to(dtype)


class EnergyNet(nn.Module):
    """The energy E of eq. 7 for Canon: a 3-layer CNN that maps an image to one scalar.

    Two strided 3x3 convolutions with ReLU, a 1x1 convolution to one channel, then the spatial mean. The last layer
    starts at zero, so every warp has the same energy at initialisation and the argmin picks the first, the identity.
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (32, 64)) -> None:
        """Args:
            in_chans: channels of the images scored.
            widths: output channels of the two 3x3 convolutions.
        """
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if len(widths) != 2 or min(widths) < 1:
            raise ValueError(f"widths must be two positive channel counts, got {tuple(widths)}")
        c1, c2 = widths
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, c1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.head = nn.Conv2d(c2, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (N, C, H, W) images.

        Returns:
            (N,) energies.
        """
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(x).mean(dim=(1, 2, 3))


class InputCanonicalizer(nn.Module):
    """Canon: canonicalise the input over a discrete bank of monotone warps, then run any model.

    For each sample, every warp k of the bank gives a candidate S^{-1}(I; Phi_k); the energy net scores the
    candidates (at ``energy_size`` pixels at most, for speed), the lowest energy wins, and the model sees the winning
    candidate at full resolution. In training the forward value is unchanged, but the gradient reaching the energy
    net is that of ``sum_k softmax(-E / temperature)_k * candidate_k`` (straight-through estimator; the candidates
    taken at the scoring resolution, so the input is not warped K times at full size). Samples are
    independent of each other. The wrapped model keeps its own state-dict keys under ``model.``.

    Every warp but the identity pays ``identity_margin`` of energy, and a training loop should add `energy_loss`
    (the classifier's ranking of candidates) to its loss: trained by the straight-through gradient alone, the energy
    chooses warps at random with respect to the classifier (README, "Canon: how its energy starts and learns").

    Example:
        >>> import timm
        >>> canon = InputCanonicalizer(timm.create_model("resnet18", num_classes=10), num_warps=8)
        >>> canon(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
            self,
            model: nn.Module,
            num_warps: int = 64,
            grid: int = 4,
            strength: float = 0.5,
            seed: int = 0,
            in_chans: int = 3,
            energy_size: int = 32,
            energy_widths: Sequence[int] = (32, 64),
            temperature: float = 1.0,
            identity_margin: float = 1.0,
    ) -> None:
        """Args:
            model: any module mapping (B, C, H, W) images to outputs, e.g. a timm classifier.
            num_warps: K, warps in the bank including the identity.
            grid: G of the warp grid.
            strength: spread of the bank's warps (see `warp_bank`).
            seed: seed of the bank; a fixed seed gives the same bank in every process.
            in_chans: C of the input images.
            energy_size: candidates are area-downsampled so that their longer side is at most this before scoring.
            energy_widths: channels of the energy net's two 3x3 convolutions.
            temperature: of the softmax in the straight-through backward; > 0.
            identity_margin: energy added to every warp but the identity (the ``energy_prior`` buffer, saved with
                the weights); >= 0. With a margin, ties and near-ties go to the identity; 0 is the paper's Canon.
        """
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if energy_size < 4:
            raise ValueError(f"energy_size must be >= 4, got {energy_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not identity_margin >= 0:
            raise ValueError(f"identity_margin must be >= 0, got {identity_margin}")
        self.model = model
        self.energy = EnergyNet(in_chans, energy_widths)
        self.register_buffer("warps", warp_bank(num_warps, grid, strength, seed), persistent=True)
        prior = torch.full((num_warps,), float(identity_margin))
        prior[0] = 0.0
        self.register_buffer("energy_prior", prior, persistent=True)
        self.in_chans = in_chans
        self.energy_size = energy_size
        self.temperature = float(temperature)

    @property
    def num_warps(self) -> int:
        return self.warps.shape[0]

    @property
    def num_classes(self) -> Optional[int]:
        return getattr(self.model, "num_classes", None)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.model, "pretrained_cfg", {})

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        self.model.reset_classifier(num_classes, *args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints from before the identity prior had none: a zero prior is exactly what they were trained with.
        key = prefix + "energy_prior"
        if key not in state_dict and any(k.startswith(prefix + "energy.") for k in state_dict):
            state_dict[key] = torch.zeros_like(self.energy_prior)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def identity_margin(self) -> float:
        """The energy every non-identity warp pays (from the ``energy_prior`` buffer)."""
        return float(self.energy_prior[1:].min()) if self.num_warps > 1 else 0.0

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must have shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def _candidates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K, C, H, W): x warped by every warp of the bank, S^{-1}(x; Phi_k)."""
        batch, k = x.shape[0], self.num_warps
        warps = self.warps.to(x.device).repeat(batch, 1, 1, 1)
        out = monotone_warp(x.repeat_interleave(k, dim=0), warps, check=False)
        return out.reshape(batch, k, *x.shape[1:])

    def _scored(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) energies (the identity prior included) and the (B, K, C, h, w) candidates they score, at the
        scoring resolution."""
        self._check_input(x)
        height, width = x.shape[-2:]
        if max(height, width) > self.energy_size:
            scale = self.energy_size / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(x, size=size, mode="area")
        cands = self._candidates(x)
        energy = self.energy(cands.flatten(0, 1)).reshape(cands.shape[:2])
        return energy + self.energy_prior.to(energy), cands

    def energies(self, x: torch.Tensor) -> torch.Tensor:
        """Energy of every canonicalised candidate.

        Args:
            x: (B, C, H, W) images.

        Returns:
            (B, K) energies, the identity prior included; a sample's row does not depend on the other samples.
        """
        return self._scored(x)[0]

    def canonicalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest-energy canonicalisation of each sample.

        In training, the straight-through term is the softmax(-E / temperature) mixture of the scored candidates
        (at the scoring resolution, nearest-upsampled to the input's), minus itself detached: zero in value, it
        carries the mixture's gradient to the energy net without warping the full-size input K times.

        Args:
            x: (B, C, H, W) images.

        Returns:
            (B, C, H, W) canonicalised images S^{-1}(x; Phi*) and (B,) indices of the chosen warps in ``warps``.
        """
        energy, cands = self._scored(x)
        index = energy.argmin(dim=1)
        out = monotone_warp(x, self.warps.to(x.device)[index], check=False)
        if torch.is_grad_enabled() and energy.requires_grad:
            soft = torch.softmax(-energy / self.temperature, dim=1)
            mix = torch.einsum("bk,bk...->b...", soft - soft.detach(), cands.detach().to(soft.dtype))
            if mix.shape[-2:] != out.shape[-2:]:
                mix = F.interpolate(mix, size=out.shape[-2:], mode="nearest")
            out = out + mix.to(out.dtype)
        return out, index

    def energy_loss(
            self,
            x: torch.Tensor,
            target: torch.Tensor,
            classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            num_candidates: int = 4,
            loss_temperature: float = 0.1,
    ) -> torch.Tensor:
        """Teach the energy which candidates the classifier reads best (a listwise ranking loss).

        For each sample, ``num_candidates`` warps are scored: the identity, the current lowest-energy warp, and
        random others. The classifier's cross-entropy on each (no gradient to the classifier) gives the target
        distribution softmax(-CE / loss_temperature) over them; the loss is the cross-entropy from that target to
        softmax(-E) over the same warps (E with the identity prior). Its minimum orders the energies as the
        classifier's losses, so the argmin moves to the warp the classifier reads best, and leaves the identity
        only where another warp is clearly better. Samples are independent; the random warps come from torch's
        global RNG.

        Args:
            x: (B, C, H, W) images, as ``forward`` takes them.
            target: (B,) class indices of the classifier's output.
            classifier: maps (N, C, H, W) images to (N, num_classes) logits or log-probabilities; default the wrapped
                model.
            num_candidates: M warps scored per sample, including the identity and the current choice; >= 2.
            loss_temperature: of the target softmax over the classifier's losses (nats); > 0.

        Returns:
            () the mean over samples of the ranking loss; its gradient reaches the energy net only.
        """
        if num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
        if not loss_temperature > 0:
            raise ValueError(f"loss_temperature must be > 0, got {loss_temperature}")
        classifier = self.model if classifier is None else classifier
        batch, k = x.shape[0], self.num_warps
        m = min(num_candidates, k)
        energy = self.energies(x)  # (B, K)
        current = energy.detach().argmin(dim=1)
        # (B, M) distinct warps: the identity, the current choice (if not the identity), then uniform random others
        keys = torch.rand(batch, k, device=x.device)
        keys[:, 0] = -2.0
        keys.scatter_(1, current[:, None], -1.0)
        index = keys.argsort(dim=1)[:, :m]
        with torch.no_grad():
            warps = self.warps.to(x.device)[index.flatten()]
            cands = monotone_warp(x.repeat_interleave(m, dim=0), warps, check=False)
            out = classifier(cands)
            ce = F.cross_entropy(out.float(), target.repeat_interleave(m), reduction="none").reshape(batch, m)
            goal = torch.softmax(-ce / loss_temperature, dim=1)
        chosen = energy.gather(1, index)
        return -(goal * torch.log_softmax(-chosen, dim=1)).sum(dim=1).mean()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's ``forward_features`` on the canonicalised input."""
        return self.model.forward_features(self.canonicalize(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The wrapped model's ``forward_head``."""
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, C, H, W) images.

        Returns:
            The wrapped model's output on the canonicalised images, e.g. (B, num_classes) logits.
        """
        return self.model(self.canonicalize(x)[0])

    def extra_repr(self) -> str:
        return (f"num_warps={self.num_warps}, energy_size={self.energy_size}, temperature={self.temperature}, "
                f"identity_margin={self.identity_margin:g}")
