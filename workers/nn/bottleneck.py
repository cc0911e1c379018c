"""The two bottlenecks of the first-stage autoencoders.

`VectorQuantizer`: VQ-VAE's quantizer (van den Oord et al. 2017) with the commitment loss
β·||z_e - sg(z_q)||², a straight-through gradient, codebook vectors updated as exponential moving
averages of the encoder outputs assigned to them (Razavi et al. 2019) instead of by gradient, and
dead-code restart (Dhariwal et al. 2020, Jukebox): a code whose EMA usage falls below a threshold
is moved onto a random encoder output of the current batch, so the codebook does not collapse.
In a data-parallel job (workers/parallel.py) the codes' counts and sums are those of the global
batch (summed over the ranks) and restarts use rank 0's picks, so every rank keeps the same
codebook.

`DiagonalGaussian`: the KL-regularised bottleneck of latent diffusion's autoencoder (Rombach et
al. 2022): the encoder predicts a mean and log-variance, training samples from it, the KL to
N(0, I) is the regulariser, and the mean is the latent at inference.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def code_stats(idx: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Perplexity of the code distribution and the fraction of codes used, over `idx`."""
    counts = torch.bincount(idx.reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum()
    return {"perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
            "codebook_usage": (counts > 0).float().mean()}


class VectorQuantizer(nn.Module):
    def __init__(self, *, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 restart_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.beta, self.decay, self.restart_threshold, self.eps = beta, decay, restart_threshold, eps
        embed = torch.randn(codebook_size, dim) / math.sqrt(dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        # Starts at 0: every code is "dead" on the first step and is restarted onto the data,
        # which is the data-dependent initialisation of the codebook.
        self.register_buffer("cluster_size", torch.zeros(codebook_size))

    def codes(self, z: Tensor) -> Tensor:
        """Nearest code index of every vector of z (..., dim)."""
        flat = z.reshape(-1, self.dim)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
                + self.embed.pow(2).sum(1)[None, :])
        return dist.argmin(1).view(z.shape[:-1])

    def lookup(self, idx: Tensor) -> Tensor:
        """(B, H, W) code indices -> (B, dim, H, W) codebook vectors."""
        return F.embedding(idx, self.embed).permute(0, 3, 1, 2).contiguous()

    def forward(self, z_e: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(B, dim, H, W) -> (straight-through z_q, commitment loss, stats); EMA updates in training."""
        z = z_e.permute(0, 2, 3, 1)
        idx = self.codes(z.detach())
        z_q = self.lookup(idx)
        loss = self.beta * F.mse_loss(z_e, z_q.detach())
        if self.training:
            self._ema_update(z.detach().reshape(-1, self.dim), idx.reshape(-1), generator)
        stats = code_stats(idx, self.codebook_size)
        # Straight-through: the forward pass sees z_q, the gradient flows to z_e unchanged.
        return z_e + (z_q - z_e).detach(), loss, {**stats, "indices": idx}

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor, generator: torch.Generator | None) -> None:
        onehot = F.one_hot(idx, self.codebook_size).type(flat.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        # Dead-code restart candidates: one random encoder output per code, used only where the
        # code is dead (a fixed-size pick and `where` instead of a boolean index: no host sync).
        pick = torch.randint(len(flat), (self.codebook_size,), generator=generator,
                             device=flat.device)
        candidates = flat[pick]
        if _world_size() > 1:
            counts, sums, candidates = _global_statistics(counts, sums, candidates)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        dead = self.cluster_size < self.restart_threshold
        self.embed.copy_(torch.where(dead[:, None], candidates, self.embed))
        self.embed_avg.copy_(torch.where(dead[:, None], candidates * self.restart_threshold,
                                         self.embed_avg))
        self.cluster_size.masked_fill_(dead, self.restart_threshold)


def _world_size() -> int:
    """The ranks of the data-parallel job this process is one of (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_statistics(counts: Tensor, sums: Tensor, candidates: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """One all-reduce over the ranks of a data-parallel job: the per-code counts and sums of
    the global batch, and rank 0's restart candidates (the other ranks add zeros), so that every
    rank keeps the same codebook while its encoder and decoder gradients are averaged."""
    if dist.get_rank() != 0:
        candidates = torch.zeros_like(candidates)
    buf = torch.cat([counts[:, None], sums, candidates], dim=1)
    dist.all_reduce(buf)
    dim = sums.shape[1]
    return buf[:, 0], buf[:, 1:1 + dim], buf[:, 1 + dim:]


class DiagonalGaussian(nn.Module):
    """(B, 2·dim, H, W) moments -> a latent of (B, dim, H, W) and the KL to N(0, I)."""

    def forward(self, moments: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean
        if self.training:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        # Mean over latent elements (not a sum), so kl_weight does not depend on the latent size.
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return z, kl, {"kl": kl.detach(), "latent_std": mean.detach().std()}
