"""Publishing ``*_dec`` models: a Hub folder with a model card, the push, and loading back.

A saved folder is `timm_dec.checkpoint.save_model`'s, which is what timm's own Hub loader reads:

* ``config.json``: the record (`timm_dec.checkpoint.model_record`): timm's Hub config -- ``architecture`` (the
  ``*_dec`` name), ``num_classes``, ``num_features``, ``label_names``, ``pretrained_cfg`` (preprocessing), and
  ``model_args``, which ``timm.create_model`` passes back to the entrypoint as keyword arguments; the DEC options are
  written there as ``dec_*`` arguments, so loading rebuilds the same model -- and a ``timm_dec`` section (version,
  data settings, metrics);
* ``model.safetensors``: the full state dict, DEC parameters under ``dec.``;
* ``README.md``: the card template (``timm_dec/templates/model_card.md``, package data) rendered with the model's
  name, options and measured metrics, which also go into the card's ``model-index`` metadata.

After ``import timm_dec``, ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` or
``timm.create_model("local-dir:FOLDER", pretrained=True)`` gives the saved model back; `load_pretrained` is
`timm_dec.checkpoint.load_model` (the one loader, which checks the folder first, with clear errors) by its Hub-facing
name. ``timm-dec push`` (`timm_dec.apps.push`) turns any checkpoint that loader reads into such a folder and uploads
it with these functions. Nothing here unpickles arbitrary objects.
"""
from __future__ import annotations

import importlib.resources
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import timm
from torch import nn

from . import __version__
from ._format import format_scale, jsonable

# the saved format, its writer and its loader live in checkpoint; hub adds the card, the push and the Hub-facing names
from .checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_pretrained,
    hub_reachable,
    load_model,
    model_record,
    save_model,
)
from .models import INPUT, DECModelMixin, base_model_name, dec_options

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "README_NAME", "MODEL_CARD_TEMPLATE", "hub_architecture",
    "normalize_metrics", "render_model_card", "save_pretrained", "push_to_hub", "check_pretrained", "load_pretrained",
    "prepare_output_folder", "check_repo_id", "hub_reachable",
]

README_NAME = "README.md"
# The card template ships inside the package (package data), so an installed wheel renders cards too.
MODEL_CARD_TEMPLATE = importlib.resources.files(__package__) / "templates" / "model_card.md"

PathLike = Union[str, os.PathLike]


def _dec_cfg(model: nn.Module) -> Any:
    """The frozen DEC config of an adapted model (`timm_dec.models.AdaptConfig`), or None for a model without
    DEC."""
    if isinstance(model, DECModelMixin):
        return model.dec_cfg
    return None


def hub_architecture(model: nn.Module) -> str:
    """The registered ``*_dec`` name that rebuilds ``model`` with ``timm.create_model``.

    A model from ``timm.create_model("<name>_dec")`` keeps its name; a model adapted in place with `timm_dec.adapt`
    names its base architecture, and ``<base>_dec`` is used when it is registered.

    Raises:
        TypeError: the model has no DEC, or is not a timm model (no ``pretrained_cfg``).
        ValueError: no registered ``*_dec`` name matches it.
    """
    if _dec_cfg(model) is None:
        raise TypeError(
            f"{type(model).__name__} has no DEC: publish a model from a '*_dec' name or from timm_dec.adapt(model)")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise TypeError(
            f"{type(model).__name__} has no pretrained_cfg['architecture']: create it with timm.create_model")
    if not arch.endswith("_dec"):
        arch = f"{arch}_dec"
    if not timm.is_model(arch):
        raise ValueError(f"no registered timm_dec architecture {arch!r} rebuilds this model")
    return arch


# ---------------------------------------------------------------------------------------------------------------------
# metrics and the model card
# ---------------------------------------------------------------------------------------------------------------------

