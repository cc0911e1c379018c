"""The DDPM family's `model:` section, its distillation method and its rules. Torch-free."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from orchestrator.spec import SampleSpec, Strict, Upstream
from workers.config import UNetModel, distill_rounds


class ProgressiveDistill(Strict):
    """Diffusion step distillation: the student starts as the teacher and learns, round by
    round, to match two of its DDIM steps with one, halving the steps each round. Each round
    trains `train.steps` steps."""

    method: Literal["progressive"]
    student_steps: int = Field(4, ge=1, le=10_000)
    # DDIM steps of the first round's teacher; None: the teacher's own (its timesteps, or the
    # steps it was itself distilled to)
    teacher_steps: int | None = Field(None, ge=2, le=10_000)
    prediction: Literal["v", "x"] = "v"  # what the student predicts (ε is unstable at few steps)
    # a class-conditional teacher's guidance scale, which the student learns to sample with;
    # None: the default sampling guidance
    guidance: float | None = Field(None, ge=0, le=100)


def halving_problem(distill: dict[str, Any], up: Upstream, timesteps: int) -> str | None:
    """Whether halving from the teacher's steps reaches `distill.student_steps`."""
    own = up.model.get("distilled_steps") or timesteps
    start = distill.get("teacher_steps") or own
    student = distill["student_steps"]
    where = "distill.teacher_steps" if distill.get("teacher_steps") else "distill.student_steps"
    if start > timesteps:
        return f"distill.teacher_steps: {start} but {up.label} has {timesteps} timesteps"
    rounds = distill_rounds(start, student)
    if rounds is None or rounds == 0:
        largest = student * 2 ** max(0, (timesteps // student).bit_length() - 1)
        why = ("are not fewer than" if rounds == 0 else "cannot be reached by halving")
        hint = (f"; set distill.teacher_steps to {student} times a power of two, e.g. "
                f"{largest}" if largest > student else "")
        return (f"{where}: {student} steps {why} the {start} steps of the teacher "
                f"({up.label}){hint}")
    return None


class DDPMModel(UNetModel):
    timesteps: int = Field(1000, ge=2, le=10_000)
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction: Literal["eps", "v", "x"] = "eps"  # what the U-Net predicts

    DISTILL: ClassVar[type[Strict] | None] = ProgressiveDistill

    @model_validator(mode="after")
    def _betas_increase(self) -> DDPMModel:
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start {self.beta_start:g} must be smaller than beta_end "
                             f"{self.beta_end:g}")
        return self

    @classmethod
    def student_model(cls, teacher: dict[str, Any], distill: dict[str, Any]) -> dict[str, Any]:
        # `distilled_steps` exists only in checkpoints: the steps the student samples with
        return {**teacher, "prediction": distill["prediction"],
                "distilled_steps": distill["student_steps"], **cls.guided_student(teacher, distill)}

    @classmethod
    def check_sample(cls, sample: SampleSpec, up: Upstream) -> str | None:
        limit = up.model.get("timesteps")
        if sample.steps and limit and sample.steps > limit:
            return f"sample.steps: {sample.steps} steps but {up.label} has {limit} timesteps"
        if up.model.get("distilled_steps") and sample.sampler not in (None, "ddim"):
            return (f"sample.sampler: {up.label} is distilled for {up.model['distilled_steps']}"
                    f"-step DDIM; sample it with sampler: ddim")
        return super().check_sample(sample, up)

    @classmethod
    def check_distill(cls, distill: dict[str, Any], up: Upstream) -> str | None:
        return cls.check_guided_distill(distill, up) or halving_problem(distill, up, int(up.model.get("timesteps", 1000)))


def describe_sampler(settings: dict[str, Any]) -> str:
    """E.g. "ddim 50 steps trailing"."""
    if not settings.get("sampler"):
        return "-"
    spacing = " trailing" if settings.get("spacing") == "trailing" else ""
    guidance = (f", guidance {settings['distilled_guidance']:g} (distilled)"
                if settings.get("distilled_guidance") is not None else
                f", guidance {settings['guidance']:g}" if settings.get("guidance") is not None else "")
    return f"{settings['sampler']} {settings.get('steps') or 'all'} steps{spacing}{guidance}"
