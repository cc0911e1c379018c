"""The autoregressive family's `model:` section, its distillation method and its rules.
Torch-free."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from orchestrator.spec import DataSpec, ModelSection, Strict, Upstream
from workers.config import first_stage_problem, labels_problem

MAX_TOKENS = 1024  # longest token sequence an autoregressive model may be asked to learn


class KDDistill(Strict):
    """Knowledge distillation of an autoregressive model: the student (the teacher's model with
    the `student` changes) learns the teacher's next-token distributions, T² KL(P_T || Q_T) at
    temperature T, mixed with the hard-label cross-entropy: α CE + (1 - α) T² KL."""

    method: Literal["kd"]
    student: dict[str, Any] = Field(default_factory=dict)
    temperature: float = Field(2.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1)
    allow_larger_student: bool = False


class ARModel(ModelSection):
    REFS: ClassVar[tuple[str, ...]] = ("tokenizer",)
    DISTILL: ClassVar[type[Strict] | None] = KDDistill
    STUDENT_FIELDS: ClassVar[tuple[str, ...]] = ("dim", "layers", "heads", "dropout")
    SIZE_FIELDS: ClassVar[tuple[str, ...]] = ("dim", "layers")
    TRAIN_METRICS: ClassVar[tuple[str, ...]] = ("loss", "perplexity", "tokens_per_s")
    FINAL_METRICS: ClassVar[tuple[str, ...]] = ("holdout_nats_per_token", "holdout_perplexity",
                                                "holdout_nats_per_token_raw")

    TRAINS_ON: ClassVar[str] = "its tokenizer's codes"

    tokenizer: str = Field(min_length=1)  # a vqgan job of this spec, or its checkpoint URI
    dim: int = Field(128, ge=8, le=8192)
    layers: int = Field(4, ge=1, le=64)
    heads: int = Field(4, ge=1, le=128)
    dropout: float = Field(0.0, ge=0, lt=1)
    class_conditional: bool = False
    num_classes: int = Field(10, ge=2, le=100_000)

    @model_validator(mode="after")
    def _heads_divide(self) -> ARModel:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self

    def check_data(self, data: DataSpec) -> str | None:
        return labels_problem(data) if self.class_conditional else None

    def needs_labels(self) -> bool:
        return self.class_conditional

    def check_ref(self, field: str, up: Upstream, data: DataSpec) -> str | None:
        problem, factor = first_stage_problem(field, up, data, {"vqgan": None})
        tokens = (data.image_size // factor) ** 2
        if problem is None and tokens > MAX_TOKENS:
            problem = (f"{field}: {data.image_size}x{data.image_size} images make {tokens} tokens "
                       f"with {up.label}; at most {MAX_TOKENS} are supported")
        return problem


def describe_sampler(settings: dict[str, Any]) -> str:
    """E.g. "T=1, top-k 50"."""
    parts = [f"T={settings.get('temperature', 1.0):g}"]
    parts += [f"top-k {settings['top_k']}"] if settings.get("top_k") else []
    parts += [f"top-p {settings['top_p']:g}"] if settings.get("top_p") else []
    return ", ".join(parts)
