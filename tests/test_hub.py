"""timm_dec.hub: save / push / load of *_dec models, offline (the Hub's HTTP layer is replaced by a fake)."""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http

import timm_dec
from timm_dec import checkpoint, hub
from timm_dec.apps import push as push_app

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, dec_widths=(8, 16),
            dec_proj_chans=8)
# non-default DEC options, so a loader that fell back to the defaults would be caught
DEC = dict(dec_blocks=(1,), dec_grid=3, dec_mode="invariant", dec_max_iter=6)
METRICS = {"acc": 0.8125, "inv_e": 0.01234, "per_scale_acc": [0.5, 0.75, 0.8125], "scales": [0.5, 1.0, 1.5],
           "num_samples": 16, "per_scale_prob_correct": [0.3, 0.5, 0.6], "dataset": "locally scaled digits"}


def tiny_model(seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A tiny vit_tiny_dec whose DEC is moved off the identity, so its weights change the logits."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_dec", **{**TINY, **DEC, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def saved(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    hub.save_pretrained(model, folder, metrics=METRICS, label_names=[f"c{i}" for i in range(5)], repo_id="org/tiny")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# a fake Hub: the HTTP endpoints huggingface_hub calls, answered in memory
# ---------------------------------------------------------------------------------------------------------------------

class FakeHub:
    """Answers huggingface_hub's requests for repo creation, preupload, commit and file download."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.created: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []
        self.files: dict[str, dict[str, bytes]] = {}
        self.validated: list[str] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path, body = request.url.path, request.read()
        self.requests.append((request.method, path, body))
        if path == "/api/repos/create":
            info = json.loads(body)
            repo = f"{info['organization']}/{info['name']}"
            self.created.append(info)
            self.files.setdefault(repo, {})
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            # the real Hub checks the card's metadata; here: it must parse as a model card with metadata
            content = json.loads(body)["content"]
            self.validated.append(content)
            if not ModelCard(content).data.to_dict():
                return httpx2.Response(400, json={"errors": [{"message": "no metadata"}]})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if path.startswith("/api/models/") and "/commit/" in path:
            repo = path[len("/api/models/"):].split("/commit/")[0]
            lines = [json.loads(line) for line in body.decode().splitlines()]
            commit = {"header": lines[0]["value"], "files": {}}
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
                commit["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            self.commits.append(commit)
            self.files[repo].update(commit["files"])
            oid = hashlib.sha1(repr(len(self.commits)).encode()).hexdigest()
            return httpx2.Response(200, json={"success": True, "commitOid": oid,
                                              "commitUrl": f"https://huggingface.co/{repo}/commit/{oid}"})
        if "/resolve/" in path:
            repo, rest = path.lstrip("/").split("/resolve/")
            name = rest.split("/", 1)[1]
            data = self.files.get(repo, {}).get(name)
            if data is None:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": "c" * 40, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Length": str(len(data))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        return httpx2.Response(404, json={"error": f"the fake hub does not serve {path}"})


def _client_factory(handler: Any) -> Any:
    """huggingface_hub's own client (its request hook enforces HF_HUB_OFFLINE) with only the transport replaced."""
    def factory() -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(handler), follow_redirects=True,
                             event_hooks={"request": [_http.hf_request_event_hook]})
    return factory


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()
    _http.set_client_factory(_client_factory(fake.handle))
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    yield fake
    _http.set_client_factory(_http.default_client_factory)


def _no_network(request: httpx2.Request) -> httpx2.Response:
    raise AssertionError(f"offline mode made a request: {request.method} {request.url}")


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained and the local-dir round trip
# ---------------------------------------------------------------------------------------------------------------------

def test_folder_holds_timm_config_safetensors_and_card(model: torch.nn.Module, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_dec"
    assert config["num_classes"] == 5 and config["num_features"] == 32
    assert config["label_names"] == [f"c{i}" for i in range(5)]
    args = config["model_args"]
    assert args["dec_blocks"] == [1] and args["dec_grid"] == 3 and args["dec_mode"] == "invariant"
    assert args["dec_max_iter"] == 6 and args["dec_widths"] == [8, 16]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["timm_dec"]["metrics"]["acc"] == METRICS["acc"]
    weights = safetensors.torch.load_file(str(saved / "model.safetensors"))
    own = model.state_dict()
    assert sorted(weights) == sorted(own)
    assert any(k.startswith("dec.1.") for k in weights)
    assert all(torch.equal(weights[k], own[k]) for k in own)


def test_local_dir_round_trip_gives_the_same_logits(model: torch.nn.Module, saved: Path) -> None:
    loaded = timm.create_model(f"local-dir:{saved}", pretrained=True)
    assert loaded.dec_cfg == model.dec_cfg
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.pretrained_cfg["label_names"] == [f"c{i}" for i in range(5)]
    checked = hub.load_pretrained(saved)
    torch.testing.assert_close(logits(checked), logits(model), rtol=0, atol=0)
    # the comparison can fail: the same architecture with other weights gives other logits
    assert not torch.allclose(logits(tiny_model(seed=1)), logits(model))


def test_adapted_instance_saves_under_its_dec_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5)
    model = timm_dec.adapt(base, blocks=(0,), grid=3)
    with torch.no_grad():
        for p in model.dec.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hub.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224_dec"
    loaded = hub.load_pretrained(tmp_path)
    assert loaded.dec_cfg == model.dec_cfg
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_base_model_is_refused(tmp_path: Path) -> None:
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="has no DEC"):
        hub.save_pretrained(base, tmp_path)


def test_card_carries_metadata_options_and_metrics(saved: Path) -> None:
    text = (saved / "README.md").read_text()
    assert "{{" not in text and "{%" not in text
    card = ModelCard(text)
    assert card.data.library_name == "timm"
    assert card.data.license == "apache-2.0"
    assert {"timm", "timm_dec", "image-classification"} <= set(card.data.tags)
    assert {"accuracy", "inv_e"} <= set(card.data.metrics)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": pytest.approx(100 * METRICS["acc"]), "inv_e": pytest.approx(100 * METRICS["inv_e"])}
    assert card.data.eval_results[0].dataset_name == METRICS["dataset"]
    assert 'timm.create_model("hf-hub:org/tiny", pretrained=True)' in text
    assert "| `dec_grid` | `3` |" in text and "| `dec_mode` | `invariant` |" in text
    assert "| 81.25 | 1.23 |" in text                                      # accuracy %, InvE in 1e-2
    assert "| Scale | 0.5 | 1 | 1.5 |" in text and "| Accuracy (%) | 50.00 | 75.00 | 81.25 |" in text
    assert "weight decay 0.05" in text and "layer-wise learning-rate decay\n0.75" in text  # Table A1 recipe
    assert "@inproceedings{rahman2025local" in text


def test_card_prose_describes_the_models_own_dec() -> None:
    """Where the DECs sit, the update form and the backward come from the model's options, not one fixed text."""
    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
    default = hub.render_model_card(timm.create_model("vit_tiny_patch16_224_dec", **kwargs))
    assert "in front of\nits patch embedding (the input image is canonicalised)" in default.replace("  ", " ")
    assert "absolute update, `knots = H(S^-1(F; knots))`" in default
    assert "implicit differentiation (an adjoint fixed point" in default and "phantom gradients" not in default
    other = hub.render_model_card(timm.create_model(
        "vit_tiny_patch16_224_dec", dec_blocks=("input", 0, 1), dec_update="residual", dec_backward="phantom",
        dec_phantom_steps=2, **kwargs))
    assert "its patch embedding (the input image is canonicalised) and blocks 0, 1" in other
    assert "residual update, `knots = knots + H(S^-1(F; knots))`" in other
    assert "phantom gradients (2 unrolled steps from the equilibrium)" in other
    assert "implicit differentiation" not in other


def test_card_without_metrics_says_so(model: torch.nn.Module) -> None:
    text = hub.render_model_card(model)
    assert ModelCard(text).data.eval_results is None
    assert "No evaluation was recorded" in text


@pytest.mark.parametrize("metrics, message", [
    ({"inv_e": 0.1}, "lack"),
    ({"acc": 81.0, "inv_e": 0.1}, "fraction"),
    ({"acc": 0.8, "inv_e": -1.0}, "InvE"),
    ({"acc": 0.8, "inv_e": 0.1, "per_scale_acc": [0.5], "scales": [0.5, 1.0]}, "same length"),
])
def test_bad_metrics_are_refused(model: torch.nn.Module, metrics: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hub.render_model_card(model, metrics=metrics)


def test_metrics_of_timm_dec_eval_json_are_accepted() -> None:
    # `timm-dec eval --json` writes the evaluate_scale_consistency keys plus model / data descriptions
    written = {**{k: v for k, v in METRICS.items() if k != "dataset"}, "model": "vit_tiny_dec", "data": "digits",
               "checkpoint": None, "dec_solver": {"mean_iterations": 3.2, "fallbacks": 0}}
    checked = hub.normalize_metrics(written)
    assert checked["dataset"] == "locally scaled digits (timm_dec.data)"
    assert checked["acc"] == METRICS["acc"] and checked["per_scale_acc"] == METRICS["per_scale_acc"]
    assert "model" not in checked and "dec_solver" not in checked


def test_wrong_number_of_label_names(model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 label_names for a model with 5 classes"):
        hub.save_pretrained(model, tmp_path, label_names=["a", "b", "c"])


# ---------------------------------------------------------------------------------------------------------------------
# errors when loading a broken folder
# ---------------------------------------------------------------------------------------------------------------------

def _copy(saved: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in saved.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_missing_safetensors(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")  # a pickle beside it is never read
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        hub.load_pretrained(folder)


def test_corrupt_safetensors(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        hub.load_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        hub.check_pretrained(folder)


def test_unknown_architecture(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "vit_tiny_nonexistent_dec"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'vit_tiny_nonexistent_dec', which neither timm nor timm_dec"):
        hub.load_pretrained(folder)


def test_config_dec_options_that_do_not_match_the_weights(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["dec_blocks"] = [0, 1]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"dec_blocks=\[0, 1\]\) do not match .* blocks \[1\]"):
        hub.load_pretrained(folder)


def test_dec_options_cannot_be_overridden_on_load(saved: Path) -> None:
    with pytest.raises(ValueError, match="dec_grid=8 contradicts the saved model .* trained with dec_grid=3"):
        hub.load_pretrained(saved, dec_grid=8)


# ---------------------------------------------------------------------------------------------------------------------
# push, and the hf-hub round trip through huggingface_hub's cache
# ---------------------------------------------------------------------------------------------------------------------

def test_push_uploads_the_folder_in_one_commit(model: torch.nn.Module, saved: Path, fake_hub: FakeHub) -> None:
    info = hub.push_to_hub(model, "org/tiny", private=True, commit_message="Add tiny", metrics=METRICS,
                           label_names=[f"c{i}" for i in range(5)])
    assert info.commit_url.startswith("https://huggingface.co/org/tiny/commit/")
    assert [(c["organization"], c["name"], c["visibility"]) for c in fake_hub.created] == [("org", "tiny", "private")]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["header"]["summary"] == "Add tiny"
    assert sorted(commit["files"]) == ["README.md", "config.json", "model.safetensors"]
    # the upload is what save_pretrained writes
    for name in ("README.md", "config.json"):
        assert commit["files"][name] == (saved / name).read_bytes()
    weights = safetensors.torch.load(commit["files"]["model.safetensors"])
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert fake_hub.validated == [commit["files"]["README.md"].decode()]


def test_hf_hub_round_trip_from_the_offline_cache(model: torch.nn.Module, fake_hub: FakeHub, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hub.push_to_hub(model, "org/tiny")
    cache = tmp_path / "cache"
    online = timm.create_model("hf-hub:org/tiny", pretrained=True, cache_dir=cache)  # fills the cache
    torch.testing.assert_close(logits(online), logits(model), rtol=0, atol=0)
    assert list((cache / "models--org--tiny" / "snapshots").glob("*/model.safetensors"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _http.set_client_factory(_client_factory(_no_network))
    offline = timm.create_model("hf-hub:org/tiny", pretrained=True, cache_dir=cache)
    assert offline.dec_cfg == model.dec_cfg
    torch.testing.assert_close(logits(offline), logits(model), rtol=0, atol=0)
    checked = hub.load_pretrained("hf-hub:org/tiny", cache_dir=cache)
    torch.testing.assert_close(logits(checked), logits(model), rtol=0, atol=0)
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):  # not cached, and offline
        timm.create_model("hf-hub:org/other", pretrained=True, cache_dir=cache)


def test_repo_id_is_checked(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="ORG/NAME"):
        hub.push_to_hub(model, "no-org")


# ---------------------------------------------------------------------------------------------------------------------
# training checkpoints and `timm-dec push`
# ---------------------------------------------------------------------------------------------------------------------

def _timm_checkpoint(model: torch.nn.Module, folder: Path, model_kwargs: dict) -> Path:
    """A checkpoint as timm's train.py writes it: CheckpointSaver with the argparse Namespace of train.py."""
    from timm.utils import CheckpointSaver
    args = argparse.Namespace(model="vit_tiny_dec", num_classes=5, in_chans=None, gp=None, img_size=32,
                              input_size=None, model_kwargs=model_kwargs, lr=1e-4, epochs=3)
    optimizer = torch.optim.AdamW(model.parameters())
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(epoch=0, metric=0.5)
    return folder / "last.pth.tar"


@pytest.fixture(scope="module")
def timm_ckpt(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kwargs = {k: list(v) if isinstance(v, tuple) else v
              for k, v in {**TINY, **DEC}.items() if k not in ("num_classes", "img_size")}
    return _timm_checkpoint(model, tmp_path_factory.mktemp("train"), kwargs)


def test_timm_train_checkpoint_loads_with_weights_only(model: torch.nn.Module, timm_ckpt: Path) -> None:
    loaded = checkpoint.load_model(timm_ckpt)
    assert loaded.dec_cfg == model.dec_cfg
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_checkpoint_whose_dec_options_do_not_match(timm_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="dec_grid=4 contradicts .* trained with dec_grid=3"):
        checkpoint.load_model(timm_ckpt, model_kwargs={"dec_grid": 4})
    with pytest.raises(ValueError, match=r"dec_blocks=\[0, 1\] contradicts .* trained with dec_blocks=\[1\]"):
        checkpoint.load_model(timm_ckpt, model_kwargs={"dec_blocks": [0, 1]})


def test_weights_whose_dec_blocks_do_not_match(model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"     # a bare file records no options: the weights themselves disagree
    safetensors.torch.save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"dec_blocks=\[0, 1\] contradicts .* trained with dec_blocks=\[1\]"):
        checkpoint.load_model(path, model_name="vit_tiny_dec", model_kwargs={**TINY, **DEC,
                                                                                    "dec_blocks": [0, 1]})


def test_checkpoint_with_dec_weights_into_a_base_model(model: torch.nn.Module, timm_ckpt: Path,
                                                       tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has DEC options .* but vit_tiny_patch16_224 has no DEC"):
        checkpoint.load_model(timm_ckpt, model_name="vit_tiny_patch16_224")
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    base_kwargs = {k: v for k, v in TINY.items() if not k.startswith("dec_")}
    with pytest.raises(ValueError, match=r"DEC parameters for blocks \[1\], but vit_tiny_patch16_224 has no DEC"):
        checkpoint.load_model(path, model_name="vit_tiny_patch16_224", model_kwargs=base_kwargs)


def test_checkpoint_with_code_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "arch": "vit_tiny_dec", "payload": Path("x")}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        checkpoint.load_model(path)


def test_bare_safetensors_needs_a_model_name(model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError, match="pass model_name"):
        checkpoint.load_model(path)
    loaded = checkpoint.load_model(path, model_name="vit_tiny_dec", model_kwargs={**TINY, **DEC})
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def push_cli(argv: list[str]) -> int:
    """``timm-dec push ARGV`` (the subcommand's own parser and run, as timm_dec.cli wires them)."""
    parser = argparse.ArgumentParser(prog="timm-dec push")
    push_app.add_arguments(parser)
    return push_app.run(parser.parse_args(argv))


def test_cli_push_from_a_timm_checkpoint(model: torch.nn.Module, timm_ckpt: Path, tmp_path: Path,
                                         fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)  # push checks it first; the fake Hub answers
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    out = tmp_path / "out"
    assert push_cli(["--checkpoint", str(timm_ckpt), "--repo-id", "org/from-train", "--metrics", str(metrics),
                     "--output", str(out), "--commit-message", "train.py run", "--datasets", "imagenet-1k"]) == 0
    commit = fake_hub.commits[-1]
    assert commit["header"]["summary"] == "train.py run"
    assert sorted(commit["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert commit["files"]["config.json"] == (out / "config.json").read_bytes()
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.datasets == ["imagenet-1k"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"] == pytest.approx(81.25)
    loaded = hub.load_pretrained(out)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_cli_dry_run_does_not_touch_the_hub(timm_ckpt: Path, tmp_path: Path, fake_hub: FakeHub) -> None:
    assert push_cli(["--checkpoint", str(timm_ckpt), "--dry-run", "--output", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert not [r for r in fake_hub.requests if "/api/" in r[1] and "agent" not in r[1]]


# ---------------------------------------------------------------------------------------------------------------------
# nothing loads silently wrong; reused output folders
# ---------------------------------------------------------------------------------------------------------------------

def test_partial_dec_weights_are_an_error_naming_the_missing_keys(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "m")
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    partial = {k: v for k, v in weights.items() if not k.startswith("dec.") or k == "dec.1.head.weight"}
    safetensors.torch.save_file(partial, str(folder / "model.safetensors"))
    missing = sorted(k for k in weights if k.startswith("dec.") and k not in partial)
    with pytest.raises(ValueError, match="some DEC weights but not all") as info:
        timm.create_model(f"local-dir:{folder}", pretrained=True)   # timm's own loader, through the DEC filter
    assert missing[0] in str(info.value)
    with pytest.raises(ValueError, match="some DEC weights but not all"):
        hub.load_pretrained(folder)
    model = tiny_model()
    with pytest.raises(ValueError, match=f"the checkpoint does not fit .*{missing[0]}"):
        timm_dec.models.load_dec_state_dict(model, partial, source="the checkpoint")


def test_base_weights_still_load_with_the_dec_at_the_identity(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "m")
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    safetensors.torch.save_file({k: v for k, v in weights.items() if not k.startswith("dec.")},
                                str(folder / "model.safetensors"))
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert all(not p.any() for n, p in loaded.named_parameters() if n.startswith("dec.") and "head" in n)


def test_reused_output_folder_is_cleaned_or_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    hub.save_pretrained(tiny_model(seed=1), folder, metrics=METRICS)
    hub.save_pretrained(model, folder)            # an earlier save is replaced, not merged
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "timm_dec" in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "config.json").read_text())["timm_dec"]["metrics"] is None
    torch.testing.assert_close(logits(hub.load_pretrained(folder)), logits(model), rtol=0, atol=0)
    torch.save({}, folder / "pytorch_model.bin")  # stale weights of another writer
    with pytest.raises(ValueError, match=r"already holds other weight files \(pytorch_model.bin\)"):
        hub.save_pretrained(model, folder)
