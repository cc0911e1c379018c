"""DDPM (Ho et al. 2020): a U-Net learns to undo Gaussian noise; ancestral or DDIM sampling;
progressive step distillation. The worker is `workers.ddpm.worker`."""

from workers.ddpm.config import DDPMModel, describe_sampler
from workers.registry import Family

SAMPLERS = ("ddim", "ancestral")  # the first is the default
SPACINGS = ("linspace", "trailing")

FAMILY = Family("ddpm", DDPMModel, frozenset({"train", "sample", "distill"}),
                "workers.ddpm.worker:DDPMWorker", SAMPLERS, SPACINGS, describe_sampler)
