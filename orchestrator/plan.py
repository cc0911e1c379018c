"""From a validated spec to a plan: the DAG of jobs, their order and their content hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from orchestrator.spec import Job, Spec, SpecError, Upstream, distill_section, model_section

# Job kinds whose output is a checkpoint another job can read.
PRODUCES_CHECKPOINT = frozenset({"train", "distill"})


def is_uri(ref: str) -> bool:
    return "://" in ref


@lru_cache(maxsize=1)
def code_version() -> str:
    """Version of the code that computes results: the package version and a digest of the
    worker sources, so that a change to a model or a loss invalidates cached results."""
    from orchestrator import __version__

    root = Path(__file__).resolve().parent.parent / "workers"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:10]}"


@dataclass(frozen=True)
class PlannedJob:
    job: Job
    deps: tuple[str, ...]  # jobs of this spec it reads
    hash: str

    @property
    def name(self) -> str:
        return self.job.name


@dataclass(frozen=True)
class Plan:
    spec: Spec
    jobs: tuple[PlannedJob, ...]  # in topological order
    code_version: str
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


def job_hash(job: Job, upstream: dict[str, str], version: str) -> str:
    """Content hash: the resolved job (less its name and resources, which do not change the
    result), the hashes of what it reads, and the code version."""
    resolved = job.resolved()
    for key in ("name", "resources"):
        resolved.pop(key, None)
    payload = json.dumps(
        {"job": resolved, "upstream": upstream, "code": version}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_uri_references(plan: Plan, read_meta) -> None:
    """Check every checkpoint URI the spec reads, before anything runs: `read_meta(uri)` returns
    the checkpoint's metadata or raises with the reason it cannot be read."""
    errors: list[str] = []
    for p in plan.jobs:
        for field_name, ref in p.job.references:
            if not is_uri(ref):
                continue
            try:
                up = Upstream.of_checkpoint(ref, read_meta(ref))
            except Exception as exc:  # noqa: BLE001 - any reason becomes the message
                problem = f"{field_name}: cannot read a checkpoint at {ref} ({exc})"
            else:
                problem = check_reference(p.job, field_name, up)
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
    return None


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
        section = model_section(up.family, up.model)
    except ValueError as exc:
        return f"teacher: {up.label}: {exc}"
    if section is not distill_section(job.family):
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
        limit = up.model.get("timesteps")
        if job.sample.steps and limit and job.sample.steps > limit:
            return f"sample.steps: {job.sample.steps} steps but {up.label} has {limit} timesteps"
        if up.model.get("distilled_steps") and job.sample.sampler != "ddim":
            return (f"sample.sampler: {up.label} is distilled for {up.model['distilled_steps']}"
                    f"-step DDIM; sample it with sampler: ddim")
    if field.startswith("model."):
        return job.section().check_ref(field, up, job.data)
    return None


def build_plan(spec: Spec) -> Plan:
    src = spec.source
    names = {j.name: j for j in spec.jobs}
    errors: list[str] = []
    deps: dict[str, list[str]] = {}
    for job in spec.jobs:
        deps[job.name] = []
        for field_name, ref in job.references:
            if is_uri(ref):
                if not ref.startswith(("s3://", "file://")):
                    errors.append(f"{src}: job '{job.name}': {field_name}: "
                                  f"unsupported URI scheme in {ref!r} (use s3:// or file://)")
                continue
            upstream = names.get(ref)
            if upstream is None:
                errors.append(f"{src}: job '{job.name}': {field_name}: "
                              f"no job named '{ref}' in this spec")
                continue
            if ref == job.name:
                errors.append(f"{src}: job '{job.name}': {field_name}: a job cannot read itself")
                continue
            problem = check_reference(job, field_name, Upstream.of_job(upstream, names))
            if problem:
                errors.append(f"{src}: job '{job.name}': {problem}")
            deps[job.name].append(ref)
    errors += _missing_data_files(spec)
    if errors:
        raise SpecError(errors)
    try:
        order = topological_order(spec.jobs, deps)
    except SpecError as exc:
        raise SpecError([f"{src}: {line}" for line in exc.lines]) from None

    version = code_version()
    hashes: dict[str, str] = {}
    planned: list[PlannedJob] = []
    for name in order:
        job = names[name]
        upstream = {ref: (hashes[ref] if ref in hashes else ref) for ref in job.sources}
        hashes[name] = job_hash(job, upstream, version)
        planned.append(PlannedJob(job=job, deps=tuple(deps[name]), hash=hashes[name]))
    return Plan(spec=spec, jobs=tuple(planned), code_version=version)
