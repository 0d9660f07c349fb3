"""The timm contract of the ``*_dec`` models on tiny configs of every family: what timm's train.py and validate.py call.

train.py is not in timm's wheel, so `test_train_py_sequence` makes its calls in its order: ``create_model`` with its
keywords (``checkpoint_path`` = ``--initial-checkpoint``, ``pretrained_cfg_overlay`` and ``dec_*`` model kwargs),
``resolve_data_config``, channels_last, ``create_optimizer_v2(..., layer_decay=0.75)``, ``ModelEmaV3``,
``create_loader`` on an in-memory dataset, bfloat16-autocast training steps, ``CheckpointSaver`` after a validate-style
eval, then ``resume_checkpoint`` into a fresh model. The references are timm's own: the base model with the same
backbone weights, the base model's layer-decay groups, the EMA formula, the saved state.

Also here: the classifier API, training moves the DEC, one DDP step (gloo, 2 processes) against a single-process
reference, and ``torch.compile``. What `tests/test_models.py` and `tests/test_adapt.py` already cover (registry,
identity at init, pretrained loading, features_only, grad checkpointing, layer decay with SGD) is not repeated.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from datetime import timedelta
from functools import partial
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny import tiny_table
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_loader, resolve_data_config
from timm.layers import DropPath
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3, accuracy
from torch import nn

from timm_dec import solver_stats

# family -> (timm base name, tiny architecture kwargs, image size)
TINY = tiny_table("vit", "deit_distilled", "dinov2_reg", "beit", "swin", "eva02", "dinov3_reg", "relpos_cls",
                  "swinv2", "swinv2_cr")
FAMILIES = list(TINY)
# a cheap H; two adapted units per family, so that layer decay has two DEC groups to place
DEC_KWARGS = dict(dec_blocks=(0, 1), dec_widths=(8, 8), dec_proj_chans=4, dec_pool_size=8)
NUM_CLASSES = 5
# train.py --gp: a non-default pooling where the family has one (timm's distilled DeiT reads the two tokens only)
GLOBAL_POOL = {"deit_distilled": "token"}


def global_pool(family: str) -> str:
    return GLOBAL_POOL.get(family, "avg")


def pool_of(model: nn.Module) -> str:
    """The model's pooling type (timm's Swin V2 cr keeps it on its head only)."""
    if hasattr(model, "global_pool") and isinstance(model.global_pool, str):
        return model.global_pool
    return model.head.global_pool.pool_type


def create(family: str, dec: bool = True, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The tiny ``<base>_dec`` (or base) model of a family, built by ``timm.create_model``."""
    name, arch, _ = TINY[family]
    torch.manual_seed(seed)
    extra = DEC_KWARGS if dec else {}
    return timm.create_model(name + ("_dec" if dec else ""), num_classes=NUM_CLASSES, **{**arch, **extra, **kwargs})


