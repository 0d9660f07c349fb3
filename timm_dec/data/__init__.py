"""Local-scale data: a random monotone-scaling augmentation, locally scaled digits, object rescaling with a mask, and
image folders. One module per concern; every name is importable from here (``from timm_dec.data import ...``).

* `augment`: `random_knots` draws random monotone scalings (knots of `timm_dec.ops`) and `RandomMonotoneScale`
  applies one to images; it is the paper's *Aug* baseline and works inside a timm / torchvision transform pipeline.
* `digits`: `LocallyScaledDigits` is the locally scaled digits dataset of paper Sec. 5.2: k-digit numbers on a square
  canvas, each digit resized by its own factor; ``variants(i, scales)`` re-renders an item at other per-digit scales.
  Its digit sources are scikit-learn's bundled digits and a local MNIST.
* `objects`: `rescale_object` is steps (e)-(f) of paper Sec. 5.3: scale a masked object about its centre and paste it
  onto an inpainted background, for users who bring their own masks and inpainting.
* `folders`: `ImageFolderVariants`, an image folder with locally scaled variants, as ``timm-dec eval`` reads it;
  `ImageFolderSplit`, a split of an image folder as timm reads it, for training.

Randomness never touches the global RNG state unless asked to (``RandomMonotoneScale`` without ``seed`` or
``generator`` uses torch's global RNG, like torchvision's transforms, so DataLoader workers differ).
"""
# Scale, MASKS_DIR and BACKGROUNDS_DIR (noqa) were importable from timm_dec.data outside __all__: they still are
from ..ops import random_knots
from .augment import PIL_MODES, RandomMonotoneScale
from .digits import (
    DEFAULT_NUM_SAMPLES,
    SOURCES,
    SPLITS,
    DigitSample,
    LocallyScaledDigits,
    Scale,  # noqa: F401
)
from .folders import (
    BACKGROUNDS_DIR,  # noqa: F401
    IMAGE_EXTENSIONS,
    MASKS_DIR,  # noqa: F401
    ImageFolderSplit,
    ImageFolderVariants,
)
from .objects import rescale_object

__all__ = [
    "random_knots", "RandomMonotoneScale", "LocallyScaledDigits", "DigitSample", "rescale_object", "SOURCES",
    "SPLITS", "DEFAULT_NUM_SAMPLES", "PIL_MODES", "ImageFolderVariants", "ImageFolderSplit", "IMAGE_EXTENSIONS",
]
