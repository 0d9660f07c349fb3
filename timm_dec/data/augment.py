"""The random monotone-scaling augmentation: `RandomMonotoneScale`, the paper's *Aug* baseline.

It warps images by random monotone scalings (`timm_dec.ops.random_knots`) and works inside a timm / torchvision
transform pipeline, on tensors and on PIL images. Randomness never touches the global RNG state unless asked to
(without ``seed`` or ``generator`` it uses torch's global RNG, like torchvision's transforms, so DataLoader workers
differ).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import get_worker_info

from .._argcheck import check_float, check_int
from ..ops import monotone_warp, random_knots

__all__ = ["RandomMonotoneScale", "PIL_MODES"]

PIL_MODES = ("L", "LA", "RGB", "RGBA", "I", "I;16", "F")


def _seed_from(*keys: int) -> int:
    """A 63-bit torch seed mixed from integer keys (numpy's SeedSequence), e.g. (seed, index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class RandomMonotoneScale(nn.Module):
    """Random local monotone scaling of images: the *Aug* baseline of the paper (Sec. 5.1-5.2).

    With probability ``p`` an image is warped by S(I; Phi) (sampled at l^{-1}(p), bilinear, border-clamped) with
    Phi from `random_knots`; otherwise it is returned unchanged. Each image of a batch gets its own coin and warp.
    ``strength=0`` or ``p=0`` return the input object itself and draw nothing.

    Inputs: float or uint8 tensors (C, H, W) or (B, C, H, W) (float values are warped as they are, so it goes
    before or after ``Normalize``), and PIL images of mode L, LA, RGB, RGBA, I, I;16 or F. The output has the type,
    shape, dtype and mode of the input.

    Randomness: ``generator`` draws from that torch.Generator; ``seed`` makes a private generator (reseeded once per
    DataLoader worker from the seed and the worker's seed, so workers and epochs differ but a run is reproducible
    after ``torch.manual_seed``); with neither, torch's global RNG is used, as torchvision's transforms do.
    Cost: the inverse map is the expensive part (~19 ms for a 3 x 224 x 224 image on one CPU core, ~2 ms at 64 x 64);
    for speed apply it to whole batches on the training device.

    Args:
        strength: standard deviation of the random segment logits (0: identity).
        grid: DEC grid size G of the random warp.
        p: probability of warping an image.
        generator: torch.Generator to draw from (its device is where the logits are drawn).
        seed: seed of a private generator; exclusive with ``generator``.

    Example:
        >>> from torchvision import transforms
        >>> tf = transforms.Compose([RandomMonotoneScale(strength=0.3, p=1.0, seed=0), transforms.ToTensor()])
    """

    def __init__(
            self,
            strength: float = 0.3,
            grid: int = 4,
            p: float = 0.5,
            *,
            generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.strength = check_float("strength", strength)
        self.grid = check_int("grid", grid, 1)
        self.p = check_float("p", p)
        if self.p > 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.generator = generator
        self._seeded: Optional[torch.Generator] = None
        self._seeded_for: Optional[tuple] = None

    def _rng(self) -> Optional[torch.Generator]:
        if self.generator is not None or self.seed is None:
            return self.generator
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if self._seeded_for != owner:
            seed = self.seed if info is None else _seed_from(self.seed, info.seed)
            self._seeded, self._seeded_for = torch.Generator().manual_seed(seed), owner
        return self._seeded

    def forward(self, img: Union[torch.Tensor, Image.Image]) -> Union[torch.Tensor, Image.Image]:
        """Warp ``img`` ((C, H, W) / (B, C, H, W) tensor or PIL image) with probability p; see the class doc."""
        if isinstance(img, Image.Image):
            return self._forward_pil(img)
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"img must be a tensor or a PIL image, got {type(img).__name__}")
        if img.dim() not in (3, 4):
            raise ValueError(f"img must have shape (C, H, W) or (B, C, H, W), got {tuple(img.shape)}")
        if not (img.is_floating_point() or img.dtype == torch.uint8):
            raise TypeError(f"img must be a floating point or uint8 tensor, got {img.dtype}")
        if self.strength == 0 or self.p == 0:
            return img
        x = img if img.dim() == 4 else img.unsqueeze(0)
        rng = self._rng()
        coin_device = rng.device if rng is not None else torch.device("cpu")
        apply = torch.rand(x.shape[0], generator=rng, device=coin_device) < self.p
        knots = random_knots(x.shape[0], self.grid, self.strength, generator=rng)
        if not bool(apply.any()):
            return img
        idx = apply.nonzero().squeeze(1)
        chosen = x[idx.to(x.device)]
        work = chosen if chosen.is_floating_point() else chosen.float()
        warped = monotone_warp(work, knots[idx].to(x.device), inverse=True, check=False)
        if not x.is_floating_point():
            warped = warped.round_().clamp_(0, 255).to(x.dtype)
        out = x.clone()
        out[idx.to(x.device)] = warped
        return out if img.dim() == 4 else out.squeeze(0)

    def _forward_pil(self, img: Image.Image) -> Image.Image:
        if img.mode not in PIL_MODES:
            raise ValueError(f"PIL image mode {img.mode!r} is not supported (one of {PIL_MODES}); convert it first, "
                             f"e.g. img.convert('RGB')")
        if self.strength == 0 or self.p == 0:
            return img
        arr = np.asarray(img)
        work = np.float64 if arr.dtype.itemsize >= 4 else np.float32  # mode I (int32) needs float64 to stay exact
        chw = torch.from_numpy(arr.astype(work)).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)
        out = self.forward(chw)
        if out is chw:
            return img
        res = out.permute(1, 2, 0).numpy()
        if np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            res = np.clip(np.rint(res), info.min, info.max)  # bilinear samples stay in range; this only rounds
        res = res.astype(arr.dtype).reshape(arr.shape)
        return Image.fromarray(res)

    def extra_repr(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return f"strength={self.strength}, grid={self.grid}, p={self.p}{seed}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_seeded"], state["_seeded_for"] = None, None  # a copy in another process reseeds itself
        return state
