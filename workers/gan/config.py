"""The GAN family's `model:` section and its distillation method. Torch-free."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from orchestrator.spec import DataSpec, ModelSection, Strict
from workers.gan.layout import dcgan_layout


class RegressDistill(Strict):
    """Generator distillation: a student generator (the teacher's with the `student` changes)
    regresses the teacher's G(z) for the same z, optionally also fooling the teacher's frozen
    discriminator."""

    method: Literal["regress"]
    student: dict[str, Any] = Field(default_factory=dict)
    loss: Literal["l1", "l2"] = "l1"
    adversarial_weight: float = Field(0.0, ge=0, le=100)
    allow_larger_student: bool = False


class GANModel(ModelSection):
    DISTILL: ClassVar[type[Strict] | None] = RegressDistill
    STUDENT_FIELDS: ClassVar[tuple[str, ...]] = ("g_width",)
    SIZE_FIELDS: ClassVar[tuple[str, ...]] = ("g_width",)
    TRAIN_METRICS: ClassVar[tuple[str, ...]] = ("loss_d", "loss_g", "d_real", "d_fake")

    z_dim: int = Field(64, ge=1, le=4096)
    g_width: int = Field(64, ge=4, le=2048)  # channels of the generator's last hidden layer
    d_width: int = Field(64, ge=4, le=2048)  # channels of the discriminator's first layer
    loss: Literal["bce", "hinge"] = "bce"  # bce: non-saturating with BCEWithLogits
    d_steps: int = Field(1, ge=1, le=10)  # k of Goodfellow et al.'s Algorithm 1
    betas: tuple[float, float] = (0.5, 0.999)

    def check_data(self, data: DataSpec) -> str | None:
        try:
            dcgan_layout(data.image_size)
        except ValueError as exc:
            return f"data.image_size: {exc}"
        return None
