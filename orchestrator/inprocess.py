"""Running a spec's jobs in this process, in plan order, on file:// storage and a local MLflow
store: the workers exactly as the driver builds their tasks, without Ray or any service. For
unit tests of the families, benchmarks of the models alone, and debugging a worker with pdb;
pipelines run through the driver. `run_untracked` runs the same tasks without MLflow: each job
logs into memory, for a benchmark or a test on a machine with torch but no MLflow, as a GPU
box may be."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.datasets import stage
from orchestrator.plan import (build_plan, check_uri_references, is_uri, resolve_checkpoint,
                               resolve_inputs)
from orchestrator.spec import parse_spec
from orchestrator.storage import S3Credentials, open_storage
from orchestrator.task import Task
from workers.base import NullLogger
from workers.registry import worker_class


def tasks(workdir: Path, spec: dict[str, Any], only: list[str] | None = None,
          s3: S3Credentials | None = None,
          open_run: Callable[[Any], tuple[str, str | None]] | None = None,
          tracking_uri: str | None = None) -> Iterator[Task]:
    """The task of every job (or those in `only`, whose upstream jobs must have run in the
    same `workdir`), in plan order, each made once the one before it has run. `open_run(job)`
    gives a planned job's (tracking URI, run id); without it a task has no run.
    `tracking_uri`'s registry resolves models:/ references."""
    parsed = parse_spec(spec, source=str(workdir / "spec.yaml"))
    root_uri = f"file://{workdir / 'store'}"
    root = open_storage(root_uri)
    plan = build_plan(parsed, resolve_inputs(
        parsed, lambda job: stage(job.data, root, base=workdir),
        lambda uri: resolve_checkpoint(uri, s3, tracking_uri)))
    check_uri_references(plan)  # a checkpoint URI that cannot be read or does not fit
    prefix = {p.name: f"{plan.spec.experiment}/{p.name}/{p.hash}" for p in plan.jobs}
    for p in plan.jobs:
        if only is not None and p.name not in only:
            continue
        tracking, run_id = open_run(p) if open_run else ("", None)
        if run_id is not None:  # only when asked: a monitor's end waits on a run lookup,
            from orchestrator.tracking import system_metrics_interval  # seconds on sqlite

            sampling = system_metrics_interval(default=0.0)
        uris = [(f, p.checkpoints[ref] if is_uri(ref) else root.uri(prefix[ref]))
                for f, ref in p.job.references]
        yield Task(job=p.job.resolved(), job_hash=p.hash, experiment=plan.spec.experiment,
                   storage_root=root_uri, prefix=prefix[p.name], tracking_uri=tracking,
                   run_id=run_id, code_version=p.code, sources=tuple(uri for _, uri in uris),
                   data_key=p.data_key, refs=dict(uris), s3=s3,
                   system_metrics_s=sampling if run_id is not None else 0.0)


def run_jobs(workdir: Path, spec: dict[str, Any], only: list[str] | None = None,
             s3: S3Credentials | None = None) -> dict[str, dict[str, Any]]:
    """Run every job (or those in `only`, whose upstream jobs must have run in the same
    `workdir`); returns job name -> result, plus "_runs" -> job name -> MLflow run id. `s3`
    reads checkpoint URIs of an S3 server that the spec names."""
    from mlflow.tracking import MlflowClient  # `tasks` without runs needs no MLflow

    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking)
    experiment = parse_spec(spec, source=str(workdir / "spec.yaml")).experiment
    exp = (client.get_experiment_by_name(experiment)
           or client.get_experiment(client.create_experiment(experiment)))

    def open_run(p: Any) -> tuple[str, str]:
        return tracking, client.create_run(exp.experiment_id, run_name=p.name, tags={
            "genforge.job": p.name, "genforge.kind": p.job.kind, "genforge.hash": p.hash,
            "genforge.family": p.job.family or "-"}).info.run_id

    results: dict[str, Any] = {"_runs": {}}
    for task in tasks(workdir, spec, only, s3, open_run, tracking):
        results[task.name] = worker_class(task.family or task.kind).for_task(task)(task).run()
        client.set_terminated(task.run_id, "FINISHED")
        results["_runs"][task.name] = task.run_id
    return results


class MemoryLogger(NullLogger):
    """What a job without a run logs, kept in memory: its metrics with the time they were
    logged (Unix seconds), and its tags."""

    def __init__(self) -> None:
        self.metrics: list[tuple[float, int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((time.time(), step, dict(metrics)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def series(self, key: str) -> list[tuple[float, int, float]]:
        """(time, step, value) of every point of metric `key`."""
        return [(t, step, m[key]) for t, step, m in self.metrics if key in m]


def run_untracked(workdir: Path, spec: dict[str, Any], only: list[str] | None = None
                  ) -> dict[str, tuple[dict[str, Any], MemoryLogger]]:
    """`run_jobs` without MLflow: job name -> (result, what the job logged)."""
    out: dict[str, tuple[dict[str, Any], MemoryLogger]] = {}
    for task in tasks(workdir, spec, only):
        worker = worker_class(task.family or task.kind).for_task(task)(task)
        worker.log = MemoryLogger()
        out[task.name] = worker.run(), worker.log
    return out
