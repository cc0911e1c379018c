"""The reference implementations `bench/peers.py` sets beside genforge's families: each trains
on the same images (genforge's staged split, floats in [-1, 1]) for a given wall-clock budget
and returns its samples in [-1, 1], which genforge's evaluation then scores.

- `dcgan`: pytorch/examples' DCGAN (examples/dcgan/main.py), scaled from 64 px to the image
  size by dropping doublings: its networks, `weights_init`, BCELoss on a sigmoid, Adam 2e-4
  (0.5, 0.999), one fake batch per step shared by the D and G updates, and samples drawn as
  its pictures are (the generator in train mode, batch statistics in 64-image batches).
- `diffusers_ddpm`: diffusers' `UNet2DModel` trained with `DDPMScheduler` (the cosine
  schedule) and AdamW, sampled with `DDIMScheduler` (the bench extra pins diffusers).

`gan_nets_outside`: genforge's own DCGAN networks in the reference's loop, to tell the
harness's cost per step from the architecture's.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn


class Batches:
    """Shuffled batches of `x`, epoch by epoch, from a seeded generator."""

    def __init__(self, x: Tensor, batch_size: int, seed: int):
        self.x, self.batch_size = x, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(len(x), generator=self.gen), 0

    def next(self) -> Tensor:
        if self.at + self.batch_size > len(self.x):
            self.order, self.at = torch.randperm(len(self.x), generator=self.gen), 0
        idx = self.order[self.at:self.at + self.batch_size]
        self.at += self.batch_size
        return self.x[idx]


def train_for(seconds: float, step: Callable[[int], None]) -> int:
    """Call `step(i)` until `seconds` of wall time have passed; returns the steps taken."""
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        i += 1
        step(i)
    return i


# ---- pytorch/examples' DCGAN ------------------------------------------------------------------

def weights_init(m: nn.Module) -> None:
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def dcgan_nets(image_size: int, nc: int, nz: int = 100, ngf: int = 64, ndf: int = 64
               ) -> tuple[nn.Module, nn.Module]:
    """examples/dcgan's Generator and Discriminator: 4 px -> image_size by doublings (64 px:
    four, its own; 16 px: two), the widest layer ngf * 2 ** (doublings - 1)."""
    depth = (image_size // 4).bit_length() - 1
    if 4 * 2**depth != image_size:
        raise ValueError(f"image size {image_size} is not 4 times a power of two")
    g: list[nn.Module] = [nn.ConvTranspose2d(nz, ngf * 2 ** (depth - 1), 4, 1, 0, bias=False),
                          nn.BatchNorm2d(ngf * 2 ** (depth - 1)), nn.ReLU(True)]
    for i in range(depth - 1, 0, -1):
        g += [nn.ConvTranspose2d(ngf * 2**i, ngf * 2 ** (i - 1), 4, 2, 1, bias=False),
              nn.BatchNorm2d(ngf * 2 ** (i - 1)), nn.ReLU(True)]
    g += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
    d: list[nn.Module] = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    for i in range(depth - 1):
        d += [nn.Conv2d(ndf * 2**i, ndf * 2 ** (i + 1), 4, 2, 1, bias=False),
              nn.BatchNorm2d(ndf * 2 ** (i + 1)), nn.LeakyReLU(0.2, inplace=True)]
    d += [nn.Conv2d(ndf * 2 ** (depth - 1), 1, 4, 1, 0, bias=False), nn.Sigmoid()]
    netg, netd = nn.Sequential(*g), nn.Sequential(*d)
    netg.apply(weights_init)
    netd.apply(weights_init)
    return netg, netd


def dcgan_loop(netg: nn.Module, netd: nn.Module, nz: int, x: Tensor, seconds: float, seed: int,
               batch_size: int = 64, logits: bool = False) -> int:
    """examples/dcgan's training loop for `seconds`; returns its steps. `logits`: `netd`
    returns logits (genforge's discriminator), so the loss is BCEWithLogits."""
    criterion = nn.BCEWithLogitsLoss() if logits else nn.BCELoss()
    opt_d = torch.optim.Adam(netd.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(netg.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batches = Batches(x, batch_size, seed)
    real_label = torch.ones(batch_size)
    fake_label = torch.zeros(batch_size)

    def step(_: int) -> None:
        real = batches.next()
        netd.zero_grad()
        err_real = criterion(netd(real).view(-1), real_label)
        err_real.backward()
        fake = netg(torch.randn(batch_size, nz, 1, 1))
        err_fake = criterion(netd(fake.detach()).view(-1), fake_label)
        err_fake.backward()
        opt_d.step()
        netg.zero_grad()
        err_g = criterion(netd(fake).view(-1), real_label)
        err_g.backward()
        opt_g.step()

    return train_for(seconds, step)


def dcgan(x: Tensor, seconds: float, seed: int, num_samples: int) -> tuple[Tensor, int]:
    """(samples, steps) of the reference DCGAN trained on `x` for `seconds`."""
    torch.manual_seed(seed)
    nz = 100
    netg, netd = dcgan_nets(x.shape[-1], x.shape[1], nz)
    steps = dcgan_loop(netg, netd, nz, x, seconds, seed)
    with torch.no_grad():  # as examples/dcgan draws its pictures: netG in train mode
        samples = torch.cat([netg(torch.randn(64, nz, 1, 1)) for _ in range(0, num_samples, 64)])
    return samples[:num_samples], steps


def gan_nets_outside(x: Tensor, seconds: float, seed: int, z_dim: int, width: int) -> int:
    """Steps genforge's own DCGAN networks take in the reference's loop in `seconds`."""
    from workers.gan.nets import Discriminator, Generator

    torch.manual_seed(seed)
    g = Generator(z_dim=z_dim, channels=x.shape[1], image_size=x.shape[-1], width=width)
    d = Discriminator(channels=x.shape[1], image_size=x.shape[-1], width=width)
    return dcgan_loop(g, d, z_dim, x, seconds, seed, logits=True)


# ---- diffusers' DDPM ------------------------------------------------------------------------

def diffusers_ddpm(x: Tensor, seconds: float, seed: int, num_samples: int, *, channels: int,
                   channel_mult: tuple[int, ...], lr: float, batch_size: int, ema_decay: float,
                   sampler_steps: int) -> tuple[Tensor, int]:
    """(samples, steps) of diffusers' UNet2DModel (channels x channel_mult, one ResNet block a
    level, no attention: genforge's U-Net at its defaults) trained with DDPMScheduler's
    cosine schedule, ε-prediction, AdamW at `lr` and diffusers' EMAModel, sampled with
    DDIMScheduler at `sampler_steps` steps (η 0) from the EMA weights."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    levels = len(channel_mult)
    unet = UNet2DModel(sample_size=x.shape[-1], in_channels=x.shape[1], out_channels=x.shape[1],
                       layers_per_block=1, block_out_channels=tuple(channels * m for m in channel_mult),
                       down_block_types=("DownBlock2D",) * levels,
                       up_block_types=("UpBlock2D",) * levels, add_attention=False,
                       norm_num_groups=8)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=1.0)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    batches = Batches(x, batch_size, seed)

    def step(_: int) -> None:
        clean = batches.next()
        noise = torch.randn_like(clean)
        t = torch.randint(0, 1000, (len(clean),))
        pred = unet(noise_sched.add_noise(clean, noise, t), t).sample
        loss = nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())

    steps = train_for(seconds, step)
    ema.copy_to(unet.parameters())
    unet.eval()
    ddim = DDIMScheduler.from_config(noise_sched.config)
    ddim.set_timesteps(sampler_steps)
    out = []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, num_samples, 128):
            n = min(128, num_samples - start)
            sample = torch.randn(n, x.shape[1], x.shape[-1], x.shape[-1], generator=gen)
            for t in ddim.timesteps:
                sample = ddim.step(unet(sample, t).sample, t, sample, eta=0.0).prev_sample
            out.append(sample.clamp(-1, 1))
    return torch.cat(out), steps
