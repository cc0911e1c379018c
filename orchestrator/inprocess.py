"""Running a spec's jobs in this process, in plan order, on file:// storage and a local MLflow
store: the workers exactly as the driver builds their tasks, without Ray or any service. For
unit tests of the families, benchmarks of the models alone, and debugging a worker with pdb;
pipelines run through the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.datasets import stage
from orchestrator.plan import (build_plan, check_uri_references, is_uri, resolve_checkpoint,
                               resolve_inputs)
from orchestrator.spec import parse_spec
from orchestrator.storage import S3Credentials, open_storage
from orchestrator.task import Task
from workers.registry import worker_class


def run_jobs(workdir: Path, spec: dict[str, Any], only: list[str] | None = None,
             s3: S3Credentials | None = None) -> dict[str, dict[str, Any]]:
    """Run every job (or those in `only`, whose upstream jobs must have run in the same
    `workdir`); returns job name -> result, plus "_runs" -> job name -> MLflow run id. `s3`
    reads checkpoint URIs of an S3 server that the spec names."""
    parsed = parse_spec(spec, source=str(workdir / "spec.yaml"))
    root_uri = f"file://{workdir / 'store'}"
    root = open_storage(root_uri)
    plan = build_plan(parsed, resolve_inputs(
        parsed, lambda job: stage(job.data, root, base=workdir),
        lambda uri: resolve_checkpoint(uri, s3)))
    check_uri_references(plan)  # a checkpoint URI that cannot be read or does not fit
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking)
    exp = (client.get_experiment_by_name(plan.spec.experiment)
           or client.get_experiment(client.create_experiment(plan.spec.experiment)))
    prefix = {p.name: f"{plan.spec.experiment}/{p.name}/{p.hash}" for p in plan.jobs}
    results: dict[str, Any] = {"_runs": {}}
    for p in plan.jobs:
        if only is not None and p.name not in only:
            continue
        run_id = client.create_run(exp.experiment_id, run_name=p.name, tags={
            "genforge.job": p.name, "genforge.kind": p.job.kind, "genforge.hash": p.hash,
            "genforge.family": p.job.family or "-"}).info.run_id
        uris = [(f, p.checkpoints[ref] if is_uri(ref) else root.uri(prefix[ref]))
                for f, ref in p.job.references]
        refs = dict(uris)
        task = Task(job=p.job.resolved(), job_hash=p.hash, experiment=plan.spec.experiment,
                    storage_root=root_uri, prefix=prefix[p.name], tracking_uri=tracking,
                    run_id=run_id, code_version=p.code,
                    sources=tuple(uri for _, uri in uris), data_key=p.data_key, refs=refs, s3=s3)
        results[p.name] = worker_class(task.family or task.kind).for_task(task)(task).run()
        client.set_terminated(run_id, "FINISHED")
        results["_runs"][p.name] = run_id
    return results
