"""What `timm_dec.demo` reports: the tables, the paired comparisons with Aug, the evidence that the DEC learned to
canonicalise (solver iterations, the correlation of each digit's scale with the warp's local magnification there),
the figures, and the ``timm-dec eval`` command that re-evaluates a checkpoint."""
from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .._format import format_per_scale_table, format_scale, format_table
from ..data import LocallyScaledDigits
from ..metrics import paired_bootstrap
from ..models import INPUT
from ..ops.folds import local_magnification
from .experiment import BASE, DECS, REFERENCE
from .plots import plot_per_scale, plot_prob_correct, plot_warp_grids
from .presets import dec_kwargs

__all__ = ["eval_command", "paired_rows", "first_dec_knots", "dec_evidence", "tables", "plots"]


def eval_command(cfg: dict[str, Any], method: str, checkpoint: Path) -> str:
    """The ``timm-dec eval`` command line that re-evaluates one demo checkpoint on the demo's test set."""
    model = cfg["model"] + ("_dec" if method in DECS else "")
    kwargs = dict(cfg["model_kwargs"])
    if method in DECS:
        kwargs.update(dec_kwargs(cfg))
    parts = ["timm-dec", "eval", "--model", model, "--checkpoint", str(checkpoint)]
    if kwargs:
        parts += ["--model-kwargs"] + [f"{k}={v!r}".replace(" ", "") for k, v in kwargs.items()]
    if method == "canon":
        parts += ["--canon", "--canon-warps", str(cfg["canon_warps"]), "--canon-strength", f"{cfg['aug_strength']:g}",
                  "--canon-seed", str(cfg["seed"]), "--canon-energy-size", str(cfg["canon_energy_size"]),
                  "--canon-energy-widths", *map(str, cfg["canon_energy_widths"])]
    parts += ["--num-digits", str(cfg["num_digits"]), "--label", cfg["label"], "--canvas", str(cfg["canvas"]),
              "--scale-range", *map(str, cfg["scale_range"]), "--num-samples", str(cfg["test_samples"]),
              "--scales", ",".join(f"{s:g}" for s in cfg["scales"]), "--data-seed", str(cfg["seed"]),
              "--seed", str(cfg["seed"])]
    if cfg["digit_size"] is not None:
        parts += ["--digit-size", str(cfg["digit_size"])]
    if cfg["scale_bins"]:
        parts += ["--scale-bins", ",".join(f"{lo:g}-{hi:g}" for lo, hi in cfg["scale_bins"])]
    return " ".join(shlex.quote(p) for p in parts)


