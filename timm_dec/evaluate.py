"""``timm-dec eval``: accuracy, InvE (paper eq. 24) and per-scale accuracy of ANY timm model.

The model is built by name with ``timm.create_model`` (base models and ``*_dec`` models alike), optionally wrapped
with the Canon baseline (`timm_dec.baselines.InputCanonicalizer`), and loaded from ``--checkpoint`` with timm's
``load_state_dict`` (``.safetensors`` files are read with safetensors; other files with
``torch.load(weights_only=True)``) and `timm_dec.models.load_dec_state_dict`: strictly, except that a base model's
checkpoint loads into its ``*_dec`` model with the DEC at the identity. Images are normalised with the model's timm
data config (mean, std).

Data (``--data``):

* ``digits`` (default, offline): `timm_dec.data.LocallyScaledDigits`, test split. Variant ``s`` renders the same
  number from the same source digits with every digit at scale ``s``; ``--scale-bins`` adds Table 3-style bins
  (per-digit scales drawn uniformly in each bin).
* ``folder:PATH``: an ImageFolder-style directory, ``PATH/<class>/<image>`` (`timm_dec.data.ImageFolderVariants`).
  If ``PATH/masks/<class>/<stem>.png`` (object masks, non-zero = object) and ``PATH/backgrounds/<class>/<stem>.<ext>``
  (the image with the object inpainted away) exist, variant ``s`` is `timm_dec.data.rescale_object` with factor
  ``s`` (paper Sec. 5.3). Without ``masks/``, variant ``s`` is a random monotone scaling
  (`timm_dec.data.RandomMonotoneScale`) of strength ``|ln s|``, drawn from a generator seeded with (seed, image,
  variant): local scale factors of about s^{+-1}.

Results: a printed table and, with ``--json``, a JSON file with ``acc`` and ``per_scale_acc`` (fractions), ``inv_e``
(raw; the paper prints 100x it), ``per_scale_prob_correct``, ``scales``, the data and model description and, for
``*_dec`` models, DEC solver statistics.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import load_state_dict
from timm.utils import ParseKwargs
from torch.utils.data import Dataset

from .baselines import InputCanonicalizer
from .data import ImageFolderVariants, LocallyScaledDigits
from .dec import solver_stats
from .metrics import evaluate_scale_consistency, format_scale, json_default
from .models import load_dec_state_dict

__all__ = [
    "DEFAULT_SCALES", "parse_scales", "parse_bins", "normalize_transform", "digits_dataset", "data_dataset",
    "create_eval_model", "evaluate_model", "format_table", "format_per_scale_table", "add_arguments", "run",
]

DEFAULT_SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)


def parse_scales(text: str) -> list[float]:
    """``"0.7,0.8,1.0"`` -> [0.7, 0.8, 1.0]; every scale a finite number > 0."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"scales must be comma-separated numbers, e.g. 0.7,0.85,1.0, got {text!r}") from None
    if not scales:
        raise ValueError(f"no scales in {text!r}")
    bad = [s for s in scales if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"scales must be finite and > 0, got {bad}")
    return scales


