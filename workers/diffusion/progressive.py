"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) on a discrete noise schedule.

A round distils a teacher sampling with N deterministic DDIM steps into a student that needs
N/2: for x_t on the student's grid, the teacher takes two DDIM steps t -> t' -> t'', and the
student learns the x̃ whose single DDIM step t -> t'' lands on the same point:

    x̃ = (z_t'' - (σ_t''/σ_t) z_t) / (α_t'' - (σ_t''/σ_t) α_t)

Grids are "trailing" (`timestep_grid`), so the student's N/2 timesteps are every other one of
the teacher's N, and each round's student is the next round's teacher. The student predicts v
(loss: MSE in v, i.e. the paper's "SNR+1" weighting of the x_0 error) or x_0 (the "truncated
SNR", max(SNR, 1), weighting); both stay stable where α_t -> 0, unlike ε.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.diffusion.parameterization import Prediction, to_x0_eps
from workers.diffusion.samplers import first_timestep, timestep_grid
from workers.diffusion.schedules import NoiseSchedule

Net = Callable[[Tensor, Tensor], Tensor]
END = -1  # the "timestep" after the last step: ᾱ = 1, the clean image


def _coefficients(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) at timesteps `t`, where END means ᾱ = 1."""
    abar = schedule.alphas_cumprod.to(like.device)[t.clamp(min=0)]
    abar = torch.where(t == END, torch.ones_like(abar), abar).to(like.dtype)
    shape = (-1, *([1] * (like.ndim - 1)))
    return abar.sqrt().reshape(shape), (1 - abar).clamp(min=0).sqrt().reshape(shape)


def _ddim_step(net: Net, prediction: Prediction, schedule: NoiseSchedule, z: Tensor, t: Tensor,
               t_next: Tensor, clip: bool) -> Tensor:
    """One deterministic DDIM step z_t -> z_t_next (as DDIMSampler with η = 0, batched over t)."""
    alpha, sigma = _coefficients(schedule, t, z)
    x0 = to_x0_eps(prediction, net(z, t), z, alpha, sigma)[0]
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = (z - alpha * x0) / sigma
    alpha_next, sigma_next = _coefficients(schedule, t_next, z)
    return alpha_next * x0 + sigma_next * eps


def student_grid_points(schedule: NoiseSchedule, teacher_steps: int, n: int,
                        generator: torch.Generator | None, device: torch.device, *,
                        clip: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(t, t', t'') for `n` random student steps of a round whose teacher takes `teacher_steps`,
    on the grid the student then samples on (see `first_timestep`)."""
    grid = timestep_grid(schedule.timesteps, teacher_steps, "trailing", first_timestep(schedule, clip))
    grid = torch.tensor(grid + [END], device=device)
    i = torch.randint(0, teacher_steps // 2, (n,), generator=generator, device=device)
    return grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]


@torch.no_grad()
def two_step_target(teacher: Net, prediction: Prediction, schedule: NoiseSchedule, z: Tensor,
                    t: Tensor, t1: Tensor, t2: Tensor, *, clip: bool) -> tuple[Tensor, Tensor]:
    """(x̃, z_t''): the x_0 a single DDIM step t -> t'' must predict to land where the teacher's
    two steps t -> t' -> t'' land, and that point."""
    z2 = _ddim_step(teacher, prediction, schedule,
                    _ddim_step(teacher, prediction, schedule, z, t, t1, clip), t1, t2, clip)
    alpha, sigma = _coefficients(schedule, t, z)
    alpha2, sigma2 = _coefficients(schedule, t2, z)
    ratio = sigma2 / sigma
    return (z2 - ratio * z) / (alpha2 - ratio * alpha), z2


def student_step(student: Net, prediction: Prediction, schedule: NoiseSchedule, z: Tensor,
                 t: Tensor, t2: Tensor, *, clip: bool) -> Tensor:
    """The student's one DDIM step t -> t''."""
    return _ddim_step(student, prediction, schedule, z, t, t2, clip)


def progressive_loss(student: Net, student_prediction: Prediction, teacher: Net,
                     teacher_prediction: Prediction, schedule: NoiseSchedule, x0: Tensor,
                     teacher_steps: int, *, clip: bool,
                     generator: torch.Generator | None = None) -> Tensor:
    """The distillation loss of one batch of training data `x0` in a round whose teacher
    samples with `teacher_steps` steps."""
    t, t1, t2 = student_grid_points(schedule, teacher_steps, len(x0), generator, x0.device,
                                    clip=clip)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = _coefficients(schedule, t, x0)
    z = alpha * x0 + sigma * noise
    target, _ = two_step_target(teacher, teacher_prediction, schedule, z, t, t1, t2, clip=clip)
    out = student(z, t)
    if student_prediction == "v":
        return F.mse_loss(out, (alpha * z - target) / sigma)
    if student_prediction == "x":
        weight = (alpha / sigma).square().clamp(min=1.0)  # truncated SNR
        return (weight * (out - target).square()).mean()
    raise ValueError(f"a distilled student predicts 'v' or 'x', not {student_prediction!r}")


def round_of(step: int, steps_per_round: int) -> int:
    """The 0-based round that global step `step` (1-based) belongs to."""
    return (step - 1) // steps_per_round


def teacher_steps_of_round(teacher_steps: int, round_index: int) -> int:
    return teacher_steps // 2 ** round_index