def paired_rows(results: dict[str, dict[str, Any]], seed: int = 0, reference: str = "aug",
                methods: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    """Each method (of ``methods``, default all) against ``reference`` on the same test images: accuracy and InvE
    differences with 95% paired-bootstrap intervals (accuracy in points, InvE in the paper's 1e-2 units), and the
    InvE ratio."""
    ref = results[reference]
    rows = {}
    for method, r in results.items():
        if method == reference or (methods is not None and method not in methods):
            continue
        acc = paired_bootstrap(r["correct"].double(), ref["correct"].double(), seed=seed)
        inv = paired_bootstrap(r["inv_e_per_sample"].double(), ref["inv_e_per_sample"].double(), seed=seed)
        rows[method] = dict(
            acc_points=100 * acc["diff"], acc_low=100 * acc["low"], acc_high=100 * acc["high"],
            inv_e_1e2=100 * inv["diff"], inv_e_low=100 * inv["low"], inv_e_high=100 * inv["high"],
            inv_e_ratio=r["inv_e"] / ref["inv_e"] if ref["inv_e"] > 0 else math.nan, n=acc["n"],
            resamples=acc["resamples"])
    return rows


def first_dec_knots(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Knots that the input DEC (else the first adapted block's DEC) finds for ``x`` (a forward hook, removed after),
    and its position (``"input"`` or the block index)."""
    key = INPUT if INPUT in model.dec else str(min(int(k) for k in model.dec))
    found: list[torch.Tensor] = []
    handle = model.dec[key].register_forward_hook(lambda mod, inp, out: found.append(out.detach()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return found[0], key


def dec_evidence(model: nn.Module, test_set: LocallyScaledDigits, cfg: dict[str, Any],
                 device: torch.device) -> dict[str, Any]:
    """Does the first DEC stretch small digits and squeeze large ones? Per digit of ``stretch_images`` test images:
    its true scale s and the local magnification m of the canonicalisation at the digit's centre (in the coordinates
    of the DEC's map: image pixels for the input DEC, tokens for a block's). Returns the Pearson correlation of
    log s with log m (negative when small digits are enlarged), the least-squares slope of log m on log s (-1 for a
    perfect canonicaliser, which brings every digit to one scale; 0 for none), the mean m for the smallest and the
    largest third of scales, and the number of digits."""
    n = min(cfg["stretch_images"], len(test_set))
    if n == 0:
        return {}
    scales, mags = [], []
    for start in range(0, n, cfg["eval_batch"]):
        idx = list(range(start, min(n, start + cfg["eval_batch"])))
        x = torch.stack([test_set[i][0] for i in idx]).to(device)
        knots, position = first_dec_knots(model, x)
        patch = 1 if position == INPUT else int(cfg["model_kwargs"].get("patch_size", 16))
        side = cfg["canvas"] // patch
        centres = []
        for i in idx:
            sample = test_set.describe(i)
            boxes = test_set.digit_boxes(sample.scales)
            # pixel box centre -> token index (token j covers pixels [j p, (j+1) p)) -> align_corners coordinate
            centres.append([[((left + size / 2) / patch - 0.5) / max(side - 1, 1),
                             ((top + size / 2) / patch - 0.5) / max(side - 1, 1)] for left, top, size in boxes])
            scales.extend(sample.scales)
        pts = torch.tensor(centres, dtype=torch.float64).clamp(0, 1)
        mags.append(local_magnification(knots.cpu(), pts).flatten())
    log_s = torch.tensor(scales, dtype=torch.float64).log()
    log_m = torch.cat(mags).log()
    pearson = torch.corrcoef(torch.stack((log_s, log_m)))[0, 1].item()
    centred = log_s - log_s.mean()
    slope = (centred * (log_m - log_m.mean())).sum() / centred.pow(2).sum().clamp_min(1e-300)
    order = log_s.argsort()
    third = max(1, len(order) // 3)
    return dict(pearson_log_scale_log_magnification=pearson, slope_log_magnification_log_scale=slope.item(),
                digits=len(order),
                mean_magnification_small=log_m[order[:third]].exp().mean().item(),
                mean_magnification_large=log_m[order[-third:]].exp().mean().item(),
                small_scale_max=log_s[order[third - 1]].exp().item(), large_scale_min=log_s[order[-third]].exp().item())


def _paired_table(rows: dict[str, dict[str, Any]], labels: dict[str, str], ref: str, num_test: int) -> str:
    """Rows of `paired_rows` against the method labelled ``ref``, as printed."""
    w = max(8, *(len(labels[m]) for m in rows))
    out = [f"Against {ref} on the same {num_test} test images (95% paired bootstrap intervals):",
           f"{'Method':<{w}}  {'dAcc (pts)':>10}  {'interval':>16}  {'dInvE (1e-2)':>12}  {'interval':>16}  "
           f"{'InvE / ' + ref:>10}"]
    for method, p in rows.items():
        out.append(f"{labels[method]:<{w}}  {p['acc_points']:>+10.2f}  [{p['acc_low']:+6.2f}, {p['acc_high']:+6.2f}]"
                   f"  {p['inv_e_1e2']:>+12.2f}  [{p['inv_e_low']:+6.2f}, {p['inv_e_high']:+6.2f}]"
                   f"  {p['inv_e_ratio']:>10.3f}")
    return "\n".join(out)


def tables(cfg: dict[str, Any], results: dict[str, dict[str, Any]], paired: dict[str, dict[str, Any]],
           evidence: dict[str, Any], labels: dict[str, str], calibration: Optional[dict[str, Any]] = None) -> str:
    """Tables 2 and 3 (per scale, per bin), the paired comparison with Aug, the equal-compute line (from the
    ``calibration`` of Aug+time's steps) and the DEC lines, as printed."""
    labelled = {labels[m]: r for m, r in results.items()}
    num_test = next(iter(results.values()))["num_samples"]
    out = [f"Table 2 style: accuracy and InvE on the test set ({num_test} images; InvE over per-digit scales "
           f"{', '.join(format_scale(s) for s in cfg['scales'])})", format_table(labelled), "",
           "Table 3 style: accuracy (%) per per-digit scale", format_per_scale_table(labelled)]
    if cfg["scale_bins"]:
        out += ["", "Table 3 style: accuracy (%) per scale bin (each digit's scale drawn in the bin)",
                format_per_scale_table(labelled, key="per_bin_acc")]
    against_aug = {m: p for m, p in paired.items() if m in labels}  # (not the *_vs_* pairs)
    against_base = {m: paired[f"{m}_vs_{BASE}"] for m in DECS if f"{m}_vs_{BASE}" in paired}
    for ref, rows in ((REFERENCE, against_aug), (BASE, against_base)):
        if rows:
            out += ["", _paired_table(rows, labels, labels[ref], num_test)]
    control = paired.get("dec_vs_aug_time")
    if control and calibration:
        out += ["", f"Equal compute: DEC against Aug+time (Aug given the DEC's training cost in Aug steps, measured "
                    f"side by side: {calibration['extra_steps']:+d} steps): dAcc {control['acc_points']:+.2f} "
                    f"[{control['acc_low']:+.2f}, {control['acc_high']:+.2f}] pts, InvE ratio "
                    f"{control['inv_e_ratio']:.3f}"]
        if calibration["noisy"]:
            out[-1] += (f" -- NOT an equal-compute figure: the step costs were uncertain by "
                        f"{100 * calibration['uncertainty']:.0f}% (a busy machine)")
    if results.get("dec", {}).get("dec_solver"):
        out += ["", _solver_line(labels["dec"], results["dec"]["dec_solver"], cfg)]
    check = evidence.get("gradient_check")
    if check:
        out += [f"DEC backward against the true gradient (float64, {check['inputs']} test images, a random direction "
                f"in the DEC's parameters; finite differences of equilibria solved to 1e-11, steps "
                f"{', '.join(f'{h:g}' for h in check['steps'])} agreeing to {check['fd_agree']:.1e}): "
                f"{100 * check['error']:.2f}% off as configured ({100 * check['configured']['within_tol']:.0f}% of "
                f"those solves within tol), {100 * check['error_at_equilibrium']:.2f}% at the equilibrium"]
    if "pearson_log_scale_log_magnification" in evidence:
        out += [f"DEC warp at each digit ({evidence['digits']} digits): corr(log scale, log magnification) = "
                f"{evidence['pearson_log_scale_log_magnification']:+.3f}, slope "
                f"{evidence['slope_log_magnification_log_scale']:+.3f}; mean magnification "
                f"{evidence['mean_magnification_small']:.3f} for scales <= {evidence['small_scale_max']:.2f}, "
                f"{evidence['mean_magnification_large']:.3f} for scales >= {evidence['large_scale_min']:.2f}"]
    if results.get("dec_base", {}).get("dec_solver"):
        out += ["", _solver_line(labels["dec_base"], results["dec_base"]["dec_solver"], cfg)]
    return "\n".join(out)


def _solver_line(label: str, solver: dict[str, Any], cfg: dict[str, Any]) -> str:
    spread = ""
    if solver.get("iterations_sd") is not None:  # summaries written before it was recorded have none
        error = solver["iterations_sd"] / math.sqrt(max(1, solver["samples"]))
        spread = f" (sd {solver['iterations_sd']:.2f}, standard error {error:.3f})"
    return (f"{label} solver at test time: {solver['mean_iterations']:.2f} iterations per sample on average{spread} "
            f"(limit {cfg['dec_max_iter']}, tol {cfg['dec_tol']:g}), relative residual at exit "
            f"{solver['mean_residual']:.2e} on average, {solver['max_residual']:.2e} at most; "
            f"{solver['not_converged']} of {solver['samples']} solves above tol "
            f"({100 * (1 - solver['not_converged'] / max(1, solver['samples'])):.2f}% within), "
            f"{solver['fallbacks']} fallbacks")


def plots(out: Path, cfg: dict[str, Any], results: dict[str, dict[str, Any]], curves: dict[str, torch.Tensor],
          dec_model: Optional[nn.Module], test_set: LocallyScaledDigits, normalize: Callable[[torch.Tensor],
          torch.Tensor], device: torch.device, prob_idx: list[int], labels: dict[str, str]) -> list[str]:
    """Per-scale accuracy, probability of the correct class and the learned warp grids; the file names."""
    plot_per_scale(results, out / "per_scale_accuracy.png", labels)
    files = ["per_scale_accuracy.png"]

    def raw(indices: list[int]) -> torch.Tensor:
        return torch.stack([test_set.render(test_set.describe(i).source_indices, test_set.describe(i).scales)
                            for i in indices])

    if prob_idx:
        plot_prob_correct(curves, cfg["prob_scales"], raw(prob_idx), [test_set.describe(i).label for i in prob_idx],
                          out / "prob_correct.png", labels)
        files.append("prob_correct.png")
    if dec_model is not None and cfg["grid_images"] > 0:
        idx = list(range(min(cfg["grid_images"], len(test_set))))
        images = raw(idx)
        knots, position = first_dec_knots(dec_model, normalize(images).to(device))
        names = [f"{test_set.describe(i).label:0{cfg['num_digits']}d} (scales "
                 f"{', '.join(f'{s:.1f}' for s in test_set.describe(i).scales)})" for i in idx]
        where = "the input DEC" if position == INPUT else f"the DEC of block {position}"
        plot_warp_grids(images, knots, names, f"Warps found by {where} (Fig. A2 style): each orange cell is where "
                        f"one canonical cell is sampled from", out / "warp_grids.png")
        files.append("warp_grids.png")
    return files
