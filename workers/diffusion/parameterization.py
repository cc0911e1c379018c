"""What a diffusion network predicts from (x_t, t), and the conversions between the choices.

With α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t) and x_t = α_t x_0 + σ_t ε:

- "eps": ε, the DDPM choice (Ho et al. 2020);
- "x":   x_0 itself;
- "v":   v = α_t ε - σ_t x_0 (Salimans & Ho 2022), so that x_0 = α_t x_t - σ_t v and
         ε = σ_t x_t + α_t v.

ε-prediction is the best-studied for many-step sampling, but its x_0 estimate
(x_t - σ_t ε̂) / α_t blows up as α_t -> 0, which is where a few-step sampler starts; "v" and "x"
stay bounded there, which is why progressive distillation trains students with them.
"""

from __future__ import annotations

from typing import Callable, Literal

from torch import Tensor

from workers.diffusion.schedules import NoiseSchedule, _gather

Prediction = Literal["eps", "v", "x"]
PREDICTIONS: tuple[str, ...] = ("eps", "v", "x")


def alpha_sigma(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(α_t, σ_t) for a LongTensor[B] of timesteps, shaped to broadcast against `like`."""
    return (_gather(schedule.sqrt_alphas_cumprod, t, like),
            _gather(schedule.sqrt_one_minus_alphas_cumprod, t, like))


def training_target(prediction: Prediction, x0: Tensor, noise: Tensor, alpha: Tensor,
                    sigma: Tensor) -> Tensor:
    """What a network of this parameterization should output for x_t = α x_0 + σ ε."""
    if prediction == "eps":
        return noise
    if prediction == "x":
        return x0
    if prediction == "v":
        return alpha * noise - sigma * x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def to_x0_eps(prediction: Prediction, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor
              ) -> tuple[Tensor, Tensor]:
    """(x_0, ε) implied by the network output `out` at x_t."""
    if prediction == "eps":
        return (x_t - sigma * out) / alpha, out
    if prediction == "x":
        return out, (x_t - alpha * out) / sigma
    if prediction == "v":
        return alpha * x_t - sigma * out, sigma * x_t + alpha * out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def eps_model(net: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule,
              prediction: Prediction) -> Callable[[Tensor, Tensor], Tensor]:
    """`net` as the ε-predictor the samplers take, whatever it predicts."""
    if prediction == "eps":
        return net

    def predict_eps(x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = alpha_sigma(schedule, t, x_t)
        return to_x0_eps(prediction, net(x_t, t), x_t, alpha, sigma)[1]

    return predict_eps
