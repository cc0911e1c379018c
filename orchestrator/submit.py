"""Running a spec on a Ray cluster through Ray's Job Submission API, as `ray job submit` does.

`submit` validates the spec here, stages its data into object storage from here (a cluster
cannot read this machine's files) and rewrites the spec to read the staged copies. The driver
then runs on the cluster as a Ray job: the entrypoint is `genforge run` on that spec, the
project's code travels as `py_modules`, and the service settings (tracking URI, storage,
S3 endpoint) as environment variables of the job's runtime environment, never in the spec.
The S3 key pair is the cluster's own (its nodes' environment or instance role; the local stack
starts Ray with its key pair): Ray logs runtime environments, so it is sent with the job only
when asked (`--send-credentials`). Every submission carries the metadata `genforge: <experiment>`, which is how
`jobs` tells them from other Ray jobs, and `GENFORGE_SUBMISSION`, which the driver puts on
every MLflow run it opens, which is how `jobs` finds a submission's progress and `cancel` its
runs.

Cancelling stops the job with SIGINT (`RAY_JOB_STOP_SIGNAL`): the driver handles it as it does
Ctrl-C, stopping its jobs at a step boundary with a checkpoint and marking their runs KILLED.
Runs it had no time for are marked KILLED by `cancel` itself.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import yaml

from orchestrator.datasets import heldout_key, split_sizes
from orchestrator.plan import Plan
from orchestrator.settings import Settings
from orchestrator.spec import KIND_SECTIONS, OPTIONAL_SECTIONS
from orchestrator.storage import open_storage
from orchestrator.tracking import SYSTEM_METRICS_ENV

ROOT = Path(__file__).resolve().parent.parent
METADATA_KEY = "genforge"
SUBMISSION_ENV = "GENFORGE_SUBMISSION"
STOP_WAIT_S = 120  # how long Ray waits for the driver to stop its jobs before killing it
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(Exception):
    """The cluster or a submission cannot be used; the message says why."""


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "the local Ray cluster"
        raise SubmitError(f"cannot reach the Ray job server at {where}: "
                          f"{str(exc).splitlines()[0]}") from None


def staged_spec(plan: Plan, settings: Settings) -> dict[str, Any]:
    """The spec with every job's data replaced by its staged copy in object storage (so the
    cluster reads nothing from this machine), as plain data. The cluster's driver takes that
    copy for what it is (`datasets.content_key`): the jobs' hashes are this machine's, and a
    `genforge run` of the same spec shares their cache."""
    root = open_storage(settings.storage, settings.s3)
    jobs = []
    for p in plan.jobs:
        job = {k: v for k, v in p.job.resolved().items()
               if k not in OPTIONAL_SECTIONS or k in KIND_SECTIONS[p.job.kind]}
        data, key = p.job.data, p.data_key
        if key is not None:
            labelled = split_sizes(root, key)["labelled"]
            job["data"] = {"dataset": "npz", "path": root.uri(key), "x_key": "x",
                           "y_key": "y" if labelled else None, "image_size": data.image_size,
                           "channels": data.channels, "limit": data.limit,
                           "split": {"heldout": root.uri(heldout_key(key))}}
        jobs.append(job)
    return {"experiment": plan.spec.experiment, "jobs": jobs}


def service_env(settings: Settings, credentials: bool) -> dict[str, str]:
    """The settings the driver needs; the S3 key pair only with `credentials`."""
    s3 = settings.s3
    env = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "GENFORGE_STORAGE": settings.storage,
           "AWS_ENDPOINT_URL": s3.endpoint_url,
           SYSTEM_METRICS_ENV: os.environ.get(SYSTEM_METRICS_ENV)}
    if credentials:
        env.update(AWS_ACCESS_KEY_ID=s3.access_key_id, AWS_SECRET_ACCESS_KEY=s3.secret_access_key)
    return {k: v for k, v in env.items() if v}


def submit(plan: Plan, settings: Settings, address: str | None,
           send_credentials: bool = False) -> str:
    """Submit the spec's driver as a Ray job; returns the submission id. The S3 key pair goes
    with it only with `send_credentials`: Ray writes a job's runtime environment, its
    variables included, into the runtime-env agent's log on every node it runs on."""
    jobs = client(address)
    submission = f"genforge-{plan.spec.experiment.lower()[:40]}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="genforge-submit-") as tmp:
        spec_path = Path(tmp) / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(staged_spec(plan, settings),
                                            sort_keys=False))
        runtime_env = {
            "working_dir": tmp,
            "py_modules": [str(ROOT / "orchestrator"), str(ROOT / "workers")],
            "env_vars": {**service_env(settings, send_credentials), SUBMISSION_ENV: submission,
                         "RAY_JOB_STOP_SIGNAL": "SIGINT",
                         "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S),
                         "PYTHONUNBUFFERED": "1"},
        }
        try:
            return jobs.submit_job(entrypoint="python -m orchestrator.cli run spec.yaml",
                                   submission_id=submission, runtime_env=runtime_env,
                                   metadata={METADATA_KEY: plan.spec.experiment})
        except RuntimeError as exc:
            raise SubmitError(f"the Ray job server refused the submission: "
                              f"{str(exc).splitlines()[0]}") from None


def submissions(address: str | None) -> list[Any]:
    """genforge's Ray jobs, newest first."""
    found = [j for j in client(address).list_jobs() if METADATA_KEY in (j.metadata or {})]
    return sorted(found, key=lambda j: j.start_time or 0, reverse=True)


def info(address: str | None, submission: str):
    try:
        return client(address).get_job_info(submission)
    except RuntimeError:
        raise SubmitError(f"no submission '{submission}' on the cluster") from None


def logs(address: str | None, submission: str, follow: bool) -> Iterator[str]:
    info(address, submission)
    jobs = client(address)
    if not follow:
        yield jobs.get_job_logs(submission)
        return

    # tail_job_logs is an async generator; run it to the job's end, yielding as it goes
    loop = asyncio.new_event_loop()
    try:
        agen = jobs.tail_job_logs(submission)
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def wait(address: str | None, submission: str, timeout: float) -> str:
    """The submission's status once terminal, or its status when `timeout` runs out."""
    jobs = client(address)
    deadline = time.monotonic() + timeout
    while True:
        status = str(jobs.get_job_status(submission).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def cancel(address: str | None, submission: str) -> str:
    """Stop a submission; its status once terminal (or when the wait runs out)."""
    client(address).stop_job(submission)
    return wait(address, submission, STOP_WAIT_S + 30)
