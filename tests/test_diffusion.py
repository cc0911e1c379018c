"""Unit tests for the diffusion building blocks: schedule, samplers, loss, U-Net, EMA."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from workers.diffusion.losses import ddpm_loss
from workers.diffusion.samplers import (SIGMA_MAX, AncestralSampler, DDIMSampler, first_timestep,
                                       make_sampler, sample)
from workers.diffusion.schedules import NoiseSchedule, make_schedule
from workers.nn.ema import EMA
from workers.nn.unet import UNet, norm

KINDS = ["linear", "cosine"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def broadcast(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values[t].reshape(-1, *([1] * (like.ndim - 1))).to(like)


def oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """The ideal ε-predictor for a point mass at x0: ε = (x_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = broadcast(schedule.alphas_cumprod, t, x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return model_fn


def run_chain(sampler, model_fn, x, num_steps, *, generator=None, record=()):
    """Manual sampling loop from a given x at timesteps[0]; returns final x and {t: x_t} for t in record."""
    sampler.set_timesteps(num_steps)
    ts = sampler.timesteps
    states = {}
    for i, t in enumerate(ts):
        if t in record:
            states[t] = x.clone()
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        x = sampler.step(model_fn(x, torch.full((x.shape[0],), t)), t, t_prev, x, generator=generator)
    return x, states


# --------------------------------------------------------------------------- schedules


def test_linear_betas_endpoints():
    s = NoiseSchedule(kind="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02)
    assert s.betas.shape == (1000,)
    assert s.betas.dtype == torch.float32
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    assert torch.all(s.betas[1:] > s.betas[:-1])


def reference_betas(kind: str, T: int = 1000) -> np.ndarray:
    """Independent float64 transcription of the two papers' formulas."""
    if kind == "linear":
        return np.linspace(1e-4, 0.02, T)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


@pytest.mark.parametrize("kind", KINDS)
def test_derived_quantities_consistent(kind):
    s = make_schedule(kind, 1000)
    betas = reference_betas(kind)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas.numpy(), 1 - betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-5)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod.numpy(), np.sqrt(abar), rtol=1e-5)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - abar), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(kind):
    abar = make_schedule(kind, 1000).alphas_cumprod
    assert torch.all(abar > 0) and torch.all(abar < 1)
    assert torch.all(abar[1:] < abar[:-1])


def test_cosine_endpoints_and_clipping():
    s = NoiseSchedule(kind="cosine", timesteps=1000)
    assert s.alphas_cumprod[0].item() > 0.999
    assert s.alphas_cumprod[-1].item() < 1e-6
    assert s.betas.max().item() == pytest.approx(0.999)
    # Nichol & Dhariwal's ᾱ(t) = f(t)/f(0) away from the clipped end.
    t = np.arange(1, 1001) / 1000
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(s.alphas_cumprod[:900].numpy(), (f(t) / f(0))[:900], rtol=1e-5)


def test_bad_schedule_kind_raises():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule(kind="quadratic")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0, 10, 250, 600, 999])
def test_q_sample_moments(kind, t):
    s = make_schedule(kind, 1000)
    n = 20_000
    x0 = torch.tensor([-0.8, 0.0, 0.3, 1.0]).repeat(n, 1)  # [n, 4]: n draws for each of 4 values
    noise = torch.randn(x0.shape, generator=gen(t))
    x_t = s.q_sample(x0, torch.full((n,), t), noise).double()

    a = s.alphas_cumprod.double()[t].item()
    mean_tol = 5 * math.sqrt((1 - a) / n) + 1e-6
    var_tol = 5 * (1 - a) * math.sqrt(2 / n)
    np.testing.assert_allclose(x_t.mean(0).numpy(), math.sqrt(a) * x0[0].double().numpy(), atol=mean_tol)
    np.testing.assert_allclose(x_t.var(0).numpy(), np.full(4, 1 - a), atol=var_tol)


