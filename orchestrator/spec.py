"""The job spec: the YAML a user writes, as strict pydantic models.

Every problem found is reported as one line naming the file, the job and the field
(``SpecError.lines``); the CLI prints them and exits 2.
"""

from __future__ import annotations

import collections.abc
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.registry import FAMILIES, family

JOB_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
EXPERIMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"

Kind = Literal["train", "sample", "distill", "evaluate"]


class SpecError(Exception):
    """A spec that cannot run; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]):
        # user text (keys, names) inside a message stays on its line, and within bounds
        lines = [_printable(line)[:MAX_LINE] for line in lines]
        super().__init__("\n".join(lines))
        self.lines = lines


MAX_LINE = 1000


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


MAX_SHOWN = 60  # characters of a value a message shows


def _shown(value: Any) -> str:
    """A value the user gave, as a message shows it: its repr, cut short."""
    shown = repr(value)
    return shown[:MAX_SHOWN] + "..." if len(shown) > MAX_SHOWN else shown


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSpec(Strict):
    """The held-out split: a file of its own (same format as the data), or else a seeded
    `fraction` of the data. Training reads only the rest; evaluation and the autoencoders'
    reconstruction error read the held-out part."""

    heldout: str | None = None  # local path or s3:// URI; for idx, the images file
    heldout_labels: str | None = None  # idx only
    fraction: float = Field(0.1, gt=0, le=0.5)  # without `heldout`
    seed: int = Field(0, ge=0, le=2**31 - 1)


class Augment(Strict):
    """Augmentation of training batches, drawn per batch on the job's device from the step's
    seeded generator (a resumed job draws the same)."""

    hflip: bool = False  # mirror each image left-right with probability 1/2
    # random resized crop: a square of a uniform fraction in [crop, 1] of the image's area, at a
    # uniform position, resized back (bilinear); None: no crop
    crop: float | None = Field(None, gt=0, lt=1)


class DataSpec(Strict):
    dataset: Literal["digits", "npz", "idx", "folder"] = "digits"
    path: str | None = None  # local file or s3:// URI (npz, IDX images file); folder: a directory
    labels: str | None = None  # IDX labels file; npz labels come from `y_key`
    x_key: str = "x"
    y_key: str | None = "y"
    image_size: int = Field(16, ge=4, le=256)
    channels: Literal[1, 3] = 1
    limit: int | None = Field(None, ge=1)
    split: SplitSpec = SplitSpec()
    augment: Augment = Augment()

    @model_validator(mode="after")
    def _path_matches_dataset(self) -> DataSpec:
        # a model-level check: its message names the offending field and value itself
        given = [(name, value) for name, value in (
            ("path", self.path), ("labels", self.labels), ("split.heldout", self.split.heldout))
            if value]
        if self.dataset == "digits" and given:
            name, value = given[0]
            raise ValueError("dataset 'digits' is built in and takes no path, labels or "
                             f"split.heldout (got {name} {_shown(value)})")
        if self.dataset != "digits" and not self.path:
            raise ValueError(f"dataset '{self.dataset}' needs a path")
        if self.dataset == "folder" and (
                self.labels or ("://" in self.path and not self.path.startswith(("s3://", "file://")))):
            name, value = ("labels", self.labels) if self.labels else ("path", self.path)
            raise ValueError("dataset 'folder' is a directory or an s3:// prefix whose "
                             "subfolders are the classes (no labels file; got "
                             f"{name} {_shown(value)})")
        if self.split.heldout_labels and self.dataset != "idx":
            raise ValueError(f"split.heldout_labels is for dataset 'idx' only, not "
                             f"'{self.dataset}' (got {_shown(self.split.heldout_labels)})")
        return self


class Resources(Strict):
    gpus: float = Field(0, ge=0, le=64)
    cpus: float = Field(1, gt=0, le=512)
    max_restarts: int = Field(3, ge=0, le=100)  # infrastructure failures: resume from checkpoint
    max_retries: int = Field(0, ge=0, le=100)  # errors in the job itself
    timeout_s: float | None = Field(None, gt=0)
    # data-parallel training: `workers` Ray Train workers, each with `cpus` CPUs and
    # `gpus_per_worker` GPUs, share each step's batch
    workers: int = Field(1, ge=1, le=1024)
    gpus_per_worker: float = Field(0, ge=0, le=64)
    # when the cluster is full, jobs of higher priority start first (then the earlier)
    priority: int = Field(0, ge=-1000, le=1000)


# Fields that do not change a job's result, by section: `plan.job_hash` leaves them out.
# `train.eval` changes no weights (its sampling draws from generators of its own): its metrics
# are extra outputs, so a job cached without them is not run again to add them.
UNHASHED_FIELDS = {"train": frozenset({"keep_checkpoints", "compile", "eval"}),
                   "sample": frozenset({"compile"})}

# Sampler steps of `train.eval` when it leaves `steps` out: the family's default, at most this.
# Measured on a quickstart-sized DDPM (2 CPUs, 7.7 steps/s): one evaluation of 500 samples takes
# 15 s at DDIM's default 50 steps, 19% of a 4000-step job's wall time at `every: 500`; at 20
# steps 6.2 s, 8.7%, with the same FD (15.5 against 15.7 at 50 steps; 10 steps: 18.5).
TRAIN_EVAL_STEPS = 20


class ClassifierSpec(Strict):
    """The feature network of evaluation, trained once per data set and configuration."""

    steps: int = Field(1500, ge=1, le=1_000_000)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0, le=10)
    width: int = Field(32, ge=4, le=1024)
    features: int = Field(128, ge=8, le=4096)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class TrainEval(Strict):
    """`train.eval`: the sample quality of the model as it trains. At steps `every`, 2 `every`,
    ..., those of `at`, and the last, rank 0 samples `num_samples` images from its EMA model and scores them
    against the first `num_samples` held-out images in the feature space of the data set's
    evaluation classifier (by default the one evaluate jobs use; `classifier` names another;
    trained by whichever job needs it first), logging `fd` and `kid` at that step; `metric` names the one that is the
    objective (a sweep's). Training is unchanged: the job trains the same weights.

    `metric` may instead be any metric the training logs (`loss`, `psnr`, `images_per_s`,
    ...; the family's `TRAIN_METRICS` and `LOGGED_ALWAYS`): then nothing is sampled, and the
    measurement at each of those steps is the metric's mean over the log steps since the last
    one (`every` a multiple of `train.log_every`)."""

    # the steps between evaluations; None with `at`: only at `at` and the last step
    every: int | None = Field(None, ge=1)
    # steps to evaluate at (a sweep's trial under asha or hyperband: the pruner's rungs)
    at: list[Annotated[int, Field(ge=1)]] | None = Field(None, max_length=64)
    # KID's subsets are half the samples: with fewer than 10 its estimate means little
    num_samples: int = Field(500, ge=10, le=1_000_000)
    metric: str = Field("fd", min_length=1, max_length=100)
    # sampler steps (diffusion, flow); None: the family's default, at most TRAIN_EVAL_STEPS
    # (DDIM 50 -> 20, Euler 50 -> 20; a distilled model's own steps are fewer still)
    steps: int | None = Field(None, ge=1, le=100_000)
    # the feature network; None: an evaluate job's default `evaluate.classifier` (1500 steps),
    # so that both share one cached classifier. A smaller one is quicker to train on a CPU.
    classifier: ClassifierSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _every_500_unless_at(cls, data: Any) -> Any:
        """`every` 500 unless it or `at` is given (so that a job's data round-trips: its
        `every` is left out of it when `at` alone says when)."""
        if isinstance(data, dict) and data.get("every") is None and data.get("at") is None:
            return {**data, "every": 500}
        return data


class TrainSpec(Strict):
    steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(2e-4, gt=0, le=10)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    # decay of the weights' exponential moving average, which sampling uses; 0: none, the
    # weights as trained
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int | None = Field(None, ge=1)  # None: only the final checkpoint
    # Checkpoints kept (older ones are pruned as new ones are written); None keeps every one.
    # 3: the newest, plus two to fall back on should the newest turn out corrupt. The newest,
    # LATEST's target and checkpoints pinned by jobs that read them are never deleted.
    keep_checkpoints: int | None = Field(3, ge=1)
    sample_every: int | None = Field(None, ge=1)  # None: one grid at the end
    sample_images: int = Field(16, ge=1, le=1024)
    # sampler steps of those grids (diffusion, flow); None: the family's default, as a sample
    # job's (DDIM 50, Euler 50). Set, a grid is what a sample job with these steps draws.
    sample_steps: int | None = Field(None, ge=1, le=100_000)
    log_every: int = Field(10, ge=1)
    # fp32, or mixed precision: bf16 (autocast) or fp16 (autocast and a gradient scaler)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # torch.compile the networks (where the tool chain works here; else eager, and the run
    # says why): fewer, fused kernels, after a first step that compiles
    compile: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)
    eval: TrainEval | None = None  # None: no evaluation while training

    def eval_problem(self, family_name: str, model: ModelSection) -> str | None:
        """`eval` of a metric the family does not log, or of sample quality asked of a model
        that does not make images from noise (a first stage)."""
        from workers.config import AutoencoderModel  # the first stages' section

        if self.eval is None:
            return None
        metric = self.eval.metric
        if metric not in EVAL_METRICS:
            logged = model.logged_metrics()
            if metric not in logged:
                return (f"train.eval.metric: family '{family_name}' never logs '{metric}' "
                        f"during training (it can be: {', '.join([*EVAL_METRICS, *logged])})")
            if self.eval.every is not None and self.eval.every % self.log_every:
                return (f"train.eval.every: {self.eval.every} is not a multiple of "
                        f"train.log_every ({self.log_every}): '{metric}' is read at log steps")
            off = [step for step in self.eval.at or () if step % self.log_every]
            if off:
                return (f"train.eval.at: {off[0]} is not a multiple of train.log_every "
                        f"({self.log_every}): '{metric}' is read at log steps")
            return None
        if not isinstance(model, AutoencoderModel):
            return None
        stage = f" with model.stage '{model.stage}'" if "stage" in type(model).model_fields else ""
        return (f"train.eval: family '{family_name}'{stage} trains a first-stage autoencoder, "
                "which reconstructs images instead of generating them; evaluate the model "
                "trained on it")


class SampleSpec(Strict):
    num_images: int = Field(64, ge=1, le=1_000_000)
    # the family's sampler (ddpm, ldm: "ddim" or "ancestral"); None: the family's default
    sampler: str | None = None
    # None: a distilled model's own steps; else ddim: 50 (or every timestep, if fewer), and
    # ancestral: every timestep of the model
    steps: int | None = Field(None, ge=1, le=100_000)
    eta: float = Field(0.0, ge=0, le=1)
    # timesteps: "linspace" T-1..0, "trailing" T-1..T/n-1; None: the model's own (trailing for
    # a distilled model, whose grid it is)
    spacing: str | None = None
    # autoregressive
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    use_cache: bool = True
    label: int | None = Field(None, ge=0)  # class-conditional models: None cycles through classes
    # classifier-free guidance scale s of a class-conditional diffusion or flow model: 0 is
    # unconditional, 1 conditional, > 1 guided; None: the model's default
    guidance: float | None = Field(None, ge=0, le=100)
    batch_size: int = Field(256, ge=1, le=65536)
    use_ema: bool = True
    compile: bool = False  # torch.compile the sampling network, as train.compile
    seed: int = Field(0, ge=0, le=2**31 - 1)


class EvaluateSpec(Strict):
    num_samples: int = Field(1000, ge=10, le=1_000_000)  # generated images per source
    sample: dict[str, Any] = Field(default_factory=dict)  # sampler settings for every source
    per_source: dict[str, dict[str, Any]] = Field(default_factory=dict)  # ...overridden by source
    # sampler settings each source is scored at, one score per value (several fields: per
    # combination), e.g. {guidance: [0, 1, 2, 4]}: a class-conditional model's trade-off
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    knn_k: int = Field(3, ge=1, le=100)  # k of the k-NN precision/recall
    classifier: ClassifierSpec = ClassifierSpec()
    inception: bool = False  # also the Inception FID (the `inception` extra; slow on CPU)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    def settings(self, ref: str | None, **swept: Any) -> SampleSpec:
        """The sampler settings for source `ref` (with the swept values `swept`)."""
        merged = {**self.sample, **self.per_source.get(ref, {}), **swept,
                  "num_images": self.num_samples}
        return SampleSpec.model_validate(merged)

    def variants(self, ref: str | None) -> list[tuple[dict[str, Any], SampleSpec]]:
        """(swept values, settings) of each scoring of source `ref`: one without a sweep."""
        combos = [dict(zip(self.sweep, values))
                  for values in itertools.product(*self.sweep.values())]
        return [(combo, self.settings(ref, **combo)) for combo in combos]


@dataclass(frozen=True)
class Upstream:
    """What a job reads, as far as validation needs it: a job of the spec or a checkpoint's
    metadata (for URIs)."""

    ref: str
    family: str
    kind: str
    model: dict[str, Any]
    image_shape: tuple[int, int, int] | None  # (channels, height, width)
    num_images: int | None = None  # what a sample job makes

    @classmethod
    def of_job(cls, job: Job, jobs: dict[str, Job] | None = None, _seen: frozenset = frozenset()
               ) -> Upstream:
        """`jobs` (the spec's, by name) lets a sample job report its model's image shape and a
        distill job its student's model."""
        jobs = jobs or {}
        source, model = job, job.model
        if job.kind == "sample" and isinstance(job.from_, str) and job.from_ in jobs:
            source = jobs[job.from_]
        if job.kind == "distill":
            model = {}
            teacher = jobs.get(job.teacher or "")
            if teacher is not None and teacher.name not in _seen | {job.name}:
                up = cls.of_job(teacher, jobs, _seen | {job.name})
                section = family(str(job.family)).distill_section()
                if up.model and section is not None and job.distill:
                    model = section.student_model(up.model, job.distill)
        data = source.data
        shape = (data.channels, data.image_size, data.image_size) if data else None
        return cls(job.name, str(job.family), job.kind, model, shape,
                   job.sample.num_images if job.sample else None)

    @classmethod
    def of_checkpoint(cls, uri: str, meta: dict[str, Any]) -> Upstream:
        shape = meta.get("image_shape")
        return cls(uri, str(meta.get("family")), str(meta.get("kind", "train")),
                   dict(meta.get("model") or {}), tuple(shape) if shape else None)

    @property
    def label(self) -> str:
        return f"job '{self.ref}'" if ":" not in self.ref else self.ref


class ModelSection(Strict):
    """A family's `model:` section. REFS names the fields that point at another job or a
    checkpoint URI (e.g. an autoregressive model's tokenizer); the plan makes them edges of the
    DAG and asks `check_ref` whether what they point at fits."""

    REFS: ClassVar[tuple[str, ...]] = ()
    DISTILL: ClassVar[type[Strict] | None] = None  # the family's distillation method
    STUDENT_FIELDS: ClassVar[tuple[str, ...]] = ()  # what `distill.student` may change
    SIZE_FIELDS: ClassVar[tuple[str, ...]] = ()  # ...of which, larger than the teacher's, grow it

    @classmethod
    def of(cls, model: dict[str, Any]) -> ModelSection:
        """The section validated from a model dict that may hold more than its fields (a
        checkpoint's model records e.g. `distilled_steps`)."""
        return cls.model_validate({k: v for k, v in model.items() if k in cls.model_fields})

    # what the family's training batches are: augmentation flips pixels only
    TRAINS_ON: ClassVar[str] = "pixels"
    # metrics the family measures when training ends (a sweep's objective may be one)
    FINAL_METRICS: ClassVar[tuple[str, ...]] = ()
    # what the family's training step returns, logged every `train.log_every` steps (with
    # LOGGED_ALWAYS): what `train.eval.metric`, and so a sweep's objective, may also be
    TRAIN_METRICS: ClassVar[tuple[str, ...]] = ("loss",)

    def logged_metrics(self) -> tuple[str, ...]:
        return (*self.TRAIN_METRICS, *LOGGED_ALWAYS)

    def check_data(self, data: DataSpec) -> str | None:
        """A problem of this model with that data, found before anything runs."""
        return None

    def needs_labels(self) -> bool:
        return False

    def check_ref(self, field: str, up: Upstream, data: DataSpec) -> str | None:
        return None

    @classmethod
    def check_sample(cls, sample: SampleSpec, up: Upstream) -> str | None:
        """A problem of sampler settings with the trained model `up` of this section."""
        return None

    @classmethod
    def student_model(cls, teacher: dict[str, Any], distill: dict[str, Any]) -> dict[str, Any]:
        """The model section of a student distilled from a teacher with model `teacher`."""
        return {**teacher, **distill.get("student", {})}

    @classmethod
    def check_distill(cls, distill: dict[str, Any], up: Upstream) -> str | None:
        """Whether `distill` can make a student of the teacher `up` (whose model is known)."""
        model = cls.student_model(up.model, distill)
        try:
            cls.of(model)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, ("distill.student", *err["loc"])))
            return f"{where}: {_describe(err)}"
        if not distill.get("allow_larger_student"):
            for name in cls.SIZE_FIELDS:
                if name in up.model and model[name] > up.model[name]:
                    return (f"distill.student.{name}: {model[name]} is larger than the teacher's "
                            f"{up.model[name]} ({up.label}); a student is meant to be smaller "
                            "(set distill.allow_larger_student: true to allow it)")
        return None


def model_needs_labels(job: Job, jobs: dict[str, Job]) -> bool:
    """Whether the model a train or distill job trains reads class labels."""
    model = job.model if job.kind == "train" else Upstream.of_job(job, jobs).model
    if not model or job.family not in FAMILIES:
        return False
    return family(job.family).section(model).of(model).needs_labels()


# The sections each kind reads; `defaults` fill only these, a job may set only these.
KIND_SECTIONS: dict[str, frozenset[str]] = {
    "train": frozenset({"model", "data", "train", "sweep", "register"}),
    "sample": frozenset({"sample", "from"}),
    "distill": frozenset({"teacher", "distill", "data", "train", "register"}),
    "evaluate": frozenset({"from", "data", "evaluate", "promote"}),
}
OPTIONAL_SECTIONS = frozenset({"model", "data", "train", "sample", "from", "teacher", "distill",
                               "evaluate", "sweep", "register", "promote"})
# MLflow's registered model names and aliases (an alias is no version: not `latest`, not v3)
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$"
ALIAS = r"^[A-Za-z0-9_-]{1,255}$"


def _alias(value: str | None) -> str | None:
    if value is not None and re.fullmatch(r"latest|[vV][0-9]+", value):
        raise ValueError(f"'{value}' names a version in MLflow, not an alias")
    return value


class RegisterSpec(Strict):
    """`register:` on a train or distill job: once it finishes, its checkpoint becomes a new
    version of this MLflow registered model (a pyfunc that samples), `alias` moved to it."""

    name: str = Field(pattern=MODEL_NAME)
    alias: str | None = Field(None, pattern=ALIAS)
    _check_alias = field_validator("alias")(_alias)


class PromoteSpec(Strict):
    """`promote:` on an evaluate job: of its sources that are versions of the registered model
    `name`, the best by `metric` takes `alias` if it beats the version holding it now."""

    name: str = Field(pattern=MODEL_NAME)
    alias: str = Field("champion", pattern=ALIAS)
    metric: str = "fd"
    _check_alias = field_validator("alias")(_alias)
    mode: Literal["min", "max"] | None = None  # None: as a sweep's objective (fd: min)


_Int = int  # (a field below is called `int`)


class ParamRange(Strict):
    """A swept setting's range: exactly one of these, each [low, high]."""

    uniform: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    int: tuple[_Int, _Int] | None = None
    log_int: tuple[_Int, _Int] | None = None

    @model_validator(mode="after")
    def _one(self) -> ParamRange:
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, log_uniform, int, log_int "
                             f"(got {', '.join(given) or 'none'})")
        low, high = getattr(self, given[0])
        if not low < high:
            raise ValueError(f"{given[0]}: low must be below high (got [{low}, {high}])")
        if given[0].startswith("log") and low <= 0:
            raise ValueError(f"{given[0]}: a log range must be positive (got [{low}, {high}])")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self if v is not None)

    @property
    def bounds(self) -> tuple[float, float]:
        return getattr(self, self.kind)


