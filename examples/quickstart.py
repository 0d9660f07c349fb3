"""Quickstart: create a ``*_dec`` model, train it briefly on locally scaled digits, predict, and draw its learned warp.

    python examples/quickstart.py                         # the tiny preset: about a minute on a laptop CPU
    python examples/quickstart.py --steps 600 --num-digits 2
    python examples/quickstart.py --model local-dir:runs/finetune-tiny/final --steps 0   # a fine-tuned model

Everything runs offline: the digits come from scikit-learn's bundled handwritten digits. The output folder gets
``warp.png`` (the learned monotone scaling of the first DEC, the input image's, drawn over test images, as the paper's
Fig. A2)
and the model itself as a Hub folder (``timm.create_model("local-dir:<output>/model", pretrained=True)``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from timm.utils import ParseKwargs
from torchvision.transforms import Normalize

import timm_dec
from timm_dec.data import LocallyScaledDigits
from timm_dec.hub import save_pretrained
from timm_dec.ops import apply_map

# A ViT small enough to train on a CPU in a minute: 32 px digits, 8 px patches, average pooling, a DEC on the input
# image (the default position) with the image H's default widths.
TINY = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, global_pool="avg", dec_blocks=("input",),
            dec_image_widths=(8, 16))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_dec", help="a *_dec name, or local-dir:/hf-hub: of a saved one")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                        help="create_model kwargs; default the tiny preset for a *_dec name")
    parser.add_argument("--num-digits", type=int, default=1, help="digits per image (10**k classes)")
    parser.add_argument("--canvas", type=int, default=32, help="image size")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200, help="training steps (0: use the model as it is)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/quickstart")
    return parser.parse_args(argv)


def create(args: argparse.Namespace) -> torch.nn.Module:
    """The model: a saved one as it is, or a fresh ``*_dec`` model (the tiny preset unless --model-kwargs)."""
    if args.model.startswith(("local-dir:", "hf-hub:")):
        return timm.create_model(args.model, pretrained=True)
    kwargs = args.model_kwargs or TINY
    return timm.create_model(args.model, num_classes=10 ** args.num_digits, img_size=args.canvas, **kwargs)


def train(model: torch.nn.Module, data: LocallyScaledDigits, args: argparse.Namespace) -> None:
    """A plain PyTorch loop: the DEC trains with the rest of the model (implicit gradients, no extra loss)."""
    if args.steps < 1:
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    model.train()
    step = 0
    while step < args.steps:
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(f"step {step:4d}  loss {loss.item():.3f}")
            if step == args.steps:
                break
    model.eval()


def predict(model: torch.nn.Module, data: LocallyScaledDigits, count: int = 6) -> torch.Tensor:
    """Top-3 predictions for the first test images, with the solver statistics of the DEC solves."""
    images = torch.stack([data[i][0] for i in range(count)])
    labels = [data[i][1] for i in range(count)]
    with torch.no_grad(), timm_dec.solver_stats() as stats:
        probs = model.eval()(images).softmax(-1)
    top = probs.topk(3, dim=-1)
    for i, label in enumerate(labels):
        guesses = ", ".join(f"{c} ({p:.2f})" for p, c in zip(top.values[i].tolist(), top.indices[i].tolist()))
        print(f"image {i}: label {label:>3}  top-3 {guesses}")
    print(f"DEC solves: {stats.mean_iterations:.1f} iterations per sample on average, "
          f"{stats.total_fallbacks} fallbacks to the identity")
    return images


def learned_knots(model: torch.nn.Module, images: torch.Tensor) -> tuple[Union[str, int], torch.Tensor]:
    """(position, knots (B, 2, G+1, G+1)) of the first DEC ("input" or a block), read with a forward hook on it."""
    block = model.dec_cfg.blocks[0]
    captured = []
    handle = model.dec[str(block)].register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
    return block, captured[0]


def draw_warp(images: torch.Tensor, knots: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              path: Path, block: Union[str, int]) -> None:
    """Each image with the grid lines of l: the canonicalised map at p reads the features at l(p)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = images.shape[0]
    shown = Normalize([-m / s for m, s in zip(mean, std)], [1 / s for s in std])(images).clamp(0, 1)
    t = torch.linspace(0, 1, 64)
    lines = [torch.stack([t, torch.full_like(t, v)], -1) for v in torch.linspace(0, 1, 9)]
    lines += [torch.stack([torch.full_like(t, v), t], -1) for v in torch.linspace(0, 1, 9)]
    pts = torch.cat(lines)                                                     # (N, 2) points (x, y) in [0, 1]
    warped = apply_map(knots, pts.expand(b, -1, -1).contiguous()).view(b, len(lines), len(t), 2)
    fig, axes = plt.subplots(1, b, figsize=(2.2 * b, 2.4))
    size = images.shape[-1] - 1
    for i, ax in enumerate(axes):
        ax.imshow(shown[i].permute(1, 2, 0).numpy())
        for line in warped[i]:
            ax.plot(line[:, 0] * size, line[:, 1] * size, lw=0.7, color="tab:orange")
        ax.set_axis_off()
    where = "the input image" if block == "input" else f"block {block}"
    fig.suptitle(f"learned monotone scaling of {where} (grid lines of l)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = create(args)
    cfg = timm.data.resolve_input_data_config(model)
    # digits as large as the canvas allows at the largest scale (2.0), so a small model can read them
    common = dict(num_digits=args.num_digits, canvas=args.canvas, digit_size=args.canvas // (2 * args.num_digits),
                  transform=Normalize(cfg["mean"], cfg["std"]))
    train_data = LocallyScaledDigits("train", num_samples=args.train_samples, **common)
    test_data = LocallyScaledDigits("test", num_samples=64, **common)
    print(f"{args.model}: DEC on blocks {model.dec_cfg.blocks}, grid {model.dec_cfg.options.grid}, "
          f"mode {model.dec_cfg.mode}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    train(model, train_data, args)
    images = predict(model, test_data)
    block, knots = learned_knots(model, images)
    identity = torch.linspace(0, 1, knots.shape[-1])
    print(f"DEC {block}: mean |knots - identity| = {(knots - identity).abs().mean().item():.4f} "
          f"(0 is the identity warp, where every DEC starts)")

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    draw_warp(images, knots, cfg["mean"], cfg["std"], out / "warp.png", block)
    # the data settings go into config.json: `timm-dec eval --model local-dir:<output>/model` evaluates on the same
    save_pretrained(model, out / "model", dataset="locally scaled digits (quickstart)",
                    data=dict(num_digits=args.num_digits, canvas=args.canvas, digit_size=common["digit_size"],
                              scale_range=[0.4, 2.0]))
    print(f"wrote {out / 'warp.png'} and {out / 'model'} (load it with "
          f"timm.create_model('local-dir:{out / 'model'}', pretrained=True))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
