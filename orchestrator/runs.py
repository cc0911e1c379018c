"""The pipeline's MLflow runs: its own, and one a job, whose id the driver passes down.

A job's run is opened at its launch, or ahead of it, SCHEDULED, while the pipeline waits for
room; a job that ran before resumes in its unfinished run. The run says which attempt runs
(`genforge.attempt`) and how the job ended. Requests about job runs go out from a few threads,
in order for each run, so that the loop never waits on the tracking server. Runs that a driver
which has ended left open are closed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from orchestrator import lease
from orchestrator.plan import PlannedJob
from orchestrator.storage import Storage, StorageError
from orchestrator.sweep import split_label
from orchestrator.tracking import RunInfo, Tracker, flatten

PREOPEN = 16  # job runs opened ahead of their launch, at most
OPEN_AHEAD_S = 3.0  # ...once the pipeline has launched nothing for this long
RESULT = "result.json"  # a job's result, written last: the job has finished


def job_prefix(experiment: str, name: str, job_hash: str) -> str:
    """Where a job's objects are, under the storage root."""
    return f"{experiment}/{name}/{job_hash}"


def run_params(p: PlannedJob) -> dict[str, str]:
    """A job run's params: the job's settings, resolved and flattened."""
    return flatten({k: v for k, v in p.job.resolved().items() if k != "name"})


class OpenedRun(NamedTuple):
    info: RunInfo
    attempts: int  # attempts the run has seen
    status: str  # SCHEDULED (opened ahead of its launch) or RUNNING
    params_logged: bool  # else the worker logs them with its first metrics


@dataclass
class JobRun:
    """One job's run, as this driver last left it."""
    id: str | None = None
    artifact_uri: str | None = None  # its artifact root
    status: str = ""  # what the driver last made its status
    params_logged: bool = False  # it has its params (else they go with the job's logs)
    opened: Future | None = None  # an OpenedRun, opened ahead while the job is queued
    tracking: Future | None = None  # the last request about it
    attempt: int = 0  # the job's attempts in it
    attempt_tag: int = 0  # what its genforge.attempt tag says
    adopt: bool = False  # looked up again when opened (a driver before ran the job)


