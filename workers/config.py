"""Rules of the `model:` section that more than one family shares. Torch-free: validation
imports it."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from orchestrator.spec import DataSpec, ModelSection, SampleSpec, Upstream


def levels_divide(size: int, channel_mult: tuple[int, ...], what: str, where: str) -> str | None:
    """Whether `size` halves evenly through the levels of a U-Net or autoencoder."""
    factor = 2 ** (len(channel_mult) - 1)
    if size % factor:
        return (f"{where}: {size} is not divisible by {factor}, which the {what}'s "
                f"{len(channel_mult)} levels (model.channel_mult) need")
    return None


def distill_rounds(teacher_steps: int, student_steps: int) -> int | None:
    """Halving rounds from `teacher_steps` to `student_steps`, or None if unreachable."""
    if student_steps < 1 or teacher_steps < student_steps or teacher_steps % student_steps:
        return None
    ratio = teacher_steps // student_steps
    return ratio.bit_length() - 1 if ratio & (ratio - 1) == 0 else None


def labels_problem(data: DataSpec) -> str | None:
    """Why a class-conditional model cannot train on `data`, or None."""
    if data.dataset == "idx" and not data.labels:
        return ("model.class_conditional: the data has no labels (dataset 'idx' without "
                "data.labels; set data.labels)")
    if data.dataset == "npz" and not data.y_key:
        return ("model.class_conditional: the data has no labels (dataset 'npz' with "
                "data.y_key null; set data.y_key)")
    return None


def first_stage_problem(field: str, up: Upstream, data: DataSpec, families: dict[str, str | None]
                        ) -> tuple[str | None, int]:
    """Whether `up` is a trained first stage of one of `families` (family -> required stage),
    with the same image shape as `data`. Returns (problem, downsampling factor)."""
    stage = up.model.get("stage")
    wanted = " or ".join(f"'{f}'" + (f" (stage: {s})" if s else "") for f, s in families.items())
    if up.kind not in ("train", "distill") or up.family not in families or (
            families[up.family] and stage != families[up.family]):
        what = f"a '{up.family}' {up.kind} job" + (f" (stage: {stage})" if stage else "")
        return f"{field}: {up.label} is {what}; it must be a trained {wanted} model", 1
    shape = (data.channels, data.image_size, data.image_size)
    if up.image_shape and tuple(up.image_shape) != shape:
        return (f"{field}: {up.label} works on {'x'.join(map(str, up.image_shape))} images, "
                f"this job's data is {'x'.join(map(str, shape))} (channels x size x size)"), 1
    return None, 2 ** (len(up.model.get("channel_mult", (1,))) - 1)


class AutoencoderModel(ModelSection):
    """The first-stage autoencoder of VQGAN and latent diffusion."""

    channels: int = Field(64, ge=4, le=1024)
    channel_mult: tuple[int, ...] = Field((1, 2, 2), min_length=1, max_length=6)
    num_res_blocks: int = Field(1, ge=1, le=8)
    latent_channels: int = Field(4, ge=1, le=1024)
    disc_start: int = Field(1000, ge=0)  # the patch discriminator joins at this step
    disc_weight: float = Field(0.5, ge=0, le=100)  # 0: no discriminator at all
    disc_width: int = Field(64, ge=4, le=1024)
    disc_layers: int = Field(2, ge=1, le=5)

    FINAL_METRICS: ClassVar[tuple[str, ...]] = ("holdout_psnr", "holdout_mse")
    # on the training batches; the code statistics are the VQ bottleneck's, kl and latent_std
    # the KL one's, g_loss and d_loss the discriminator's once it joins
    TRAIN_METRICS: ClassVar[tuple[str, ...]] = (
        "loss", "rec_l1", "mse", "psnr", "bottleneck_loss", "perplexity", "codebook_usage",
        "kl", "latent_std", "g_loss", "d_loss")

    def check_data(self, data: DataSpec) -> str | None:
        return levels_divide(data.image_size, self.channel_mult, "autoencoder", "data.image_size")


# `sample.guidance` of a class-conditional model when a job leaves it out: the scale DiT
# (Peebles & Xie 2023) reports its FID at. Larger scales (diffusers' DiT pipeline shows 4) give
# samples more clearly of their class at the cost of FD and recall: bench/flow.py measures
# the trade-off (docs/results.md).
DEFAULT_GUIDANCE = 1.5


class ConditionalModel(ModelSection):
    """Class conditioning with classifier-free guidance (Ho & Salimans 2022), for the
    diffusion-type families: with `class_conditional`, training drops each label with
    probability `label_dropout`, and sampling takes `sample.label` and `sample.guidance`."""

    class_conditional: bool = False
    num_classes: int = Field(10, ge=2, le=100_000)
    label_dropout: float = Field(0.1, ge=0, lt=1)  # Ho & Salimans' p_uncond

    def check_data(self, data: DataSpec) -> str | None:
        return labels_problem(data) if self.class_conditional else None

    def needs_labels(self) -> bool:
        return self.class_conditional

    @classmethod
    def check_sample(cls, sample: SampleSpec, up: Upstream) -> str | None:
        model = up.model
        if not model.get("class_conditional"):
            for name in ("label", "guidance"):
                if getattr(sample, name) is not None:
                    return (f"sample.{name}: {up.label} is not class-conditional (train it with "
                            "model.class_conditional: true)")
            return None
        classes = model.get("num_classes", 10)
        if sample.label is not None and sample.label >= classes:
            return f"sample.label: {sample.label} but {up.label} has {classes} classes"
        baked = model.get("distilled_guidance")
        if baked is not None and sample.guidance not in (None, baked):
            return (f"sample.guidance: {up.label} was distilled with guidance {baked:g}, which "
                    f"its samples keep (got {sample.guidance:g})")
        return None

    @classmethod
    def guided_student(cls, teacher: dict[str, Any], distill: dict[str, Any]) -> dict[str, Any]:
        """The guidance a student of `teacher` has built in (its model section's
        `distilled_guidance`): a distilled teacher's own, else `distill.guidance`."""
        if not teacher.get("class_conditional"):
            return {}
        return {"distilled_guidance": (teacher.get("distilled_guidance")
                                       or distill.get("guidance") or DEFAULT_GUIDANCE)}

    @classmethod
    def check_guided_distill(cls, distill: dict[str, Any], up: Upstream) -> str | None:
        """Whether `distill.guidance` fits the teacher `up`."""
        guidance = distill.get("guidance")
        if guidance is not None and not up.model.get("class_conditional"):
            return (f"distill.guidance: {up.label} is not class-conditional; only a "
                    "class-conditional teacher is guided")
        baked = up.model.get("distilled_guidance")
        if baked is not None and guidance not in (None, baked):
            return (f"distill.guidance: {up.label} was distilled with guidance {baked:g}, which "
                    f"its students keep (got {guidance:g})")
        return None


class UNetModel(ConditionalModel):
    """The U-Net of the diffusion-type families (workers/nn/unet.py)."""

    channels: int = Field(32, ge=4, le=1024)
    channel_mult: tuple[int, ...] = Field((1, 2), min_length=1, max_length=6)
    num_res_blocks: int = Field(1, ge=1, le=8)
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = Field(0.0, ge=0, lt=1)

    def check_data(self, data: DataSpec) -> str | None:
        return (levels_divide(data.image_size, self.channel_mult, "U-Net", "data.image_size")
                or super().check_data(data))