class Objective(Strict):
    # fd or kid: measured during training (`train.eval`) on `num_samples` samples every
    # `every` steps (default: train.eval's; else under asha or hyperband only at the pruner's
    # rungs, min_steps, 3x, 9x, ..., and the end, which is all it reads; else an eighth of
    # the steps), which early stopping reads; or any metric the training logs (loss, psnr, images_per_s...: its mean over those
    # steps); or a metric the family measures when training ends (e.g. holdout_psnr)
    metric: str = "fd"
    # None: max for psnr, accuracy, usage and throughput (*_per_s), else min
    mode: Literal["min", "max"] | None = None
    every: int | None = Field(None, ge=1)
    num_samples: int | None = Field(None, ge=10, le=100_000)  # None: train.eval's, else 500


class EarlyStop(Strict):
    # Optuna's pruners: asha (successive halving, the default: at steps min_steps, 3x, 9x, ...
    # only the best third of the trials measured there go on); median (Optuna's default: a
    # trial whose objective at a step is worse than the median of the other trials' at that
    # step stops); hyperband (asha over several min_steps at once); or none. bench/sweep.py,
    # 16 TPE trials: asha trained 40% of the steps of every trial to full length, median 43%,
    # hyperband more; see README.
    method: Literal["asha", "median", "hyperband", "none"] = "asha"
    # no trial stops before; None: objective.every (else train.eval's, else an eighth of the steps)
    min_steps: int | None = Field(None, ge=1)

    REDUCTION: ClassVar[int] = 3  # asha's and hyperband's: the best third go on, rungs 3x apart

    def rungs(self, first: int, steps: int) -> list[int] | None:
        """The steps at which asha or hyperband (whose brackets' rungs are the same steps)
        decide, below `steps`, from `first` on; None for a pruner that reads every
        measurement."""
        if self.method not in ("asha", "hyperband"):
            return None
        rungs = [first]
        while rungs[-1] * self.REDUCTION < steps:
            rungs.append(rungs[-1] * self.REDUCTION)
        return rungs


