"""Issue 24: bad input never costs work or gives a wrong answer -- silent mismatches and API edges of the models and
loaders (checkpoints evaluated or pushed under another architecture, DEC weights of another grid, empty batches,
solve-budget options on load). Offline; tiny models."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from _tiny import SMALL_DEC, SMALL_DEC_KWARGS, logits_of, off_identity, tiny_table

import timm_dec  # noqa: F401
from timm_dec.dec import DEC
from timm_dec.models import DECOptionError

# ---------------------------------------------------------------------------------------------------------------------
# empty batches behave like the base
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, shape, kwargs", [
    ("nchw", (0, 3, 16, 16), dict(input="image")),
    ("tokens", (0, 1 + 16, 8), dict(num_prefix_tokens=1)),
    ("nhwc", (0, 4, 4, 8), {}),
])
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_dec_of_an_empty_batch_is_empty_identity_knots(layout: str, shape: tuple, kwargs: dict,
                                                       backward: str) -> None:
    options = {k: v for k, v in kwargs.items() if k != "num_prefix_tokens"}
    extra = dict(update="residual") if backward == "phantom" else {}
    dec = DEC(shape[1] if layout == "nchw" else shape[-1], grid=3, backward=backward, **SMALL_DEC, **options,
              **extra)
    x = torch.randn(*shape, requires_grad=True)
    prefix = {k: v for k, v in kwargs.items() if k == "num_prefix_tokens"}
    for training in (True, False):  # with grad: no solve, no backward to set up
        dec.train(training)
        assert dec(x, layout=layout, **prefix).shape == (0, 2, 4, 4)
    with torch.no_grad():
        assert dec(x, layout=layout, **prefix).shape == (0, 2, 4, 4)
    with pytest.raises(ValueError, match="expects"):  # the input is still checked
        dec(torch.randn(0, 5, 16, 16), layout="nchw")


def _outcome(fn: Any) -> Any:
    try:
        return tuple(fn().shape)
    except RuntimeError as e:  # timm's own Swin / BEiT / EVA attention cannot reshape an empty batch
        return type(e), str(e)


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "relpos_cls", "swin", "beit"])
def test_empty_batch_behaves_like_the_base(family: str) -> None:
    (base, kwargs, size), = tiny_table(family).values()
    torch.manual_seed(0)
    twin = timm.create_model(f"{base}_dec", dec_blocks=("input", 0, 1), **kwargs, **SMALL_DEC_KWARGS)
    ref = timm.create_model(base, **kwargs)
    x = torch.randn(0, 3, size, size)
    for model in (twin, ref):
        model.eval()
    with torch.no_grad():
        assert _outcome(lambda: twin(x)) == _outcome(lambda: ref(x))
        assert _outcome(lambda: twin.forward_features(x)) == _outcome(lambda: ref.forward_features(x))
    for training in (True, False):  # with grad, in train and eval mode
        twin.train(training)
        ref.train(training)
        xg = x.clone().requires_grad_()
        got, want = _outcome(lambda: twin(xg)), _outcome(lambda: ref(x))
        assert got == want
        if isinstance(got, tuple) and not isinstance(got[0], type):
            twin(xg).sum().backward()


# ---------------------------------------------------------------------------------------------------------------------
# a state dict carries the options that interpret its DEC weights
# ---------------------------------------------------------------------------------------------------------------------

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **SMALL_DEC_KWARGS)


def vit(seed: int = 0, **dec: Any) -> torch.nn.Module:
    """A tiny vit_tiny_dec whose DEC is off the identity (so its weights change the logits)."""
    torch.manual_seed(seed)
    return off_identity(timm.create_model("vit_tiny_patch16_224_dec", **{**VIT, **dec}))


logits = logits_of


def old_format(state: dict) -> dict:
    """A state dict as timm_dec wrote it before the DEC options buffer (``dec.<position>.options``)."""
    return {k: v for k, v in state.items() if not (k.startswith("dec.") and k.endswith(".options"))}


@pytest.mark.parametrize("saved, built, key", [
    (dict(dec_grid=8), dict(dec_grid=4), "dec_grid"),
    (dict(dec_mode="invariant"), dict(dec_mode="equivariant"), "dec_mode"),
    (dict(dec_update="residual", dec_backward="phantom"), dict(dec_backward="phantom"), "dec_update"),
    (dict(dec_act_layer="relu"), {}, "dec_act_layer"),
    (dict(dec_image_size=32), dict(dec_image_size=0), "dec_image_size"),
])
def test_dec_weights_of_other_options_are_refused_on_load(saved: dict, built: dict, key: str, tmp_path: Path) -> None:
    import safetensors.torch

    state = vit(**saved).state_dict()
    target = vit(1, **built)
    pattern = f"{key}=.* contradicts the state dict for dec.input, whose DEC weights were trained with {key}="
    with pytest.raises(DECOptionError, match=pattern):
        timm_dec.load_dec_state_dict(target, state)
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(state, strict=True)
    path = tmp_path / "bare.safetensors"  # no metadata: only the state dict can tell
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(DECOptionError, match=pattern):
        timm.create_model("vit_tiny_patch16_224_dec", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **{**VIT, **built})


def test_a_latent_dec_of_another_grid_is_refused_and_names_its_position() -> None:
    state = vit(dec_blocks=("input", 1), dec_grid=8).state_dict()
    target = vit(dec_blocks=("input", 1), dec_grid=8)
    target.dec["1"] = type(target.dec["1"])(32, target.dec["1"].cfg, name="dec.1", grid=4)
    target.dec["1"].head.weight.data = state["dec.1.head.weight"].clone()  # same shapes: grid only pools H's output
    with pytest.raises(DECOptionError, match="dec_grid=4 contradicts the state dict for dec.1"):
        target.load_state_dict(state)


def test_state_dict_written_before_the_options_buffer_still_loads(tmp_path: Path) -> None:
    import safetensors.torch

    model = vit(dec_grid=3)
    state = old_format(model.state_dict())
    for load in ("dec", "strict", "file"):
        target = vit(1, dec_grid=3)
        if load == "dec":
            assert timm_dec.load_dec_state_dict(target, state) == []  # no DEC weight kept its own value
        elif load == "strict":
            target.load_state_dict(state, strict=True)
        else:
            path = tmp_path / "old.safetensors"
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            target = timm.create_model("vit_tiny_patch16_224_dec", pretrained=True, dec_grid=3,
                                       pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **VIT)
        torch.testing.assert_close(logits(target), logits(model), rtol=0, atol=0)
        assert "dec.input.options" in target.state_dict()


def test_options_buffer_survives_ema_dtype_and_safetensors(tmp_path: Path) -> None:
    import safetensors.torch
    from timm.utils import ModelEmaV2, ModelEmaV3

    model = vit(dec_grid=3).train()
    own = model.dec["input"].options.clone()
    for ema in (ModelEmaV2(model, decay=0.9998), ModelEmaV3(model, decay=0.9998)):
        ema.update(model)
        vit(1, dec_grid=3).load_state_dict(ema.module.state_dict())  # still readable, still matching
    half = vit(dec_grid=3).to(torch.bfloat16)
    vit(1, dec_grid=3).load_state_dict(half.state_dict())
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.testing.assert_close(safetensors.torch.load_file(str(path))["dec.input.options"], own)
    for state in (model.state_dict(), old_format(model.state_dict())):  # built on meta, loaded with assign=True
        meta = timm.create_model("vit_tiny_patch16_224_dec", device="meta", dec_grid=3, **VIT)
        meta.load_state_dict(state, assign=True)
        assert not any(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
        torch.testing.assert_close(meta.dec["input"].options, own)
    assert [k for k in model.state_dict() if not k.startswith("dec.")] == list(
        timm.create_model("vit_tiny_patch16_224", **{k: v for k, v in VIT.items()
                                                     if not k.startswith("dec_")}).state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# the solve budget may be changed on load; what interprets the weights may not; one error type, one message form
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from timm_dec import hub

    return hub.save_pretrained(vit(dec_grid=3, dec_max_iter=6), tmp_path_factory.mktemp("saved") / "m")


def test_solve_budget_options_may_be_overridden_on_load_and_say_so(saved: Path) -> None:
    from timm_dec import hub

    budget = dict(dec_max_iter=4, dec_tol=1e-4, dec_check_every=2, dec_history=3, dec_backward_max_iter=5)
    for load in (lambda: timm.create_model(f"local-dir:{saved}", pretrained=True, **budget),
                 lambda: hub.load_pretrained(saved, **budget)):
        with pytest.warns(UserWarning, match="trained with dec_max_iter=6.*uses dec_max_iter=4") as record:
            model = load()
        assert len([w for w in record if "solve-budget" in str(w.message)]) == 1
        options = model.dec_cfg.options
        assert (options.max_iter, options.tol, options.check_every, options.history, options.backward_max_iter) \
            == (4, 1e-4, 2, 3, 5)
        with pytest.warns(UserWarning, match="solve-budget"):
            same = timm.create_model(f"local-dir:{saved}", pretrained=True, dec_max_iter=4)
        torch.testing.assert_close(logits(model), logits(same), rtol=0, atol=0)
    assert timm.create_model(f"local-dir:{saved}", pretrained=True).dec_cfg.options.max_iter == 6  # the recorded


def test_every_loader_refuses_a_weight_option_with_one_error(saved: Path, tmp_path: Path) -> None:
    from timm_dec import checkpoint, hub

    ckpt = checkpoint.save_model(vit(dec_grid=3), tmp_path / "c.safetensors")
    loads = [
        lambda: timm.create_model(f"local-dir:{saved}", pretrained=True, dec_grid=5),
        lambda: hub.load_pretrained(saved, dec_grid=5),
        lambda: checkpoint.load_model(ckpt, model_kwargs=dict(dec_grid=5)),
        lambda: timm.create_model("vit_tiny_patch16_224_dec", pretrained=True, dec_grid=5,
                                  pretrained_cfg_overlay=dict(file=str(ckpt)), **VIT),
        lambda: timm_dec.load_dec_state_dict(vit(dec_grid=5), vit(dec_grid=3).state_dict()),
    ]
    for load in loads:
        with pytest.raises(DECOptionError, match=r"^dec_grid=5 contradicts .*, whose DEC weights were trained with "
                                                 r"dec_grid=3; ") as info:
            load()
        assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# a checkpoint is evaluated and published as the architecture it records, with the preprocessing it records
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from timm_dec import checkpoint

    model = vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.25, 0.5, 0.75)}  # trained with its own mean
    return checkpoint.save_model(model, tmp_path_factory.mktemp("ckpt") / "vit.safetensors", data=dict(num_digits=1))


def test_checkpoint_under_another_architecture_is_refused_in_one_line(vit_ckpt: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from timm_dec import cli

    out = tmp_path / "o"
    # deit_tiny takes vit_tiny's weights as they are; vit_small's entrypoint builds a vit_tiny from the recorded dims
    for argv in (["eval", "--checkpoint", str(vit_ckpt), "--model", "deit_tiny_patch16_224_dec", "--num-samples", "2",
                  "--scales", "1", "--no-progress"],
                 ["push", "--checkpoint", str(vit_ckpt), "--model", "vit_small_patch16_224_dec", "--dry-run",
                  "--output", str(out)]):
        assert cli.main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"timm-dec {argv[0]}: error: "), lines
        assert re.search(rf"is a checkpoint of vit_tiny_patch16_224_dec, not of {argv[4]}: .*leave --model out",
                         lines[0]), lines[0]
    assert not out.exists()


def test_checkpoint_keeps_its_preprocessing_under_its_own_architecture(vit_ckpt: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from timm_dec import checkpoint

    for name in (None, "vit_tiny_patch16_224_dec", "vit_tiny_dec", "vit_tiny_patch16_224_dec.augreg_in21k"):
        model = checkpoint.load_model(vit_ckpt, model_name=name)
        assert tuple(model.pretrained_cfg["mean"]) == (0.25, 0.5, 0.75), name
        assert timm.data.resolve_input_data_config(model)["mean"] == (0.25, 0.5, 0.75)
        notes = [line for line in capsys.readouterr().err.splitlines() if "preprocessing" in line]
        assert len(notes) == 1 and "mean=[0.25, 0.5, 0.75]" in notes[0] and "mean=(0.5, 0.5, 0.5)" in notes[0]
    torch.testing.assert_close(logits(checkpoint.load_model(vit_ckpt)), logits(vit()), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# the README says what works
# ---------------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_readme_load_back_install_and_compile_lines_are_accurate() -> None:
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert 'timm.create_model("local-dir:FOLDER", pretrained=True)' in readme  # pretrained=True for both names
    pins = re.search(r"^TORCH_PINS \?= (.+)$", (REPO / "Makefile").read_text(encoding="utf-8"), re.M).group(1)
    assert f"pip install {pins.strip()} --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "make setup" in readme and "TORCH_PINS" in readme
    # measured with torch._dynamo.explain (README "Use"): the re-entry splits every enclosing frame
    assert "one graph break per DEC call" not in readme and "9 graphs (8 breaks)" in readme