_METRIC_KEYS = ("acc", "inv_e", "per_scale_acc", "scales", "num_samples", "scale_bins", "per_bin_acc", "dataset")


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"metrics[{what!r}] must be a fraction in [0, 1], got {value!r}")
    return float(value)


def normalize_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Check measured metrics and keep the ones the card shows.

    Args:
        metrics: the dict of `timm_dec.metrics.evaluate_scale_consistency` -- ``acc`` and ``per_scale_acc`` as
            fractions, ``inv_e`` raw, ``scales``, ``num_samples``, optional ``scale_bins`` / ``per_bin_acc`` -- plus
            an optional ``dataset`` name (or ``data``, as ``timm-dec eval --json`` writes it). Other keys (model
            names, solver statistics) are ignored.

    Returns:
        The checked subset, JSON-serialisable.

    Raises:
        TypeError: ``metrics`` is not a mapping.
        ValueError: ``acc`` or ``inv_e`` missing, a value out of range, or lists of different lengths.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a mapping like evaluate_scale_consistency returns, got {type(metrics).__name__}")
    missing = [k for k in ("acc", "inv_e") if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}; expected the keys of evaluate_scale_consistency: {_METRIC_KEYS}")
    out: dict[str, Any] = {"acc": _fraction(metrics["acc"], "acc")}
    inv_e = metrics["inv_e"]
    if isinstance(inv_e, bool) or not isinstance(inv_e, (int, float)) or not 0.0 <= float(inv_e) <= 2.0:
        raise ValueError(f"metrics['inv_e'] must be a raw InvE in [0, 2], got {inv_e!r}")
    out["inv_e"] = float(inv_e)
    for values_key, labels_key in (("per_scale_acc", "scales"), ("per_bin_acc", "scale_bins")):
        if values_key not in metrics:
            continue
        values, labels = metrics[values_key], metrics.get(labels_key)
        if not isinstance(values, Sequence) or not isinstance(labels, Sequence) or len(values) != len(labels):
            raise ValueError(f"metrics[{values_key!r}] needs a {labels_key!r} list of the same length, got "
                             f"{values!r} and {labels!r}")
        out[values_key] = [_fraction(v, values_key) for v in values]
        out[labels_key] = jsonable(list(labels), f"metrics[{labels_key!r}]")
    if "num_samples" in metrics:
        n = metrics["num_samples"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"metrics['num_samples'] must be a positive int, got {n!r}")
        out["num_samples"] = n
    # `timm-dec eval --json` names its data under "data" ("digits", "folder:PATH")
    dataset = metrics.get("dataset", metrics.get("data"))
    if dataset is not None:
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"metrics['dataset'] must be a non-empty string, got {dataset!r}")
        out["dataset"] = "locally scaled digits (timm_dec.data)" if dataset == "digits" else dataset
    return out


def _card_metrics(metrics: Mapping[str, Any], dataset: Optional[str]) -> dict[str, Any]:
    """Metrics formatted for the card template: percentages with two decimals, InvE in 1e-2."""
    return {
        "dataset": metrics.get("dataset") or dataset or "the evaluation set",
        "num_samples": metrics.get("num_samples", "?"),
        "accuracy": f"{100 * metrics['acc']:.2f}",
        "inv_e": f"{100 * metrics['inv_e']:.2f}",
        "per_scale": [(format_scale(s), f"{100 * a:.2f}") for s, a in
                      zip(metrics.get("scales", []), metrics.get("per_scale_acc", []))],
        "per_bin": [(f"[{lo:g}, {hi:g}]", f"{100 * a:.2f}") for (lo, hi), a in
                    zip(metrics.get("scale_bins", []), metrics.get("per_bin_acc", []))],
    }