MAX_GRID = 64  # grid points a sweep may have without `allow_large_grid`


class SweepSpec(Strict):
    """A search over a train job's settings: each trial is the job with `params` set (keys
    are dotted paths into the job, e.g. train.lr, model.channels), a job of its own."""

    method: Literal["grid", "random", "tpe"] = "tpe"
    trials: int | None = Field(None, ge=1, le=10_000)  # None: a grid's size, else 16
    params: dict[str, list[Any] | ParamRange] = Field(min_length=1)
    objective: Objective = Objective()
    early_stop: EarlyStop = EarlyStop()
    parallel: int = Field(4, ge=1, le=1000)  # trials running at once, within the cluster's room
    seed: int = Field(0, ge=0, le=2**31 - 1)
    allow_large_grid: bool = False

    @field_validator("params", mode="before")
    @classmethod
    def _values_or_range(cls, params: Any) -> Any:
        """Each param: a list of values, or a range (one line naming the param if neither)."""
        if not isinstance(params, dict):
            return params
        out = {}
        for path, value in params.items():
            if isinstance(value, dict):
                try:
                    value = ParamRange.model_validate(value)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = _loc(first["loc"])
                    raise ValueError(f"{path}: {'' if where == '(top level)' else where + ': '}"
                                     f"{_describe(first)}") from None
            elif not isinstance(value, list):
                raise ValueError(f"{path}: a list of values or a range such as {{uniform: "
                                 f"[low, high]}} (or log_uniform, int, log_int) (got "
                                 f"{_shown(value)})")
            out[path] = value
        return out


