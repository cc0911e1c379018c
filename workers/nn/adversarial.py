"""Adversarial losses on discriminator logits, shared by the GAN and the autoencoders' patch
discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    # non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z)))
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
