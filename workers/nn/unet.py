"""ε-prediction U-Net (Ho et al. 2020, with ADM-style details from Dhariwal & Nichol 2021).

Purely convolutional over (C, H, W): nothing here knows about pixels, so the same
network serves pixel-space and latent diffusion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, *, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (integer or continuous) timesteps, shape [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def norm(channels: int) -> nn.GroupNorm:
    # 32 groups (the DDPM default) is too many for narrow nets: keep >= 4 channels per group.
    max_groups = max(1, min(32, channels // 4))
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    # Residual branches (and the output) start as identity/zero, which makes early training stable.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class AttnBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection."""

    def __init__(self, *, channels: int, head_dim: int = 64):
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each [B, heads, HW, head_dim]
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding (when temb_dim > 0) added in between;
    optional attention after. Without a time embedding it is the autoencoders' block."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_dim: int = 0, dropout: float = 0.0,
                 attn: bool = False):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_channels) if temb_dim else None
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attn = AttnBlock(channels=out_channels) if attn else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class Downsample(nn.Module):
    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Predicts ε (or v, x_0, a velocity) from (x_t, t) and, with `num_classes`, a class label.

    Level i runs at resolution image_size / 2**i with channels * channel_mult[i] channels.
    The encoder pushes every intermediate activation on a skip stack; each decoder level
    has num_res_blocks + 1 blocks so that it consumes exactly those skips (as in DDPM).
    Attention is added wherever the feature map is r x r for r in attn_resolutions,
    including the middle block.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        out_channels: int | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")
        num_down = len(channel_mult) - 1
        if image_size % (2**num_down) != 0:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)={2**num_down} "
                f"so that every downsampling halves the feature map exactly"
            )
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        unknown = set(attn_resolutions) - set(resolutions)
        if unknown:
            raise ValueError(f"attn_resolutions {sorted(unknown)} not among feature-map sizes {resolutions}")

        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        self.channels = channels
        temb_dim = 4 * channels

        self.time_embed = nn.Sequential(nn.Linear(channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # class conditioning: one row per class and a last one for "no label"
        # (workers/nn/conditioning.py), added to the time embedding
        self.num_classes = num_classes
        self.label_embed = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        block = dict(temb_dim=temb_dim, dropout=dropout)
        self.down = nn.ModuleList()
        skip_channels = [channels]
        ch = channels
        for level, mult in enumerate(channel_mult):
            attn = resolutions[level] in attn_resolutions
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(in_channels=ch, out_channels=channels * mult, attn=attn, **block))
                ch = channels * mult
                skip_channels.append(ch)
            if level < num_down:
                self.down.append(Downsample(channels=ch))
                skip_channels.append(ch)

        mid_attn = resolutions[-1] in attn_resolutions
        self.mid = nn.ModuleList([
            ResBlock(in_channels=ch, out_channels=ch, attn=mid_attn, **block),
            ResBlock(in_channels=ch, out_channels=ch, **block),
        ])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            attn = resolutions[level] in attn_resolutions
            for _ in range(num_res_blocks + 1):
                in_ch = ch + skip_channels.pop()
                self.up.append(ResBlock(in_channels=in_ch, out_channels=channels * mult, attn=attn, **block))
                ch = channels * mult
            if level > 0:
                self.up.append(Upsample(channels=ch))

        self.norm_out = norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embed(timestep_embedding(t, self.channels))
        if self.label_embed is not None:
            if y is None:  # unconditional: the null label
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.label_embed(y)

        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h, temb)
            skips.append(h)
        for module in self.mid:
            h = module(h, temb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = module(torch.cat([h, skips.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
