"""From a validated spec to a plan: the DAG of jobs, their order and their content hashes.

A job's hash is what its result depends on, and nothing else: the job as resolved (less its
name, its resources and settings that do not change the result), the *content* of what it
reads and the code that computes it:

- its data: the staged content key (`datasets.content_key`), never the path it was read from,
  with the settings the worker reads it with (size, channels, limit);
- every job of the spec it reads: that job's hash;
- every checkpoint URI it reads: the digest of the manifest of the exact checkpoint the URI
  names when the plan is made (a job prefix means its newest complete checkpoint), and the
  job then reads that checkpoint, whatever is written there later;
- its code: the digest of its family's modules (`orchestrator.code`).

Hashes need the inputs resolved (`PlanInputs`): `build_plan(spec)` alone checks the spec and
orders the jobs; the driver stages the data, resolves the checkpoint URIs and plans again with
them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator import __version__
from orchestrator.code import family_digest
from orchestrator.spec import UNHASHED_FIELDS, Job, SampleSpec, Spec, SpecError, Upstream
from orchestrator.sweep import split_label, trial_count
from workers.registry import FAMILIES, family

# Job kinds whose output is a checkpoint another job can read.
PRODUCES_CHECKPOINT = frozenset({"train", "distill"})
# What a worker reads of a data section beside the staged content (see workers/data.py).
DATA_READ_FIELDS = ("image_size", "channels", "limit", "augment")


MODELS = "models:/"  # a registered model version: models:/NAME@ALIAS or models:/NAME/VERSION


def is_uri(ref: str) -> bool:
    return "://" in ref or ref.startswith(MODELS)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint URI as resolved at planning: the exact checkpoint it names now."""

    uri: str  # <job prefix>/checkpoints/step-000500
    digest: str  # sha256 of its manifest, which holds the sha256 of each of its files
    meta: dict[str, Any]


def resolve_checkpoint(uri: str, credentials=None, tracking_uri: str | None = None
                       ) -> ResolvedCheckpoint:
    """The exact checkpoint `uri` names now (a job prefix: its newest complete one; a
    registered model version, through `tracking_uri`'s registry: the checkpoint it was
    registered from); raises StorageError (NotFound, CheckpointError) or ModelError when there
    is none."""
    from orchestrator.checkpoints import checkpoint_name, read_manifest, resolve_checkpoint_uri

    if uri.startswith(MODELS):
        from orchestrator.models import ModelError, resolve_model_uri

        if not tracking_uri:
            raise ModelError(f"{uri}: no MLflow tracking server to find it in")
        uri, _ = resolve_model_uri(uri, tracking_uri)
    storage, name = resolve_checkpoint_uri(uri, credentials)
    manifest = read_manifest(storage, name)  # its step is checked against its folder's name
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return ResolvedCheckpoint(storage.uri(f"checkpoints/{checkpoint_name(manifest['step'])}"),
                              digest, manifest.get("meta") or {})


@dataclass
class PlanInputs:
    """The content a plan's hashes cover: staged data keys, by data section
    (`DataSpec.model_dump_json()`), and resolved checkpoints, by URI as the spec writes it."""

    data: dict[str, str] = field(default_factory=dict)
    checkpoints: dict[str, ResolvedCheckpoint] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # URI -> why it cannot be read

    def data_key(self, job: Job) -> str | None:
        return self.data.get(job.data.model_dump_json()) if job.data is not None else None


def job_code(job: Job, jobs: dict[str, Job], inputs: PlanInputs | None) -> str | None:
    """The digest of the code that computes `job`'s result: its family's; an evaluation's own
    and that of every family it samples (None: a source's family is not known yet)."""
    if job.kind != "evaluate":
        return family_digest(str(job.family))
    families = {"evaluate"}
    for ref in job.sources:
        if is_uri(ref):
            resolved = (inputs.checkpoints if inputs else {}).get(ref)
            if resolved is None:
                return None
            families.add(str(resolved.meta.get("family")))
        else:
            families.add(str(jobs[split_label(ref)[0]].family))
    return family_digest(*families)


def stages_data(job: Job) -> bool:
    """Whether the job reads its data section (the driver stages it): sample jobs do not."""
    return job.data is not None and job.kind in ("train", "distill", "evaluate")