class JobRuns:
    """The runs of one pipeline; `runs[name]` is the run of job `name`."""

    def __init__(self, tracker: Tracker, root: Storage, experiment: str,
                 forced: Callable[[str], bool], echo: Callable[[str], None]):
        self.tracker, self.root, self.experiment = tracker, root, experiment
        self.forced, self.echo = forced, echo
        self.driver_tags: dict[str, str] = {}  # on every run this driver opens or adopts
        self.experiment_id: str | None = None
        self.parent: str | None = None  # the pipeline's run
        self.parents: dict[str, str] = {}  # a job's run under another (a trial's: its sweep's)
        self.unfinished: dict[tuple[str, str], Any] = {}  # see Tracker.unfinished_runs
        self.last_launch = time.monotonic()
        self._runs: defaultdict[str, JobRun] = defaultdict(JobRun)
        # Requests to the tracking server about job runs leave the loop: each takes tens of ms,
        # and a pipeline of many short jobs would wait on them, one after another.
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="tracking")
        self._sent: list[Future] = []

    def __getitem__(self, name: str) -> JobRun:
        return self._runs[name]

    def open_pipeline(self, tags: dict[str, str], ended: Callable[[str, str], bool]) -> None:
        """The experiment; the runs of drivers that have `ended` closed; the unfinished job
        runs that jobs resume in; and the pipeline's own run, with `tags`."""
        self.experiment_id = self.tracker.experiment_id(self.experiment)
        self._close_orphans(ended)
        self.unfinished = self.tracker.unfinished_runs(self.experiment_id)
        self.parent = self.tracker.start_run(self.experiment_id, f"{self.experiment} pipeline",
                                             {**tags, **self.driver_tags}).run_id
        self.last_launch = time.monotonic()

    def _close_orphans(self, ended: Callable[[str, str], bool]) -> None:
        """Runs left RUNNING or SCHEDULED by a driver of this cluster that has ended without
        closing them (killed -9, its node gone): a job run whose job has its result is
        FINISHED, any other KILLED, with the reason. A rerun then resumes in it."""
        for run in self.tracker.open_runs(self.experiment_id):
            ray_job, _, gcs = run.data.tags.get("genforge.driver", "").partition("@")
            if not ended(ray_job, gcs):
                continue
            tags = run.data.tags
            job = (self.root.child(job_prefix(self.experiment, split_label(tags["genforge.job"])[0],
                                              tags.get("genforge.hash")))
                   if "genforge.job" in tags else None)
            try:
                done = job is not None and job.exists(RESULT)
                if job is not None:  # the lease it held too (others take it over anyway)
                    lease.drop_if_held_by(job, ray_job, gcs)
            except StorageError:  # storage away for now: left to a later driver
                continue
            if not done:
                self.tracker.set_tags(run.info.run_id, {
                    "genforge.error": f"its driver (Ray job {ray_job}) ended without closing it"})
            self.tracker.finish(run.info.run_id, "FINISHED" if done else "KILLED")

    def open(self, p: PlannedJob, ahead: bool) -> OpenedRun:
        """A new child run, or the unfinished run of the same job hash (a resumed job keeps its
        metric history in one run; a forced job starts a new one). Opened `ahead` of its
        launch, it says SCHEDULED and has its params; opened at the launch, it says RUNNING
        (MLflow's default) and its params go with the job's first metrics: one request, where a
        run opened ahead takes four with its RUNNING at the launch. Its `genforge.attempt` tag
        names the attempt that the launch will be."""
        status = "SCHEDULED" if ahead else "RUNNING"
        if self[p.name].adopt:  # another driver ran it since this one started: its run, if any
            self.unfinished.update(self.tracker.unfinished_runs(self.experiment_id, p.name))
        run = self.unfinished.pop((p.name, p.hash), None)
        if run is not None and not self.forced(p.name):
            attempts = int(run.data.tags.get("genforge.attempt", "0"))
            self.tracker.set_status(run.info.run_id, status)
            self.tracker.set_tags(run.info.run_id, {"mlflow.parentRunId": self._parent(p),
                                                    "genforge.attempt": str(attempts + 1),
                                                    **self.driver_tags})
            return OpenedRun(run.info, attempts, status, params_logged=True)
        tags = {
            **self.driver_tags,
            "genforge.job": p.name, "genforge.family": p.job.family or "-", "genforge.kind": p.job.kind,
            "genforge.hash": p.hash, "genforge.code_version": p.code,
            "genforge.checkpoint": self.root.uri(
                f"{job_prefix(self.experiment, p.job.name, p.hash)}/checkpoints"),
            "genforge.attempt": "1",
        }
        info = self.tracker.start_run(self.experiment_id, p.name, tags,
                                      run_params(p) if ahead else None, self._parent(p))
        if ahead:
            self.tracker.set_status(info.run_id, "SCHEDULED")
        return OpenedRun(info, 0, status, params_logged=ahead)

    def _parent(self, p: PlannedJob) -> str | None:
        return self.parents.get(p.name, self.parent)

    def open_ahead(self, queued: list[PlannedJob]) -> None:
        """A job's run is opened when it is launched. When the pipeline waits for room (it has
        launched nothing for OPEN_AHEAD_S), the runs of the jobs next in line (`queued`, first
        first) are opened in the background, SCHEDULED, so that MLflow shows what waits; not
        all of them (a pipeline of thousands would flood the server). A run opened ahead costs
        two requests more."""
        if time.monotonic() - self.last_launch < OPEN_AHEAD_S:
            return
        opened = sum(1 for p in queued if self[p.name].opened is not None)
        for p in [p for p in queued if self[p.name].opened is None][:max(0, PREOPEN - opened)]:
            self[p.name].opened = self._pool.submit(self.open, p, True)

    def launch(self, p: PlannedJob) -> JobRun:
        """The job's run as its next attempt starts: opened (ahead, or now), RUNNING, its
        `genforge.attempt` tag naming this attempt."""
        run = self[p.name]
        if run.id is None:
            opened = self.open(p, ahead=False) if run.opened is None else run.opened.result()
            run.id, run.artifact_uri = opened.info.run_id, opened.info.artifact_uri
            run.attempt, run.status = opened.attempts, opened.status
            run.params_logged = opened.params_logged
            run.attempt_tag = run.attempt + 1  # an opened run names its next attempt
        run.attempt += 1
        self.last_launch = time.monotonic()
        if run.status != "RUNNING":  # opened ahead (a restart finds it RUNNING)
            self._track(run, self.tracker.set_status, run.id, "RUNNING")
            run.status = "RUNNING"
        if run.attempt != run.attempt_tag:  # a retry or a restart in this pipeline run
            run.attempt_tag = run.attempt
            self.tag(p.name, {"genforge.attempt": str(run.attempt)})
        return run

    def tag(self, name: str, tags: dict[str, str]) -> None:
        run = self[name]
        self._track(run, self.tracker.set_tags, run.id, tags)

    def log(self, name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        run = self[name]
        self._track(run, self.tracker.log, run.id, params, tags)

    def metrics(self, name: str, values: dict[str, float]) -> None:
        run = self[name]
        self._track(run, self.tracker.log_metrics, run.id, values)

    def finish(self, p: PlannedJob, status: str, error: str | None) -> None:
        """The job's end (finished, failed, killed, or pruned: a sweep's trial stopped early)
        on its run, with the error (or why it was stopped); a job cancelled while queued ends
        in the run opened ahead for it, if one was."""
        run = self[p.name]
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED",
                         "pruned": "KILLED"}[status]
        key = "genforge.pruned" if status == "pruned" else "genforge.error"
        tags = {key: error[:4000]} if error else {}
        if run.id is None and run.opened is not None:  # cancelled while queued
            opened = run.opened.result()
            run.id, run.params_logged = opened.info.run_id, opened.params_logged
            tags["genforge.attempt"] = str(opened.attempts)  # it was not launched after all
        if run.id:
            # A job that failed may have ended before its worker sent the run's params: they
            # go with the error (the same params again are no change).
            params = {} if run.params_logged or status == "finished" else run_params(p)
            if tags or params:
                self._track(run, self.tracker.log, run.id, params, tags)
            self._track(run, self.tracker.finish, run.id, mlflow_status)

    def _track(self, run: JobRun, fn: Callable[..., Any], *args: Any) -> None:
        """Send a request about the job's run from the tracking threads, after the ones before
        it (a run must not be marked RUNNING after it was marked FINISHED)."""
        before = run.tracking

        def call() -> None:
            if before is not None:
                before.result()
            fn(*args)

        run.tracking = self._pool.submit(call)
        self._sent.append(run.tracking)

    def drain(self) -> None:
        """Wait for every request about job runs; say which failed (the run may show a wrong
        state; the job's own outcome stands)."""
        self._pool.shutdown(wait=True)
        failed = [f.exception() for f in self._sent if f.exception() is not None]
        if failed:
            self.echo(f"tracking: {len(failed)} requests about job runs failed, the first: "
                      f"{str(failed[0]).splitlines()[0][:300]}")
