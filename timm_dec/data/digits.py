"""The locally scaled digits of paper Sec. 5.2 (`LocallyScaledDigits`, `DigitSample`) and their digit sources.

`LocallyScaledDigits` draws k-digit numbers on a square canvas, each digit resized by its own factor;
``variants(i, scales)`` re-renders an item at other per-digit scales. The digit images come from a source:
scikit-learn's bundled 8x8 digits (offline; split once, stratified, into disjoint train and test pools) or MNIST's
official splits read from a local torchvision-format folder (no download).
"""
from __future__ import annotations

import importlib.util
import operator
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._argcheck import check_float, check_int

__all__ = ["LocallyScaledDigits", "DigitSample", "SOURCES", "SPLITS", "DEFAULT_NUM_SAMPLES", "Scale"]

SOURCES = ("digits", "mnist")
SPLITS = ("train", "test")
DEFAULT_NUM_SAMPLES = {"train": 6000, "test": 2000}
# The train/test split of scikit-learn's digits is fixed, whatever the dataset seed, so splits never share a digit.
_DIGITS_SPLIT_SEED = 20250612
_DIGITS_TEST_FRACTION = 0.2
# MNIST source ids: official train images keep their index, test images are offset past the 60000 train images.
_MNIST_TEST_ID_OFFSET = 60000

Scale = Union[float, Sequence[float]]


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