def images(family: str, batch: int, seed: int = 1) -> torch.Tensor:
    size = TINY[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturb_dec(model: nn.Module, std: float = 0.3, seed: int = 2) -> None:
    """Move every DEC off the identity: its zero-initialised last layer gets random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for dec in model.dec.values():
            for p in (dec.head.weight,):
                p.copy_(std * torch.randn(p.shape, generator=gen))


def base_twin(family: str, model: nn.Module, **kwargs: Any) -> nn.Module:
    """The base model holding ``model``'s backbone weights (every key but ``dec.*``), loaded strictly."""
    base = create(family, dec=False, **kwargs)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dec.")})
    return base


def unit_prefix(family: str, k: int) -> str:
    """Parameter-name prefix of the unit that DEC k sits in front of (Swin: stage k's blocks)."""
    if family in ("swin", "swinv2"):
        return f"layers.{k}.blocks."
    return f"stages.{k}.blocks." if family == "swinv2_cr" else f"blocks.{k}."


class InMemoryImages(torch.utils.data.Dataset):
    """A tiny RGB image dataset in memory, shaped like timm's ImageDataset (``transform`` is set by create_loader).

    Toy task: the label is the quadrant of a bright square painted on a dark noisy background.
    """

    def __init__(self, count: int, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images: list[Image.Image] = []
        self.targets: list[int] = []
        side = size // 3
        for i in range(count):
            target = i % 4
            pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            top, left = (target // 2) * (size - side), (target % 2) * (size - side)
            pixels[top:top + side, left:left + side] = 230
            self.images.append(Image.fromarray(pixels, mode="RGB"))
            self.targets.append(target)
        self.transform = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def lr_scales(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    """Parameter name -> the ``lr_scale`` of its layer-decay group."""
    by_id = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def weight_decays(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def dec_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The DEC's weights (not its ``options`` buffers: the options it was built with, which training leaves alone)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith("dec.") and not k.endswith(".options")}


# ---------------------------------------------------------------------------------------------------------------------
# train.py / validate.py, in their order


@pytest.mark.parametrize("family", FAMILIES)
def test_train_py_sequence(family, tmp_path):
    name, arch, size = TINY[family]
    dec_name = name + "_dec"

    # --initial-checkpoint: a full *_dec checkpoint with a trained (here: perturbed) DEC
    pool = global_pool(family)
    initial = create(family, seed=3, global_pool=pool)  # avg pooling changes the ViT norms: build it alike
    perturb_dec(initial)
    init_path = str(tmp_path / "initial.safetensors")
    save_file({k: v.contiguous() for k, v in initial.state_dict().items()}, init_path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    overlay = dict(input_size=(3, size, size), mean=mean, std=std, crop_pct=1.0, interpolation="bicubic")

    # model = create_model(args.model, pretrained=..., in_chans=..., num_classes=..., drop_rate=..., ...)
    model = timm.create_model(
        dec_name, pretrained=False, in_chans=3, num_classes=NUM_CLASSES, drop_rate=0.1, drop_path_rate=0.1,
        global_pool=pool, checkpoint_path=init_path, pretrained_cfg_overlay=overlay, **arch, **DEC_KWARGS)
    assert type(model).__name__.endswith("DEC") and model.dec_cfg.blocks == (0, 1)
    for key, value in initial.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # the initial checkpoint was loaded, DEC included
    assert pool_of(model) == pool
    assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.1 for m in model.modules())

    # data_config = resolve_data_config(vars(args), model=model); channels_last
    data_config = resolve_data_config({}, model=model)
    assert data_config["input_size"] == (3, size, size) and data_config["crop_pct"] == 1.0
    assert data_config["mean"] == mean and data_config["std"] == std and data_config["interpolation"] == "bicubic"
    model.to(memory_format=torch.channels_last)

    # optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args)) with --layer-decay 0.75
    optimizer = create_optimizer_v2(model, "adamw", lr=2e-3, weight_decay=0.05, layer_decay=0.75)
    scales = lr_scales(optimizer, model)
    # reference: the base model's own groups (the DEC must not shift the layer numbering)
    base = create(family, dec=False, global_pool=pool)
    base_scales = lr_scales(create_optimizer_v2(base, "adamw", lr=2e-3, weight_decay=0.05, layer_decay=0.75), base)
    assert {n: s for n, s in scales.items() if not n.startswith("dec.")} == base_scales
    unit_scale = []
    for k in (0, 1):
        block = {s for n, s in scales.items() if n.startswith(unit_prefix(family, k))}
        dec = {s for n, s in scales.items() if n.startswith(f"dec.{k}.")}
        assert len(block) == 1 and dec == block, (k, dec, block)
        unit_scale.append(block.pop())
    assert unit_scale[0] < unit_scale[1] < 1  # deeper units decay less: the two DECs are in different groups
    decays = weight_decays(optimizer, model)
    assert decays["dec.0.conv1.weight"] == 0.05 and decays["dec.0.conv1.bias"] == 0.0
    assert decays["dec.1.norm.weight"] == 0.0 and decays["dec.1.head.weight"] == 0.05

    # model_ema = ModelEmaV3(model, decay=...)
    model_ema = ModelEmaV3(model, decay=0.5)
    assert type(model_ema.module) is type(model) and model_ema.module.dec_cfg == model.dec_cfg

    # loaders: create_loader(dataset, input_size=data_config['input_size'], ..., mean=..., std=...)
    common = dict(input_size=data_config["input_size"], batch_size=4, mean=data_config["mean"], std=data_config["std"],
                  num_workers=0, device=torch.device("cpu"), use_prefetcher=True)
    loader_train = create_loader(InMemoryImages(8, size, seed=0), is_training=True, hflip=0.0, **common)
    loader_eval = create_loader(InMemoryImages(8, size, seed=1), is_training=False,
                                interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"], **common)

    # train_one_epoch: AMP (CPU bfloat16), channels_last inputs, optimizer step, EMA update
    amp_autocast = partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)
    loss_fn = nn.CrossEntropyLoss()
    before = dec_state(model)
    model.train()
    num_updates = 0
    with solver_stats() as stats:
        for inputs, target in loader_train:
            assert inputs.shape == (4, 3, size, size) and inputs.dtype == torch.float32
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(inputs)
                loss = loss_fn(output, target)
            assert output.shape == (4, NUM_CLASSES) and torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            optimizer.step()
            num_updates += 1
            ema_before = dec_state(model_ema.module)
            model_ema.update(model, step=num_updates)
            decay = model_ema.get_decay(num_updates)  # timm's warm-up: 0 at the first update, then 0.5
            for key, value in dec_state(model_ema.module).items():  # the DEC tensors are averaged too
                torch.testing.assert_close(value, decay * ema_before[key] + (1 - decay) * model.state_dict()[key])
    assert num_updates == 2 and decay == 0.5
    assert stats.names == ["dec.0", "dec.1"] and stats.total_fallbacks == 0 and stats.mean_iterations > 1
    assert all(not torch.equal(before[k], v) for k, v in dec_state(model).items())  # every DEC tensor trained

    # validate(): eval, no_grad, AMP; then the EMA weights
    def validate(net: nn.Module) -> tuple[float, torch.Tensor]:
        net.eval()
        outputs, targets = [], []
        with torch.no_grad(), amp_autocast():
            for inputs, target in loader_eval:
                outputs.append(net(inputs.contiguous(memory_format=torch.channels_last)).float())
                targets.append(target)
        output, target = torch.cat(outputs), torch.cat(targets)
        assert torch.isfinite(output).all()
        return accuracy(output, target, topk=(1,))[0].item(), output

    top1, eval_logits = validate(model)
    _, ema_logits = validate(model_ema.module)
    assert not torch.equal(eval_logits, ema_logits)

    # saver.save_checkpoint(epoch, metric=eval_metrics[eval_metric])
    args = argparse.Namespace(model=dec_name, model_kwargs=dict(DEC_KWARGS))
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), max_history=2)
    best_metric, best_epoch = saver.save_checkpoint(epoch=0, metric=top1)
    assert (best_metric, best_epoch) == (top1, 0)
    (last,) = glob.glob(str(tmp_path / "last.pth*"))

    # --resume: a fresh model (no initial checkpoint) and optimizer take the saved state
    resumed = timm.create_model(dec_name, num_classes=NUM_CLASSES, in_chans=3, drop_rate=0.1, drop_path_rate=0.1,
                                global_pool=pool, pretrained_cfg_overlay=overlay, **arch, **DEC_KWARGS)
    resumed.to(memory_format=torch.channels_last)  # before the EMA copy, as train.py does (bf16 convs follow it)
    resumed_opt = create_optimizer_v2(resumed, "adamw", lr=2e-3, weight_decay=0.05, layer_decay=0.75)
    assert resume_checkpoint(resumed, last, optimizer=resumed_opt, log_info=False) == 1
    resumed_ema = ModelEmaV3(resumed, decay=0.5)
    load_checkpoint(resumed_ema.module, last, use_ema=True)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in model_ema.module.state_dict().items():
        assert torch.equal(resumed_ema.module.state_dict()[key], value), key
    saved_opt, loaded_opt = optimizer.state_dict(), resumed_opt.state_dict()
    assert [g["lr_scale"] for g in loaded_opt["param_groups"]] == [g["lr_scale"] for g in saved_opt["param_groups"]]
    for index, state in saved_opt["state"].items():
        torch.testing.assert_close(loaded_opt["state"][index]["exp_avg"], state["exp_avg"], rtol=0, atol=0)
    torch.testing.assert_close(validate(resumed)[1], eval_logits, rtol=0, atol=0)
    torch.testing.assert_close(validate(resumed_ema.module)[1], ema_logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_and_head_api(family):
    model = create(family).eval()
    perturb_dec(model)
    x = images(family, 2)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)
        pre_logits = model.forward_head(features, pre_logits=True)
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)  # distilled DeiT: (head, head_dist)
    assert all(h.out_features == NUM_CLASSES for h in heads)
    assert len(heads) == (2 if family == "deit_distilled" else 1)

    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre_logits, rtol=0, atol=0)  # no head: the pooled features
    model.reset_classifier(3, global_pool=global_pool(family))
    assert pool_of(model) == global_pool(family)
    with torch.no_grad():
        assert model(x).shape == (2, 3)

    gray = create(family, in_chans=1).eval()
    with torch.no_grad():
        assert gray(x[:, :1]).shape == (2, NUM_CLASSES)
    assert gray.patch_embed.proj.in_channels == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_training_moves_dec_and_changes_logits(family):
    model = create(family).train()
    x = images(family, 8)
    target = torch.arange(8) % NUM_CLASSES
    with torch.no_grad():  # premise: at init the DEC is the identity
        assert (model.eval()(x) - base_twin(family, model).eval()(x)).abs().max() <= 1e-5
    before = dec_state(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    after = dec_state(model)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    model.eval()
    with torch.no_grad(), solver_stats() as stats:
        logits = model(x)
        base_logits = base_twin(family, model).eval()(x)
    assert stats.total_fallbacks == 0 and stats.mean_iterations > 1  # a real equilibrium solve, not the identity
    assert (logits - base_logits).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# DDP: one training step, gloo, 2 processes


DDP_LR = 0.5
# rank 1's DECs stop after one iteration, unconverged, while rank 0's iterate: the ranks run different solves, and
# DDP must still reduce every DEC gradient (no unused parameters, no hang)
DDP_RANK_OPTIONS = ({}, dict(dec_max_iter=1))


def _ddp_model(rank: int) -> nn.Module:
    model = create("vit", **DDP_RANK_OPTIONS[rank]).train()
    perturb_dec(model)
    return model


def _ddp_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return images("vit", 4, seed=10 + rank), (torch.arange(4) + rank) % NUM_CLASSES


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        model = nn.parallel.DistributedDataParallel(_ddp_model(rank))
        optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
        x, target = _ddp_batch(rank)
        with solver_stats() as stats:
            nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
        state = {k: v.contiguous() for k, v in model.module.state_dict().items()}
        save_file(state, f"{out_dir}/rank{rank}.safetensors")
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(dict(fallbacks=stats.total_fallbacks, samples=stats.total_samples,
                           max_iterations=max(r.max_iterations for r in stats.records)), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_training_step_gloo_two_processes(tmp_path):
    world_size = 2
    context = mp.start_processes(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)),
                                 nprocs=world_size, join=False, start_method="spawn")
    while not context.join(timeout=300):
        pass
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world_size)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # identical weights on both ranks
    stats = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert stats[0]["fallbacks"] == 0 and stats[0]["samples"] == 8 and stats[0]["max_iterations"] > 1  # it iterates
    assert stats[1] == dict(fallbacks=0, samples=8, max_iterations=1)

    # reference: one process, the gradient averaged over the two ranks' batches and configurations
    grads: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        model = _ddp_model(rank)
        x, target = _ddp_batch(rank)
        nn.functional.cross_entropy(model(x), target).backward()
        for n, p in model.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad / world_size
    initial = _ddp_model(0).state_dict()
    for name, grad in grads.items():
        torch.testing.assert_close(ranks[0][name], initial[name] - DDP_LR * grad, msg=name)
    unmoved = [n for n in grads if n.startswith("dec.") and torch.equal(ranks[0][n], initial[n])]
    assert not unmoved, unmoved


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile


