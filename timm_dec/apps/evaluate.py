"""``timm-dec eval``: accuracy, InvE (paper eq. 24) and per-scale accuracy of ANY timm model.

The model comes from ``--model`` and ``--checkpoint`` through the one loader, as ``timm-dec push`` reads them
(`timm_dec.checkpoint.load_model`): a ``local-dir:``/``hf-hub:`` name loads the saved model with its weights;
a checkpoint (``.safetensors`` from the demo, timm's ``train.py`` ``.pth.tar``, a ``timm_dec.finetune`` checkpoint
folder, a ``save_pretrained`` folder) rebuilds the architecture and ``create_model`` kwargs it records, and
``--model-kwargs`` DEC options that contradict them are an error; a plain name builds ``timm.create_model(name)``
(with ``--pretrained``, timm's weights). ``--canon`` wraps the model with the Canon baseline
(`timm_dec.baselines.InputCanonicalizer`) before the checkpoint is loaded. Loading is strict, except that a base
model's checkpoint loads into its ``*_dec`` model with the DEC at the identity. Images are normalised with the
model's timm data config (mean, std). The data must fit the model: ``--num-digits`` or the class folders of
``folder:`` must give the model's class count, else the run stops before it starts.

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

Digits settings not given as flags are what the checkpoint records (the demo, quickstart, ``timm_dec.finetune`` and
``save_pretrained`` record the settings they trained with), else derived from the model (see `resolve_digits`).

Results: a printed table and, with ``--results-file`` (alias ``--json``), a JSON file with ``acc`` and
``per_scale_acc`` (fractions), ``inv_e`` (raw; the paper prints 100x it), ``per_scale_prob_correct``, ``scales``,
the data and model description and, for ``*_dec`` models, DEC solver statistics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.utils import ParseKwargs
from torch.utils.data import Dataset

from .._argcheck import check_checkpoint_path, check_output_file
from .._format import format_per_scale_table, format_scale, format_table, json_default
from ..baselines import InputCanonicalizer
from ..checkpoint import load_model, read_record, read_saved, record_wrapper
from ..data import ImageFolderVariants, LocallyScaledDigits
from ..dec import solver_stats
from ..metrics import evaluate_scale_consistency
from ._common import (
    bins_arg,
    check_model_build,
    check_number,
    check_scale_range,
    normalize_transform,
    parse_bins,
    parse_scales,
    resolve_device,
    scales_arg,
)
from .heads import LABEL_RULES, DigitwiseClassifier, num_outputs

__all__ = [
    "DEFAULT_SCALES", "parse_scales", "parse_bins", "normalize_transform", "digits_dataset", "data_dataset",
    "create_eval_model", "build_eval_model", "evaluate_model", "format_table", "format_per_scale_table",
    "resolve_device", "resolve_digits", "check_class_count", "add_arguments", "run",
]

DEFAULT_SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
# digits defaults when neither a flag nor the checkpoint says otherwise (the paper's Sec. 5.2 setting)
DEFAULT_NUM_DIGITS = 3
DEFAULT_CANVAS = 224
DEFAULT_SCALE_RANGE = (0.4, 2.0)


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


def default_num_digits(num_classes: int) -> Optional[int]:
    """k when ``num_classes`` is 10**k (k = 1..4), else None."""
    for k in range(1, 5):
        if num_classes == 10 ** k:
            return k
    return None


def resolve_digits(args: argparse.Namespace, recorded: Mapping[str, Any], num_classes: Optional[int],
                   input_size: Optional[int]) -> dict[str, Any]:
    """The digits settings of an evaluation: each flag given, else what the checkpoint records (the settings it
    was trained with: the demo, quickstart, `timm_dec.finetune` and `timm_dec.hub.save_pretrained` record them),
    else: digits from the model's class count (10**k), canvas the model's input size, digit size the dataset's
    default (``canvas // 8``), per-digit scales 0.4-2.0."""
    num_digits = args.num_digits or recorded.get("num_digits") or (
        default_num_digits(num_classes) if num_classes else None) or DEFAULT_NUM_DIGITS
    canvas = args.canvas or recorded.get("canvas") or input_size or DEFAULT_CANVAS
    digit_size = args.digit_size
    if digit_size is None and recorded.get("canvas", canvas) == canvas:
        digit_size = recorded.get("digit_size")
    scale_range = tuple(args.scale_range or recorded.get("scale_range") or DEFAULT_SCALE_RANGE)
    return dict(num_digits=int(num_digits), canvas=int(canvas), digit_size=digit_size, scale_range=scale_range)


def data_dataset(args: argparse.Namespace, chans: int, digits: Optional[Mapping[str, Any]] = None,
                 img_size: Optional[int] = None) -> Dataset:
    """The evaluation dataset that ``--data`` names (see the module doc), without a transform yet.

    Args:
        digits: the digits settings (`resolve_digits`); default from the flags alone.
        img_size: folder data: the image side, unless ``--img-size`` is given; default the model's ``img_size`` in
            ``--model-kwargs`` or 224.
    """
    if args.data in ("digits", "mnist"):
        d = digits or resolve_digits(args, {}, None, None)
        return digits_dataset(
            "test", args.num_samples, num_digits=d["num_digits"], canvas=d["canvas"],
            scale_range=tuple(d["scale_range"]), digit_size=d["digit_size"], seed=args.data_seed, data_cfg=None,
            chans=chans, source=args.data, root=args.mnist_root)
    if args.data.startswith("folder:"):
        size = args.img_size or img_size or int(dict(args.model_kwargs).get("img_size", 224))
        return ImageFolderVariants(args.data[len("folder:"):], (size, size), chans, None, args.num_samples,
                                   args.data_seed)
    raise ValueError(f"--data must be 'digits', 'mnist' or 'folder:PATH', got {args.data!r}")


def _data_num_classes(args: argparse.Namespace, recorded: Mapping[str, Any]) -> int:
    """The class count ``--data`` implies, for a model built without a recorded one."""
    if args.data in ("digits", "mnist"):
        return num_outputs(args.label or recorded.get("label") or "number",
                           int(args.num_digits or recorded.get("num_digits") or DEFAULT_NUM_DIGITS))
    if args.data.startswith("folder:"):
        return data_dataset(args, 3, img_size=8).num_classes
    raise ValueError(f"--data must be 'digits', 'mnist' or 'folder:PATH', got {args.data!r}")


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of the model (of the model inside a Canon wrapper): the input size it was built with
    (``img_size``), its mean and std."""
    inner = model.model if isinstance(model, InputCanonicalizer) else model
    resolve = getattr(timm.data, "resolve_input_data_config", None)  # timm >= 1.0.20 reads the built size
    return dict(resolve(inner) if resolve is not None else resolve_data_config({}, model=inner))


def check_class_count(model: nn.Module, dataset: Dataset, data: str) -> None:
    """An error, before anything runs, when the data's labels do not fit the model's classifier."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None and hasattr(model, "model"):
        num_classes = getattr(model.model, "num_classes", None)
    if num_classes is None:
        return
    if isinstance(dataset, (LocallyScaledDigits, argparse.Namespace)):  # the digits (or their settings)
        if 10 ** dataset.num_digits != num_classes:
            hint = default_num_digits(num_classes)
            raise ValueError(
                f"{dataset.num_digits}-digit numbers have {10 ** dataset.num_digits} classes, but the model has "
                f"{num_classes}: " + (f"use --num-digits {hint}" if hint else "this model was not trained on the "
                                      "digits; evaluate it on --data folder:PATH"))
    elif dataset.num_classes != num_classes:
        raise ValueError(
            f"{data} has {dataset.num_classes} class folders, but the model has {num_classes} classes: a label "
            f"index means a different class unless the folder has the model's classes "
            f"({'fewer' if dataset.num_classes < num_classes else 'more'} class folders than classes)")


def create_eval_model(
        name: Optional[str],
        *,
        num_classes: Optional[int] = None,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        canon: Optional[Mapping[str, Any]] = None,
        pretrained: bool = False,
        in_chans: Optional[int] = None,
        use_ema: bool = False,
) -> nn.Module:
    """The model ``timm-dec eval`` evaluates (see `build_eval_model`), without the recorded data settings."""
    return build_eval_model(name, num_classes=num_classes, checkpoint=checkpoint, model_kwargs=model_kwargs,
                            canon=canon, pretrained=pretrained, in_chans=in_chans, use_ema=use_ema)[0]


def build_eval_model(
        name: Optional[str],
        *,
        num_classes: Optional[Union[int, Callable[[Mapping[str, Any]], int]]] = None,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        canon: Optional[Mapping[str, Any]] = None,
        pretrained: bool = False,
        in_chans: Optional[int] = None,
        use_ema: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to evaluate, in eval mode on the CPU, and the data settings its weights record.

    Args:
        name: any timm model name, base or ``*_dec``; or ``local-dir:FOLDER`` / ``hf-hub:ORG/NAME`` of a saved model,
            whose weights are loaded (with its DEC options; ``model_kwargs`` may not contradict them). May be None
            with a ``checkpoint`` that records its architecture.
        num_classes: classifier size of a model whose checkpoint does not record it (an int, or a function of the
            recorded data settings).
        checkpoint: a training checkpoint, read as ``timm-dec push`` reads it (`timm_dec.checkpoint.load_model`:
            timm ``.pth.tar``, ``timm_dec.finetune`` folder, ``save_pretrained`` folder, ``.safetensors``): the
            model is rebuilt with the options it records, and ``dec_*`` options that contradict them are an error.
            Loaded strictly, except that a base checkpoint may leave a ``*_dec`` model's DEC at the identity.
        model_kwargs: more ``create_model`` keyword arguments (``img_size``, ``dec_grid``, ...).
        canon: `InputCanonicalizer` options; wraps the model with Canon (the checkpoint then holds the wrapper's
            weights) when not None.
        pretrained: load timm's pretrained weights (needs the Hub or its cache) for a plain name.
        in_chans: image channels, unless the checkpoint or ``model_kwargs`` set them.
        use_ema: take timm's ``state_dict_ema`` from a ``.pth.tar`` (an error for any other source: it has no EMA
            weights).
    """
    kwargs = dict(model_kwargs or {})
    def with_canon(m: nn.Module) -> nn.Module:
        return InputCanonicalizer(m, in_chans=int(getattr(m, "in_chans", None) or in_chans or 3), **canon)

    wrap = with_canon if canon is not None else None
    if use_ema and not checkpoint:
        raise ValueError(f"--use-ema: {name or 'the model'} has no EMA weights (only a timm train.py .pth.tar "
                         f"--checkpoint keeps them); leave --use-ema out")
    if name and name.startswith(("local-dir:", "hf-hub:")):
        if checkpoint:
            raise ValueError(f"--model {name} names saved weights, which --checkpoint {checkpoint} would replace; "
                             f"give one of them")
        if canon is not None:
            raise ValueError(f"--canon wraps {name} in an untrained Canon; evaluate a trained Canon checkpoint with "
                             f"--checkpoint")
        saved = read_saved(name)
        return load_model(saved, model_kwargs=kwargs).eval(), dict(saved.data)
    if checkpoint:
        saved = read_saved(checkpoint, use_ema=use_ema)
        canon_weights = saved.wrapper == "InputCanonicalizer" or any(k.startswith("energy.") for k in saved.state_dict)
        if canon is not None and not canon_weights:
            holds = "a DEC model" if any(".dec." in f".{k}" for k in saved.state_dict) else "a model without Canon"
            arch = saved.architecture or "architecture not recorded"
            raise ValueError(f"--canon: {checkpoint} holds {holds} ({arch}), not a Canon-wrapped one (timm-dec demo's "
                             f"canon checkpoint); leave --canon out")
        if "num_classes" not in saved.model_kwargs and "num_classes" not in kwargs and num_classes is not None:
            kwargs["num_classes"] = num_classes(saved.data) if callable(num_classes) else num_classes
        if "in_chans" not in saved.model_kwargs and in_chans is not None:
            kwargs.setdefault("in_chans", in_chans)
        model = load_model(saved, model_name=name, model_kwargs=kwargs, allow_base=True, wrap=wrap)
        return model.eval(), dict(saved.data)
    if not name:
        raise ValueError("--model is required (any timm model name, or local-dir:FOLDER / hf-hub:ORG/NAME)")
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes({}) if callable(num_classes) else num_classes)
    if in_chans is not None:
        kwargs.setdefault("in_chans", in_chans)
    check_model_build(name, kwargs)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if wrap is not None:
        model = wrap(model)
    return model.eval(), {}


class _Precision(nn.Module):
    """Runs a model under autocast (``--amp``) and/or with channels_last inputs, returning float32 logits."""

    def __init__(self, model: nn.Module, amp_dtype: Optional[torch.dtype], channels_last: bool) -> None:
        super().__init__()
        self.model, self.amp_dtype, self.channels_last = model, amp_dtype, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is None:
            return self.model(x)
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
            return self.model(x).float()


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
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
) -> dict[str, Any]:
    """`timm_dec.metrics.evaluate_scale_consistency`, plus DEC solver statistics for a ``*_dec`` model.

    Args:
        amp_dtype: run the model under ``torch.autocast`` with this dtype (``--amp``).
        channels_last: model and inputs in channels_last memory format (``--channels-last``).

    Returns:
        The metrics dict (``acc``, ``inv_e``, ``per_scale_acc``, ``per_scale_prob_correct``, ``scales``,
        ``num_samples``, and ``per_bin_acc`` with bins), with ``dec_solver`` (``mean_iterations``, ``iterations_sd``,
        ``iteration_counts`` (samples per number of evaluations of H), ``fallbacks``, ``samples``,
        ``not_converged``, ``mean_residual`` and ``max_residual`` at exit) when the model ran a DEC.
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = _Precision(model, amp_dtype, channels_last) if (amp_dtype is not None or channels_last) else model
    with solver_stats() as stats:
        result = evaluate_scale_consistency(
            runner, dataset, list(scales), scale_bins=scale_bins or None, batch_size=batch_size, device=device,
            num_workers=num_workers, seed=seed, progress=progress, return_per_sample=return_per_sample)
    if len(stats):
        result["dec_solver"] = dict(mean_iterations=stats.mean_iterations, iterations_sd=stats.iterations_sd,
                                    iteration_counts=stats.iteration_counts, fallbacks=stats.total_fallbacks,
                                    samples=stats.total_samples, not_converged=stats.total_not_converged,
                                    mean_residual=stats.mean_residual,
                                    max_residual=max(r.max_residual for r in stats.records))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``timm-dec eval`` options (named as in timm's ``validate.py`` where they overlap)."""
    parser.add_argument("--model", default=None,
                        help="any timm model name, base or *_dec; or local-dir:FOLDER / hf-hub:ORG/NAME of a saved "
                             "model, whose weights are loaded; default the architecture --checkpoint records")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="weights, read as timm-dec push reads them: .safetensors (timm-dec demo), timm train.py "
                             ".pth.tar, timm_dec.finetune checkpoint folder or save_pretrained folder; the model is "
                             "rebuilt with the options it records")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="more create_model kwargs, as in timm's train.py (img_size=64 patch_size=8 dec_grid=4); "
                             "DEC options that contradict the checkpoint's are an error")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from timm's pretrained weights (needs the Hub); implied by local-dir:/hf-hub:")
    parser.add_argument("--use-ema", action="store_true", help="a timm .pth.tar: evaluate its EMA weights")
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
    parser.add_argument("--scales", type=scales_arg, default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
                        metavar="S,S,...", help="comma-separated scales of the variants")
    parser.add_argument("--scale-bins", type=bins_arg, default=None, metavar="LOW-HIGH,...",
                        help="digits: Table 3 bins (per-digit scales drawn in each bin), e.g. 0.4-1.0,1.0-2.0")
    parser.add_argument("--num-samples", type=int, default=500, help="test images evaluated")
    parser.add_argument("-b", "--batch-size", type=int, default=64, metavar="N", help="images per model call")
    parser.add_argument("-j", "--workers", type=int, default=0, metavar="N",
                        help="DataLoader workers rendering the variants")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda if available, else cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision (torch.autocast)")
    parser.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                        help="autocast dtype with --amp (float16 runs as bfloat16 on a CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory layout")
    parser.add_argument("--results-file", "--json", dest="results_file", default=None, metavar="FILE",
                        help="write the results to this JSON file (--json is an alias), in an existing folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scale-bin draws and random variants")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    digits = parser.add_argument_group(
        "digits data", "each default: what the checkpoint or saved model records (the settings it was trained "
                       "with), else the value named")
    digits.add_argument("--num-digits", type=int, default=None,
                        help="digits per number; else k for a model with 10**k classes, else 3")
    digits.add_argument("--canvas", type=int, default=None, help="image side in pixels; else the model's input size")
    digits.add_argument("--digit-size", type=int, default=None, help="digit side at scale 1; else canvas // 8")
    digits.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="per-digit scale range of the test images; else 0.4 2.0")
    digits.add_argument("--label", choices=LABEL_RULES, default=None,
                        help="number: one class per number (10**k outputs); digits: 10 outputs per digit, scored on "
                             "the whole number (timm_dec.heads); else what the checkpoint records, else number")
    digits.add_argument("--data-seed", type=int, default=0, help="dataset seed")
    digits.add_argument("--mnist-root", default=None, help="torchvision MNIST root for --data mnist")
    parser.add_argument("--img-size", type=int, default=None, help="folder data: image side; default the model's")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    for name in ("num_digits", "canvas", "digit_size", "img_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (args.data in ("digits", "mnist") or args.data.startswith("folder:")):
        raise ValueError(f"--data must be 'digits', 'mnist' or 'folder:PATH', got {args.data!r}")
    if args.scale_range is not None:
        check_scale_range(*args.scale_range)
    if args.canon:
        for flag, value, low in (("--canon-warps", args.canon_warps, 1), ("--canon-grid", args.canon_grid, 1),
                                 ("--canon-energy-size", args.canon_energy_size, 4)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if min(args.canon_energy_widths) < 1:
            raise ValueError(f"--canon-energy-widths must be two positive channel counts, got "
                             f"{tuple(args.canon_energy_widths)}")
        check_number("--canon-strength", args.canon_strength, strict=False)
    if args.checkpoint:
        check_checkpoint_path(args.checkpoint)
        _refuse_segmenter(args.checkpoint)
    if args.results_file:  # a file in an existing folder, writable: checked before any work; no folder is created
        check_output_file(args.results_file, "--results-file")


def _refuse_segmenter(path: str) -> None:
    """A checkpoint of ``timm-dec segment`` (a segmenter, not a classifier; its record's ``timm_dec.wrapper`` says
    so) is said to be one, with what reads it."""
    try:
        record = read_record(path)
    except Exception:  # noqa: BLE001  (not a valid file: the checkpoint reader says so)
        return
    wrapper = record_wrapper(record)
    if wrapper.get("task") == "segmentation":
        loader = wrapper.get("load_with") or "timm_dec.apps.segment.load_checkpoint"
        raise ValueError(f"--checkpoint {path} is a timm-dec segment checkpoint (a segmenter, not a classifier), which "
                         f"timm-dec eval does not evaluate; load it with {loader}(PATH) "
                         f"(its numbers are in the run's summary.json)")


def _check_label(args: argparse.Namespace, recorded: Mapping[str, Any]) -> None:
    """``--label`` may not contradict the label rule the checkpoint was trained with."""
    trained = recorded.get("label")
    if args.label and trained and args.label != trained:
        outputs = "10 outputs per digit" if trained == "digits" else "one class per number"
        raise ValueError(f"--label {args.label}: the checkpoint was trained with label {trained!r} ({outputs}); "
                         f"leave --label out (the checkpoint's rule is used) or give --label {trained}")


def run(args: argparse.Namespace) -> int:
    """Evaluate one model; print the tables and write ``--results-file``."""
    _check_args(args)
    device = resolve_device(args.device)
    model_kwargs = dict(args.model_kwargs)
    chans = int(model_kwargs.get("in_chans", 3))
    canon = None
    if args.canon:
        canon = dict(num_warps=args.canon_warps, grid=args.canon_grid, strength=args.canon_strength,
                     seed=args.canon_seed, energy_size=args.canon_energy_size,
                     energy_widths=tuple(args.canon_energy_widths))
    model, recorded = build_eval_model(
        args.model, num_classes=lambda rec: _data_num_classes(args, rec), checkpoint=args.checkpoint,
        model_kwargs=model_kwargs, canon=canon, pretrained=args.pretrained, in_chans=chans, use_ema=args.use_ema)
    data_cfg = model_data_config(model)
    chans = int(data_cfg["input_size"][0])
    size = int(data_cfg["input_size"][-1])
    digits = None
    base_model = model.model if canon is not None else model
    if args.data in ("digits", "mnist"):
        _check_label(args, recorded)
        label = args.label or recorded.get("label") or "number"
        digits = resolve_digits(args, recorded, None if label == "digits" else getattr(model, "num_classes", None),
                                size)
        digits["label"] = label
        if label == "digits":
            model = DigitwiseClassifier(model, digits["num_digits"])
        check_class_count(model, argparse.Namespace(num_digits=digits["num_digits"]), args.data)
    dataset = data_dataset(args, chans, digits, img_size=size)
    check_class_count(model, dataset, args.data)
    dataset.transform = normalize_transform(data_cfg, chans)
    bins = args.scale_bins if args.data in ("digits", "mnist") else None
    amp_dtype = None
    if args.amp:
        amp_dtype = torch.bfloat16 if (args.amp_dtype == "bfloat16" or device.type == "cpu") else torch.float16
    result = evaluate_model(model, dataset, args.scales, scale_bins=bins, batch_size=args.batch_size, device=device,
                            num_workers=args.workers, seed=args.seed, progress=not args.no_progress,
                            amp_dtype=amp_dtype, channels_last=args.channels_last)
    model_name = args.model or base_model.pretrained_cfg.get("architecture")
    name = model_name + (" + Canon" if args.canon else "")
    what = args.data if digits is None else (
        f"{args.data} ({digits['num_digits']}-digit numbers, {digits['canvas']} px, digit size "
        f"{digits['digit_size'] or digits['canvas'] // 8} px)")
    print(f"\n{name} on {what} ({result['num_samples']} test images, variants at scales "
          f"{', '.join(format_scale(s) for s in result['scales'])})")
    print(format_table({name: result}))
    print()
    print(format_per_scale_table({name: result}))
    if "per_bin_acc" in result:
        print()
        print(format_per_scale_table({name: result}, key="per_bin_acc"))
    if "dec_solver" in result:
        s = result["dec_solver"]
        print(f"\nDEC solver: {s['mean_iterations']:.2f} iterations per sample on average "
              f"(sd {s['iterations_sd']:.2f}), {s['fallbacks']} fallbacks")
    if args.results_file:
        variants = getattr(dataset, "variant_kind", "digits_rescaled")
        out = dict(result, model=model_name, checkpoint=args.checkpoint, model_kwargs=model_kwargs,
                   canon=canon, data=args.data, digits=digits, variants=variants, device=str(device),
                   amp=str(amp_dtype).replace("torch.", "") if amp_dtype else None)
        Path(args.results_file).write_text(json.dumps(out, indent=2, default=json_default) + "\n", encoding="utf-8")
        print(f"\nwrote {args.results_file}", file=sys.stderr)
    return 0
