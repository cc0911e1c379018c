"""Latent diffusion (Rombach et al. 2022): a KL autoencoder (`stage: autoencoder`), then the
DDPM family's diffusion on its latents (`stage: diffusion`). The worker is `workers.ldm.worker`."""

from workers.ddpm import SAMPLERS, SPACINGS
from workers.ddpm.config import describe_sampler
from workers.ldm.config import LDMAutoencoderModel, LDMModel
from workers.registry import Family

FAMILY = Family("ldm", {"diffusion": LDMModel, "autoencoder": LDMAutoencoderModel},
                frozenset({"train", "sample", "distill"}), "workers.ldm.worker:LDMWorker",
                SAMPLERS, SPACINGS, describe_sampler)
