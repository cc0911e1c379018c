"""The flow family's `model:` section, its distillation method and its rules. Torch-free.

Sampling integrates the learned ODE dx/dt = v(x, t) from noise (t = 0) to data (t = 1):

- `sample.sampler`: "euler" (the default) or "heun" (Karras et al. 2022: a second evaluation
  corrects every step but the last, so N steps cost 2N - 1 network evaluations);
- `sample.steps`: by default 50 Euler steps, the default of flow-matching pipelines (e.g.
  diffusers' FlowMatchEulerDiscreteScheduler), or 25 Heun steps: 49 evaluations, the same
  budget; a distilled model samples with the steps it was distilled for;
- `sample.spacing`: the time grid. "uniform" t_i = i/N (the default); "shifted": SD3's time
  shift (Esser et al. 2024) of the noise level σ = 1 - t, σ' = sσ / (1 + (s - 1)σ) with
  s = SHIFT, which spends more of the steps near the noise end.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import Field

from orchestrator.spec import SampleSpec, Strict, Upstream
from workers.config import UNetModel, distill_rounds

Sampler = Literal["euler", "heun"]
Spacing = Literal["uniform", "shifted"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)  # the first is the default
SPACINGS: tuple[str, ...] = get_args(Spacing)
DEFAULT_STEPS = {"euler": 50, "heun": 25}  # the same 49-50 network evaluations
SHIFT = 3.0  # SD3's shift (diffusers' default for its flow-matching scheduler)
# Euler steps of a distillation's first teacher when neither the job nor the teacher says
DISTILL_TEACHER_STEPS = 64


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of `steps` steps of `sampler` (a guided one doubles its batch, not
    its calls)."""
    return 2 * steps - 1 if sampler == "heun" else steps


class HalvingDistill(Strict):
    """Progressive halving of Euler steps (Salimans & Ho 2022, on the flow's ODE): the student
    starts as the teacher and learns, round by round, to take in one Euler step the two Euler
    steps of the round's teacher, halving the steps each round; each round trains `train.steps`
    steps and its student is the next round's teacher."""

    method: Literal["progressive"]
    student_steps: int = Field(4, ge=1, le=10_000)
    # Euler steps of the first round's teacher; None: a distilled teacher's own, else 64
    teacher_steps: int | None = Field(None, ge=2, le=10_000)
    # the time grid distilled on (the student's); None: a distilled teacher's own, else uniform
    spacing: Spacing | None = None
    # a class-conditional teacher's guidance scale, built into the student; None: the default
    guidance: float | None = Field(None, ge=0, le=100)


class FlowModel(UNetModel):
    """Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): x_t = (1 - t) x0 +
    t x1 between noise x0 ~ N(0, I) and data x1; a U-Net regresses the velocity x1 - x0."""

    # How training draws t. "logit_normal" (sigmoid of N(logit_mean, logit_std²)), the default:
    # Esser et al. 2024 ranked rectified flow with logit-normal(0, 1) first of all the
    # formulations they compared; it weights the middle of the path, where the velocity is
    # hardest to predict (near either end it is almost a mean). "uniform": t ~ U(0, 1), as in
    # Lipman et al. and Liu et al.
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = Field(0.0, ge=-5, le=5)
    logit_std: float = Field(1.0, gt=0, le=5)

    DISTILL: ClassVar[type[Strict] | None] = HalvingDistill

    @classmethod
    def student_model(cls, teacher: dict[str, Any], distill: dict[str, Any]) -> dict[str, Any]:
        # the `distilled_*` fields exist only in checkpoints: how the student samples
        return {**teacher, "distilled_steps": distill["student_steps"],
                "distilled_spacing": (distill.get("spacing") or
                                      teacher.get("distilled_spacing") or SPACINGS[0]),
                **cls.guided_student(teacher, distill)}

    @classmethod
    def check_sample(cls, sample: SampleSpec, up: Upstream) -> str | None:
        steps = up.model.get("distilled_steps")
        if steps and sample.sampler not in (None, "euler"):
            return (f"sample.sampler: {up.label} is distilled for {steps} Euler steps; sample it "
                    "with sampler: euler")
        return super().check_sample(sample, up)

    @classmethod
    def check_distill(cls, distill: dict[str, Any], up: Upstream) -> str | None:
        model = up.model
        own = model.get("distilled_spacing")
        if own is not None and distill.get("spacing") not in (None, own):
            return (f"distill.spacing: {up.label} was distilled with spacing {own}, which its "
                    f"students keep (got {distill['spacing']})")
        problem = cls.check_guided_distill(distill, up)
        if problem:
            return problem
        student = distill["student_steps"]
        start = (distill.get("teacher_steps") or model.get("distilled_steps")
                 or DISTILL_TEACHER_STEPS)
        rounds = distill_rounds(start, student)
        if not rounds:  # None: not a power of two apart; 0: no fewer steps
            where = f"distill.{'teacher' if distill.get('teacher_steps') else 'student'}_steps"
            why = "are not fewer than" if rounds == 0 else "cannot be reached by halving"
            return (f"{where}: {student} steps {why} the {start} Euler steps of the teacher "
                    f"({up.label}); set distill.teacher_steps to {student} times a power of "
                    f"two, e.g. {student * 16}")
        return None


def describe_sampler(settings: dict[str, Any]) -> str:
    """E.g. "heun 10 steps (19 NFE)", "euler 4 steps (4 NFE) shifted, w=4 (distilled)"."""
    if not settings.get("sampler"):
        return "-"
    text = f"{settings['sampler']} {settings['steps']} steps ({settings['nfe']} NFE)"
    if settings.get("spacing", "uniform") != "uniform":
        text += f" {settings['spacing']}"
    if settings.get("distilled_guidance") is not None:
        text += f", w={settings['distilled_guidance']:g} (distilled)"
    elif settings.get("guidance") is not None:
        text += f", w={settings['guidance']:g}"
    if settings.get("label") is not None:
        text += f", class {settings['label']}"
    return text
