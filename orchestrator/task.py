"""What the driver hands a worker (everything one job needs, and nothing from the driver's disk),
and what a worker tells the driver beyond its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.storage import S3Credentials


class WorkersLost(Exception):
    """A worker of a data-parallel job died (its node left, it ran out of memory): the job
    resumes from its last checkpoint, like a single-worker job whose actor died."""


@dataclass(frozen=True)
class Task:
    job: dict[str, Any]  # the resolved job spec (Job.resolved())
    job_hash: str
    experiment: str
    storage_root: str  # e.g. s3://bucket/genforge
    prefix: str  # the job's key prefix under storage_root: <experiment>/<job>/<hash>
    tracking_uri: str
    run_id: str | None  # None: the job logs nothing to MLflow
    code_version: str
    sources: tuple[str, ...] = ()  # checkpoint URIs of what the job reads (job prefixes or steps)
    data_key: str | None = None  # staged data set, relative to storage_root
    refs: dict[str, str] = field(default_factory=dict)  # field ("from", "model.tokenizer") -> URI
    attempt: int = 1
    launched: float = 0.0  # when the driver handed the job to its actor (Unix time)
    artifact_uri: str | None = None  # the run's artifact root, as MLflow gave it
    params: dict[str, str] = field(default_factory=dict)  # the run's params, left to the worker
    s3: S3Credentials | None = field(default=None, repr=False)
    system_metrics_s: float = 0.0  # MLflow's sampling of the machine into the run; 0: none

    @property
    def name(self) -> str:
        return self.job["name"]

    @property
    def kind(self) -> str:
        return self.job["kind"]

    @property
    def family(self) -> str:
        return self.job.get("family")
