"""The reference implementations `bench/peers.py` sets beside genforge's families. Each trains
on the same images (genforge's staged split, floats in [-1, 1]) or the same code sequences,
for a given wall-clock budget (`train_for`) or a given number of steps (`train_steps`).

Generators, whose samples genforge's evaluation then scores (returned in [-1, 1]):

- `dcgan`: pytorch/examples' DCGAN (examples/dcgan/main.py), scaled from 64 px to the image
  size by dropping doublings: its networks, `weights_init`, BCELoss on a sigmoid, Adam 2e-4
  (0.5, 0.999), one fake batch per step shared by the D and G updates, and samples drawn as
  its pictures are (the generator in train mode, batch statistics in 64-image batches).
- `diffusers_ddpm`: diffusers' `UNet2DModel` trained with `DDPMScheduler` (the cosine
  schedule) and AdamW, sampled with `DDIMScheduler` (the bench extra pins diffusers); on
  images, or on a first stage's scaled latents (`clip=False`: no clipping to [-1, 1] anywhere),
  for the LDM's diffusion stage.

`gan_nets_outside`: genforge's own DCGAN networks in the reference's loop, to tell the
harness's cost per step from the architecture's.

Beside `family: vqgan`, `vq_autoencoder`: genforge's own Encoder and Decoder
(workers/nn/autoencoder.py) around vector-quantize-pytorch's `VectorQuantize` (`VQAutoencoder`),
so that only the quantizer and the training loop differ: L1 reconstruction plus the library's
commitment loss, Adam. The library's own advice against dead codes is taken (its README):
`kmeans_init` (the codebook starts as k-means centroids, 10 iterations, of the first batch's
encoder outputs, as in SoundStream) and `threshold_ema_dead_code=2` (a code whose EMA cluster
size falls below 2 is replaced by a random encoder output of the batch); everything else is the
library's default (notably its rotation-trick gradient through the quantizer, not a plain
straight-through one). `reconstruction_metrics` measures it as genforge's `final_metrics` does:
PSNR of the MSE over all held-out pixels (images in [-1, 1], reconstructions clamped), and
`code_stats` (perplexity, fraction of the codebook used) of the held-out images' codes.

Beside `family: autoregressive`, `x_transformer`: x-transformers' `TransformerWrapper(Decoder)`
of the same width, depth, heads (head size dim / heads, as genforge's) and context over the same
code sequences, with genforge's start-token layout (a start token of its own, logits over the
codebook only); `train_x_transformer` trains it for a given number of steps. `nats_per_token`
scores any next-token model (genforge's `Transformer.logits` or `x_transformer_logits`) alike:
the mean cross-entropy, in nats, over every token of the given sequences.
"""

from __future__ import annotations

import time
from typing import Any, Callable

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


def train_steps(steps: int, step: Callable[[int], None]) -> float:
    """Call `step(i)` for i = 1..steps; returns the seconds they took."""
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return time.perf_counter() - start


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
                   sampler_steps: int, clip: bool = True) -> tuple[Tensor, int]:
    """(samples, steps) of diffusers' UNet2DModel (channels x channel_mult, one ResNet block a
    level, no attention: genforge's U-Net at its defaults) trained with DDPMScheduler's
    cosine schedule, ε-prediction, AdamW at `lr` and diffusers' EMAModel, sampled with
    DDIMScheduler at `sampler_steps` steps (η 0) from the EMA weights. `clip`: the data are
    images in [-1, 1] (the schedulers clip their x_0 estimates, as the samples, to it); without,
    latents of any range (genforge's LDM clips nothing either)."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    levels = len(channel_mult)
    unet = UNet2DModel(sample_size=x.shape[-1], in_channels=x.shape[1], out_channels=x.shape[1],
                       layers_per_block=1, block_out_channels=tuple(channels * m for m in channel_mult),
                       down_block_types=("DownBlock2D",) * levels,
                       up_block_types=("UpBlock2D",) * levels, add_attention=False,
                       norm_num_groups=8)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                clip_sample=clip)
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
            out.append(sample.clamp(-1, 1) if clip else sample)
    return torch.cat(out), steps


def descend(opt: torch.optim.Optimizer, loss: Tensor, grad_clip: float | None) -> None:
    """Zero, backward, clip the gradients' global norm to `grad_clip` (None: no clipping) and
    step, as genforge's `Worker.optimize` does."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], grad_clip)
    opt.step()


