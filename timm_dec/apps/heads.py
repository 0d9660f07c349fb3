"""Classifiers over structured labels: a k-digit number predicted digit by digit.

`LocallyScaledDigits` labels an image with its number n in [0, 10**k). A classifier with 10**k outputs must learn
every number as a class of its own; with k = 2 a tiny ViT trained from scratch on a CPU stays near chance for
hundreds of steps. `DigitwiseClassifier` wraps a model with 10 * k outputs (one 10-way distribution per digit
position, left to right) and returns the joint log-probabilities of the 10**k numbers under the independent-digit
model, log p(n) = sum_j log p_j(d_j). Accuracy is then "every digit right", cross-entropy on the number is the sum of
the per-digit cross-entropies, and every metric defined on class probabilities (InvE, the probability of the correct
class) applies unchanged. The wrapped model's state dict is the inner model's: a checkpoint of it loads into
``timm.create_model(name, num_classes=10 * k)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DigitwiseClassifier", "LABEL_RULES", "num_outputs"]

LABEL_RULES = ("number", "digits")


def num_outputs(label: str, num_digits: int) -> int:
    """Outputs of the model under a label rule: 10**k for ``"number"``, 10 * k for ``"digits"``."""
    if label not in LABEL_RULES:
        raise ValueError(f"label must be one of {LABEL_RULES}, got {label!r}")
    return 10 ** num_digits if label == "number" else 10 * num_digits


class DigitwiseClassifier(nn.Module):
    """A model with 10 * k outputs seen as a classifier of the 10**k numbers.

    Args:
        model: returns (B, 10 * k) logits; outputs 10 j .. 10 j + 9 score digit position j (0 = leftmost, the most
            significant digit of the number).
        num_digits: k.

    Example:
        >>> clf = DigitwiseClassifier(nn.Linear(4, 20), num_digits=2)
        >>> clf(torch.randn(3, 4)).shape, clf(torch.randn(3, 4)).logsumexp(-1).abs().max() < 1e-5
        (torch.Size([3, 100]), tensor(True))
    """

    def __init__(self, model: nn.Module, num_digits: int) -> None:
        super().__init__()
        if not isinstance(num_digits, int) or num_digits < 1:
            raise ValueError(f"num_digits must be a positive integer, got {num_digits!r}")
        self.model = model
        self.num_digits = num_digits

    @property
    def num_classes(self) -> int:
        """10**k: the numbers this classifier scores."""
        return 10 ** self.num_digits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) input -> (B, 10**k) joint log-probabilities, number n = sum_j d_j 10**(k-1-j)."""
        logits = self.model(x)
        k = self.num_digits
        if logits.dim() != 2 or logits.shape[1] != 10 * k:
            raise ValueError(f"DigitwiseClassifier({k} digits) needs (B, {10 * k}) logits, got {tuple(logits.shape)}")
        # at least float32 (half-precision logits under autocast), float64 kept (gradient checks)
        per_digit = logits.to(torch.promote_types(logits.dtype, torch.float32)).unflatten(1, (k, 10)).log_softmax(-1)
        joint = per_digit[:, 0]
        for j in range(1, k):
            joint = (joint[:, :, None] + per_digit[:, j, None, :]).flatten(1)
        return joint

    def state_dict(self, *args, **kwargs):  # noqa: D102  (the inner model's keys, so checkpoints load into timm)
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)