class Job(Strict):
    name: str = Field(pattern=JOB_NAME)
    kind: Kind
    family: str | None = None  # one of workers.registry.FAMILIES; not for evaluate jobs
    model: dict[str, Any] = Field(default_factory=dict)
    data: DataSpec | None = None
    train: TrainSpec | None = None
    sample: SampleSpec | None = None
    from_: str | list[str] | None = Field(None, alias="from")
    teacher: str | None = None
    distill: dict[str, Any] | None = None
    evaluate: EvaluateSpec | None = None
    sweep: SweepSpec | None = None
    # not hashed: what is trained is the same (`register` is a method of pydantic's models)
    register_: RegisterSpec | None = Field(None, alias="register")
    promote: PromoteSpec | None = None  # not hashed: what is scored is the same
    resources: Resources = Resources()

    @property
    def references(self) -> list[tuple[str, str]]:
        """(field, reference) for everything this job reads: job names of the spec or
        checkpoint URIs, from `from`, `teacher` and the model's reference fields."""
        froms = [self.from_] if isinstance(self.from_, str) else list(self.from_ or [])
        out = [("from", ref) for ref in froms]
        if self.teacher:
            out.append(("teacher", self.teacher))
        if self.kind == "train" and self.family in FAMILIES:
            try:
                refs = family(self.family).section(self.model).REFS
            except ValueError:
                refs = ()
            out += [(f"model.{f}", self.model[f]) for f in refs if self.model.get(f)]
        return out

    @property
    def sources(self) -> list[str]:
        return [ref for _, ref in self.references]

    def section(self) -> ModelSection:
        """The validated model section of a train job."""
        return family(self.family).section(self.model).model_validate(self.model)

    def resolved(self) -> dict[str, Any]:
        """The job as plain data with every default filled in (what is hashed and logged)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Defaults(Strict):
    data: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    sample: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None


class Spec(Strict):
    experiment: str = Field(pattern=EXPERIMENT_NAME)
    defaults: Defaults = Defaults()
    jobs: list[Job] = Field(min_length=1, max_length=1000)
    source: str = Field("<spec>", exclude=True)

    def job(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, collections.abc.Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, not a {type(key).__name__}",
                key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = "from" if part == "from_" else str(part)
            if not re.fullmatch(r"[\w.-]{1,64}", text):  # a key the user made up, shown as such
                text = repr(part)[:66]
            out += ("." if out else "") + text
    return out or "(top level)"


def _describe(err: dict[str, Any]) -> str:
    """One line for a pydantic error: its message and the value it got."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    if "input" not in err:
        return msg
    if err["type"] == "value_error" and isinstance(err["input"], (dict, BaseModel)):
        # a model-level check: its input is the whole section, its message names the value
        return msg
    return f"{msg} (got {_shown(err['input'])})"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: values of `over` win; nested mappings merge."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _job_label(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    if isinstance(name, str) and 0 < len(name) <= 64 and name.isprintable() and "'" not in name:
        return f"job '{name}'"
    return f"jobs[{index}]"


