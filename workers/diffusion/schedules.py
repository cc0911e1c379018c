"""Discrete-time variance schedules for DDPM-style diffusion.

Indexing follows diffusers: array index t in {0, ..., T-1} holds the quantities of
paper timestep t + 1, so ``alphas_cumprod[t]`` is ᾱ_{t+1} of Ho et al. (2020).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ScheduleKind = Literal["linear", "cosine"]


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Ho et al. 2020: β linear from beta_start to beta_end (1e-4 .. 0.02 for T=1000)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, *, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s))."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    # ᾱ(T) = 0 would make β_T = 1 and the reverse process singular at t = T.
    return betas.clamp(max=max_beta)


class NoiseSchedule:
    """β_t and the derived ᾱ_t, plus the forward process q(x_t | x_0)."""

    def __init__(
        self,
        *,
        kind: ScheduleKind = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if kind == "linear":
            betas = linear_betas(timesteps, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(timesteps)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; expected 'linear' or 'cosine'")

        self.kind = kind
        self.timesteps = timesteps
        # The cumulative product loses precision quickly in float32, so derive everything in float64.
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.betas = betas.float()
        self.alphas = alphas.float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1 - alphas_cumprod).sqrt().float()

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, timesteps={self.timesteps})"

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move all tensors to ``device`` in place; returns self (like ``nn.Module.to``)."""
        for name in ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, with t a LongTensor[B] of indices."""
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample given the noise: x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)."""
        return (x_t - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _gather(self.sqrt_alphas_cumprod, t, x_t)


def make_schedule(
    kind: ScheduleKind = "linear",
    timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> NoiseSchedule:
    return NoiseSchedule(kind=kind, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end)


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] reshaped to [B, 1, ..., 1] so it broadcasts against ``like``."""
    out = values.to(like.device)[t.to(like.device).long()]
    return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
