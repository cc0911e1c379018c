"""Finished generators in the MLflow Model Registry.

`register` packages one checkpoint as a pyfunc model (workers/served.py: the checkpoint's files
and genforge's code, so `mlflow models serve --env-manager local` runs it from any folder) and
registers it as a new version of a registered model, tagged with where it came from:

    genforge.checkpoint   the exact checkpoint URI (a job prefix resolved to its newest one)
    genforge.hash         the job hash that made it
    genforge.family, genforge.job, genforge.step
    genforge.fd, genforge.kid ...   the metrics given (a run's last `train.eval`, say)

and given a picture: the grid the job drew at that step (else 16 images sampled at
registration), `artifacts/grid.png` of the logged model, named in the version's description.

`resolve_model_uri` reads a version back to its checkpoint URI, so that what reads a checkpoint
can name a model version instead (`models:/digits@prod`). `load` gives the pyfunc model itself.
Nothing here logs a storage credential: the checkpoint's URI is all that is recorded of where
it came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version as installed
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import LoggedModelOutput
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.checkpoints import (CHECKPOINT_DIR, MANIFEST_FILE, resolve_checkpoint_uri,
                                      verify_checkpoint)
from orchestrator.storage import NotFound, S3Credentials, StorageError, open_storage

GRID = "grid.png"  # a version's picture, among its model's artifacts
EXPERIMENT = "genforge-models"  # where a model registered from a bare checkpoint URI is logged
TAG = "genforge."
# What the served model imports beyond the standard library and genforge's own code, pinned to
# the versions here as MLflow pins what it infers (inferring would load and run the model in
# a subprocess).
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pydantic", "PyYAML", "safetensors",
                "Pillow")
_MODEL_URI = re.compile(r"models:/(?P<name>[^@]+?)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))")


class ModelError(Exception):
    """A model, version, run or checkpoint that cannot be used; one line, naming it."""


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:300]


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API (model logging and loading) bound to `uri` for a while. It is process
    state, and MLflow also writes it to MLFLOW_TRACKING_URI: both are put back after."""
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


# ---- the checkpoint ---------------------------------------------------------------------------

def _generator_problem(meta: dict[str, Any]) -> str | None:
    """Why the model of a checkpoint's `meta` cannot be served as a generator, or None."""
    from workers.config import AutoencoderModel  # the first stages' section
    from workers.registry import family

    try:
        section = family(str(meta.get("family"))).section(meta.get("model") or {})
    except (KeyError, ValueError):
        return f"it holds no genforge model (family {meta.get('family')!r})"
    if issubclass(section, AutoencoderModel):
        return (f"it holds a '{meta['family']}' first-stage autoencoder, which reconstructs "
                "images instead of generating them; register the model trained on it")
    return None


def fetch_checkpoint(uri: str, into: Path, s3: S3Credentials | None = None
                     ) -> tuple[str, dict[str, Any]]:
    """Copy the checkpoint `uri` names now (a job prefix: its newest complete one) into
    `into/checkpoints/<name>/` and verify the copy against its manifest, so that what is
    packaged is what the job wrote, read once. Returns its exact URI and its manifest."""
    from orchestrator.plan import resolve_checkpoint

    try:
        exact = resolve_checkpoint(uri, s3).uri
        storage, name = resolve_checkpoint_uri(exact, s3)
        folder = into / CHECKPOINT_DIR / name
        folder.mkdir(parents=True)
        raw = storage.get_bytes(f"{CHECKPOINT_DIR}/{name}/{MANIFEST_FILE}")
        (folder / MANIFEST_FILE).write_bytes(raw)
        for file in json.loads(raw)["files"]:
            if Path(file).name != file or file in (".", "..", MANIFEST_FILE):
                raise ModelError(f"{exact}: its manifest lists the file {file!r}")
            storage.get_file(f"{CHECKPOINT_DIR}/{name}/{file}", folder / file)
        manifest = verify_checkpoint(open_storage(f"file://{into}"), name)
    except StorageError as exc:
        raise ModelError(f"{uri}: {_first_line(exc)}") from None
    return exact, manifest


def picture(exact: str, into: Path, s3: S3Credentials | None = None) -> tuple[bytes, str]:
    """A model version's picture, the checkpoint `exact` copied into `into` by
    `fetch_checkpoint`: the grid its job drew at that step (`samples/step-NNNNNN.png` beside
    `checkpoints/`), else one of 16 images sampled here from the copy (seed 0, the model's
    default settings). Returns the PNG and what it shows."""
    storage, name = resolve_checkpoint_uri(exact, s3)
    try:
        return storage.get_bytes(f"samples/{name}.png"), f"the job's grid at {name}"
    except NotFound:
        from workers.served import grid_png

        return (grid_png(f"file://{into / CHECKPOINT_DIR / name}"),
                f"16 images of {name} sampled when it was registered (seed 0)")


# ---- registering ------------------------------------------------------------------------------