MAX_VALUES = 100_000  # values in a spec, aliases counted each time they are used
MAX_DEPTH = 32


def _check_size(data: Any, source: str) -> None:
    """Refuse YAML that expands past MAX_VALUES values (an alias bomb: a few lines whose
    aliases nest into billions of values) or nests past MAX_DEPTH, before anything walks it."""
    budget, todo = MAX_VALUES, [(data, 0)]
    while todo:
        node, depth = todo.pop()
        budget -= 1
        if budget < 0:
            raise SpecError([f"{source}: the spec expands to more than {MAX_VALUES} values "
                             f"(YAML aliases inside aliases?)"])
        if depth > MAX_DEPTH:
            raise SpecError([f"{source}: the spec is nested more than {MAX_DEPTH} levels deep"])
        if isinstance(node, dict):
            todo.extend((v, depth + 1) for v in (*node.keys(), *node.values()))
        elif isinstance(node, (list, tuple)):
            todo.extend((v, depth + 1) for v in node)


def parse_spec(data: Any, source: str = "<spec>") -> Spec:
    """Validate already-loaded YAML data; raises SpecError with one line per problem."""
    if not isinstance(data, dict):
        raise SpecError([f"{source}: the spec must be a mapping with 'experiment' and 'jobs' "
                         f"(got {_shown(data)})"])
    _check_size(data, source)
    errors: list[str] = []
    top = {k: v for k, v in data.items() if k != "jobs"}
    try:
        head = Spec.model_validate({**top, "jobs": [{"name": "x", "kind": "train", "family": FAMILIES[0]}]})
        defaults = head.defaults
    except ValidationError as exc:
        errors += [f"{source}: {_loc(e['loc'])}: {_describe(e)}" for e in exc.errors()]
        defaults = Defaults()

    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        got = f" (got {_shown(raw_jobs)})" if "jobs" in data else ""
        errors.append(f"{source}: jobs: must be a non-empty list of jobs{got}")
        raw_jobs = []

    jobs: list[Job] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_jobs):
        label = _job_label(raw, i)
        if not isinstance(raw, dict):
            errors.append(f"{source}: {label}: must be a mapping (got {_shown(raw)})")
            continue
        job, problems = _parse_job(raw, defaults)
        errors += [f"{source}: {label}: {p}" for p in problems]
        if job is None:
            continue
        if job.name in seen:
            errors.append(f"{source}: {label}: name: duplicate job name")
        seen.add(job.name)
        jobs.append(job)

    if errors:
        raise SpecError(errors)
    return Spec.model_validate({**top, "jobs": jobs, "source": source})



