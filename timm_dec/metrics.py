"""Local scale consistency metrics: InvE (paper eq. 24), EquE (eq. 23), per-scale accuracy and probability.

Two levels:

* pure functions on tensors (`inv_error_from_probs`, `inv_error`, `equi_error_from_outputs`, `equi_error`,
  `accuracy`, `per_scale_accuracy`, `prob_correct`), differentiable and free of side effects, so a training loop
  can use them as losses (InvL, AugL) and tests can check them against hand-computed values;
* evaluation loops over a model and a dataset (`evaluate_scale_consistency`, `evaluate_equivariance`): batched, on
  any device, with a tqdm progress bar, under ``torch.no_grad()`` with the model in eval mode (restored after).

Units: accuracies are fractions in [0, 1] and InvE / EquE are raw. The paper's tables print accuracy in % and InvE
in units of 1e-2 (Table 2's "InvE(10^-2) = 13.71" is a raw InvE of 0.1371): multiply both by 100 to compare.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._format import format_scale, json_default  # noqa: F401  (re-exported: the metrics' formatting)
from .ops import LAYOUTS, check_knots, monotone_warp, random_knots

__all__ = [
    "inv_error_from_probs", "inv_error", "equi_error_from_outputs", "equi_error", "accuracy", "per_scale_accuracy",
    "prob_correct", "evaluate_scale_consistency", "evaluate_equivariance", "format_scale", "json_default",
    "paired_bootstrap",
]

Warp = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _check_tensor(name: str, x: Any, dims: int, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")
    return x


def _check_labels(labels: Any, num: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}"
                         f" of shape {tuple(getattr(labels, 'shape', ()))}")
    if labels.shape[0] != num:
        raise ValueError(f"{labels.shape[0]} labels for {num} predictions")
    if num and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, {num_classes}) for {num_classes} classes")
    return labels.long()


def _apply_reduction(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        if values.numel() == 0:
            raise ValueError("cannot average over zero samples")
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def inv_error_from_probs(probs: torch.Tensor, probs_variants: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """InvE (paper eq. 24) from class probabilities: squared L2 distance between an image's and its variants'.

    Args:
        probs: (N, K) class probabilities of the N images.
        probs_variants: (N, S, K) class probabilities of S locally scaled variants of each image.
        reduction: ``"mean"`` (over images and variants, eq. 24) or ``"none"``.

    Returns:
        A scalar, or (N, S) per-variant distances ``sum_k (probs[n, k] - probs_variants[n, s, k])**2``; raw values
        (the paper prints 100x this, "InvE(10^-2)").

    Example:
        >>> inv_error_from_probs(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.5, 0.5], [1.0, 0.0]]]))
        tensor(0.2500)
    """
    _check_tensor("probs", probs, 2)
    _check_tensor("probs_variants", probs_variants, 3)
    if probs_variants.shape[0] != probs.shape[0] or probs_variants.shape[2] != probs.shape[1]:
        raise ValueError(f"probs_variants must have shape (N, S, K) = ({probs.shape[0]}, S, {probs.shape[1]}), got "
                         f"{tuple(probs_variants.shape)}")
    if probs_variants.shape[1] == 0:
        raise ValueError("probs_variants has no variants (S = 0)")
    return _apply_reduction((probs.unsqueeze(1) - probs_variants).pow(2).sum(-1), reduction)


def inv_error(logits: torch.Tensor, logits_variants: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """InvE (paper eq. 24) from logits: `inv_error_from_probs` of their softmax (computed in float32 or better).

    Args:
        logits: (N, K) logits of the N images.
        logits_variants: (N, S, K) logits of S locally scaled variants of each image.
        reduction: ``"mean"`` or ``"none"`` ((N, S) distances).

    Returns:
        Scalar InvE, raw (x100 for the paper's units), or (N, S).
    """
    _check_tensor("logits", logits, 2)
    _check_tensor("logits_variants", logits_variants, 3)
    dtype = torch.promote_types(torch.promote_types(logits.dtype, logits_variants.dtype), torch.float32)
    return inv_error_from_probs(logits.to(dtype).softmax(-1), logits_variants.to(dtype).softmax(-1), reduction)


def equi_error_from_outputs(
        warped_outputs: torch.Tensor,
        outputs_of_warped: torch.Tensor,
        channel_dim: int = 1,
        reduction: str = "mean",
) -> torch.Tensor:
    """EquE (paper eq. 23) from the two sides: S(M(I)) against M(S(I)).

    Per image: the squared L2 norm over channels at each position, averaged over positions (for one channel this is
    the mean squared error of the map); then averaged over images with ``reduction="mean"``.

    Args:
        warped_outputs: (N, ...) S(M(I; Phi)), any dense layout.
        outputs_of_warped: M(S(I; Phi)), the same shape.
        channel_dim: the channel dimension (1 for NCHW, -1 for NHWC and tokens).
        reduction: ``"mean"`` or ``"none"`` ((N,) per image).

    Returns:
        Scalar EquE (raw), or (N,).
    """
    for name, t in (("warped_outputs", warped_outputs), ("outputs_of_warped", outputs_of_warped)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            raise ValueError(f"{name} must be a floating point tensor (N, ...) with >= 2 dims")
    if warped_outputs.shape != outputs_of_warped.shape:
        raise ValueError(f"shapes differ: S(M(I)) is {tuple(warped_outputs.shape)}, M(S(I)) is "
                         f"{tuple(outputs_of_warped.shape)}")
    if not -warped_outputs.dim() < channel_dim < warped_outputs.dim() or channel_dim % warped_outputs.dim() == 0:
        raise ValueError(f"channel_dim {channel_dim} must name a non-batch dim of a {warped_outputs.dim()}-dim tensor")
    dtype = torch.promote_types(warped_outputs.dtype, torch.float32)
    sq = (warped_outputs.to(dtype) - outputs_of_warped.to(dtype)).pow(2).sum(channel_dim)
    return _apply_reduction(sq.flatten(1).mean(1), reduction)


def equi_error(
        model: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        warp: Warp,
        *,
        layout: str = "nchw",
        num_prefix_tokens: int = 0,
        grid_size: Optional[Union[int, Sequence[int]]] = None,
        reduction: str = "mean",
) -> torch.Tensor:
    """EquE (paper eq. 23) of a dense model for one warp per image: ||S(M(I); Phi) - M(S(I; Phi))||^2.

    Runs the model twice (on I and on S(I)) with gradients as the caller has them, so it can serve as a loss (the
    paper's AugL). With knots, S samples at l^{-1}(p) (`monotone_warp(..., inverse=True)`), the same action as
    `RandomMonotoneScale`; the same knots warp the input image and the output map, whatever their resolutions.

    Args:
        model: maps (N, C, H, W) images to dense outputs in ``layout``.
        images: (N, C, H, W) images.
        warp: (N, 2, G+1, G+1) knots (one warp per image), or a callable applied to the images and to the outputs.
        layout: the outputs' layout, ``"nchw"``, ``"nhwc"`` or ``"tokens"`` (B, P + H*W, C).
        num_prefix_tokens: P prefix tokens of token outputs; they are not warped and not compared.
        grid_size: (H, W) of token outputs when not square.
        reduction: ``"mean"`` or ``"none"`` ((N,)).

    Returns:
        Scalar EquE (raw) or (N,); 0 for an exactly equivariant model, e.g. any per-pixel linear map.
    """
    _check_tensor("images", images, 4)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(warp, torch.Tensor):
        check_knots(warp, batch=images.shape[0])
        knots = warp.to(images.device)

        def warp_in(t: torch.Tensor) -> torch.Tensor:
            return monotone_warp(t, knots, inverse=True, check=False)

        def warp_out(t: torch.Tensor) -> torch.Tensor:
            return monotone_warp(t, knots, inverse=True, layout=layout, grid_size=grid_size,
                                 num_prefix_tokens=num_prefix_tokens, check=False)
    elif callable(warp):
        warp_in = warp_out = warp
    else:
        raise TypeError(f"warp must be a knots tensor or a callable, got {type(warp).__name__}")
    outputs = model(images)
    outputs_of_warped = model(warp_in(images))
    if not isinstance(outputs, torch.Tensor) or not isinstance(outputs_of_warped, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(outputs).__name__}")
    warped_outputs = warp_out(outputs)
    if layout == "tokens":
        warped_outputs = warped_outputs[:, num_prefix_tokens:]
        outputs_of_warped = outputs_of_warped[:, num_prefix_tokens:]
    return equi_error_from_outputs(warped_outputs, outputs_of_warped, 1 if layout == "nchw" else -1, reduction)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy, a fraction: logits (N, K), labels (N,) -> scalar."""
    _check_tensor("logits", logits, 2)
    labels = _check_labels(labels, logits.shape[0], logits.shape[1])
    return _apply_reduction((logits.argmax(-1) == labels).float(), "mean")


def per_scale_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy per scale (paper Tables 3 / 6), fractions.

    Args:
        logits: (N, S, K) logits of each image at S scales (or scale bins).
        labels: (N,) labels.

    Returns:
        (S,) accuracy at each scale.
    """
    _check_tensor("logits", logits, 3)
    labels = _check_labels(labels, logits.shape[0], logits.shape[2])
    if logits.shape[0] == 0:
        raise ValueError("cannot average over zero samples")
    return (logits.argmax(-1) == labels.unsqueeze(1)).float().mean(0)


def prob_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the correct class (paper Fig. 8).

    Args:
        logits: (N, K) or (N, S, K) logits.
        labels: (N,) labels.

    Returns:
        (N,) or (N, S) probability of ``labels`` (float32 or better).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating point (N, K) or (N, S, K) tensor, got "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    labels = _check_labels(labels, logits.shape[0], logits.shape[-1])
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
    index = labels.view(-1, *([1] * (logits.dim() - 1))).expand(*logits.shape[:-1], 1)
    return probs.gather(-1, index).squeeze(-1)


def _item_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, index))


class _ScaleVariantsView(Dataset):
    """Item i of a dataset with ``variants``: (image, variants at scales, variants in scale bins, label)."""

    def __init__(self, dataset: Any, indices: Sequence[int], scales: list, bins: list, seed: int) -> None:
        self.dataset, self.indices, self.scales, self.bins, self.seed = dataset, indices, scales, bins, seed
        self.parts = int(getattr(dataset, "num_digits", 1))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        i = self.indices[k]
        image, label = self.dataset[i]
        variants, v_label = self.dataset.variants(i, self.scales)
        if int(v_label) != int(label):
            raise ValueError(f"dataset.variants({i}) changed the label from {label} to {v_label}")
        in_bins = torch.empty(0)
        if self.bins:
            rng = _item_rng(self.seed, i)
            drawn = [tuple(float(s) for s in rng.uniform(lo, hi, size=self.parts)) for lo, hi in self.bins]
            in_bins, _ = self.dataset.variants(i, drawn if self.parts > 1 else [s[0] for s in drawn])
        return image, variants, in_bins, int(label)


def _model_device(model: Callable, device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _forward_logits(model: Callable, x: torch.Tensor, chunk: int) -> torch.Tensor:
    outs = []
    for start in range(0, x.shape[0], chunk):
        out = model(x[start:start + chunk])
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise TypeError(f"model must return (B, num_classes) logits, got "
                            f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        outs.append(out.float())
    return torch.cat(outs)


class _EvalMode:
    """Context: ``model.eval()`` and ``torch.no_grad()``, restoring the model's training flag after."""

    def __init__(self, model: Callable) -> None:
        self.model, self.was_training, self.no_grad = model, None, torch.no_grad()

    def __enter__(self) -> None:
        if isinstance(self.model, nn.Module):
            self.was_training = self.model.training
            self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        if self.was_training:
            self.model.train()


def _normalise_scales(scales: Sequence[Any]) -> list:
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty list of floats or per-part tuples, got {scales!r}")
    return [tuple(float(v) for v in s) if isinstance(s, Sequence) else float(s) for s in scales]


def _normalise_bins(scale_bins: Optional[Sequence[Sequence[float]]]) -> list[tuple[float, float]]:
    bins = []
    for b in scale_bins or ():
        if not isinstance(b, Sequence) or len(b) != 2:
            raise ValueError(f"each scale bin must be a (low, high) pair, got {b!r}")
        lo, hi = float(b[0]), float(b[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"a scale bin needs 0 < low <= high, got {b!r}")
        bins.append((lo, hi))
    return bins


def _check_indices(indices: Optional[Sequence[int]], size: int) -> list[int]:
    if indices is None:
        return list(range(size))
    out = [int(i) for i in indices]
    bad = [i for i in out if not 0 <= i < size]
    if bad:
        raise ValueError(f"indices {bad[:5]} are out of range for a dataset of {size} items")
    return out


def evaluate_scale_consistency(
        model: Callable[[torch.Tensor], torch.Tensor],
        dataset: Any,
        scales: Sequence[Union[float, Sequence[float]]],
        *,
        scale_bins: Optional[Sequence[Sequence[float]]] = None,
        batch_size: int = 32,
        device: Optional[Union[str, torch.device]] = None,
        num_workers: int = 0,
        indices: Optional[Sequence[int]] = None,
        seed: int = 0,
        progress: bool = True,
        return_per_sample: bool = False,
) -> dict[str, Any]:
    """Accuracy, InvE, per-scale accuracy and per-scale probability of the correct class of a classifier.

    For every image I of ``dataset`` (``dataset[i] -> (image (C, H, W), label)``), its locally scaled variants come
    from ``dataset.variants(i, scales) -> (images (S, C, H, W), label)`` (see `LocallyScaledDigits.variants`; a
    user dataset with masks can implement it with `rescale_object`). InvE (eq. 24) compares the softmax of I with
    that of each variant. ``scale_bins`` adds Table 3-style bins: per image and bin, one variant whose per-part
    scales (``dataset.num_digits`` parts, else 1) are drawn uniformly in the bin from ``default_rng((seed, i))``.

    Args:
        model: classifier returning (B, K) logits; an ``nn.Module`` is put in eval mode (and restored after).
        dataset: indexable dataset with ``variants``.
        scales: S scales, floats or per-part tuples, as ``dataset.variants`` takes them.
        scale_bins: optional (low, high) scale ranges.
        batch_size: images per model call (also dataset items per loader batch).
        device: where the model runs; default the model's parameters' device.
        num_workers: DataLoader workers rendering the variants.
        indices: evaluate only these dataset items (e.g. a few for a Fig. 8 plot).
        seed: seed of the scale-bin draws.
        progress: show a tqdm progress bar.
        return_per_sample: also return per-image tensors (CPU).

    Returns:
        ``acc`` (fraction, on the dataset's own images), ``inv_e`` (raw; x100 for the paper's 1e-2 units),
        ``per_scale_acc`` and ``per_scale_prob_correct`` (lists of S), ``scales``, ``num_samples``; with bins
        ``scale_bins`` and ``per_bin_acc``; with ``return_per_sample`` ``prob_correct`` (N, S), ``inv_e_per_sample``
        (N,) and ``correct`` (N,) tensors.
    """
    if not hasattr(dataset, "variants"):
        raise TypeError(f"dataset {type(dataset).__name__} has no variants(index, scales) method")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    scale_list, bins = _normalise_scales(scales), _normalise_bins(scale_bins)
    view = _ScaleVariantsView(dataset, _check_indices(indices, len(dataset)), scale_list, bins, seed)
    if len(view) == 0:
        raise ValueError("no samples to evaluate")
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    dev = _model_device(model, device)
    correct, scale_correct, inv_e, probs, bin_correct = [], [], [], [], []
    with _EvalMode(model):
        for image, variants, in_bins, label in tqdm(loader, desc="scale consistency", disable=not progress):
            b, s = variants.shape[:2]
            label = label.to(dev)
            logits = _forward_logits(model, image.to(dev), batch_size)
            logits_v = _forward_logits(model, variants.flatten(0, 1).to(dev), batch_size).view(b, s, -1)
            correct.append((logits.argmax(-1) == label).cpu())
            scale_correct.append((logits_v.argmax(-1) == label.unsqueeze(1)).cpu())
            inv_e.append(inv_error(logits, logits_v, reduction="none").cpu())
            probs.append(prob_correct(logits_v, label).cpu())
            if bins:
                logits_b = _forward_logits(model, in_bins.flatten(0, 1).to(dev), batch_size).view(b, len(bins), -1)
                bin_correct.append((logits_b.argmax(-1) == label.unsqueeze(1)).cpu())
    correct_t, probs_t, inv_e_t = torch.cat(correct), torch.cat(probs), torch.cat(inv_e).mean(1)
    result: dict[str, Any] = {
        "acc": correct_t.float().mean().item(),
        "inv_e": inv_e_t.mean().item(),
        "per_scale_acc": torch.cat(scale_correct).float().mean(0).tolist(),
        "per_scale_prob_correct": probs_t.mean(0).tolist(),
        "scales": [list(s) if isinstance(s, tuple) else s for s in scale_list],
        "num_samples": len(view),
    }
    if bins:
        result["scale_bins"] = [list(b) for b in bins]
        result["per_bin_acc"] = torch.cat(bin_correct).float().mean(0).tolist()
    if return_per_sample:
        result.update(prob_correct=probs_t, inv_e_per_sample=inv_e_t, correct=correct_t)
    return result


class _WarpView(Dataset):
    """Item i of a dataset: (image, (W, 2, G+1, G+1) random knots from a generator seeded with (seed, i))."""

    def __init__(self, dataset: Any, indices: Sequence[int], num_warps: int, grid: int, strength: float,
                 seed: int) -> None:
        self.dataset, self.indices = dataset, indices
        self.num_warps, self.grid, self.strength, self.seed = num_warps, grid, strength, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.indices[k]
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        gen = torch.Generator().manual_seed(int(_item_rng(self.seed, i).integers(0, 2 ** 63 - 1)))
        return image, random_knots(self.num_warps, self.grid, self.strength, generator=gen)


def evaluate_equivariance(
        model: Callable[[torch.Tensor], torch.Tensor],
        dataset: Any,
        *,
        strength: float = 0.3,
        grid: int = 4,
        num_warps: int = 1,
        layout: str = "nchw",
        num_prefix_tokens: int = 0,
        grid_size: Optional[Union[int, Sequence[int]]] = None,
        batch_size: int = 32,
        device: Optional[Union[str, torch.device]] = None,
        num_workers: int = 0,
        indices: Optional[Sequence[int]] = None,
        seed: int = 0,
        progress: bool = True,
) -> float:
    """EquE (paper eq. 23) of a dense model over a dataset, with random monotone scalings.

    Each image gets ``num_warps`` warps from `random_knots` (``strength``, ``grid``), drawn from a generator seeded
    with (seed, index), so the result does not depend on batch size or workers. The paper's expectation over a
    uniform Phi ~ Omega is estimated with these draws from `random_knots`' distribution instead.

    Args:
        model: maps (B, C, H, W) images to dense outputs in ``layout`` (e.g. a segmentation model, or
            ``lambda x: vit.forward_features(x)`` with ``layout="tokens"``); an ``nn.Module`` is put in eval mode.
        dataset: ``dataset[i]`` is an image (C, H, W) or a tuple whose first entry is one.
        strength, grid: the random warps' distribution (see `random_knots`).
        num_warps: warps per image.
        layout, num_prefix_tokens, grid_size: the outputs' layout (see `equi_error`).
        batch_size: dataset items per batch (the model sees batch_size * num_warps images at once).
        device: where the model runs; default the model's parameters' device.
        num_workers: DataLoader workers.
        indices: evaluate only these items.
        seed: seed of the warps.
        progress: show a tqdm progress bar.

    Returns:
        EquE, raw: the mean over images and warps of the per-image error of `equi_error_from_outputs`.
    """
    num_warps = int(num_warps)
    if num_warps < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    random_knots(0, grid, strength)  # checks grid and strength here rather than inside a worker
    view = _WarpView(dataset, _check_indices(indices, len(dataset)), num_warps, grid, strength, seed)
    if len(view) == 0:
        raise ValueError("no samples to evaluate")
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    dev = _model_device(model, device)
    total, count = 0.0, 0
    with _EvalMode(model):
        for images, knots in tqdm(loader, desc="equivariance", disable=not progress):
            images = images.to(dev).repeat_interleave(num_warps, dim=0)
            err = equi_error(model, images, knots.flatten(0, 1).to(dev), layout=layout,
                             num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, reduction="none")
            total += err.sum().item()
            count += err.numel()
    return total / count


def paired_bootstrap(
        values_a: torch.Tensor,
        values_b: torch.Tensor,
        *,
        resamples: int = 10000,
        confidence: float = 0.95,
        seed: int = 0,
) -> dict[str, float]:
    """Difference of means of two methods scored on the same items, with a paired bootstrap percentile interval.

    Args:
        values_a: (N,) per-item scores of method A (e.g. 0/1 correctness).
        values_b: (N,) the same items' scores of method B.
        resamples: bootstrap resamples of the N items (drawn with replacement, the same items for both methods).
        confidence: two-sided coverage of the interval.
        seed: seed of the resampling.

    Returns:
        ``diff`` (mean of A - B), ``low`` and ``high`` (the interval), ``n``, ``resamples``, ``confidence``.

    Example:
        >>> a, b = torch.tensor([1, 1, 1, 0] * 50), torch.tensor([1, 0, 1, 0] * 50)
        >>> r = paired_bootstrap(a, b, resamples=2000)
        >>> round(r["diff"], 2), r["low"] > 0
        (0.25, True)
    """
    a = _check_tensor("values_a", values_a, 1, floating=False).double()
    b = _check_tensor("values_b", values_b, 1, floating=False).double()
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(
            f"need two equally long score vectors of >= 2 items, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"confidence must be in (0, 1) and resamples >= 1, got {confidence}, {resamples}")
    diff = a - b
    gen = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 x N indices
        count = min(1000, resamples - start)
        idx = torch.randint(0, diff.numel(), (count, diff.numel()), generator=gen)
        means[start:start + count] = diff[idx].mean(dim=1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return dict(diff=diff.mean().item(), low=low, high=high, n=int(diff.numel()), resamples=resamples,
                confidence=confidence)
