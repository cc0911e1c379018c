"""The first-stage autoencoder shared by VQGAN and latent diffusion (Esser et al. 2021;
Rombach et al. 2022): a convolutional encoder and decoder built from the U-Net's residual blocks,
a bottleneck (vector-quantised or KL-regularised), and the patch discriminator that makes
reconstructions sharp.

`Autoencoder` exposes what the next stage needs:
    encode_latents(x)  images -> continuous latents (pre-quantisation for VQ, the mean for KL)
    decode_latents(z)  latents -> images (VQ latents are quantised first)
    encode(x)          images -> code indices (VQ only)
    decode(idx)        code indices -> images (VQ only)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workers.nn.bottleneck import DiagonalGaussian, VectorQuantizer
from workers.nn.init import dcgan_init
from workers.nn.unet import Downsample, ResBlock, Upsample, norm


class Encoder(nn.Module):
    def __init__(self, *, in_channels: int, channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, out_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(in_channels=ch, out_channels=channels * mult))
                ch = channels * mult
            if level < len(channel_mult) - 1:
                layers.append(Downsample(channels=ch))
        layers += [ResBlock(in_channels=ch, out_channels=ch, attn=True),
                   ResBlock(in_channels=ch, out_channels=ch),
                   norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, *, out_channels: int, channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, in_channels: int):
        super().__init__()
        ch = channels * channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1),
                                   ResBlock(in_channels=ch, out_channels=ch, attn=True),
                                   ResBlock(in_channels=ch, out_channels=ch)]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(in_channels=ch, out_channels=channels * mult))
                ch = channels * mult
            if level > 0:
                layers.append(Upsample(channels=ch))
        layers += [norm(ch), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The weight the adaptive GAN weight is measured at."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.body(z))


class Autoencoder(nn.Module):
    """`bottleneck` "vq": codebook of `codebook_size` vectors of `latent_channels`;
    "kl": a diagonal Gaussian of `latent_channels`."""

    def __init__(self, *, image_channels: int, channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                 latent_channels: int = 4, bottleneck: str = "kl", codebook_size: int = 512,
                 beta: float = 0.25, codebook_decay: float = 0.99, restart_threshold: float = 1.0):
        super().__init__()
        self.kind = bottleneck
        self.factor = 2 ** (len(channel_mult) - 1)
        self.latent_channels = latent_channels
        moments = 2 * latent_channels if bottleneck == "kl" else latent_channels
        self.encoder = Encoder(in_channels=image_channels, channels=channels,
                               channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                               out_channels=moments)
        self.decoder = Decoder(out_channels=image_channels, channels=channels,
                               channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                               in_channels=latent_channels)
        if bottleneck == "vq":
            self.bottleneck: nn.Module = VectorQuantizer(
                codebook_size=codebook_size, dim=latent_channels, beta=beta,
                decay=codebook_decay, restart_threshold=restart_threshold)
        elif bottleneck == "kl":
            self.bottleneck = DiagonalGaussian()
        else:
            raise ValueError(f"unknown bottleneck {bottleneck!r}")
        # 1/std of the latents, measured once by the stage that diffuses in this latent space
        # and saved with that stage's checkpoint (1 until then).
        self.register_buffer("latent_scale", torch.ones(()))

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = image_shape
        return self.latent_channels, h // self.factor, w // self.factor

    def forward(self, x: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Reconstruction, bottleneck loss (commitment or KL), bottleneck statistics."""
        z, loss, stats = self.bottleneck(self.encoder(x), generator)
        return self.decoder(z), loss, stats

    def encode_latents(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return h.chunk(2, dim=1)[0] if self.kind == "kl" else h

    def decode_latents(self, z: Tensor) -> Tensor:
        if self.kind == "vq":
            z = self.bottleneck.lookup(self.bottleneck.codes(z.permute(0, 2, 3, 1)))
        return self.decoder(z)

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, h, w) code indices."""
        self._need_vq()
        return self.bottleneck.codes(self.encoder(x).permute(0, 2, 3, 1))

    def decode(self, idx: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, C, H, W) images."""
        self._need_vq()
        return self.decoder(self.bottleneck.lookup(idx))

    def _need_vq(self) -> None:
        if self.kind != "vq":
            raise TypeError("code indices exist only for a vector-quantised autoencoder")


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): one logit per overlapping patch, as in taming-transformers."""

    def __init__(self, *, channels: int, width: int = 64, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out),
                     nn.LeakyReLU(0.2, True)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor,
                    max_weight: float = 1e4) -> Tensor:
    """λ = ‖∇_L rec‖ / (‖∇_L gan‖ + δ) at the decoder's last layer L (Esser et al. 2021, eq. 7):
    balances the two gradients whatever their scales."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