@dataclass(frozen=True)
class PlannedJob:
    job: Job
    deps: tuple[str, ...]  # jobs of this spec it reads
    hash: str | None  # None until the plan's inputs are resolved
    code: str | None = None  # the digest of the code that computes its result
    data_key: str | None = None  # its staged data
    # checkpoint URIs it reads, as written -> the exact checkpoint resolved at planning
    checkpoints: dict[str, str] = field(default_factory=dict, compare=False)
    # what the pipeline calls it, where that is not its job's name: a sweep's trial `ddpm[3]`
    # (whose objects are its job's, `ddpm`, under its own hash)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.job.name


@dataclass(frozen=True)
class Plan:
    spec: Spec
    jobs: tuple[PlannedJob, ...]  # in topological order
    code_version: str  # genforge's version
    inputs: PlanInputs | None = None
    by_name: dict[str, PlannedJob] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.by_name.update({p.name: p for p in self.jobs})

    def dependents(self, name: str) -> set[str]:
        """Every job that reads `name`, directly or through others."""
        out: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for p in self.jobs:
                if current in p.deps and p.name not in out:
                    out.add(p.name)
                    frontier.append(p.name)
        return out


def topological_order(jobs: list[Job], deps: dict[str, list[str]]) -> list[str]:
    """Kahn's algorithm, stable in spec order; raises SpecError naming a cycle."""
    remaining = {j.name: set(deps[j.name]) for j in jobs}
    order: list[str] = []
    while remaining:
        ready = [j.name for j in jobs if j.name in remaining and not remaining[j.name]]
        if not ready:
            raise SpecError([_cycle_message(remaining)])
        for name in ready:
            order.append(name)
            del remaining[name]
        for pending in remaining.values():
            pending.difference_update(ready)
    return order


def _cycle_message(remaining: dict[str, set[str]]) -> str:
    start = next(iter(remaining))
    path, node = [start], start
    while True:
        node = next(iter(remaining[node]))
        if node in path:
            cycle = path[path.index(node):] + [node]
            return f"job '{node}': from: dependency cycle {' -> '.join(cycle)}"
        path.append(node)


