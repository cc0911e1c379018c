"""DDPM (Ho et al. 2020): an ε-prediction U-Net, trained with Algorithm 1, sampled with the
ancestral sampler (Algorithm 2) or DDIM, from the EMA weights."""

from __future__ import annotations

from typing import Any, Callable

import torch

from workers.base import Worker
from workers.diffusion.losses import ddpm_loss
from workers.diffusion.samplers import make_sampler, sample
from workers.diffusion.schedules import make_schedule
from workers.nn.ema import EMA
from workers.nn.unet import UNet

PREVIEW_STEPS = 50  # DDIM steps for the grids logged during training


class DDPMWorker(Worker):
    family = "ddpm"

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        self.build_diffusion(model_cfg, image_shape)

    def build_diffusion(self, model_cfg: dict[str, Any], shape: tuple[int, int, int]) -> None:
        """The U-Net, schedule and EMA for diffusion over tensors of `shape` (C, H, W): pixels
        here, latents in latent diffusion."""
        self.sample_shape = shape
        channels, size, _ = shape
        net = UNet(
            in_channels=channels, image_size=size, channels=model_cfg["channels"],
            channel_mult=tuple(model_cfg["channel_mult"]),
            num_res_blocks=model_cfg["num_res_blocks"],
            attn_resolutions=tuple(model_cfg["attn_resolutions"]),
            dropout=model_cfg["dropout"],
        ).to(self.device)
        self.modules = {"net": net}
        self.schedule = make_schedule(
            model_cfg["schedule"], model_cfg["timesteps"], model_cfg["beta_start"],
            model_cfg["beta_end"],
        ).to(self.device)
        decay = self.job.get("train", {}).get("ema_decay", 0.999)
        self.emas = {"net": EMA(net, decay=decay)}

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> None:
        self.optimizers = {"net": torch.optim.Adam(self.modules["net"].parameters(), lr=train_cfg["lr"])}

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
        loss = ddpm_loss(self.modules["net"], self.schedule, batch, generator=gen)
        self.optimize(loss, "net")
        return {"loss": loss.detach()}

    def generate(self, n: int, sample_cfg: dict[str, Any] | None, gen: torch.Generator,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        if sample_cfg is None:
            name, steps, eta = "ddim", min(PREVIEW_STEPS, self.schedule.timesteps), 0.0
        else:
            name, steps, eta = sample_cfg["sampler"], sample_cfg["steps"], sample_cfg["eta"]
            steps = steps or self.schedule.timesteps
        kwargs = {"eta": eta} if name == "ddim" else {}
        sampler = make_sampler(name, self.schedule, **kwargs)
        net = self.sampling_module("net")
        was_training = net.training
        net.eval()
        try:
            return sample(net, sampler, (n, *self.sample_shape), num_steps=steps, generator=gen,
                          device=self.device, progress=progress)
        finally:
            net.train(was_training)