def test_q_sample_per_example_timesteps_and_predict_x0_inverts():
    s = make_schedule("linear", 1000)
    x0 = torch.rand(3, 2, 4, 4, generator=gen(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(1))
    t = torch.tensor([0, 500, 999])
    x_t = s.q_sample(x0, t, noise)
    for i in range(3):
        a = s.alphas_cumprod[t[i]]
        torch.testing.assert_close(x_t[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i])
    torch.testing.assert_close(s.predict_x0(x_t, t, noise), x0, atol=1e-4, rtol=0)


def test_schedule_to_returns_self_and_moves_tensors():
    s = make_schedule("cosine", 50)
    assert s.to("cpu") is s
    assert s.alphas_cumprod.device.type == "cpu"


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("num_steps", [1, 2, 4, 10, 50, 999, 1000])
def test_set_timesteps_evenly_spaced_descending(num_steps):
    sampler = DDIMSampler(make_schedule("linear", 1000))
    sampler.set_timesteps(num_steps)
    ts = sampler.timesteps
    assert len(ts) == num_steps
    assert ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if num_steps > 1:
        assert ts[-1] == 0
        gaps = np.diff(ts)
        assert gaps.max() - gaps.min() <= 1


@pytest.mark.parametrize("num_steps", [0, 1001])
def test_set_timesteps_out_of_range_raises(num_steps):
    with pytest.raises(ValueError):
        AncestralSampler(make_schedule("linear", 1000)).set_timesteps(num_steps)


@pytest.mark.parametrize(
    ("kind", "num_steps"),
    # One-step cosine divides by sqrt(ᾱ_T) ~ 5e-5 and loses ~2e-3 to float32 rounding, so it is left out.
    [("linear", n) for n in (1, 4, 10, 50, 1000)] + [("cosine", n) for n in (4, 10, 50, 1000)],
)
def test_ddim_with_oracle_follows_deterministic_path_to_x0(kind, num_steps):
    s = make_schedule(kind, 1000)
    x0 = torch.rand(16, 1, 4, 4, generator=gen(0)) * 1.8 - 0.9
    x_T = torch.randn(x0.shape, generator=gen(1))
    sampler = DDIMSampler(s, eta=0.0, clip_x0=False)
    sampler.set_timesteps(num_steps)
    ts = sampler.timesteps
    x, states = run_chain(sampler, oracle(s, x0), x_T, num_steps, record=set(ts[:7]))
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)

    # η = 0 keeps ε fixed, so every intermediate x_t is sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε along one path.
    # ε is read off x_T, except for cosine, whose ᾱ_T ~ 2e-9 leaves x_T almost no float32 bits of x0:
    # there the first step's rounding legitimately picks a neighbouring path, read off after that step.
    abar = s.alphas_cumprod.double()
    ref_t = ts[0] if kind == "linear" else ts[1]
    eps = (states[ref_t].double() - abar[ref_t].sqrt() * x0.double()) / (1 - abar[ref_t]).sqrt()
    for t in ts[1:7]:
        expected = abar[t].sqrt() * x0.double() + (1 - abar[t]).sqrt() * eps
        torch.testing.assert_close(states[t].double(), expected, atol=1e-4, rtol=0)


def test_ddim_eta0_is_deterministic_and_ignores_generator():
    s = make_schedule("linear", 100)
    x_t = torch.randn(4, 3, generator=gen(0))
    eps = torch.randn(4, 3, generator=gen(1))
    sampler = DDIMSampler(s)
    torch.testing.assert_close(sampler.step(eps, 50, 40, x_t, generator=gen(2)), sampler.step(eps, 50, 40, x_t, generator=gen(3)))