def job_hash(job: Job, upstream: dict[str, str], code: str, data_key: str | None) -> str:
    """Content hash: the resolved job less its name, resources and settings that do not
    change the result; its data by staged content key; the hashes (or resolved checkpoint
    digests) of what it reads; the digest of its code."""
    resolved = job.resolved()
    for key in ("name", "resources", "register", "promote"):
        resolved.pop(key, None)
    for section, keys in UNHASHED_FIELDS.items():
        for key in keys:
            resolved.get(section, {}).pop(key, None)
    if data_key is not None:
        resolved["data"] = {"staged": data_key,
                            **{k: v for k, v in resolved["data"].items() if k in DATA_READ_FIELDS}}
    payload = json.dumps({"job": resolved, "upstream": upstream, "code": code}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolve_inputs(spec: Spec, stage: Callable[[Job], str],
                   resolve: Callable[[str], ResolvedCheckpoint]) -> PlanInputs:
    """The inputs of every job: `stage(job)` gives its data's key, `resolve(uri)` a checkpoint
    URI's exact checkpoint (a URI it cannot resolve is noted: `check_uri_references` says
    so, in its place among the spec's other problems)."""
    inputs = PlanInputs()
    for job in spec.jobs:
        if stages_data(job) and job.data.model_dump_json() not in inputs.data:
            inputs.data[job.data.model_dump_json()] = stage(job)
        for _, ref in job.references:
            if not is_uri(ref) or ref in inputs.checkpoints or ref in inputs.unreadable:
                continue
            try:
                inputs.checkpoints[ref] = resolve(ref)
            except Exception as exc:  # noqa: BLE001 - any reason becomes the message
                inputs.unreadable[ref] = str(exc)
    return inputs


def check_uri_references(plan: Plan) -> None:
    """Whether every checkpoint URI the spec reads could be read, and fits the job that reads
    it (the plan's inputs hold what each resolved to)."""
    errors: list[str] = []
    for p in plan.jobs:
        for field_name, ref in p.job.references:
            if not is_uri(ref):
                continue
            resolved = plan.inputs.checkpoints.get(ref)
            if resolved is None:
                problem = (f"{field_name}: cannot read a checkpoint at {ref} "
                           f"({plan.inputs.unreadable.get(ref, 'not resolved')})")
            else:
                problem = check_reference(p.job, field_name,
                                          Upstream.of_checkpoint(ref, resolved.meta))
            if problem:
                errors.append(f"{plan.spec.source}: job '{p.name}': {problem}")
    if errors:
        raise SpecError(errors)


def _missing_data_files(spec: Spec) -> list[str]:
    """Local data files that do not exist (relative paths are taken from the spec's folder)."""
    base = Path(spec.source).parent
    errors = []
    for job in spec.jobs:
        if job.data is None:
            continue
        folder = job.data.dataset == "folder"
        for field_name, value in (("path", job.data.path), ("labels", job.data.labels),
                                  ("split.heldout", job.data.split.heldout),
                                  ("split.heldout_labels", job.data.split.heldout_labels)):
            if not value or is_uri(value):
                continue
            local = base / Path(value).expanduser()
            if not (local.is_dir() if folder and field_name in ("path", "split.heldout")
                    else local.is_file()):
                what = "directory" if folder and field_name in ("path", "split.heldout") else "file"
                errors.append(f"{spec.source}: job '{job.name}': data.{field_name}: "
                              f"no such {what}: {value}")
    return errors


def _check_evaluated(job: Job, up: Upstream) -> str | None:
    """An evaluate job reads images: generated from a checkpoint, or a sample job's outputs."""
    if up.kind not in PRODUCES_CHECKPOINT | {"sample"}:
        return f"from: {up.label} is a '{up.kind}' job and produces no images to evaluate"
    shape = (job.data.channels, job.data.image_size, job.data.image_size)
    if up.image_shape and tuple(up.image_shape) != shape:
        return (f"from: {up.label} makes {'x'.join(map(str, up.image_shape))} images, the "
                f"evaluation data is {'x'.join(map(str, shape))} (channels x size x size)")
    wanted = job.evaluate.num_samples
    if up.kind == "sample" and up.num_images is not None and up.num_images < wanted:
        return (f"evaluate.num_samples: {wanted} but {up.label} made only {up.num_images} "
                f"images")
    if up.kind == "sample":
        return None
    where = f"evaluate.per_source.{up.ref}" if up.ref in job.evaluate.per_source else "evaluate.sample"
    for _, settings in job.evaluate.variants(up.ref):
        problem = _check_sampling(settings, up, where)
        if problem:
            return problem
    return None


def _check_sampling(sample: SampleSpec, up: Upstream, where: str) -> str | None:
    """Whether sampler settings fit the model `up` they sample (`where`: the settings' field)."""
    if up.family not in FAMILIES:
        return None
    problem = family(up.family).check_sample(sample)
    if problem is None and up.model:
        try:
            problem = family(up.family).section(up.model).check_sample(sample, up)
        except ValueError:
            return None
    return problem and where + problem.removeprefix("sample")


def _check_teacher(job: Job, up: Upstream) -> str | None:
    """A distill job's teacher: a trained model of the job's family, on images of the job's
    data, that the job's method can make the asked-for student of."""
    if up.kind not in PRODUCES_CHECKPOINT:
        return (f"teacher: {up.label} is a '{up.kind}' job; a teacher must be a trained model "
                f"(a train or distill job)")
    if up.family != job.family:
        return f"teacher: {up.label} is family '{up.family}', this job is '{job.family}'"
    shape = (job.data.channels, job.data.image_size, job.data.image_size)
    if up.image_shape and tuple(up.image_shape) != shape:
        return (f"teacher: {up.label} works on {'x'.join(map(str, up.image_shape))} images, "
                f"this job's data is {'x'.join(map(str, shape))} (channels x size x size)")
    if not up.model:  # a teacher whose own teacher is a URI: checked when the job runs
        return None
    try:
        section = family(up.family).section(up.model)
    except ValueError as exc:
        return f"teacher: {up.label}: {exc}"
    if section is not family(job.family).distill_section():
        return (f"teacher: {up.label} is the {up.model.get('stage')} stage of '{up.family}', "
                f"which cannot be distilled (use its diffusion stage)")
    return section.check_distill(job.distill, up)


def check_reference(job: Job, field: str, up: Upstream) -> str | None:
    """Whether what `field` of `job` points at (a job of the spec or a checkpoint) fits it."""
    if job.kind == "evaluate":
        return _check_evaluated(job, up)
    if field == "teacher":
        return _check_teacher(job, up)
    if up.kind not in PRODUCES_CHECKPOINT:
        return f"{field}: {up.label} is a '{up.kind}' job and has no checkpoint to read"
    if field == "from" and job.kind == "sample":
        if up.family != job.family:
            return f"from: {up.label} is family '{up.family}', this job is '{job.family}'"
        return _check_sampling(job.sample, up, "sample")
    if field.startswith("model."):
        return job.section().check_ref(field, up, job.data)
    return None


def build_plan(spec: Spec, inputs: PlanInputs | None = None) -> Plan:
    """The plan of a valid spec; its jobs' hashes with `inputs` (else None)."""
    src = spec.source
    names = {j.name: j for j in spec.jobs}
    errors: list[str] = []
    deps: dict[str, list[str]] = {}
    for job in spec.jobs:
        deps[job.name] = []
        for field_name, ref in job.references:
            if is_uri(ref):
                if not ref.startswith(("s3://", "file://", MODELS)):
                    errors.append(f"{src}: job '{job.name}': {field_name}: unsupported URI "
                                  f"scheme in {ref!r} (use s3://, file:// or models:/)")
                continue
            base, trial = split_label(ref)
            upstream = names.get(base)
            if upstream is None or (trial is not None and upstream.sweep is None):
                errors.append(f"{src}: job '{job.name}': {field_name}: "
                              f"no job named '{ref}' in this spec")
                continue
            if trial is not None and trial >= trial_count(upstream.sweep):
                errors.append(f"{src}: job '{job.name}': {field_name}: sweep '{base}' has "
                              f"{trial_count(upstream.sweep)} trials, numbered from 0 (got {ref})")
                continue
            if base == job.name:
                errors.append(f"{src}: job '{job.name}': {field_name}: a job cannot read itself")
                continue
            problem = check_reference(job, field_name, Upstream.of_job(upstream, names))
            if problem:
                errors.append(f"{src}: job '{job.name}': {problem}")
            deps[job.name].append(base)
    errors += _missing_data_files(spec)
    if errors:
        raise SpecError(errors)
    try:
        order = topological_order(spec.jobs, deps)
    except SpecError as exc:
        raise SpecError([f"{src}: {line}" for line in exc.lines]) from None

    return _hashed(spec, order, deps, inputs)


def _hashed(spec: Spec, order: list[str], deps: dict[str, list[str]],
            inputs: PlanInputs | None) -> Plan:
    names = {j.name: j for j in spec.jobs}
    hashes: dict[str, str | None] = {}
    planned: list[PlannedJob] = []
    for name in order:
        job = names[name]
        code = job_code(job, names, inputs)
        data_key = inputs.data_key(job) if inputs and stages_data(job) else None
        upstream, checkpoints = {}, {}
        for ref in job.sources:
            if is_uri(ref):
                resolved = inputs.checkpoints.get(ref) if inputs else None
                checkpoints[ref] = resolved.uri if resolved else None
                upstream[ref] = f"{resolved.uri}@{resolved.digest}" if resolved else None
            else:  # a sweep's trial: the sweep's hash and its index
                base, trial = split_label(ref)
                upstream[ref] = (hashes[base] and f"{hashes[base]}[{trial}]"
                                 if trial is not None else hashes[base])
        complete = (code is not None and None not in upstream.values()
                    and (data_key is not None or not stages_data(job)))
        hashes[name] = job_hash(job, upstream, code, data_key) if complete else None
        planned.append(PlannedJob(job=job, deps=tuple(deps[name]), hash=hashes[name], code=code,
                                  data_key=data_key, checkpoints=checkpoints))
    return Plan(spec=spec, jobs=tuple(planned), code_version=__version__, inputs=inputs)