def requirements() -> list[str]:
    """REQUIREMENTS at the versions installed here (a local build tag like torch's `+cpu`
    left out: pip cannot find it on an index)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={installed(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def code_paths() -> list[str]:
    """genforge's packages, shipped inside the model: it loads from any folder, with or without
    genforge installed, with the code that made its checkpoint's samples."""
    import orchestrator
    import workers

    return [str(Path(package.__file__).parent) for package in (workers, orchestrator)]


def _version_tags(exact: str, meta: dict[str, Any], metrics: dict[str, float] | None
                  ) -> dict[str, str]:
    tags = {"checkpoint": exact, "hash": meta.get("hash"), "family": meta.get("family"),
            "job": meta.get("job"), "step": meta.get("step")}
    tags.update(metrics or {})
    return {TAG + key: str(value) for key, value in tags.items() if value is not None}


def _run(client: MlflowClient, run_id: str | None) -> tuple[str, str, bool]:
    """(experiment id, run id, whether it was opened here) of the run the model is logged in:
    `run_id`'s, or a new one in EXPERIMENT."""
    if run_id is not None:
        try:
            return client.get_run(run_id).info.experiment_id, run_id, False
        except MlflowException as exc:
            raise ModelError(f"run {run_id}: {_first_line(exc)}") from None
    from orchestrator.tracking import Tracker

    experiment = Tracker(client.tracking_uri).experiment_id(EXPERIMENT)
    return experiment, client.create_run(experiment, run_name="register").info.run_id, True


def register(tracking_uri: str, checkpoint_uri: str, name: str, alias: str | None = None,
             run_id: str | None = None, s3: S3Credentials | None = None,
             metrics: dict[str, float] | None = None) -> ModelVersion:
    """Package checkpoint `checkpoint_uri` as a pyfunc model (workers/served.py) logged in run
    `run_id` (else a new run of EXPERIMENT), register it as a new version of `name` tagged with
    its provenance and `metrics`, and point `alias` at it. The job's run is left as it is (a
    finished run stays finished). ModelError for a checkpoint that cannot be read or is no
    generator, and for what the tracking server refuses."""
    from workers.served import ARTIFACT, ENTRY, INPUT_EXAMPLE, SIGNATURE

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="genforge-model-") as tmp:
        exact, manifest = fetch_checkpoint(checkpoint_uri, Path(tmp), s3)
        meta = manifest.get("meta") or {}
        problem = _generator_problem(meta)
        if problem:
            raise ModelError(f"{checkpoint_uri}: {problem}")
        try:
            png, shows = picture(exact, Path(tmp), s3)
        except StorageError as exc:
            raise ModelError(f"{exact}: {_first_line(exc)}") from None
        grid = Path(tmp) / GRID
        grid.write_bytes(png)
        experiment, run_id, opened = _run(client, run_id)
        status = "FAILED"
        try:
            logged = client.create_logged_model(experiment, name=meta.get("job") or "generator",
                                                source_run_id=run_id)
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            with _tracking(tracking_uri):
                info = mlflow.pyfunc.log_model(
                    model_id=logged.model_id, python_model=str(ENTRY),
                    artifacts={ARTIFACT: str(Path(tmp) / CHECKPOINT_DIR), "grid": str(grid)},
                    code_paths=code_paths(), signature=SIGNATURE, input_example=INPUT_EXAMPLE,
                    pip_requirements=requirements())
                made = mlflow.register_model(info.model_uri, name,
                                             tags=_version_tags(exact, meta, metrics))
            client.update_model_version(name, made.version, description=(
                f"`{exact}`. Its picture, `artifacts/{GRID}` of the model: {shows}."))
            status = "FINISHED"
        except MlflowException as exc:
            raise ModelError(f"{name}: {_first_line(exc)}") from None
        finally:
            if opened:
                client.set_terminated(run_id, status)
    if alias:
        try:
            client.set_registered_model_alias(name, alias, made.version)
        except MlflowException as exc:
            raise ModelError(f"{name}: version {made.version} is registered, but alias "
                             f"{alias!r} was refused: {_first_line(exc)}") from None
    return client.get_model_version(name, made.version)


# ---- reading back -----------------------------------------------------------------------------

