"""Losses that make a student mimic its teacher."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *,
            temperature: float, alpha: float) -> dict[str, Tensor]:
    """Knowledge distillation (Hinton et al. 2015) over (..., V) logits and (...) targets:

        loss = α CE(student, targets) + (1 - α) T² KL(softmax(teacher/T) || softmax(student/T))

    with the KL the mean per position (token). T² keeps the soft term's gradients at the scale of
    the hard term's as T changes."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student_logits.reshape(-1, vocab).float(), targets.reshape(-1))
    return {"loss": alpha * ce + (1 - alpha) * temperature**2 * kl, "kl": kl, "ce": ce}


def regression_loss(output: Tensor, target: Tensor, kind: Literal["l1", "l2"]) -> Tensor:
    return F.l1_loss(output, target) if kind == "l1" else F.mse_loss(output, target)
