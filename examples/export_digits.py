"""Write the locally scaled digits as an image folder that timm's train.py / validate.py read.

    python examples/export_digits.py --out data/digits                  # 3-digit numbers at 224 px, 6000 + 2000
    python examples/export_digits.py --out data/digits-tiny --num-digits 1 --canvas 32 --train-samples 500

Layout: ``OUT/train/<label>/<index>.png`` and ``OUT/validation/<label>/<index>.png``, labels zero-padded to the
digit count, plus ``OUT/class_map.txt`` listing every label in order. Pass it to train.py as ``--class-map`` so the
class index is the number itself even when a split misses some numbers (ImageFolder would otherwise number only the
folders it finds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from torchvision.transforms.functional import to_pil_image

from timm_dec.data import LocallyScaledDigits


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits")
    parser.add_argument("--num-digits", type=int, default=3)
    parser.add_argument("--canvas", type=int, default=224)
    parser.add_argument("--digit-size", type=int, default=None, help="pixels at scale 1; default canvas // 8")
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def export(out: Path, num_digits: int, canvas: int, digit_size: Optional[int], counts: dict[str, int],
           seed: int) -> dict[str, int]:
    """Render each split to PNGs; returns the number of images written per folder."""
    written = {}
    for split, folder in (("train", "train"), ("test", "validation")):
        data = LocallyScaledDigits(split, num_samples=counts[split], num_digits=num_digits, canvas=canvas,
                                   digit_size=digit_size, seed=seed, channels=1)
        for i in range(len(data)):
            image, label = data[i]
            target = out / folder / f"{label:0{num_digits}d}"
            target.mkdir(parents=True, exist_ok=True)
            to_pil_image(image).save(target / f"{i:06d}.png")
        written[folder] = len(data)
    names = [f"{k:0{num_digits}d}" for k in range(10 ** num_digits)]
    (out / "class_map.txt").write_text("\n".join(names) + "\n")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    written = export(out, args.num_digits, args.canvas, args.digit_size,
                     {"train": args.train_samples, "test": args.test_samples}, args.seed)
    print(f"wrote {written} images and {10 ** args.num_digits} class names to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