@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddim_eta1_equals_ancestral_with_posterior_variance(clip_x0):
    s = make_schedule("linear", 1000)
    x_t = torch.randn(64, 8, generator=gen(0))
    eps = 3 * torch.randn(64, 8, generator=gen(1))  # large, so clipping of x0 is active
    ddim = DDIMSampler(s, eta=1.0, clip_x0=clip_x0)
    ddpm = AncestralSampler(s, variance="beta_tilde", clip_x0=clip_x0)
    for t, t_prev in [(999, 950), (500, 480), (20, 19), (5, None)]:
        torch.testing.assert_close(
            ddim.step(eps, t, t_prev, x_t, generator=gen(7)),
            ddpm.step(eps, t, t_prev, x_t, generator=gen(7)),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("t", [2, 300])  # at small t, β̃_t ≈ 0.6 β_t, so the two choices are distinguishable
def test_ancestral_step_is_algorithm_2(variance, t):
    """One step from a fixed x_t: mean 1/sqrt(α_t)(x_t - β_t/sqrt(1-ᾱ_t) ε), variance σ_t²."""
    s = make_schedule("linear", 1000)
    n = 40_000
    x_t = torch.full((n, 1), 0.7)
    eps = torch.full((n, 1), -0.4)
    x_prev = AncestralSampler(s, variance=variance, clip_x0=False).step(eps, t, t - 1, x_t, generator=gen(0)).double()

    beta, alpha, abar, abar_prev = (float(v) for v in (s.betas[t], s.alphas[t], s.alphas_cumprod[t], s.alphas_cumprod[t - 1]))
    mean = (0.7 - beta / math.sqrt(1 - abar) * -0.4) / math.sqrt(alpha)
    var = beta if variance == "beta" else beta * (1 - abar_prev) / (1 - abar)
    assert x_prev.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / n))
    assert x_prev.var().item() == pytest.approx(var, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ancestral_with_oracle_keeps_forward_marginals_and_ends_at_x0(kind, num_steps):
    """With σ² = β̃ the reverse chain, started from q(x_t|x0) at its first timestep, has
    marginals exactly q(x_t|x0), respaced or not."""
    s = make_schedule(kind, 1000)
    n = 20_000
    x0 = torch.full((n, 1), 0.5)
    sampler = AncestralSampler(s, variance="beta_tilde", clip_x0=False)
    sampler.set_timesteps(num_steps)
    first = torch.full((n,), sampler.timesteps[0])
    x_T = s.q_sample(x0, first, torch.randn(x0.shape, generator=gen(0)))
    record = set(sampler.timesteps[:: max(1, num_steps // 6)]) | set(sampler.timesteps[-3:])
    x, states = run_chain(sampler, oracle(s, x0), x_T, num_steps, generator=gen(1), record=record)

    assert (x - x0).abs().max().item() < 1e-4
    for t, x_t in states.items():
        a = s.alphas_cumprod.double()[t].item()
        x_t = x_t.double()
        assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=5 * math.sqrt((1 - a) / n) + 1e-6), t
        assert x_t.var().item() == pytest.approx(1 - a, rel=5 * math.sqrt(2 / n)), t


@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ancestral_default_beta_variance_ends_at_oracle_target(num_steps):
    s = make_schedule("linear", 1000)
    x0 = torch.rand(256, 1, 4, 4, generator=gen(0)) * 1.8 - 0.9
    wrong = -x0
    x_T = torch.randn(x0.shape, generator=gen(1))
    sampler = AncestralSampler(s)
    x, _ = run_chain(sampler, oracle(s, x0), x_T, num_steps, generator=gen(2))
    assert (x - x0).abs().max().item() < 1e-3
    x, _ = run_chain(sampler, oracle(s, wrong), x_T, num_steps, generator=gen(2))
    assert (x - x0).abs().max().item() > 1.0  # it follows the model, not some built-in target


@pytest.mark.parametrize("name", ["ancestral", "ddim"])
def test_clip_x0_flag(name):
    s = make_schedule("linear", 1000)
    x0 = torch.full((8, 2), 3.0)  # outside the data range
    x_T = torch.randn(x0.shape, generator=gen(0))
    clipped, _ = run_chain(make_sampler(name, s, clip_x0=True), oracle(s, x0), x_T, 20, generator=gen(1))
    raw, _ = run_chain(make_sampler(name, s, clip_x0=False), oracle(s, x0), x_T, 20, generator=gen(1))
    torch.testing.assert_close(clipped, torch.ones_like(x0), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw, x0, atol=1e-3, rtol=0)



@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_unclipped_ddim_tolerates_a_one_percent_model_error(kind):
    """Latents (the LDM's, scaled to unit variance) are not clipped to [-1, 1]: the sampler
    must not blow up a near-ideal ε-model's small error. The data are N(0, I), whose ideal
    ε-predictor is sqrt(1 - ᾱ_t) x_t; the model is off by 1% of a unit direction."""
    schedule = make_schedule(kind, 1000)
    error = 0.01 * torch.randn(256, 4, 8, 8, generator=gen(1))

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 - broadcast(schedule.alphas_cumprod, t, x)).sqrt() * x + error

    out = sample(model_fn, make_sampler("ddim", schedule, clip_x0=False), (256, 4, 8, 8),
                 num_steps=50, generator=gen(0))
    assert float(out.std()) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_an_unclipped_sampler_starts_where_sigma_over_alpha_is_at_most_stable_diffusions(kind):
    schedule = make_schedule(kind, 1000)
    snr_inv = ((1 - schedule.alphas_cumprod.double()) / schedule.alphas_cumprod.double()).tolist()
    first = first_timestep(schedule, clip_x0=False)
    assert snr_inv[first] <= SIGMA_MAX**2 < snr_inv[first + 1]
    assert first == {"linear": 726, "cosine": 955}[kind]
    assert first_timestep(schedule, clip_x0=True) == 999  # pixels: x_0 clipped, start at T-1
    for name in ("ddim", "ancestral"):
        raw, clipped = (make_sampler(name, schedule, clip_x0=c) for c in (False, True))
        raw.set_timesteps(50), clipped.set_timesteps(50)
        assert raw.timesteps[0] == first and raw.timesteps[-1] == 0 and len(raw.timesteps) == 50
        assert clipped.timesteps[0] == 999
        raw.set_timesteps(1000)  # every timestep: each of those from the start down, once
        assert raw.timesteps == list(range(first, -1, -1))


def test_make_sampler_registry():
    s = make_schedule("linear", 100)
    assert isinstance(make_sampler("ancestral", s), AncestralSampler)
    ddim = make_sampler("ddim", s, eta=0.5)
    assert isinstance(ddim, DDIMSampler) and ddim.eta == 0.5
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", s)


@pytest.mark.parametrize("name", ["ancestral", "ddim"])
def test_sample_loop(name):
    s = make_schedule("cosine", 200)
    x0 = torch.rand(5, 1, 4, 4, generator=gen(0)) * 2 - 1
    seen_t, calls = [], []
    model = oracle(s, x0)

    def model_fn(x, t):
        assert t.dtype == torch.long and t.shape == (5,)
        seen_t.append(int(t[0]))
        return model(x, t)

    out = sample(model_fn, make_sampler(name, s), (5, 1, 4, 4), num_steps=10, generator=gen(1), progress=lambda i, n: calls.append((i, n)))
    assert out.shape == (5, 1, 4, 4)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert calls == [(i, 10) for i in range(1, 11)]
    assert seen_t[0] == 199 and seen_t[-1] == 0 and len(seen_t) == 10


def test_sample_is_reproducible_with_generator():
    s = make_schedule("linear", 100)
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    a = sample(model_fn, AncestralSampler(s), (2, 3), num_steps=100, generator=gen(5))
    b = sample(model_fn, AncestralSampler(s), (2, 3), num_steps=100, generator=gen(5))
    c = sample(model_fn, AncestralSampler(s), (2, 3), num_steps=100, generator=gen(6))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


# --------------------------------------------------------------------------- U-Net


def perturbed(model: nn.Module, scale: float = 0.02) -> nn.Module:
    """Move off the zero-initialised output layers so that every parameter influences the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    ("image_size", "channel_mult", "attn"),
    [(8, (1, 2), ()), (8, (1,), (8,)), (16, (1, 2, 2), (4,)), (28, (1, 2), (14,)), (28, (1, 2, 2), ()), (32, (1, 2, 2, 2), (8,))],
)
def test_unet_output_shape(image_size, channel_mult, attn):
    model = UNet(in_channels=3, image_size=image_size, channels=8, channel_mult=channel_mult, attn_resolutions=attn)
    x = torch.randn(2, 3, image_size, image_size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape
    assert model(x, torch.tensor([0.5, 12.25])).shape == x.shape  # continuous time works too


def test_unet_out_channels_and_small_group_norm():
    model = UNet(in_channels=4, image_size=8, channels=16, num_res_blocks=2, out_channels=8, dropout=0.1)
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([3, 4])).shape == (2, 8, 8, 8)
    for c in [1, 3, 4, 8, 12, 16, 24, 32, 48, 96, 128, 256, 320]:
        g = norm(c).num_groups
        assert c % g == 0 and 1 <= g <= 32


def test_unet_gradients_reach_every_parameter_and_time_matters():
    model = perturbed(UNet(in_channels=1, image_size=8, channels=8, attn_resolutions=(4,)))
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    t = torch.tensor([1, 10, 100, 900])
    model(x, t).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(model(x, t), model(x, t.flip(0)))


def test_unet_zero_initialised_output():
    model = UNet(in_channels=1, image_size=8, channels=8)
    assert torch.all(model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])) == 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(image_size=30, channel_mult=(1, 2, 2)), dict(image_size=28, channel_mult=(1, 2, 2, 2)), dict(image_size=16, attn_resolutions=(5,))],
)
def test_unet_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        UNet(in_channels=1, channels=8, **kwargs)


# --------------------------------------------------------------------------- loss


def test_ddpm_loss_is_zero_for_exact_noise_and_one_for_zero_prediction():
    s = make_schedule("linear", 1000)
    x0 = torch.rand(512, 1, 4, 4, generator=gen(0)) * 2 - 1
    exact = ddpm_loss(oracle(s, x0), s, x0, generator=gen(1))
    assert exact.item() < 1e-6  # the model gets exactly the x_t built from the t it is told
    zero = ddpm_loss(lambda x, t: torch.zeros_like(x), s, x0, generator=gen(1))
    assert zero.item() == pytest.approx(1.0, abs=0.05)  # E[ε²]


def test_ddpm_loss_decreases_when_training_tiny_unet():
    torch.manual_seed(0)
    s = make_schedule("linear", 1000)
    model = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2))
    x0 = torch.rand(16, 1, 8, 8, generator=gen(0)) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def held_out_loss() -> float:  # same t and ε every time, so the comparison is not noise
        with torch.no_grad():
            return sum(ddpm_loss(model, s, x0, generator=gen(100 + i)).item() for i in range(4)) / 4

    before = held_out_loss()
    g = gen(1)
    for _ in range(50):
        loss = ddpm_loss(model, s, x0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < 0.7 * before, (before, after)


# --------------------------------------------------------------------------- EMA


def test_ema_update_rule_without_warmup():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    shadow = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, p in model.named_parameters():
            shadow[name] = 0.9 * shadow[name] + 0.1 * p.detach()
            torch.testing.assert_close(dict(ema.module.named_parameters())[name], shadow[name])
    assert ema.num_updates == 3


def test_ema_fused_update_is_bit_identical_to_one_lerp_per_parameter():
    torch.manual_seed(0)
    model = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2))
    ema = EMA(model, decay=0.999)
    reference = copy.deepcopy(ema.module)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = ema.current_decay()
        with torch.no_grad():
            for ref, p in zip(reference.parameters(), model.parameters()):
                ref.lerp_(p, 1.0 - d)
        ema.update(model)
    for (name, a), b in zip(ema.module.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_ema_warmup_schedule_and_first_update():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup=True)
    old = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.1 * old + 0.9 * model.weight.detach())
    decays = []
    for _ in range(12):
        decays.append(ema.current_decay())
        ema.update(model)
    expected = [min(0.5, (1 + n) / (10 + n)) for n in range(1, 13)]
    assert decays == pytest.approx(expected)
    assert decays[-1] == 0.5


def test_ema_shadow_is_frozen_copy_with_buffers_and_round_trips():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.99)
    assert ema.module is not model[0]
    assert all(not p.requires_grad for p in ema.module.parameters())
    model.train()
    model(torch.randn(8, 3))  # changes the BatchNorm running stats
    ema.update(model)
    torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean)

    restored = EMA(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.99 and restored.num_updates == 1
    torch.testing.assert_close(restored.module.state_dict(), ema.module.state_dict())

    target = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema.copy_to(target)
    torch.testing.assert_close(target.state_dict(), ema.module.state_dict())


# --------------------------------------------------------------------------- sampler defaults
def diffusion_worker(cls, timesteps: int, distilled_steps: int | None = None):
    """A DDPM-family worker as loaded for sampling a checkpoint with that model section (only
    what sampling reads: no task, no storage)."""
    from workers.ddpm.config import DDPMModel

    worker = cls.__new__(cls)
    worker.device, worker.job, worker.emas = torch.device("cpu"), {}, {}
    model = DDPMModel(channels=8, channel_mult=(1,), timesteps=timesteps).model_dump(mode="json")
    if distilled_steps:  # what a distilled checkpoint's model section records
        model |= {"prediction": "v", "distilled_steps": distilled_steps}
    worker.build_diffusion(model, (1, 4, 4))
    return worker


def workers_of_ddpm_family():
    from workers.ddpm.worker import DDPMWorker
    from workers.ldm.worker import LDMWorker

    return [DDPMWorker, LDMWorker]


@pytest.mark.parametrize("cls", workers_of_ddpm_family(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("timesteps, distilled, sampler, expected", [
    (1000, None, "ddim", 50),  # DDIM's own default, not every one of the 1000 timesteps
    # the ancestral sampler is every timestep from where sampling starts: an LDM's (latents,
    # unclipped) where σ/α = 14.6, at 726 of the linear schedule
    (1000, None, "ancestral", {"DDPMWorker": 1000, "LDMWorker": 727}),
    (20, None, "ddim", 20),  # fewer timesteps than DDIM's default: all of them
    (20, None, "ancestral", 20),
    (1000, 4, "ddim", 4),  # a distilled model: its own steps, on its grid
])
def test_sampler_steps_when_a_job_leaves_them_out(cls, timesteps, distilled, sampler, expected):
    from orchestrator.spec import SampleSpec

    expected = expected[cls.__name__] if isinstance(expected, dict) else expected
    worker = diffusion_worker(cls, timesteps, distilled)
    cfg = SampleSpec(sampler=sampler).model_dump()
    assert cfg["steps"] is None
    settings = worker.sampler_settings(cfg)
    assert settings["sampler"] == sampler and settings["steps"] == expected
    assert settings["spacing"] == ("trailing" if distilled else "linspace")
    assert worker.sampler_settings({**cfg, "steps": 7})["steps"] == 7  # a job's own steps win
    # the grids logged during training sample as a DDIM job without settings does
    assert (worker.sampler_settings(None)["steps"]
            == worker.sampler_settings({**cfg, "sampler": "ddim"})["steps"])


def test_an_evaluation_without_sampler_settings_runs_and_records_50_ddim_steps():
    """What the evaluate job generates with, and records, per source (EvaluateSpec.settings)."""
    from orchestrator.spec import EvaluateSpec
    from workers.ddpm.worker import DDPMWorker

    worker = diffusion_worker(DDPMWorker, 1000)
    cfg = EvaluateSpec().settings("ddpm").model_dump()
    assert worker.sampler_settings(cfg) == {"sampler": "ddim", "eta": 0.0, "steps": 50,
                                            "spacing": "linspace", "use_ema": True}
    calls = []
    out = worker.generate(2, cfg, gen(0), progress=lambda i, n: calls.append(n))
    assert out.shape == (2, 1, 4, 4) and calls == [50] * 50


def test_ema_restart_is_a_fresh_average_in_the_same_shadow():
    """A distillation round's end restarts the average from the student in place (a new EMA
    would deep-copy the student, which may be compiled)."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9)
    shadow = ema.module
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
    ema.restart(model)
    fresh = EMA(model, decay=0.9)
    assert ema.module is shadow and ema.num_updates == 0
    torch.testing.assert_close(ema.module.state_dict(), fresh.module.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    fresh.update(model)
    torch.testing.assert_close(ema.module.state_dict(), fresh.module.state_dict())
