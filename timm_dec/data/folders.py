"""Image folders: `ImageFolderVariants`, a folder with locally scaled variants of each image (`rescale_object` where
``masks/`` and ``backgrounds/`` exist, else `RandomMonotoneScale`), as ``timm-dec eval`` reads it; `ImageFolderSplit`,
a split of an image folder as timm reads it, for training.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset
from torch.utils.data import Dataset

from .augment import RandomMonotoneScale
from .objects import rescale_object

__all__ = ["ImageFolderVariants", "ImageFolderSplit", "IMAGE_EXTENSIONS", "MASKS_DIR", "BACKGROUNDS_DIR"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MASKS_DIR, BACKGROUNDS_DIR = "masks", "backgrounds"


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