def _augment_problem(job: Job, model: ModelSection) -> str | None:
    asked = [name for name, value in job.data.augment if value]
    if asked and model.TRAINS_ON != "pixels":
        return (f"data.augment.{asked[0]}: family '{job.family}' trains on {model.TRAINS_ON}, not "
                "on pixels (augment the images of the job that trains those)")
    return None

def _parse_job(raw: dict[str, Any], defaults: Defaults) -> tuple[Job | None, list[str]]:
    kind = raw.get("kind")
    used = KIND_SECTIONS.get(kind, OPTIONAL_SECTIONS) if isinstance(kind, str) else OPTIONAL_SECTIONS
    problems = [
        f"{key}: not used by kind '{kind}'"
        for key in raw
        if key in OPTIONAL_SECTIONS and key not in used and raw[key] is not None
    ]
    merged = dict(raw)
    for section in ("data", "train", "sample", "evaluate", "resources"):
        default = getattr(defaults, section)
        if default and (section in used or section == "resources"):
            own = raw.get(section)
            merged[section] = _merge(default, own) if isinstance(own, dict) else own or default
    for section in ("data", "train", "sample", "evaluate"):
        if section in used and merged.get(section) is None:
            merged[section] = {}

    try:
        job = Job.model_validate(merged)
    except ValidationError as exc:
        return None, problems + [f"{_loc(e['loc'])}: {_describe(e)}" for e in exc.errors()]

    problems += _check_parallel(job)
    if job.kind == "evaluate":
        return _check_evaluate(job, problems)
    if job.family is None:
        return None, problems + ["family: required field is missing"]
    if job.family not in FAMILIES:
        return None, problems + [f"family: must be one of {', '.join(FAMILIES)} "
                                 f"(got {_shown(job.family)})"]
    kinds = family(job.family).kinds
    if job.kind not in kinds:
        problems.append(f"kind: family '{job.family}' cannot run kind '{job.kind}' "
                        f"(it can: {', '.join(sorted(kinds))})")
    if job.kind == "train":
        try:
            model = family(job.family).section(job.model).model_validate(job.model)
            job = job.model_copy(update={"model": model.model_dump(mode="json")})
            problem = (model.check_data(job.data) or _augment_problem(job, model)
                       or job.train.eval_problem(job.family, model))
            if problem:
                problems.append(problem)
        except ValidationError as exc:
            problems += [f"{_loc(('model', *e['loc']))}: {_describe(e)}" for e in exc.errors()]
        except ValueError as exc:
            problems.append(str(exc))
    if job.sweep is not None and not problems:
        problems += _check_sweep(job)
    if job.kind == "sample":
        problem = family(job.family).check_sample(job.sample)
        if problem:
            problems.append(problem)
    if job.kind == "distill" and job.family in FAMILIES and job.kind in kinds:
        job, found = _check_distill(job)
        problems += found
    if job.kind in ("sample", "evaluate") and not job.sources:
        problems.append("from: required field is missing")
    return (None, problems) if problems else (job, [])


