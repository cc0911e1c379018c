"""Latent diffusion (Rombach et al. 2022) in two stages, both `family: ldm`:

- `stage: autoencoder` trains the KL-regularised first stage (`KLAutoencoderWorker`, the shared
  autoencoder training with a diagonal-Gaussian bottleneck);
- `stage: diffusion` (`LDMWorker`) freezes a first stage (that, or a VQGAN's pre-quantisation
  latents), encodes the data set once, scales the latents by 1/std measured on them (saved with
  the checkpoint) and trains the DDPM family's U-Net, schedules and samplers on them unchanged;
  samples are decoded to images.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.checkpoints import read_manifest, resolve_checkpoint_uri
from orchestrator.task import Task
from workers.autoencoder import AutoencoderWorker, encode_dataset, load_first_stage
from workers.base import Worker
from workers.ddpm.worker import DDPMWorker


class KLAutoencoderWorker(AutoencoderWorker):
    family = "ldm"
    bottleneck = "kl"


class LDMWorker(DDPMWorker):
    streams = False  # trains on the data set encoded whole (`prepare_data`)
    family = "ldm"
    clip_x0 = False  # latents are not bounded: x_0 predictions are not clipped to [-1, 1]

    @classmethod
    def for_task(cls, task: Task) -> type[Worker]:
        if task.kind == "distill":
            return cls  # the diffusion stage (validated)
        if task.kind == "train":
            stage = task.job["model"].get("stage", "diffusion")
        else:
            manifest = read_manifest(*resolve_checkpoint_uri(task.refs["from"], task.s3))
            stage = manifest.get("meta", {}).get("model", {}).get("stage", "diffusion")
        return KLAutoencoderWorker if stage == "autoencoder" else cls

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        self.ae = load_first_stage(self, "autoencoder", "model.autoencoder", ("ldm", "vqgan"))
        self.build_diffusion(model_cfg, self.ae.latent_shape(image_shape))

    def prepare_data(self, x: torch.Tensor, labels: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        latents = encode_dataset(self, "autoencoder", x, "latents")
        # Unit variance for the diffusion whatever the first stage's latent scale; measured on
        # the whole encoded data set, stored in the frozen autoencoder's buffer (checkpointed).
        self.ae.latent_scale.fill_(1.0 / float(latents.float().std()))
        self.log.set_tags({"genforge.latent_scale": f"{float(self.ae.latent_scale):.6g}"})
        return latents * self.ae.latent_scale, self.checked_labels(labels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decode_latents(z / self.ae.latent_scale).clamp(-1, 1)
