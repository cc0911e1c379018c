"""Reverse-process samplers behind one interface (diffusers habit):

    sampler.set_timesteps(n[, spacing])           # descending ints in [0, T-1]
    x = sampler.step(eps, t, t_prev, x, generator=g)

``t_prev`` is the next (smaller) timestep of the chosen subsequence, or None at the
last step, where ᾱ_prev = 1 and the sampler returns its prediction of x_0.
Both samplers go through the x_0 prediction so that it can be clipped to the data
range [-1, 1] (as the reference DDPM code does); without clipping the updates are
algebraically those of the papers.

Where x_0 is not clipped (the LDM's latents), a sampler starts from pure noise at the last
timestep whose σ/α is at most SIGMA_MAX, not at T-1. An ε-model determines x_0 only up to σ/α
times its error, and a trained one's error is largest at the noisiest timesteps: the cosine
schedule's last (β capped at 0.999) has σ/α = 20,000 and its first DDIM step multiplied the
error ~600-fold. Clipping to [-1, 1] is what bounds that error on pixels. SIGMA_MAX is Stable
Diffusion's own last noise level (its schedule ends at σ/α = 14.6); on an LDM's latents (bench
/peers.py's, 1,500 steps) the FD of 1,000 DDIM-50 samples by start, on the cosine and linear
schedules: σ/α 20,000: 97; 71: 25.1; 34: 17.3; 16: 14.1; 11: 13.6; 6.4: 14.7 (cosine), and
157 (T-1): 19.3; 80: 16.3; 35: 13.8; 15: 12.3; 10: 12.3 (linear).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

Spacing = Literal["linspace", "trailing"]

import torch
from torch import Tensor

from workers.diffusion.schedules import NoiseSchedule

# The noise level, as σ/α = sqrt((1-ᾱ)/ᾱ), an unclipped sampler starts at: Stable Diffusion's last
SIGMA_MAX = 14.6


class Sampler:
    """Base class: timestep selection and x_0 prediction shared by all samplers."""

    def __init__(self, schedule: NoiseSchedule, *, clip_x0: bool = True):
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.timesteps: list[int] = []
        self.first = first_timestep(schedule, clip_x0)
        # Python floats: the per-step coefficients are scalars and must not sync with an accelerator.
        self._alphas_cumprod: list[float] = schedule.alphas_cumprod.double().cpu().tolist()

    def set_timesteps(self, num_steps: int, spacing: Spacing = "linspace") -> None:
        """Descending timesteps from `first` (T-1 where x_0 is clipped), where sampling starts at
        pure noise: "linspace" spaces them evenly down to 0; "trailing" ends at (first+1)/n - 1
        instead, which makes the grid of n steps every other timestep of the grid of 2n (what
        progressive distillation halves)."""
        self.timesteps = timestep_grid(self.schedule.timesteps, num_steps, spacing, self.first)

    def alpha_bar(self, t: int | None) -> float:
        return 1.0 if t is None else self._alphas_cumprod[t]

    def predict_x0(self, eps: Tensor, t: int, x_t: Tensor) -> Tensor:
        a = self.alpha_bar(t)
        x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def step(self, eps: Tensor, t: int, t_prev: int | None, x_t: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


def first_timestep(schedule: NoiseSchedule, clip_x0: bool) -> int:
    """Where a sampler starts from pure noise: T-1, or where x_0 is not clipped, the last
    timestep whose σ/α is at most SIGMA_MAX."""
    last = schedule.timesteps - 1
    if clip_x0:
        return last
    abar = schedule.alphas_cumprod.double()
    within = ((1 - abar) / abar <= SIGMA_MAX**2).nonzero()
    return int(within[-1]) if len(within) else last


def timestep_grid(T: int, num_steps: int, spacing: Spacing = "linspace",
                  first: int | None = None) -> list[int]:
    """The timesteps of a sampler of `num_steps` over a schedule of T, descending from `first`
    (T-1 unless given); a sampler asked for more steps than there are timesteps from `first`
    down takes each of them once."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    first = T - 1 if first is None else first
    num_steps = min(num_steps, first + 1)
    if spacing == "trailing":
        return [round(first + 1 - i * (first + 1) / num_steps) - 1 for i in range(num_steps)]
    if spacing != "linspace":
        raise ValueError(f"spacing must be 'linspace' or 'trailing', got {spacing!r}")
    # Spacing first/(n-1) >= 1, so rounding never produces duplicates.
    return torch.linspace(first, 0, num_steps, dtype=torch.float64).round().long().tolist()


class AncestralSampler(Sampler):
    """DDPM ancestral sampling, Algorithm 2 of Ho et al. 2020.

    With fewer steps than T the chain is respaced (Nichol & Dhariwal 2021): a step t -> t_prev
    uses β = 1 - ᾱ_t / ᾱ_prev, which is exactly β_t when t_prev = t - 1.

    ``variance="beta"`` uses σ_t² = β_t, one of the two fixed choices in Ho et al. (who report
    similar results for both); the other, the posterior variance β̃_t = (1-ᾱ_prev)/(1-ᾱ_t) β_t,
    is ``variance="beta_tilde"``. β̃ is the one that reproduces the forward marginals q(x_t|x_0)
    exactly; β_t overshoots them near t = 0, badly so when respaced to few steps, so prefer
    "beta_tilde" (or DDIM) for short schedules.
    """

    def __init__(self, schedule: NoiseSchedule, *, clip_x0: bool = True, variance: Literal["beta", "beta_tilde"] = "beta"):
        super().__init__(schedule, clip_x0=clip_x0)
        if variance not in ("beta", "beta_tilde"):
            raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
        self.variance = variance

    def step(self, eps: Tensor, t: int, t_prev: int | None, x_t: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha = a_t / a_prev
        beta = 1 - alpha
        x0 = self.predict_x0(eps, t, x_t)
        # Mean of the Gaussian posterior q(x_prev | x_t, x_0), Eq. 7 of Ho et al.
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x_t
        if t_prev is None:
            return mean  # z = 0 on the final step
        var = beta if self.variance == "beta" else beta * (1 - a_prev) / (1 - a_t)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + math.sqrt(var) * noise


class DDIMSampler(Sampler):
    """DDIM, Eq. 12 of Song et al. 2021. η = 0 is deterministic; η = 1 matches ancestral with β̃."""

    def __init__(self, schedule: NoiseSchedule, *, eta: float = 0.0, clip_x0: bool = True):
        super().__init__(schedule, clip_x0=clip_x0)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, eps: Tensor, t: int, t_prev: int | None, x_t: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        x0 = self.predict_x0(eps, t, x_t)
        if self.clip_x0:
            # Keep ε consistent with the clipped x_0, otherwise the "direction to x_t" reintroduces the overshoot.
            eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = self.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return x_prev


SAMPLERS: dict[str, type[Sampler]] = {"ancestral": AncestralSampler, "ddim": DDIMSampler}


def make_sampler(name: Literal["ancestral", "ddim"], schedule: NoiseSchedule, **kwargs) -> Sampler:
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None
    return cls(schedule, **kwargs)


@torch.no_grad()
def sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    sampler: Sampler,
    shape: tuple[int, ...],
    *,
    num_steps: int,
    spacing: Spacing = "linspace",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Run the reverse process from x_T ~ N(0, I); ``progress(i, n)`` after step i of n (1-based)."""
    sampler.set_timesteps(num_steps, spacing)
    timesteps = sampler.timesteps
    x = torch.randn(shape, generator=generator, device=device)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        x = sampler.step(model_fn(x, t_batch), t, t_prev, x, generator=generator)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x