def _card_dec_prose(cfg: Any, unit: str) -> dict[str, str]:
    """The card's words for where the model's DECs sit, its update form and its backward (its own options)."""
    indices = [str(b) for b in cfg.blocks if b != INPUT]
    where = ["its patch embedding (the input image is canonicalised)"] if INPUT in cfg.blocks else []
    if indices:
        where.append(f"{unit}{'s' if len(indices) > 1 else ''} {', '.join(indices)}")
    o = cfg.options
    update = ("knots = H(S^-1(F; knots))" if o.update == "absolute" else "knots = knots + H(S^-1(F; knots))")
    backward = (f"implicit differentiation (an adjoint fixed point, up to {o.backward_max_iter} iterations)"
                if o.backward == "implicit" else
                f"phantom gradients ({o.phantom_steps} unrolled step{'s' if o.phantom_steps > 1 else ''} from the "
                f"equilibrium)")
    solver = {"anderson": "Anderson acceleration", "fixed_point": "plain fixed-point iteration"}.get(o.solver, o.solver)
    damping = f", damped by {o.beta:g}" if o.beta < 1 else ""
    if o.jac_reg > 0:
        share = f", on {o.jac_reg_fraction:.0%} of each batch" if o.jac_reg_fraction < 1 else ""
        backward += f"; trained with a Jacobian regulariser of the damped map (weight {o.jac_reg:g}{share})"
    return dict(dec_where=" and ".join(where), dec_update=f"{o.update} update, `{update}`",
                dec_solve=f"{solver}{damping} (up to {o.max_iter} iterations, relative tolerance {o.tol:g})",
                dec_backward=backward)


def render_model_card(
        model: nn.Module,
        *,
        repo_id: Optional[str] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        dataset: Optional[str] = None,
        datasets: Sequence[str] = (),
        training: Optional[Mapping[str, Any]] = None,
        license: Optional[str] = None,
        template: Optional[PathLike] = None,
) -> str:
    """The README.md of a ``*_dec`` model: the `MODEL_CARD_TEMPLATE` rendered, with ``model-index`` metadata.

    Args:
        model: a ``*_dec`` model.
        repo_id: ``ORG/NAME`` shown in the loading snippet and used as the model's name; default the architecture.
        metrics: measured metrics (see `normalize_metrics`), shown in the evaluation tables and the metadata.
        dataset: human-readable name of the fine-tuning / evaluation data.
        datasets: Hub dataset ids for the metadata header.
        training: the settings this checkpoint was trained with (shown as a table).
        license: the card's license; default the base weights' ``pretrained_cfg["license"]``, else apache-2.0.
        template: a Jinja2 card template; default `MODEL_CARD_TEMPLATE`.

    Returns:
        The card text, whose metadata header parses with ``huggingface_hub.ModelCard``.
    """
    import jinja2
    from huggingface_hub import EvalResult, ModelCard

    template_path = Path(template) if template is not None else MODEL_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model card template {template_path} not found; pass template= (timm_dec/templates/model_card.md)")
    arch = hub_architecture(model)
    cfg = _dec_cfg(model)
    checked = normalize_metrics(metrics) if metrics is not None else None
    name = repo_id.split("/")[-1] if repo_id else arch
    num_params = sum(p.numel() for p in model.parameters())
    dec_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("dec."))
    input_size = tuple(timm.data.resolve_input_data_config(model)["input_size"])
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(template_path.read_text(encoding="utf-8")).render(
        model_name=name,
        repo_id=repo_id or "ORG/NAME",
        architecture=arch,
        base_architecture=base_model_name(arch),
        license=license or model.pretrained_cfg.get("license") or "apache-2.0",
        datasets=list(datasets),
        dataset=dataset,
        num_params=f"{num_params / 1e6:.2f}",
        dec_params=f"{dec_params / 1e6:.3f}",
        num_classes=model.num_classes,
        input_size=" x ".join(str(s) for s in input_size),
        **_card_dec_prose(cfg, getattr(model, "dec_unit_name", "block")),
        dec_grid=cfg.options.grid,
        dec_mode=cfg.mode,
        dec_options=list(dec_options(model).items()),
        timm_dec_version=__version__,
        training=[(k, v) for k, v in training.items()] if training else None,
        metrics=_card_metrics(checked, dataset) if checked else None,
    )
    card = ModelCard(text)
    if checked:
        eval_dataset = checked.get("dataset") or dataset or "evaluation set"
        slug = re.sub(r"[^a-z0-9]+", "-", eval_dataset.lower()).strip("-") or "evaluation"
        common = dict(task_type="image-classification", dataset_type=slug, dataset_name=eval_dataset)
        card.data.model_name = name
        card.data.eval_results = [
            EvalResult(metric_type="accuracy", metric_name="Accuracy (%)", metric_value=round(100 * checked["acc"], 4),
                       **common),
            EvalResult(metric_type="inv_e", metric_name="InvE (1e-2)", metric_value=round(100 * checked["inv_e"], 4),
                       **common),
        ]
    return str(card)


