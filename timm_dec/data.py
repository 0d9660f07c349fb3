"""Local-scale data: a random monotone-scaling augmentation, locally scaled digits, and object rescaling with a mask.

* `random_knots` draws random monotone scalings (knots of `timm_dec.ops`) and `RandomMonotoneScale` applies one to
  images; it is the paper's *Aug* baseline and works inside a timm / torchvision transform pipeline.
* `LocallyScaledDigits` is the locally scaled digits dataset of paper Sec. 5.2: k-digit numbers on a square canvas,
  each digit resized by its own factor; ``variants(i, scales)`` re-renders an item at other per-digit scales.
* `rescale_object` is steps (e)-(f) of paper Sec. 5.3: scale a masked object about its centre and paste it onto an
  inpainted background, for users who bring their own masks and inpainting.
* `ImageFolderVariants`: an image folder with locally scaled variants, as ``timm-dec eval`` reads it;
  `ImageFolderSplit`: a split of an image folder as timm reads it, for training.

Randomness never touches the global RNG state unless asked to (``RandomMonotoneScale`` without ``seed`` or
``generator`` uses torch's global RNG, like torchvision's transforms, so DataLoader workers differ).
"""
from __future__ import annotations

import importlib.util
import math
import operator
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import create_dataset
from torch.utils.data import Dataset, get_worker_info

from ._argcheck import check_float, check_int
from .ops import monotone_warp, random_knots

__all__ = [
    "random_knots", "RandomMonotoneScale", "LocallyScaledDigits", "DigitSample", "rescale_object", "SOURCES",
    "SPLITS", "DEFAULT_NUM_SAMPLES", "PIL_MODES", "ImageFolderVariants", "ImageFolderSplit", "IMAGE_EXTENSIONS",
]

SOURCES = ("digits", "mnist")
SPLITS = ("train", "test")
DEFAULT_NUM_SAMPLES = {"train": 6000, "test": 2000}
PIL_MODES = ("L", "LA", "RGB", "RGBA", "I", "I;16", "F")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MASKS_DIR, BACKGROUNDS_DIR = "masks", "backgrounds"
# The train/test split of scikit-learn's digits is fixed, whatever the dataset seed, so splits never share a digit.
_DIGITS_SPLIT_SEED = 20250612
_DIGITS_TEST_FRACTION = 0.2
# MNIST source ids: official train images keep their index, test images are offset past the 60000 train images.
_MNIST_TEST_ID_OFFSET = 60000

Scale = Union[float, Sequence[float]]


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


@dataclass(frozen=True)
class DigitSample:
    """What one item of `LocallyScaledDigits` is made of.

    Attributes:
        label: the number, ``int("".join(map(str, digits)))``.
        digits: the digits, left to right.
        source_indices: index of each digit's image in the dataset's source pool (``dataset.source_images``).
        scales: each digit's resize factor.
    """
    label: int
    digits: tuple[int, ...]
    source_indices: tuple[int, ...]
    scales: tuple[float, ...]


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 64) float32 pixels in [0, 16] and (1797,) int64 labels."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("source='digits' needs scikit-learn: pip install scikit-learn (or 'timm-dec[demo]')")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):  # what load_digits reads; reading it directly skips importing sklearn (~2 s)
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


