"""The mathematics of flow matching: straight paths x_t = (1 - t) x0 + t x1 from noise x0 ~
N(0, I) (t = 0) to data x1 (t = 1), whose velocity x1 - x0 the network regresses; Euler and Heun
integration of dx/dt = v(x, t) over a time grid; and the progressive-halving target of a
distilled student. A velocity field here is called as v(x, t) with t in [0, 1] of shape [B]."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.flow.config import SHIFT

Velocity = Callable[[Tensor, Tensor], Tensor]
# The U-Net's sinusoidal embedding was laid out for DDPM's integer timesteps 0..999: it reads a
# continuous t in [0, 1] as t * TIME_SCALE, so its frequencies resolve the same fractions of t.
TIME_SCALE = 1000.0


def timed(net: nn.Module | Callable) -> Callable:
    """`net` (called as net(x, t_embed[, y])) as a function of t in [0, 1]."""
    return lambda x, t, *y: net(x, t * TIME_SCALE, *y)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t x1, for per-sample times `t` [B]."""
    t = _per_sample(t, x1)
    return (1 - t) * x0 + t * x1


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """d x_t / dt along the straight path: what the network regresses."""
    return x1 - x0


def sample_times(n: int, how: str, mean: float, std: float, generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    """Training times: U(0, 1), or logit-normal: sigmoid(N(mean, std²))."""
    if how == "uniform":
        return torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def flow_loss(velocity: Velocity, x1: Tensor, generator: torch.Generator | None,
              how: str = "logit_normal", mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Conditional flow matching: MSE of v(x_t, t) against x1 - x0, over a batch of data x1."""
    t = sample_times(len(x1), how, mean, std, generator, x1.device)
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    return F.mse_loss(velocity(interpolate(x0, x1, t), t), target_velocity(x0, x1))


def time_grid(steps: int, spacing: str = "uniform", device: torch.device | str = "cpu") -> Tensor:
    """steps + 1 times from 0 to 1. Every spacing maps the uniform grid monotonically, so the
    grid of N steps is every other point of the grid of 2N (what halving relies on)."""
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if spacing == "shifted":  # SD3's shift of the noise level σ = 1 - t
        sigma = 1 - u
        u = 1 - SHIFT * sigma / (1 + (SHIFT - 1) * sigma)
    elif spacing != "uniform":
        raise ValueError(f"unknown spacing {spacing!r}")
    return u.to(device=device, dtype=torch.float32)


@torch.no_grad()
def integrate(velocity: Velocity, x: Tensor, grid: Tensor, sampler: str = "euler",
              progress: Callable[[int, int], None] | None = None) -> Tensor:
    """x at grid[-1] from x at grid[0], by Euler or Heun steps between the grid's points. Heun
    (Karras et al. 2022, Algorithm 1) averages the slopes at both ends of a step, but for the
    last step, which stays Euler."""
    if sampler not in ("euler", "heun"):
        raise ValueError(f"unknown sampler {sampler!r}")
    n = len(grid) - 1
    for i in range(n):
        t, t_next = grid[i].expand(len(x)), grid[i + 1].expand(len(x))
        h = grid[i + 1] - grid[i]
        slope = velocity(x, t)
        if sampler == "heun" and i < n - 1:
            slope = (slope + velocity(x + h * slope, t_next)) / 2
        x = x + h * slope
        if progress is not None:
            progress(i + 1, n)
    return x


def halving_target(teacher: Velocity, x: Tensor, t: Tensor, t_mid: Tensor, t_end: Tensor
                   ) -> Tensor:
    """The velocity whose one Euler step t -> t_end lands where the teacher's two Euler steps
    t -> t_mid -> t_end land: their slopes, weighted by the steps' lengths."""
    h1, h2 = _per_sample(t_mid - t, x), _per_sample(t_end - t_mid, x)
    v1 = teacher(x, t)
    v2 = teacher(x + h1 * v1, t_mid)
    return (h1 * v1 + h2 * v2) / (h1 + h2)


def halving_loss(student: Velocity, teacher: Velocity, x1: Tensor, grid: Tensor,
                 generator: torch.Generator | None) -> Tensor:
    """One progressive-halving update's loss: for each data point, a random step of the
    student's grid (every other point of the teacher's `grid`), x_t on its straight path at the
    step's start, and the MSE of the student's velocity against `halving_target`."""
    j = 2 * torch.randint(0, (len(grid) - 1) // 2, (len(x1),), generator=generator,
                          device=x1.device)
    t, t_mid, t_end = grid[j], grid[j + 1], grid[j + 2]
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    x = interpolate(x0, x1, t)
    with torch.no_grad():
        target = halving_target(teacher, x, t, t_mid, t_end)
    return F.mse_loss(student(x, t), target)
