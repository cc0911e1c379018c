"""The VQGAN family's `model:` section. Torch-free."""

from __future__ import annotations

from pydantic import Field

from workers.config import AutoencoderModel


class VQGANModel(AutoencoderModel):
    latent_channels: int = Field(32, ge=1, le=1024)  # dimension of a codebook vector
    codebook_size: int = Field(256, ge=2, le=65536)
    beta: float = Field(0.25, ge=0, le=10)  # commitment
    codebook_decay: float = Field(0.99, gt=0, lt=1)  # EMA of the codebook
    restart_threshold: float = Field(1.0, ge=0)  # EMA usage below which a code is restarted