EVAL_METRICS = ("fd", "kid")  # what `train.eval` measures during training from samples
LOGGED_ALWAYS = ("lr", "steps_per_s", "images_per_s")  # logged by every training job
SWEEPABLE = ("train", "model", "data")  # the sections a sweep's params may set


def metric_mode(metric: str, mode: str | None = None) -> str:
    """min or max: `mode` if given, else max for a metric that grows with quality or speed
    (psnr, accuracy, precision, recall, codebook usage, *_per_s), min for the rest (fd, kid,
    losses)."""
    if mode is not None:
        return mode
    grows = ("psnr", "accuracy", "precision", "recall", "_per_s", "usage")
    return "max" if any(k in metric for k in grows) else "min"


def objective_mode(objective: Objective) -> str:
    return metric_mode(objective.metric, objective.mode)


def trial_job(job: Job, params: dict[str, Any]) -> Job:
    """The trial of swept `job` with `params` (dotted paths) set: the job without its sweep,
    measuring the sweep's objective during training where it is fd or kid. Raises SpecError
    with the problems of the trial's settings."""
    raw = job.resolved()
    sweep = job.sweep
    raw.pop("sweep", None)
    raw.pop("register", None)  # the sweep registers its best trial
    for path, value in params.items():
        node = raw
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise SpecError([f"{path}: {key} is not a section"])
        node[leaf] = value
    if sweep is not None and measured_in_training(job, sweep.objective.metric):
        train = raw.setdefault("train", {})
        own = train.get("eval") or {}
        objective = sweep.objective
        steps = train.get("steps", TrainSpec.model_fields["steps"].default)
        every = max(1, steps // 8)
        if objective.metric not in EVAL_METRICS:  # read at log steps
            log_every = train.get("log_every") or TrainSpec.model_fields["log_every"].default
            every = max(log_every, every // log_every * log_every)
        every = objective.every or own.get("every") or every
        # sampling costs: with no `every` asked, a pruner with rungs is measured at its rungs
        # (and the end) alone; it reads nothing between them (bench/sweep.py --example-share)
        first = sweep.early_stop.min_steps or every
        rungs = sweep.early_stop.rungs(first, steps)
        if (objective.metric in EVAL_METRICS and rungs and objective.every is None
                and own.get("every") is None):
            every, own = None, {**own, "at": rungs}
        train["eval"] = {**own, "metric": objective.metric, "every": every,
                         "num_samples": objective.num_samples or own.get("num_samples") or 500}
    trial, problems = _parse_job(raw, Defaults())
    if problems or trial is None:
        raise SpecError(problems)
    return trial


def measured_in_training(job: Job, metric: str) -> bool:
    """Whether a train job can measure `metric` as it trains (`train.eval`): sample quality, or
    a metric its family logs."""
    return metric in EVAL_METRICS or metric in job.section().logged_metrics()


def _check_sweep(job: Job) -> list[str]:
    """The sweep section of a valid train job: every value of every param (a range's ends)
    makes a valid trial, the objective is a metric the family measures, a grid is bounded."""
    sweep, problems = job.sweep, []
    lists = {p: v for p, v in sweep.params.items() if isinstance(v, list)}
    if sweep.method == "grid":
        problems += [f"sweep.params.{p}: a grid takes a list of values, not a range"
                     for p in sweep.params if p not in lists]
        size = 1
        for values in lists.values():
            size *= max(1, len(values))
        if sweep.trials is not None:
            problems.append(f"sweep.trials: a grid runs each of its {size} points once; leave "
                            f"trials out (got {sweep.trials})")
        if size > MAX_GRID and not sweep.allow_large_grid:
            problems.append(f"sweep.params: the grid has {size} points, more than {MAX_GRID}; "
                            "set sweep.allow_large_grid: true to run them all")
    for path, values in sweep.params.items():
        where = f"sweep.params.{path}"
        if path.split(".")[0] not in SWEEPABLE or "." not in path:
            problems.append(f"{where}: not a setting a trial can change (a path under "
                            f"{', '.join(SWEEPABLE)}, e.g. train.lr)")
            continue
        if isinstance(values, list) and not values:
            problems.append(f"{where}: needs at least one value")
            continue
        for value in values if isinstance(values, list) else values.bounds:
            try:
                trial_job(job.model_copy(update={"sweep": None}), {path: value})
            except SpecError as exc:
                line = exc.lines[0]
                if "unknown field" in line:
                    problems.append(f"{where}: no such setting")
                else:
                    problems.append(f"{where}: value {_shown(value)} makes an invalid job: {line}")
                break
    metric = sweep.objective.metric
    if measured_in_training(job, metric):
        try:
            trial_job(job, {})
        except SpecError as exc:
            problems.append(f"sweep.objective.metric: {metric} is measured during training, "
                            f"which this job cannot: {exc.lines[0]}")
    else:
        final = job.section().FINAL_METRICS
        if metric not in final:
            every = [*EVAL_METRICS, *job.section().logged_metrics(), *final]
            problems.append(f"sweep.objective.metric: family '{job.family}' never logs "
                            f"'{metric}' (it can be: {', '.join(every)})")
        elif sweep.early_stop.method != "none":
            problems.append(f"sweep.early_stop.method: stopping early needs an objective "
                            f"measured during training, not '{metric}' (measured when "
                            f"training ends); use early_stop: {{method: none}}")
    return problems


def _check_parallel(job: Job) -> list[str]:
    r = job.resources
    if r.workers == 1:
        if not r.gpus_per_worker:
            return []
        return ["resources.gpus_per_worker: only data-parallel jobs (resources.workers > 1) have "
                f"workers; use resources.gpus (got {r.gpus_per_worker:g})"]
    if job.kind != "train":
        return [f"resources.workers: only train jobs run data-parallel, not kind '{job.kind}' "
                f"(got {r.workers})"]
    if r.gpus:
        return ["resources.gpus: a data-parallel job asks for GPUs per worker, in "
                f"resources.gpus_per_worker (got {r.gpus:g})"]
    if r.gpus_per_worker % 1:
        return ["resources.gpus_per_worker: ranks with a fraction of a GPU would share one, "
                "which NCCL refuses; give each rank whole GPUs (got "
                f"{r.gpus_per_worker:g})"]
    if job.train is not None and job.train.batch_size % r.workers:
        return [f"train.batch_size: {job.train.batch_size} does not split evenly over "
                f"{r.workers} workers"]
    return []


def _check_distill(job: Job) -> tuple[Job, list[str]]:
    """Validate the `distill` section of a distill job against its family's method."""
    problems = [] if job.teacher else ["teacher: required field is missing"]
    section = family(job.family).distill_section()
    method = section.DISTILL.model_fields["method"].annotation.__args__[0]
    raw = job.distill
    if raw is None:
        return job, problems + [f"distill: required field is missing (family '{job.family}' "
                                f"distils with method '{method}')"]
    if raw.get("method") != method:
        got = f", not {_shown(raw['method'])}" if "method" in raw else ""
        return job, problems + [f"distill.method: family '{job.family}' distils with "
                                f"'{method}'{got}"]
    try:
        spec = section.DISTILL.model_validate(raw)
    except ValidationError as exc:
        return job, problems + [f"{_loc(('distill', *e['loc']))}: {_describe(e)}"
                                for e in exc.errors()]
    for key in getattr(spec, "student", {}):
        if key not in section.model_fields:
            problems.append(f"distill.student.{key}: unknown field")
        elif key not in section.STUDENT_FIELDS:
            problems.append(f"distill.student.{key}: the student keeps the teacher's {key}; it "
                            f"may change {', '.join(section.STUDENT_FIELDS)} "
                            f"(got {_shown(spec.student[key])})")
    return job.model_copy(update={"distill": spec.model_dump(mode="json")}), problems


def _check_evaluate(job: Job, problems: list[str]) -> tuple[Job | None, list[str]]:
    if job.family is not None:
        problems.append("family: an evaluate job scores jobs of any family; leave it out "
                        f"(got '{job.family}')")
    if not job.sources:
        problems.append("from: required field is missing")
    for ref in job.evaluate.per_source:
        if ref not in job.sources:
            problems.append(f"evaluate.per_source.{ref}: not one of the jobs in 'from'")
    for key, values in job.evaluate.sweep.items():
        if key not in SampleSpec.model_fields or key in ("num_images", "batch_size", "seed"):
            problems.append(f"evaluate.sweep.{key}: not a sampler setting")
        elif not values:
            problems.append(f"evaluate.sweep.{key}: needs at least one value")
    for ref in [None, *job.evaluate.per_source]:
        try:
            job.evaluate.variants(ref)
        except ValidationError as exc:
            where = "evaluate.sample" if ref is None else f"evaluate.per_source.{ref}"
            for e in exc.errors():
                swept = e["loc"][0] in job.evaluate.sweep
                problems.append(f"{_loc(('evaluate.sweep' if swept else where, *e['loc']))}: "
                                f"{_describe(e)}")
            break
    return (None, problems) if problems else (job, [])


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raises SpecError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError([f"{source}: cannot read the file ({exc.strerror or exc})"]) from None
    try:
        data = yaml.load(text.decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise SpecError([f"{source}: not a UTF-8 text file"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{source}: {where}invalid YAML: {problem}"]) from None
    except RecursionError:
        raise SpecError([f"{source}: the YAML is nested too deeply"]) from None
    return parse_spec(data, source)