@lru_cache(maxsize=8)
def _load_source(source: str, split: str, root: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N, h, w) float in [0, 1], labels (N,) int64, ids (N,) int64) of one split of a digit source."""
    if source == "digits":
        pixels, labels = _sklearn_digits()
        rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
        test_ids = []
        for digit in range(10):  # stratified: every digit is in both splits
            ids = rng.permutation(np.flatnonzero(labels == digit))
            test_ids.append(ids[:int(round(_DIGITS_TEST_FRACTION * len(ids)))])
        is_test = np.zeros(len(labels), dtype=bool)
        is_test[np.concatenate(test_ids)] = True
        ids = np.flatnonzero(is_test if split == "test" else ~is_test)
        images = torch.from_numpy(pixels[ids].reshape(-1, 8, 8) / np.float32(16.0))
        return images, torch.from_numpy(labels[ids]), torch.from_numpy(ids.astype(np.int64))
    if root is None:
        raise ValueError("source='mnist' needs root, a folder in torchvision's MNIST layout (root/MNIST/raw/...)")
    from torchvision.datasets import MNIST
    try:
        mnist = MNIST(root, train=split == "train", download=False)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"MNIST not found under root={root!r}: expected torchvision's layout {os.path.join(root, 'MNIST', 'raw')}"
            f"/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte. Fetch it once with "
            f"torchvision.datasets.MNIST(root, download=True) where there is network, or use source='digits'") from e
    images = mnist.data.to(torch.float32) / 255.0
    offset = 0 if split == "train" else _MNIST_TEST_ID_OFFSET
    return images, mnist.targets.to(torch.int64), torch.arange(len(images), dtype=torch.int64) + offset


class LocallyScaledDigits(Dataset):
    """Locally scaled k-digit numbers (paper Sec. 5.2): a 10**k-class classification dataset.

    Item i draws, from ``numpy.random.default_rng((seed, split, i))`` (the global RNG is never touched), a number
    in [0, 10**k) (leading zeros included), for each of its digits a source image of that digit from the split's
    pool, and for each digit a scale uniform in ``scale_range``. A digit at scale s is its source image resized to
    ``round(digit_size * s)`` pixels square (bilinear, antialiased). Digits are laid out left to right with equal
    gaps, each centred vertically, white on black. The label is the number.

    Sources: ``"digits"`` is scikit-learn's bundled 8x8 handwritten digits (offline, the default), split once and
    for all (stratified, 80/20) into disjoint train and test pools; ``"mnist"`` reads MNIST's official train/test
    splits from a local torchvision-format ``root`` (no download).

    Args:
        split: ``"train"`` or ``"test"``.
        num_samples: dataset length; default 6000 for train, 2000 for test.
        num_digits: digits per number k; there are 10**k classes.
        canvas: side of the square image in pixels.
        scale_range: (low, high) range of the per-digit scales.
        digit_size: side in pixels of a source digit image at scale 1; default ``canvas // 8`` (28 px on a 224 canvas,
            MNIST's size in the paper's 224 x 224 setting). The layout must fit: ``num_digits`` digits at the largest
            scale side by side, else a ValueError says which option to change.
        source: ``"digits"`` or ``"mnist"``.
        root: MNIST root for ``source="mnist"``.
        seed: dataset seed; the same seed gives the same items.
        channels: 1 or 3 (grey repeated, so timm models take it).
        transform: applied to each (C, canvas, canvas) float tensor in [0, 1] (e.g. ``Normalize``).

    Example:
        >>> ds = LocallyScaledDigits("test", num_samples=10, canvas=64)
        >>> image, label = ds[0]          # (3, 64, 64) in [0, 1], label in [0, 1000)
        >>> images, label = ds.variants(0, [0.5, 1.0, (0.5, 1.0, 2.0)])   # (3, 3, 64, 64), the same label
    """

    def __init__(
            self,
            split: str = "train",
            num_samples: Optional[int] = None,
            num_digits: int = 3,
            canvas: int = 224,
            scale_range: tuple[float, float] = (0.4, 2.0),
            digit_size: Optional[int] = None,
            source: str = "digits",
            root: Optional[Union[str, os.PathLike]] = None,
            seed: int = 0,
            channels: int = 3,
            transform: Optional[Callable[[torch.Tensor], Any]] = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.split, self.source = split, source
        num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples
        self.num_samples = check_int("num_samples", num_samples, 0)
        self.num_digits = check_int("num_digits", num_digits, 1)
        self.canvas = check_int("canvas", canvas, 1)
        self.digit_size = check_int("digit_size", canvas // 8 if digit_size is None else digit_size, 1)
        if not isinstance(scale_range, (tuple, list)) or len(scale_range) != 2:
            raise ValueError(f"scale_range must be a (low, high) pair, got {scale_range!r}")
        low = check_float("scale_range[0]", scale_range[0], strict=True)
        high = check_float("scale_range[1]", scale_range[1], strict=True)
        if low > high:
            raise ValueError(f"scale_range must have low <= high, got {scale_range!r}")
        self.scale_range = (low, high)
        self.seed = check_int("seed", seed, 0)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.channels = channels
        self.transform = transform
        self.num_classes = 10 ** self.num_digits
        self._check_fits((high,) * self.num_digits, "scale_range")
        self._check_fits((low,) * self.num_digits, "scale_range")
        self.root = None if root is None else os.fspath(root)
        images, labels, ids = _load_source(source, split, self.root)
        self.source_images, self.source_labels, self.source_ids = images, labels, ids
        self._pools = [np.flatnonzero(labels.numpy() == d) for d in range(10)]
        missing = [d for d in range(10) if len(self._pools[d]) == 0]
        if missing:
            raise ValueError(f"the {split} split of source {source!r} has no image of digit(s) {missing}")

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, index: int) -> int:
        index = operator.index(index)
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        return index % self.num_samples

    def describe(self, index: int) -> DigitSample:
        """The number, source digit images and per-digit scales of item ``index`` (no rendering)."""
        index = self._index(index)
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), index))
        number = int(rng.integers(0, self.num_classes))
        digits = tuple(int(c) for c in str(number).zfill(self.num_digits))
        sources = tuple(int(self._pools[d][rng.integers(0, len(self._pools[d]))]) for d in digits)
        scales = tuple(float(s) for s in rng.uniform(*self.scale_range, size=self.num_digits))
        return DigitSample(label=number, digits=digits, source_indices=sources, scales=scales)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """(image, label): the (C, canvas, canvas) image in [0, 1] (after ``transform`` if set) and the number."""
        sample = self.describe(index)
        return self._finish(self.render(sample.source_indices, sample.scales)), sample.label

    def variants(self, index: int, scales: Sequence[Scale]) -> tuple[torch.Tensor, int]:
        """Item ``index`` re-rendered at other scales: the same number and the same source digit images.

        Rendering with the item's own scales (``describe(index).scales``) reproduces ``self[index]`` exactly.

        Args:
            index: item index.
            scales: S entries, each a float (every digit at that scale) or a tuple of ``num_digits`` per-digit
                scales. They may leave ``scale_range`` as long as the digits still fit on the canvas.

        Returns:
            (images (S, C, canvas, canvas), label); images pass through ``transform`` one by one.
        """
        sample = self.describe(index)
        per_digit = self._per_digit_scales(scales)
        images = [self._finish(self.render(sample.source_indices, s)) for s in per_digit]
        if not all(isinstance(im, torch.Tensor) for im in images):
            raise TypeError("variants needs a transform that returns tensors")
        return torch.stack(images), sample.label

    def render(self, source_indices: Sequence[int], scales: Sequence[float]) -> torch.Tensor:
        """Draw source digit images at per-digit scales: (C, canvas, canvas) float in [0, 1], before ``transform``.

        Args:
            source_indices: ``num_digits`` indices into ``source_images``.
            scales: ``num_digits`` positive scales.
        """
        if len(source_indices) != self.num_digits or len(scales) != self.num_digits:
            raise ValueError(f"need {self.num_digits} source indices and scales, got {len(source_indices)} "
                             f"and {len(scales)}")
        sizes = self._check_fits(scales, "scales")
        out = torch.zeros(self.canvas, self.canvas)
        gap = (self.canvas - sum(sizes)) / (self.num_digits + 1)
        left = gap
        for src, size in zip(source_indices, sizes):
            glyph = self.source_images[src]
            if glyph.shape != (size, size):
                glyph = F.interpolate(glyph[None, None], size=(size, size), mode="bilinear", align_corners=False,
                                      antialias=True)[0, 0].clamp_(0, 1)
            x0, y0 = int(round(left)), (self.canvas - size) // 2
            out[y0:y0 + size, x0:x0 + size] = glyph
            left += size + gap
        return out.expand(self.channels, -1, -1).clone()

    def digit_boxes(self, scales: Sequence[float]) -> list[tuple[int, int, int]]:
        """(left, top, size) in pixels of each digit's square box when rendered at per-digit ``scales``."""
        sizes = self._check_fits(scales, "scales")
        gap = (self.canvas - sum(sizes)) / (self.num_digits + 1)
        boxes, left = [], gap
        for size in sizes:
            boxes.append((int(round(left)), (self.canvas - size) // 2, size))
            left += size + gap
        return boxes

    def _finish(self, image: torch.Tensor) -> Any:
        return image if self.transform is None else self.transform(image)

    def _per_digit_scales(self, scales: Sequence[Scale]) -> list[tuple[float, ...]]:
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
            raise ValueError(f"scales must be a non-empty list of floats or per-digit tuples, got {scales!r}")
        out = []
        for s in scales:
            if isinstance(s, Sequence) and not isinstance(s, (str, bytes)):
                if len(s) != self.num_digits:
                    raise ValueError(f"a per-digit scale tuple needs {self.num_digits} entries, got {tuple(s)}")
                out.append(tuple(check_float("scale", v, strict=True) for v in s))
            else:
                out.append((check_float("scale", s, strict=True),) * self.num_digits)
        return out

    def _check_fits(self, scales: Sequence[float], what: str) -> list[int]:
        sizes = [int(round(self.digit_size * s)) for s in scales]
        if min(sizes) < 1:
            raise ValueError(f"{what} {tuple(scales)} with digit_size={self.digit_size} makes a digit smaller than "
                             f"one pixel; raise digit_size or the scales")
        if sum(sizes) > self.canvas:
            raise ValueError(
                f"{what} {tuple(round(s, 4) for s in scales)}: {self.num_digits} digits of {sizes} px do not fit "
                f"side by side on a {self.canvas} px canvas (digit_size={self.digit_size}); enlarge canvas or lower "
                f"digit_size, num_digits or the largest scale")
        return sizes

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, "
                f"num_digits={self.num_digits}, canvas={self.canvas}, scale_range={self.scale_range}, "
                f"digit_size={self.digit_size}, source={self.source!r}, seed={self.seed})")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, H, W) with edge replication."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def rescale_object(
        image: torch.Tensor,
        mask: torch.Tensor,
        background: torch.Tensor,
        factor: float,
        *,
        feather: float = 1.0,
        center: str = "centroid",
) -> torch.Tensor:
    """Scale the masked object about its centre and paste it onto an inpainted background (paper 5.3, (e)-(f)).

    Output pixel p takes the object at ``c + (p - c) / factor`` (bilinear, align_corners=True pixel grid), the mask
    is moved the same way (zero outside the image), softened by a Gaussian of std ``feather`` pixels, and used as
    alpha: ``out = alpha * object + (1 - alpha) * background``. With ``factor=1`` and ``feather=0`` the object pixels
    are pasted unchanged.

    Args:
        image: (C, H, W) float image holding the object.
        mask: (H, W) bool or float mask of the object, values in [0, 1].
        background: (C, H, W) float image with the object inpainted away.
        factor: scale factor > 0 (> 1 enlarges).
        feather: std in pixels of the mask's Gaussian softening; 0 keeps the (resampled) mask's edge.
        center: ``"centroid"`` (the mask's centre of mass) or ``"bbox"`` (the centre of its bounding box).

    Returns:
        (C, H, W) locally scaled image, in ``image.dtype``.

    Example:
        >>> img, bg = torch.rand(3, 32, 32), torch.zeros(3, 32, 32)
        >>> mask = torch.zeros(32, 32, dtype=torch.bool); mask[8:16, 8:16] = True
        >>> rescale_object(img, mask, bg, 1.5).shape
        torch.Size([3, 32, 32])
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        got = f"{getattr(image, 'dtype', type(image).__name__)} of shape {tuple(getattr(image, 'shape', ()))}"
        raise ValueError(f"image must be a (C, H, W) floating point tensor, got {got}")
    if not isinstance(background, torch.Tensor) or not background.is_floating_point():
        raise ValueError("background must be a floating point tensor")
    if background.shape != image.shape:
        raise ValueError(f"background shape {tuple(background.shape)} does not match image shape {tuple(image.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    height, width = image.shape[1:]
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the image's (H, W) = {(height, width)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool or float with values in [0, 1], got {mask.dtype}")
    if mask.device != image.device or background.device != image.device:
        raise ValueError("image, mask and background must be on the same device")
    factor = check_float("factor", factor, strict=True)
    feather = check_float("feather", feather)
    if center not in ("centroid", "bbox"):
        raise ValueError(f"center must be 'centroid' or 'bbox', got {center!r}")
    dtype = torch.promote_types(image.dtype, torch.float32)
    alpha = mask.to(dtype)
    if mask.is_floating_point() and not bool(((alpha >= 0) & (alpha <= 1)).all()):
        raise ValueError("mask values must lie in [0, 1] (and not be NaN)")
    total = alpha.sum()
    if not bool(total > 0):
        raise ValueError("mask is empty: there is no object to rescale")
    ys = torch.arange(height, dtype=dtype, device=image.device)
    xs = torch.arange(width, dtype=dtype, device=image.device)
    if center == "centroid":
        cy, cx = (alpha.sum(1) * ys).sum() / total, (alpha.sum(0) * xs).sum() / total
    else:
        rows, cols = (alpha > 0).any(1).nonzero().squeeze(1), (alpha > 0).any(0).nonzero().squeeze(1)
        cy, cx = (rows[0] + rows[-1]).to(dtype) / 2, (cols[0] + cols[-1]).to(dtype) / 2
    obj, alpha = image.to(dtype)[None], alpha[None, None]
    if factor != 1:
        src_x = (cx + (xs - cx) / factor) * 2 / max(width - 1, 1) - 1
        src_y = (cy + (ys - cy) / factor) * 2 / max(height - 1, 1) - 1
        gy, gx = torch.meshgrid(src_y, src_x, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1)[None]
        obj = F.grid_sample(obj, grid, mode="bilinear", padding_mode="border", align_corners=True)
        alpha = F.grid_sample(alpha, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if feather > 0:
        alpha = _gaussian_blur(alpha, feather)
    out = alpha[0] * obj[0] + (1 - alpha[0]) * background.to(dtype)
    return out.to(image.dtype)



def _load_rgb(path: Path, size: tuple[int, int], chans: int) -> torch.Tensor:
    with Image.open(path) as im:
        im = im.convert("RGB" if chans == 3 else "L").resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    return t.permute(2, 0, 1) if t.dim() == 3 else t[None]


class ImageFolderVariants(Dataset):
    """An ImageFolder-style directory with locally scaled ``variants`` for `timm_dec.metrics`.

    Layout: ``root/<class>/<image>``; optional ``root/masks/<class>/<stem>.png`` and
    ``root/backgrounds/<class>/<stem>.<ext>`` (see `timm_dec.evaluate`'s module doc). Images are resized to
    ``size`` (no crop), converted to [0, 1] floats, varied, then passed through ``transform`` (e.g. ``Normalize``).

    Args:
        root: the directory.
        size: (H, W) the model takes.
        chans: 1 or 3 channels.
        transform: applied to each (C, H, W) image in [0, 1] and to each variant.
        num_samples: keep this many images, a seeded random subset (all when None).
        seed: seed of the subset and of the random monotone scalings.
    """

    def __init__(
            self,
            root: Union[str, os.PathLike],
            size: tuple[int, int],
            chans: int = 3,
            transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            num_samples: Optional[int] = None,
            seed: int = 0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--data folder {str(self.root)!r} does not exist")
        if chans not in (1, 3):
            raise ValueError(f"chans must be 1 or 3, got {chans}")
        reserved = {MASKS_DIR, BACKGROUNDS_DIR}
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name not in reserved)
        if not self.classes:
            raise FileNotFoundError(f"{self.root}: no class folders (expected {self.root}/<class>/<image>)")
        items = [(f, label) for label, name in enumerate(self.classes) for f in sorted((self.root / name).iterdir())
                 if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not items:
            raise FileNotFoundError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")
        if num_samples is not None and num_samples < len(items):
            keep = np.random.default_rng(seed).permutation(len(items))[:num_samples]
            items = [items[i] for i in sorted(keep)]
        self.items = items
        self.size, self.chans, self.transform, self.seed = tuple(size), chans, transform, seed
        self.num_classes = len(self.classes)
        self.has_masks = (self.root / MASKS_DIR).is_dir()
        if self.has_masks and not (self.root / BACKGROUNDS_DIR).is_dir():
            raise FileNotFoundError(
                f"{self.root}: found {MASKS_DIR}/ but no {BACKGROUNDS_DIR}/; rescale_object needs, per image, the "
                f"image with its object inpainted away at {BACKGROUNDS_DIR}/<class>/<stem>.<ext>")
        self.variant_kind = "rescale_object" if self.has_masks else "random_monotone_scale"

    def __len__(self) -> int:
        return len(self.items)

    def _companion(self, kind: str, path: Path) -> Path:
        folder = self.root / kind / path.parent.name
        for ext in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
            candidate = folder / (path.stem + ext)
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no {kind[:-1]} for {path}: expected {folder / (path.stem + '.png')}")

    def _finish(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.transform is None else self.transform(image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return self._finish(_load_rgb(path, self.size, self.chans)), label

    def variants(self, index: int, scales: Sequence[float]) -> tuple[torch.Tensor, int]:
        """Image ``index`` at each scale: (images (S, C, H, W), label)."""
        path, label = self.items[index]
        image = _load_rgb(path, self.size, self.chans)
        out = []
        if self.has_masks:
            mask = _load_rgb(self._companion(MASKS_DIR, path), self.size, 1)[0]
            background = _load_rgb(self._companion(BACKGROUNDS_DIR, path), self.size, self.chans)
            if not bool(mask.gt(0).any()):
                raise ValueError(f"the mask of {path} is empty")
            mask = mask / mask.max()
            for s in scales:
                out.append(rescale_object(image, mask, background, float(s)))
        else:
            for j, s in enumerate(scales):
                gen = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([self.seed, index, j]).generate_state(1)[0]))
                out.append(RandomMonotoneScale(strength=abs(math.log(float(s))), p=1.0, generator=gen)(image))
        return torch.stack([self._finish(v) for v in out]), label


class ImageFolderSplit(Dataset):
    """A split of an image folder (timm's ``create_dataset``: ``train/``, ``val/`` or ``validation/``) with a
    transform."""

    def __init__(self, root: str, split: str, transform: Any) -> None:
        self.dataset = create_dataset("", root=root, split=split, is_training=False)
        self.transform = transform
        class_to_idx = self.dataset.reader.class_to_idx
        self.class_names = sorted(class_to_idx, key=class_to_idx.get)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)