def parse_bins(text: str) -> list[tuple[float, float]]:
    """``"0.4-1.0,1.0-2.0"`` -> [(0.4, 1.0), (1.0, 2.0)]; each bin 0 < low <= high."""
    bins = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pieces = part.split("-")
        try:
            low, high = (float(v) for v in pieces)
        except ValueError:
            raise ValueError(f"a scale bin is LOW-HIGH, e.g. 0.4-1.0; got {part!r} in {text!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"a scale bin needs 0 < LOW <= HIGH, got {part!r}")
        bins.append((low, high))
    if not bins:
        raise ValueError(f"no scale bins in {text!r}")
    return bins


def normalize_transform(data_cfg: Mapping[str, Any], chans: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(C, H, W) or (B, C, H, W) images in [0, 1] -> normalised with the data config's ``mean`` and ``std``.

    A 1-channel model with a 3-channel config uses the channel means.
    """
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32)
    if mean.numel() != chans:
        mean, std = mean.mean().expand(chans), std.mean().expand(chans)
    mean, std = mean.view(-1, 1, 1).clone(), std.view(-1, 1, 1).clone()

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    return normalize


def digits_dataset(
        split: str,
        num_samples: int,
        *,
        num_digits: int,
        canvas: int,
        scale_range: tuple[float, float],
        digit_size: Optional[int],
        seed: int,
        data_cfg: Optional[Mapping[str, Any]],
        chans: int = 3,
        source: str = "digits",
        root: Optional[str] = None,
) -> Dataset:
    """`LocallyScaledDigits`, normalised with a timm data config (``mean``, ``std``) unless it is None."""
    return LocallyScaledDigits(
        split, num_samples=num_samples, num_digits=num_digits, canvas=canvas, scale_range=scale_range,
        digit_size=digit_size, source=source, root=root, seed=seed, channels=chans,
        transform=None if data_cfg is None else normalize_transform(data_cfg, chans))


def data_dataset(args: argparse.Namespace, chans: int) -> Dataset:
    """The evaluation dataset that ``--data`` names (see the module doc), without a transform yet.

    The folder image size is ``--img-size`` or, by default, the model's ``img_size`` in ``--model-kwargs`` or 224.
    """
    if args.data in ("digits", "mnist"):
        return digits_dataset(
            "test", args.num_samples, num_digits=args.num_digits, canvas=args.canvas,
            scale_range=tuple(args.scale_range), digit_size=args.digit_size, seed=args.data_seed, data_cfg=None,
            chans=chans, source=args.data, root=args.mnist_root)
    if args.data.startswith("folder:"):
        size = args.img_size or int(dict(args.model_kwargs).get("img_size", 224))
        return ImageFolderVariants(args.data[len("folder:"):], (size, size), chans, None, args.num_samples,
                                   args.data_seed)
    raise ValueError(f"--data must be 'digits', 'mnist' or 'folder:PATH', got {args.data!r}")


def create_eval_model(
        name: str,
        *,
        num_classes: int,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        canon: Optional[Mapping[str, Any]] = None,
        pretrained: bool = False,
        in_chans: int = 3,
) -> nn.Module:
    """``timm.create_model(name)``, optionally wrapped with Canon, then the checkpoint.

    Args:
        name: any timm model name, base or ``*_dec``.
        num_classes: classifier size, unless ``model_kwargs`` sets it.
        checkpoint: weights for the model (or for the Canon wrapper when ``canon`` is given), read with timm's
            ``load_state_dict`` (safetensors, or ``torch.load(weights_only=True)``; EMA weights preferred). Loaded
            strictly, except that a base checkpoint may leave a ``*_dec`` model's DEC modules at the identity.
        model_kwargs: more ``create_model`` keyword arguments (``img_size``, ``dec_grid``, ...).
        canon: `InputCanonicalizer` options; wraps the model with Canon when not None.
        pretrained: load timm's pretrained weights first (needs the Hub or its cache).
        in_chans: image channels.

    Returns:
        The model, in eval mode, on the CPU.
    """
    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_chans", in_chans)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if canon is not None:
        model = InputCanonicalizer(model, in_chans=kwargs["in_chans"], **canon)
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint!r} does not exist")
        try:
            kept = load_dec_state_dict(model, load_state_dict(checkpoint), source=f"checkpoint {checkpoint!r}",
                                       target=f"{name}{' + Canon' if canon is not None else ''}")
        except ValueError as e:
            raise ValueError(f"{e} (check --model, --model-kwargs and --canon)") from None
        if kept:
            print(f"note: {checkpoint} has no DEC weights (a base checkpoint); the DEC modules start at the "
                  f"identity", file=sys.stderr)
    return model.eval()


def evaluate_model(
        model: nn.Module,
        dataset: Dataset,
        scales: Sequence[float],
        *,
        scale_bins: Optional[Sequence[tuple[float, float]]] = None,
        batch_size: int = 64,
        device: Union[str, torch.device] = "cpu",
        num_workers: int = 0,
        seed: int = 0,
        progress: bool = True,
        return_per_sample: bool = False,
) -> dict[str, Any]:
    """`timm_dec.metrics.evaluate_scale_consistency`, plus DEC solver statistics for a ``*_dec`` model.

    Returns:
        The metrics dict (``acc``, ``inv_e``, ``per_scale_acc``, ``per_scale_prob_correct``, ``scales``,
        ``num_samples``, and ``per_bin_acc`` with bins), with ``dec_solver`` (``mean_iterations``, ``fallbacks``,
        ``samples``) when the model ran a DEC.
    """
    model = model.to(device)
    with solver_stats() as stats:
        result = evaluate_scale_consistency(
            model, dataset, list(scales), scale_bins=scale_bins or None, batch_size=batch_size, device=device,
            num_workers=num_workers, seed=seed, progress=progress, return_per_sample=return_per_sample)
    if len(stats):
        result["dec_solver"] = dict(mean_iterations=stats.mean_iterations, fallbacks=stats.total_fallbacks,
                                    samples=stats.total_samples)
    return result


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Paper Table 2 layout: one row per method, Acc (%) and InvE (1e-2, i.e. 100 x the raw value)."""
    width = max(8, *(len(n) for n in results))
    lines = [f"{'Method':<{width}}  {'Acc (%)':>8}  {'InvE (1e-2)':>11}"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {100 * r['acc']:>8.2f}  {100 * r['inv_e']:>11.2f}")
    return "\n".join(lines)


def format_per_scale_table(results: Mapping[str, Mapping[str, Any]], key: str = "per_scale_acc") -> str:
    """Paper Table 3 layout: accuracy (%) per scale (or per bin with ``key="per_bin_acc"``) and their mean +- std."""
    first = next(iter(results.values()))
    cols = ([f"[{lo:g},{hi:g}]" for lo, hi in first["scale_bins"]] if key == "per_bin_acc"
            else [format_scale(s) for s in first["scales"]])
    width = max(8, *(len(n) for n in results))
    cw = max(6, *(len(c) for c in cols))
    lines = [f"{'Scale':<{width}}  " + "  ".join(f"{c:>{cw}}" for c in cols) + f"  {'Overall':>14}"]
    for name, r in results.items():
        accs = [100 * a for a in r[key]]
        spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        overall = f"{statistics.fmean(accs):.2f} ± {spread:.2f}"
        lines.append(f"{name:<{width}}  " + "  ".join(f"{a:>{cw}.2f}" for a in accs) + f"  {overall:>14}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``timm-dec eval`` options."""
    parser.add_argument("--model", required=True, help="any timm model name, base or *_dec")
    parser.add_argument("--checkpoint", default=None, help="weights: .safetensors or a timm .pth/.pth.tar checkpoint")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="more create_model kwargs, as in timm's train.py (img_size=64 patch_size=8 dec_grid=4)")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from timm's pretrained weights (needs the Hub)")
    parser.add_argument("--canon", action="store_true",
                        help="wrap the model with the Canon baseline (input canonicalizer) before loading --checkpoint")
    parser.add_argument("--canon-warps", type=int, default=64, help="Canon: warps in the bank, identity included")
    parser.add_argument("--canon-grid", type=int, default=4, help="Canon: grid G of the warps")
    parser.add_argument("--canon-strength", type=float, default=0.5, help="Canon: spread of the warps")
    parser.add_argument("--canon-seed", type=int, default=0, help="Canon: seed of the warp bank")
    parser.add_argument("--canon-energy-size", type=int, default=32, help="Canon: side at which energies are scored")
    parser.add_argument("--canon-energy-widths", type=int, nargs=2, default=(32, 64), metavar=("C1", "C2"),
                        help="Canon: channels of the energy CNN")
    parser.add_argument("--data", default="digits",
                        help="'digits' (offline, scikit-learn), 'mnist' (needs --mnist-root) or 'folder:PATH'")
    parser.add_argument("--scales", type=parse_scales, default=list(DEFAULT_SCALES),
                        help="comma-separated scales of the variants (default 0.7,0.8,...,1.3)")
    parser.add_argument("--scale-bins", type=parse_bins, default=None,
                        help="digits: Table 3 bins LOW-HIGH,... (per-digit scales drawn in each bin), "
                             "e.g. 0.4-1.0,1.0-2.0")
    parser.add_argument("--num-samples", type=int, default=500, help="test images evaluated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers rendering the variants")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scale-bin draws and random variants")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    digits = parser.add_argument_group("digits data (the defaults are the paper's Sec. 5.2 setting)")
    digits.add_argument("--num-digits", type=int, default=3)
    digits.add_argument("--canvas", type=int, default=224, help="image side in pixels")
    digits.add_argument("--digit-size", type=int, default=None, help="digit side at scale 1 (default canvas // 8)")
    digits.add_argument("--scale-range", type=float, nargs=2, default=(0.4, 2.0), metavar=("LOW", "HIGH"),
                        help="per-digit scale range of the test images")
    digits.add_argument("--data-seed", type=int, default=0, help="dataset seed")
    digits.add_argument("--mnist-root", default=None, help="torchvision MNIST root for --data mnist")
    parser.add_argument("--img-size", type=int, default=None, help="folder data: image side (default the model's)")


def run(args: argparse.Namespace) -> int:
    """Evaluate one model; print the tables and write ``--json``."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    model_kwargs = dict(args.model_kwargs)
    chans = int(model_kwargs.get("in_chans", 3))
    dataset = data_dataset(args, chans)
    canon = None
    if args.canon:
        canon = dict(num_warps=args.canon_warps, grid=args.canon_grid, strength=args.canon_strength,
                     seed=args.canon_seed, energy_size=args.canon_energy_size,
                     energy_widths=tuple(args.canon_energy_widths))
    model = create_eval_model(args.model, num_classes=dataset.num_classes, checkpoint=args.checkpoint,
                              model_kwargs=model_kwargs, canon=canon, pretrained=args.pretrained, in_chans=chans)
    dataset.transform = normalize_transform(resolve_data_config({}, model=model), chans)
    bins = args.scale_bins if args.data in ("digits", "mnist") else None
    result = evaluate_model(model, dataset, args.scales, scale_bins=bins, batch_size=args.batch_size, device=device,
                            num_workers=args.workers, seed=args.seed, progress=not args.no_progress)
    name = args.model + (" + Canon" if args.canon else "")
    print(f"\n{name} on {args.data} ({result['num_samples']} test images, variants at scales "
          f"{', '.join(format_scale(s) for s in result['scales'])})")
    print(format_table({name: result}))
    print()
    print(format_per_scale_table({name: result}))
    if "per_bin_acc" in result:
        print()
        print(format_per_scale_table({name: result}, key="per_bin_acc"))
    if "dec_solver" in result:
        s = result["dec_solver"]
        print(f"\nDEC solver: {s['mean_iterations']:.2f} iterations per sample on average, {s['fallbacks']} fallbacks")
    if args.json:
        variants = getattr(dataset, "variant_kind", "digits_rescaled")
        out = dict(result, model=args.model, checkpoint=args.checkpoint, model_kwargs=model_kwargs,
                   canon=canon, data=args.data, variants=variants, device=str(device))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=json_default) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0