def model_version(model_uri: str, tracking_uri: str) -> ModelVersion:
    """The registered version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
    found = _MODEL_URI.fullmatch(model_uri)
    if not found:
        raise ModelError(f"{model_uri}: a registered model is models:/NAME@ALIAS or "
                         "models:/NAME/VERSION")
    client = MlflowClient(tracking_uri)
    try:
        if found["alias"]:
            return client.get_model_version_by_alias(found["name"], found["alias"])
        return client.get_model_version(found["name"], found["version"])
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelError(f"{model_uri}: no such registered model version") from None
        raise ModelError(f"{model_uri}: {_first_line(exc)}") from None


def resolve_model_uri(model_uri: str, tracking_uri: str) -> tuple[str, int]:
    """(checkpoint URI, version number) of a registered version that `register` made."""
    found = model_version(model_uri, tracking_uri)
    checkpoint = found.tags.get(TAG + "checkpoint")
    if not checkpoint:
        raise ModelError(f"{model_uri}: version {found.version} of '{found.name}' was not "
                         f"registered by genforge (it has no {TAG}checkpoint tag)")
    return checkpoint, int(found.version)


def load(model_uri: str, tracking_uri: str) -> tuple[Any, ModelVersion]:
    """The pyfunc model of a registered version (`mlflow.pyfunc.load_model`, on this machine's
    GPU if it has one), and the version."""
    found = model_version(model_uri, tracking_uri)  # a name or alias that is not there: one line
    with _tracking(tracking_uri):
        return mlflow.pyfunc.load_model(model_uri), found


def run_source(run_id: str, tracking_uri: str) -> tuple[str, dict[str, float]]:
    """(checkpoint URI, metrics) of a genforge training or distillation job's run: its
    `genforge.checkpoint` tag (the newest checkpoint the job wrote) and its last FD and KID,
    if it measured them (`train.eval`)."""
    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise ModelError(f"run {run_id}: {_first_line(exc)}") from None
    tags, kind = run.data.tags, run.data.tags.get(TAG + "kind")
    if kind not in ("train", "distill") or not tags.get(TAG + "checkpoint"):
        what = f"a '{kind}' job's run" if kind else "not a genforge job's run"
        raise ModelError(f"run {run_id}: {what}; register a train or distill job's run, or a "
                         "checkpoint URI")
    metrics = {k: v for k, v in run.data.metrics.items() if k in ("fd", "kid")}
    return tags[TAG + "checkpoint"], metrics


# ---- a pipeline's registering and promoting ---------------------------------------------------

def _versions(client: MlflowClient, name: str, tag: str, value: str) -> list[ModelVersion]:
    try:
        return client.search_model_versions(f"name = '{name}' and tags.`{TAG}{tag}` = '{value}'")
    except MlflowException:  # no model of that name yet
        return []


def register_job(tracking_uri: str, name: str, alias: str | None, job_hash: str,
                 result: dict[str, Any], run_id: str | None, s3: S3Credentials | None = None
                 ) -> tuple[ModelVersion, bool]:
    """`register:` of a finished train or distill job: a new version of `name` from its
    checkpoint, tagged with its last in-training FD and KID if it measured them; or, when a
    version was registered from the same job hash before (a cached job, a rerun), that one,
    with `alias` moved to it. Returns (the version, whether it is new)."""
    client = MlflowClient(tracking_uri)
    found = _versions(client, name, "hash", job_hash)
    if found:
        version = max(found, key=lambda v: int(v.version))
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
        return client.get_model_version(name, version.version), False
    evals = result.get("evals") or []
    metrics = {k: v for k, v in (evals[-1][1] if evals else {}).items() if k in ("fd", "kid")}
    return register(tracking_uri, result["checkpoint"], name, alias, run_id, s3, metrics), True


def promote(tracking_uri: str, name: str, alias: str, metric: str, mode: str,
            scored: list[tuple[str, float]], run_id: str | None = None) -> str:
    """An evaluation's promotion: of the checkpoints it `scored` ((checkpoint URI, `metric`))
    that are versions of `name`, the best takes `alias` if it beats the version holding it
    now, by the score the holder's own promoting evaluation gave it (a holder never scored so
    is beaten by any). Every version scored here is tagged with its score and `run_id` (the
    evaluation's run). Returns what was done, in one line, for the evaluation's run."""
    client = MlflowClient(tracking_uri)
    sign = 1 if mode == "min" else -1
    versions: dict[str, tuple[float, ModelVersion]] = {}
    for uri, score in scored:
        for version in _versions(client, name, "checkpoint", uri):
            best = versions.get(version.version)
            if best is None or sign * score < sign * best[0]:
                versions[version.version] = (score, version)
    if not versions:
        return f"{name}@{alias}: none of the models scored is a version of '{name}'"
    for score, version in versions.values():
        client.set_model_version_tag(name, version.version, f"{TAG}eval.{metric}", str(score))
        if run_id:
            client.set_model_version_tag(name, version.version, f"{TAG}eval.run", run_id)
    score, best = min(versions.values(), key=lambda sv: (sign * sv[0], int(sv[1].version)))
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    held = None
    if holder is not None:
        held = versions[holder.version][0] if holder.version in versions else _score(holder, metric)
    line = f"{name}@{alias}: version {best.version} ({metric} {score:.4g})"
    if holder is not None and holder.version == best.version:
        return f"{line} keeps it"
    if held is not None and sign * held <= sign * score:
        return (f"{name}@{alias}: version {holder.version} ({metric} {held:.4g}) keeps it over "
                f"version {best.version} ({metric} {score:.4g})")
    client.set_registered_model_alias(name, alias, best.version)
    was = ("" if holder is None else f"; was version {holder.version}" +
           (f" ({metric} {held:.4g})" if held is not None else " (never scored)"))
    return f"{line} takes it{was}"


def _score(version: ModelVersion, metric: str) -> float | None:
    value = version.tags.get(f"{TAG}eval.{metric}")
    return float(value) if value is not None else None