# Inductor compiles C++ for each graph piece: ~100 s for this tiny model on the 2-core CI machine. aot_eager runs the
# same Dynamo capture (fullgraph: no graph break anywhere, the solve included) and AOTAutograd's tracing and
# decompositions in ~15 s. tests/test_compile.py has every family, the training step and the CUDA-graph capture.
COMPILE_BACKEND = os.environ.get("TIMM_DEC_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.mark.slow
def test_torch_compile_forward_matches_eager():
    """A solve that converges (the absolute update from small head weights, a contraction): eager stops once every
    sample has converged (host check every iteration), the compiled graph runs all ``max_iter`` iterations with the
    converged samples frozen; the outputs agree. Solver statistics are recorded in eager only: under compile nothing
    is read on the host, by design."""
    model = create("vit", dec_update="absolute", dec_max_iter=8, dec_beta=1.0).eval()
    perturb_dec(model)
    x = images("vit", 2)
    compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)
    with torch.no_grad():
        with solver_stats() as eager_stats:
            expected = model(x)
        with solver_stats() as compiled_stats:
            got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base_twin("vit", model).eval()(x)).abs().max() > 1e-3  # the DEC does something
    assert list(eager_stats.summary()) == ["dec.0", "dec.1"] and 1 < eager_stats.mean_iterations < 8
    assert eager_stats.total_not_converged == eager_stats.total_fallbacks == 0
    assert len(compiled_stats) == 0