# ---------------------------------------------------------------------------------------------------------------------
# saving and pushing
# ---------------------------------------------------------------------------------------------------------------------

def save_pretrained(
        model: nn.Module,
        folder: PathLike,
        *,
        metrics: Optional[Mapping[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        label_descriptions: Optional[Mapping[str, str]] = None,
        repo_id: Optional[str] = None,
        dataset: Optional[str] = None,
        datasets: Sequence[str] = (),
        training: Optional[Mapping[str, Any]] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        license: Optional[str] = None,
        card_template: Optional[PathLike] = None,
        data: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a ``*_dec`` model as a Hub folder: ``config.json``, ``model.safetensors`` and a ``README.md`` card.

    The folder is `timm_dec.checkpoint.save_model`'s (the record of `timm_dec.checkpoint.model_record` as
    ``config.json``: timm's Hub config, with every DEC option among its ``model_args`` as ``dec_*`` keyword
    arguments, so ``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds the same model), plus the card.
    Measured ``metrics`` are also kept in ``config.json`` under ``timm_dec.metrics``.

    Args:
        model: a ``*_dec`` model (from a ``*_dec`` name or `timm_dec.adapt`), unwrapped (no DDP wrapper).
        folder: output folder; created if missing. A folder that holds an earlier save has its ``config.json``,
            ``model.safetensors`` and ``README.md`` replaced; one that holds other weight files (``*.bin``,
            ``*.pth``, another ``*.safetensors``, ...) is refused, so no stale weights end up beside the new ones.
        metrics: measured metrics (see `normalize_metrics`), shown in the card.
        label_names: ``num_classes`` class names, written where timm's loader reads them.
        label_descriptions: optional ``{label name: description}``.
        repo_id: the Hub repo the folder is meant for (for the card's loading snippet).
        dataset, datasets, training, license: shown in the card (see `render_model_card`).
        data_config: the preprocessing used in training (``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``), recorded in ``pretrained_cfg``; default the model's own.
        card_template: a Jinja2 card template; default `MODEL_CARD_TEMPLATE`.
        data: the data settings the model was trained with (e.g. ``num_digits``, ``canvas``, ``digit_size``,
            ``scale_range`` of the digits), recorded under ``timm_dec.data`` in ``config.json``; ``timm-dec eval``
            takes its defaults from them.

    Returns:
        The folder.

    Raises:
        TypeError: the model has no DEC or is wrapped.
        ValueError: wrong number of label names, bad metrics, a DEC option that is not JSON data, or a folder
            with other weight files.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("save_pretrained needs the unwrapped model (model.module), not a DataParallel wrapper")
    arch = hub_architecture(model)
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != model.num_classes:
            raise ValueError(f"{len(label_names)} label_names for a model with {model.num_classes} classes")
    checked = normalize_metrics(metrics) if metrics is not None else None
    readme = render_model_card(
        model, repo_id=repo_id, metrics=checked, dataset=dataset, datasets=datasets, training=training,
        license=license, template=card_template)
    record = model_record(model, data=data, metrics=checked, architecture=arch, label_names=label_names,
                          label_descriptions=label_descriptions, data_config=data_config)
    folder = prepare_output_folder(folder, (CONFIG_NAME, WEIGHTS_NAME, README_NAME))
    save_model(model, folder, record=record)
    (folder / README_NAME).write_text(readme, encoding="utf-8")
    return folder


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".tar", ".h5", ".msgpack", ".npz", ".onnx")


def prepare_output_folder(folder: PathLike, names: Sequence[str]) -> Path:
    """Make ``folder`` ready to receive the files ``names``: created if missing; if it exists, the files of those
    names are removed first, and any other weight file in it is an error (stale weights must not sit beside new
    ones: a loader may pick either).

    Raises:
        ValueError: ``folder`` is a file, or holds weight files other than ``names``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {folder} is a file; choose a folder")
    if folder.is_dir():
        stale = sorted(p.name for p in folder.iterdir()
                       if p.name not in names and p.is_file() and p.name.lower().endswith(_WEIGHT_SUFFIXES))
        if stale:
            raise ValueError(
                f"output folder {folder} already holds other weight files ({', '.join(stale)}); they would sit "
                f"beside the new {WEIGHTS_NAME}: choose an empty folder or remove them")
        for name in names:
            if (folder / name).is_file():
                (folder / name).unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_repo_id(repo_id: Any) -> str:
    """``repo_id`` if it looks like ``ORG/NAME``; a ValueError otherwise (checked before anything is written)."""
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"repo_id must look like 'ORG/NAME', got {repo_id!r}")
    return repo_id


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        *,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: str = "Add timm_dec model",
        metrics: Optional[Mapping[str, Any]] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        **save_kwargs: Any,
) -> Any:
    """Save a ``*_dec`` model with `save_pretrained` and upload the folder to the Hub in one commit.

    timm's ``push_to_hf_hub`` is not used as-is: it keeps an existing README.md and writes its generic card, where
    this card carries the DEC options and the measured metrics and is replaced on every push.

    Args:
        model: a ``*_dec`` model.
        repo_id: ``ORG/NAME``; the model repo is created if missing.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token; default the locally saved one.
        commit_message: the commit's summary.
        metrics: measured metrics for the card.
        revision: branch to push to; default the main branch.
        create_pr: open a pull request instead of pushing to the branch.
        **save_kwargs: `save_pretrained` options (``label_names``, ``dataset``, ``training``, ...).

    Returns:
        huggingface_hub's ``CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi(token=token, library_name="timm_dec", library_version=__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo_url.repo_id
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, metrics=metrics, repo_id=repo_id, **save_kwargs)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision, create_pr=create_pr,
            commit_message=commit_message)


