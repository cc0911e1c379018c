"""Training objectives."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.diffusion.parameterization import Prediction, alpha_sigma, training_target
from workers.diffusion.schedules import NoiseSchedule

NoisePredictor = Callable[[Tensor, Tensor], Tensor]


def ddpm_loss(model: NoisePredictor, schedule: NoiseSchedule, x0: Tensor, *,
              generator: torch.Generator | None = None, prediction: Prediction = "eps") -> Tensor:
    """L_simple, Algorithm 1 of Ho et al. 2020: ||ε - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, t)||²,
    t ~ U{0..T-1}; with `prediction` "x" or "v" the network regresses x_0 or v instead."""
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.q_sample(x0, t, noise)
    if prediction == "eps":
        return F.mse_loss(model(x_t, t), noise)
    alpha, sigma = alpha_sigma(schedule, t, x0)
    return F.mse_loss(model(x_t, t), training_target(prediction, x0, noise, alpha, sigma))
