"""DCGAN generator and discriminator (Radford et al. 2016) for 1- or 3-channel square images.

The spatial path doubles (or halves) `depth` times between `base` (4..7 pixels) and the image
size, so 8, 16, 28, 32 and 64 all work: 28 = 7 -> 14 -> 28.
"""

from __future__ import annotations

from torch import Tensor, nn

from workers.gan.layout import dcgan_layout as layout
from workers.nn.init import dcgan_init


class Generator(nn.Module):
    def __init__(self, *, z_dim: int, channels: int, image_size: int, width: int = 64):
        super().__init__()
        base, depth = layout(image_size)
        self.z_dim = z_dim
        top = width * 2 ** (depth - 1)
        self.project = nn.Sequential(
            nn.ConvTranspose2d(z_dim, top, base, 1, 0, bias=False),  # 1x1 -> base x base
            nn.BatchNorm2d(top), nn.ReLU(True),
        )
        layers: list[nn.Module] = []
        ch = top
        for _ in range(depth - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]
        self.up = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.up(self.project(z.view(len(z), self.z_dim, 1, 1)))


class Discriminator(nn.Module):
    """Returns logits (BCEWithLogits or hinge losses take them as they are)."""

    def __init__(self, *, channels: int, image_size: int, width: int = 64):
        super().__init__()
        base, depth = layout(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(depth - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2),
                       nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, base, 1, 0)]  # base x base -> 1x1
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).view(len(x))