# ---------------------------------------------------------------------------------------------------------------------
# checking and loading
# ---------------------------------------------------------------------------------------------------------------------

def load_pretrained(source: PathLike, **kwargs: Any) -> nn.Module:
    """A saved ``*_dec`` model, by its Hub-facing name: `timm_dec.checkpoint.load_model` of ``source``.

    Args:
        source: ``"hf-hub:ORG/NAME"`` (downloads or reads huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` works),
            ``"local-dir:FOLDER"`` or a folder path.
        **kwargs: ``timm.create_model`` kwargs, and ``cache_dir`` (huggingface_hub's cache); DEC options come from
            the config: one given here must equal the saved one, except the solve budget
            (`timm_dec._options.OVERRIDABLE`: ``dec_max_iter``, ``dec_tol``, ...), which may differ (said once, as a
            warning).

    Returns:
        The model, in eval mode, with the saved weights (loaded strictly, from safetensors only).

    Raises:
        DECOptionError: a ``dec_*`` kwarg that shapes or interprets the weights and differs from the saved option.
        OSError: an ``hf-hub:`` model that is not cached, offline (see `timm_dec.checkpoint.saved_folder`).
    """
    cache_dir = kwargs.pop("cache_dir", None)
    return load_model(os.fspath(source), model_kwargs=kwargs, cache_dir=cache_dir)