# ---- vector-quantize-pytorch's VectorQuantize in genforge's autoencoder ---------------------

VQ_FIELDS = ("channels", "channel_mult", "num_res_blocks", "latent_channels", "codebook_size",
             "beta", "codebook_decay")  # of a `family: vqgan` model section


class VQAutoencoder(nn.Module):
    """genforge's Encoder and Decoder, built as its `Autoencoder` builds them (so the same seed
    gives them the same initial weights), around vector-quantize-pytorch's EMA `VectorQuantize`
    of the same dimension and codebook size, EMA decay `codebook_decay` and commitment weight
    `beta`."""

    def __init__(self, *, image_channels: int, channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, latent_channels: int, codebook_size: int, beta: float,
                 codebook_decay: float):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        from workers.nn.autoencoder import Decoder, Encoder

        self.codebook_size = codebook_size
        levels = dict(channels=channels, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks)
        self.encoder = Encoder(in_channels=image_channels, out_channels=latent_channels, **levels)
        self.decoder = Decoder(out_channels=image_channels, in_channels=latent_channels, **levels)
        self.quantizer = VectorQuantize(
            dim=latent_channels, codebook_size=codebook_size, decay=codebook_decay,
            commitment_weight=beta, kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2,
            accept_image_fmap=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction, (B, h, w) code indices, commitment loss (0 in eval mode)."""
        z, idx, commit = self.quantizer(self.encoder(x))
        return self.decoder(z), idx, commit.sum()


def vq_autoencoder(x: Tensor, seconds: float, seed: int, model: dict, *, lr: float,
                   betas: tuple[float, float], batch_size: int, grad_clip: float | None
                   ) -> tuple[VQAutoencoder, int]:
    """(the model, its steps) of a `VQAutoencoder` of the `model` section (VQ_FIELDS of it)
    trained on `x` for `seconds` with L1 reconstruction + the commitment loss and Adam."""
    torch.manual_seed(seed)
    net = VQAutoencoder(image_channels=x.shape[1], **{k: model[k] for k in VQ_FIELDS})
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas)
    batches = Batches(x, batch_size, seed)

    def step(_: int) -> None:
        batch = batches.next()
        rec, _, commit = net(batch)
        descend(opt, (batch - rec).abs().mean() + commit, grad_clip)

    net.train()
    return net, train_for(seconds, step)


@torch.no_grad()
def reconstruction_metrics(net: nn.Module, heldout: Tensor, batch_size: int = 256
                           ) -> dict[str, float]:
    """genforge's autoencoder `final_metrics` (less their `holdout_` prefix) of `net`, which
    maps images to (reconstruction, code indices, ...): MSE and L1 over every held-out pixel of
    the clamped reconstructions, the PSNR of that MSE (peak-to-peak 2), and the perplexity and
    codebook usage of the held-out codes. `net` is left in eval mode."""
    from workers.autoencoder import psnr
    from workers.nn.bottleneck import code_stats

    net.eval()
    outs = [net(heldout[i:i + batch_size]) for i in range(0, len(heldout), batch_size)]
    rec = torch.cat([o[0] for o in outs]).clamp(-1, 1)
    mse = float((rec - heldout).pow(2).mean())
    stats = code_stats(torch.cat([o[1] for o in outs]), net.codebook_size)
    return {"mse": mse, "psnr": psnr(mse), "l1": float((rec - heldout).abs().mean()),
            **{k: float(v) for k, v in stats.items()}}


# ---- x-transformers' decoder over code sequences ---------------------------------------------

def x_transformer(*, vocab_size: int, seq_len: int, dim: int, layers: int, heads: int) -> nn.Module:
    """TransformerWrapper(Decoder) of `dim`, `layers`, `heads` (head size dim / heads) and a
    context of `seq_len`; token `vocab_size` is the start token, the logits cover the codebook."""
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(num_tokens=vocab_size + 1, logits_dim=vocab_size, max_seq_len=seq_len,
                              attn_layers=Decoder(dim=dim, depth=layers, heads=heads,
                                                  attn_dim_head=dim // heads))


def x_transformer_logits(net: nn.Module, tokens: Tensor) -> Tensor:
    """(B, L, vocab) next-token logits of (B, L) sequences, as genforge's `Transformer.logits`:
    the input is [start, t_0, ..., t_{L-2}], position i predicts t_i."""
    start = torch.full((len(tokens), 1), net.num_tokens - 1, dtype=torch.long, device=tokens.device)
    return net(torch.cat([start, tokens[:, :-1]], dim=1))


def train_transformer(net: nn.Module, logits: Callable[[nn.Module, Tensor], Tensor],
                      codes: Tensor, steps: int, seed: int, *, lr: float,
                      betas: tuple[float, float], weight_decay: float, batch_size: int,
                      grad_clip: float | None) -> tuple[nn.Module, float, int]:
    """(`net` in eval mode, seconds, tokens seen) after `steps` steps of next-token
    cross-entropy with AdamW on (N, L) code sequences, `logits(net, batch)` the (B, L, vocab)
    next-token logits of a batch."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    batches = Batches(codes, batch_size, seed)
    seen = 0

    def step(_: int) -> None:
        nonlocal seen
        batch = batches.next()
        descend(opt, nn.functional.cross_entropy(logits(net, batch).flatten(0, 1), batch.flatten()),
                grad_clip)
        seen += batch.numel()

    net.train()
    seconds = train_steps(steps, step)
    return net.eval(), seconds, seen


def train_x_transformer(codes: Tensor, steps: int, seed: int, *, vocab_size: int, dim: int,
                        layers: int, heads: int, **recipe: Any) -> tuple[nn.Module, float, int]:
    """`train_transformer` of an `x_transformer` of that shape (`recipe`: its optimiser's)."""
    torch.manual_seed(seed)
    net = x_transformer(vocab_size=vocab_size, seq_len=codes.shape[1], dim=dim, layers=layers,
                        heads=heads)
    return train_transformer(net, x_transformer_logits, codes, steps, seed, **recipe)


def ar_net_outside(codes: Tensor, steps: int, seed: int, *, vocab_size: int, dim: int,
                   layers: int, heads: int, dropout: float, **recipe: Any) -> float:
    """Seconds genforge's own transformer of that shape takes for `steps` of the reference's
    loop (`train_transformer`)."""
    from workers.autoregressive.transformer import Transformer

    torch.manual_seed(seed)
    net = Transformer(vocab_size=vocab_size, seq_len=codes.shape[1], dim=dim, layers=layers,
                      heads=heads, dropout=dropout)
    return train_transformer(net, lambda m, b: m.logits(b), codes, steps, seed, **recipe)[1]


@torch.no_grad()
def nats_per_token(logits: Callable[[Tensor], Tensor], codes: Tensor, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats) over every token of the (N, L) sequences `codes`,
    `logits` mapping a batch of them to its (B, L, vocab) next-token logits."""
    total = 0.0
    for i in range(0, len(codes), batch_size):
        chunk = codes[i:i + batch_size]
        total += float(nn.functional.cross_entropy(logits(chunk).flatten(0, 1), chunk.flatten(),
                                                   reduction="sum"))
    return total / codes.numel()