# ---------------------------------------------------------------------------------------------------------------------
# timm-dec bench overhead, on a tiny input


@pytest.mark.slow
def test_bench_overhead_runs_and_its_figures_add_up(tmp_path, capsys):
    from timm_dec import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    path = tmp_path / "overhead.json"
    args = parser.parse_args(["overhead", "--models", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "2",
                              "--repeats", "3", "--warmup", "0", "--json", str(path), "--check"])
    status = bench.run(args)
    assert "target vit_tiny_patch16_224 forward_<=1.15" in capsys.readouterr().out
    result = json.loads(path.read_text())
    entry = result["models"]["vit_tiny_patch16_224"]
    assert status == (0 if all(t["met"] for t in entry["targets"].values()) else 1)
    for key in ("forward", "train_step"):
        rounds = entry[key]["rounds_ms"]
        assert len(rounds["base"]) == len(rounds["dec"]) == 3
        per_round = sorted(d / b for d, b in zip(rounds["dec"], rounds["base"]))
        assert entry[key]["ratio"] == pytest.approx(per_round[1]) == pytest.approx(entry["ratios"][key])
    base = timm.create_model("vit_tiny_patch16_224", img_size=64)
    base_bytes = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
    memory = entry["memory"]
    assert memory["base"]["resident_bytes"] == base_bytes
    options = timm.create_model("vit_tiny_patch16_224_dec", img_size=64).dec.buffers()  # each DEC's options buffer
    assert memory["dec"]["resident_bytes"] - base_bytes == 4 * entry["dec_params"] + sum(
        b.numel() * b.element_size() for b in options) > 0
    for m in memory.values():
        assert m["total_bytes"] == m["resident_bytes"] + m["step_bytes"] and m["step_bytes"] > 0
    # the converging case's heads make the solve iterate, and it reaches tol
    assert entry["solver"]["eval_mean_iterations"] > 2 and entry["solver"]["fallbacks"] == 0
    assert entry["solver"]["eval_within_tol"] == 1.0 and entry["solver"]["train_within_tol"] == 1.0
    assert 0 < entry["split"]["forward_dec_share"] < 1 and 0 < entry["split"]["train_dec_forward_share"] < 1
    # the default implicit backward spends part of the training step in its adjoint solve
    assert entry["mode"] == "eager" and 0 < entry["split"]["train_adjoint_share_profiled"] < 1
