"""The latent-diffusion family's two `model:` sections (`stage: diffusion` and
`stage: autoencoder`). Torch-free."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from orchestrator.spec import DataSpec, Upstream
from workers.config import AutoencoderModel, ConditionalModel, first_stage_problem, levels_divide
from workers.ddpm.config import DDPMModel


class LDMModel(DDPMModel):
    REFS: ClassVar[tuple[str, ...]] = ("autoencoder",)

    TRAINS_ON: ClassVar[str] = "its autoencoder's latents"

    stage: Literal["diffusion"] = "diffusion"
    autoencoder: str = Field(min_length=1)  # an ldm autoencoder or a vqgan: a job or its URI

    def check_data(self, data: DataSpec) -> str | None:
        # the latent size is known only with the autoencoder: see check_ref
        return ConditionalModel.check_data(self, data)

    def check_ref(self, field: str, up: Upstream, data: DataSpec) -> str | None:
        problem, factor = first_stage_problem(field, up, data,
                                              {"ldm": "autoencoder", "vqgan": None})
        if problem is None:
            problem = levels_divide(data.image_size // factor, self.channel_mult, "U-Net",
                                    f"{field}: its latent size")
        return problem


class LDMAutoencoderModel(AutoencoderModel):
    stage: Literal["autoencoder"]
    kl_weight: float = Field(1e-4, ge=0, le=100)  # weight of the KL (mean per latent element)
