"""The Ray driver: stage data, look up the cache, launch one actor per job, watch, retry.

A job is ready as soon as every job it reads has finished, and starts when the cluster has
room for it: `orchestrator/admission.py` decides, by priority, across all pipelines. Progress
comes from the actors' `progress()` method, polled a few times a second, never from their
output.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError,
                            RayActorError, RayTaskError)
from tqdm import tqdm

from orchestrator import admission, datasets
from orchestrator.actor import JobActor, WorkersLost
from orchestrator.checkpoints import CheckpointError, read_manifest, resolve_checkpoint_uri
from orchestrator.plan import Plan, PlannedJob, check_uri_references, is_uri
from orchestrator.settings import ServiceError, Settings
from orchestrator.spec import SpecError, model_needs_labels
from orchestrator.storage import NotFound, StorageError, open_storage
from orchestrator.submit import SUBMISSION_ENV
from orchestrator.task import Task
from orchestrator.tracking import RunInfo, Tracker, flatten

STOP_GRACE_S = 30.0  # how long a stopped job may take to save its checkpoint
PREOPEN = 16  # job runs opened ahead of their launch, at most
OPEN_AHEAD_S = 3.0  # ...once the pipeline has launched nothing for this long
PUBLISH_S = 2.0  # the pipeline's progress tag changes at most this often while it runs
POLL_S = 1.0  # progress polls and the loop's reaction time; each poll is an RPC to every actor
RESULT = "result.json"


class OpenedRun(NamedTuple):
    info: RunInfo
    attempts: int  # attempts the run has seen
    status: str  # SCHEDULED (opened ahead of its launch) or RUNNING
    params_logged: bool  # else the worker logs them with its first metrics


@dataclass
class JobState:
    planned: PlannedJob
    # pending | queued (ready, waiting for room) | running | finished | cached | failed |
    # skipped | killed
    status: str = "pending"
    run_id: str | None = None
    artifact_uri: str | None = None  # its run's artifact root
    run_status: str = ""  # what the driver last made its run's status
    params_logged: bool = False  # its run has its params (else they go with the job's logs)
    actor: Any = None
    ref: Any = None
    progress_ref: Any = None
    progress_asked: float = 0.0  # when its actor was last asked for progress (monotonic)
    run_opened: Future | None = None  # an OpenedRun, opened ahead while it is queued
    tracking: Future | None = None  # the last tracking request about its run
    bar: tqdm | None = None
    attempt: int = 0
    attempt_tag: int = 0  # what its run's genforge.attempt tag says
    restarts: int = 0
    retries: int = 0
    started: float = 0.0
    alive: bool = False  # its actor answered: it has its resources (else it is queued)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        return self.planned.name


class Driver:
    def __init__(self, plan: Plan, settings: Settings, *, force: bool | set[str] = False,
                 echo: Callable[[str], None] = lambda m: tqdm.write(m, file=sys.stderr)):
        self.plan = plan
        self.settings = settings
        self.force = force
        self.echo = echo
        self.experiment = plan.spec.experiment
        self.root = open_storage(settings.storage, settings.s3)
        self.tracker = Tracker(settings.tracking_uri)
        self.jobs = {p.name: JobState(p) for p in plan.jobs}
        self.data_keys: dict[str, str] = {}
        self._positions: list[int] = []
        # a Ray job submitted by `genforge submit`: every run says which submission made it
        submission = os.environ.get(SUBMISSION_ENV)
        self.submission_tags = {"genforge.submission": submission} if submission else {}
        self._progress_tag, self._published = "", 0.0
        self._idle: list[tuple[tuple[float, float], Any]] = []  # finished jobs' actors, for reuse
        # Requests to the tracking server about job runs leave the loop: each takes tens of ms,
        # and a pipeline of many short jobs would wait on them, one after another.
        self._tracking = ThreadPoolExecutor(4, thread_name_prefix="tracking")
        self._tracking_done: list[Future] = []
        self._last_launch = time.monotonic()

    # ---- setup ------------------------------------------------------------------------------
    def prefix(self, planned: PlannedJob) -> str:
        return f"{self.experiment}/{planned.name}/{planned.hash}"

    def stage_data(self) -> None:
        """Stage every data set once, before anything starts; bad data is a SpecError."""
        for p in self.plan.jobs:
            data = p.job.data
            if data is None or p.job.kind not in ("train", "distill", "evaluate"):
                continue
            ident = data.model_dump_json()
            if ident in self.data_keys:
                continue
            try:
                self.data_keys[ident] = datasets.stage(data, self.root, self.settings.s3,
                                                       base=Path(self.plan.spec.source).parent)
            except datasets.DataError as exc:
                raise SpecError([f"{self.plan.spec.source}: job '{p.name}': data: {exc}"]) from None
        problems = []
        jobs = {j.name: j for j in self.plan.spec.jobs}
        for p in self.plan.jobs:
            if p.job.kind not in ("train", "distill", "evaluate"):
                continue
            key = self.data_keys[p.job.data.model_dump_json()]
            needs = ("evaluation's feature classifier" if p.job.kind == "evaluate" else
                     "model.class_conditional" if model_needs_labels(p.job, jobs) else None)
            sizes = datasets.split_sizes(self.root, key) if needs else None
            where = f"{self.plan.spec.source}: job '{p.name}'"
            if needs and not sizes["labelled"]:
                problems.append(f"{where}: data: {p.job.data.path or p.job.data.dataset} has no "
                                f"labels ('{p.job.data.y_key}'), which the {needs} needs")
            elif p.job.kind == "evaluate" and sizes["heldout"] < p.job.evaluate.num_samples:
                problems.append(f"{where}: evaluate.num_samples: {p.job.evaluate.num_samples} but "
                                f"the held-out split has {sizes['heldout']} images to compare with")
        if problems:
            raise SpecError(problems)

    def check_references(self) -> None:
        """Every checkpoint URI the spec reads exists and fits; a SpecError otherwise."""
        @functools.lru_cache(maxsize=None)  # many jobs may read one checkpoint
        def read_meta(uri: str) -> dict[str, Any]:
            return read_manifest(*resolve_checkpoint_uri(uri, self.settings.s3)).get("meta", {})

        check_uri_references(self.plan, read_meta)

    def _is_forced(self, name: str) -> bool:
        return self.force is True or (isinstance(self.force, set) and name in self.force)

    def _cached(self, state: JobState) -> dict[str, Any] | None:
        if self._is_forced(state.name):
            return None
        try:
            return json.loads(self.root.child(self.prefix(state.planned)).get_bytes(RESULT))
        except (NotFound, ValueError):
            return None

    # ---- launching --------------------------------------------------------------------------
    def _uri(self, ref: str) -> str:
        return ref if is_uri(ref) else self.root.uri(self.prefix(self.plan.by_name[ref]))

    def _sources(self, planned: PlannedJob) -> tuple[str, ...]:
        return tuple(self._uri(ref) for ref in planned.job.sources)

    def _launch(self, state: JobState, actor: Any = None) -> None:
        """Start the job's next attempt, on `actor` (an idle one of the same resources) or on a
        new one."""
        p = state.planned
        if state.run_id is None:
            opened = self._opened_run(state)
            state.run_id, state.artifact_uri = opened.info.run_id, opened.info.artifact_uri
            state.attempt, state.run_status = opened.attempts, opened.status
            state.params_logged = opened.params_logged
            state.attempt_tag = state.attempt + 1  # an opened run names its next attempt
        state.attempt += 1
        self._last_launch = time.monotonic()
        if state.run_status != "RUNNING":  # opened ahead (a restart finds it RUNNING)
            self._track(state, self.tracker.set_status, state.run_id, "RUNNING")
            state.run_status = "RUNNING"
        if state.attempt != state.attempt_tag:  # a retry or a restart in this pipeline run
            state.attempt_tag = state.attempt
            self._track(state, self.tracker.set_tags, state.run_id,
                        {"genforge.attempt": str(state.attempt)})
        data_key = self.data_keys.get(p.job.data.model_dump_json()) if p.job.data else None
        reused = actor is not None
        task = Task(
            job=p.job.resolved(), job_hash=p.hash, experiment=self.experiment,
            storage_root=self.settings.storage, prefix=self.prefix(p),
            tracking_uri=self.settings.tracking_uri, run_id=state.run_id,
            artifact_uri=state.artifact_uri, params={} if state.params_logged else self._params(p),
            code_version=self.plan.code_version, sources=self._sources(p), data_key=data_key,
            refs={field: self._uri(ref) for field, ref in p.job.references},
            attempt=state.attempt, launched=time.time(), s3=self.settings.s3,
        )
        if actor is None:
            r = p.job.resources
            # a data-parallel job's actor only coordinates: Ray Train reserves its workers
            parallel = r.workers > 1
            actor = ray.remote(JobActor).options(
                num_cpus=0 if parallel else r.cpus, num_gpus=0 if parallel else r.gpus,
                max_concurrency=4, max_restarts=0,
                name=f"genforge:{self.experiment}:{p.name}:{state.run_id[:8]}:{state.attempt}",
                namespace="genforge",
            ).remote()
        state.actor = actor
        state.ref = actor.run.remote(task)
        state.status, state.started, state.progress_ref = "running", time.monotonic(), None
        # An actor that ran a job before holds its resources: it is first asked for progress
        # once the job has run for POLL_S. A new one is asked at once, to learn that it holds
        # them (a data-parallel job's workers are placed anew each time).
        state.alive = reused and p.job.resources.workers == 1
        state.progress_asked = state.started if state.alive else 0.0
        if state.bar is None:
            position = next(i for i in range(len(self.jobs) + 1) if i not in self._positions)
            self._positions.append(position)
            # Bars only on a terminal; logs get the one-line events instead.
            state.bar = tqdm(total=1, desc=f"{p.name:<14.14}", position=position, leave=True,
                             dynamic_ncols=True, file=sys.stderr, unit="step",
                             disable=not sys.stderr.isatty())
        self.echo(f"job '{p.name}': started (attempt {state.attempt}, run {state.run_id})")
        state.bar.set_postfix_str(f"attempt {state.attempt}" if state.attempt > 1 else "starting")

    def _track(self, state: JobState, fn: Callable[..., Any], *args: Any) -> None:
        """Send a request about the job's run from the tracking threads, after the ones before
        it (a run must not be marked RUNNING after it was marked FINISHED)."""
        before = state.tracking

        def call() -> None:
            if before is not None:
                before.result()
            fn(*args)

        state.tracking = self._tracking.submit(call)
        self._tracking_done.append(state.tracking)

    def _opened_run(self, state: JobState) -> OpenedRun:
        """The run opened ahead for the job, or one opened now, RUNNING."""
        if state.run_opened is None:
            return self._open_run(state.planned, ahead=False)
        return state.run_opened.result()

    def _drain_tracking(self) -> None:
        """Wait for every request about job runs; say which failed (the run may show a wrong
        state; the job's own outcome stands)."""
        self._tracking.shutdown(wait=True)
        failed = [f.exception() for f in self._tracking_done if f.exception() is not None]
        if failed:
            self.echo(f"tracking: {len(failed)} requests about job runs failed, the first: "
                      f"{str(failed[0]).splitlines()[0][:300]}")

    def _params(self, p: PlannedJob) -> dict[str, str]:
        return flatten({k: v for k, v in p.job.resolved().items() if k != "name"})

    def _open_run(self, p: PlannedJob, ahead: bool) -> OpenedRun:
        """A new child run, or the unfinished run of the same job hash (a resumed job keeps its
        metric history in one run). Opened `ahead` of its launch, it says SCHEDULED and has its
        params; opened at the launch, it says RUNNING (MLflow's default) and its params go with
        the job's first metrics: one request, where a run opened ahead takes four with its
        RUNNING at the launch. Its `genforge.attempt` tag names the attempt that the launch
        will be."""
        status = "SCHEDULED" if ahead else "RUNNING"
        run = self._unfinished.pop((p.name, p.hash), None)
        if run is not None:
            attempts = int(run.data.tags.get("genforge.attempt", "0"))
            self.tracker.set_status(run.info.run_id, status)
            self.tracker.set_tags(run.info.run_id, {"mlflow.parentRunId": self.parent_run,
                                                    "genforge.attempt": str(attempts + 1),
                                                    **self.submission_tags})
            return OpenedRun(run.info, attempts, status, params_logged=True)
        tags = {
            **self.submission_tags,
            "genforge.job": p.name, "genforge.family": p.job.family or "-", "genforge.kind": p.job.kind,
            "genforge.hash": p.hash, "genforge.code_version": self.plan.code_version,
            "genforge.checkpoint": self.root.uri(f"{self.prefix(p)}/checkpoints"),
            "genforge.attempt": "1",
        }
        info = self.tracker.start_run(self.experiment_id, p.name, tags,
                                      self._params(p) if ahead else None, self.parent_run)
        if ahead:
            self.tracker.set_status(info.run_id, "SCHEDULED")
        return OpenedRun(info, 0, status, params_logged=ahead)

    # ---- watching ---------------------------------------------------------------------------
    def _poll_progress(self) -> None:
        """Update the bars from each actor's last progress report, never blocking: a report
        is asked for, at most every POLL_S (the loop turns once per finished job), and read
        on a later pass once it has arrived."""
        now = time.monotonic()
        for state in self.jobs.values():
            if state.status != "running":
                continue
            if state.progress_ref is None:
                if now - state.progress_asked >= POLL_S:
                    state.progress_ref, state.progress_asked = state.actor.progress.remote(), now
                continue
            ready, _ = ray.wait([state.progress_ref], timeout=0)
            if not ready:
                continue
            try:
                prog = ray.get(state.progress_ref)
            except Exception:  # the actor is gone; its run() ref says why
                prog = {}
            state.progress_ref = None
            # It holds its resources, and admission's books can let go: a job's own actor holds
            # them once it answers at all (Ray placed it), even while it still imports its
            # family's worker, which takes seconds in a cold process; a data-parallel job's
            # actor holds none, its workers hold them once it is past "starting" and "queued".
            holds = (state.planned.job.resources.workers == 1
                     or prog.get("phase") not in ("queued", "starting"))
            if not state.alive and prog and holds:
                state.alive = True
                self.admission.started.remote([self._ticket(state)])
            if prog.get("total"):
                state.bar.total = prog["total"]
                state.bar.n = prog.get("step", 0)
            post = prog.get("phase", "")
            if "loss" in prog:
                post += f" loss={prog['loss']:.4f}"
            state.bar.set_postfix_str(post, refresh=False)
            state.bar.refresh()

    def progress_summary(self) -> str:
        """One line: how many jobs are done, running, queued for resources and waiting."""
        counts: dict[str, int] = {}
        for state in self.jobs.values():
            # queued: waiting for admission, or launched and waiting for Ray's resources
            status = "queued" if state.status == "running" and not state.alive else state.status
            counts[status] = counts.get(status, 0) + 1
        done = counts.get("finished", 0) + counts.get("cached", 0)
        parts = [f"{done}/{len(self.jobs)} done"]
        parts += [f"{counts[k]} {k}" for k in ("running", "queued", "pending", "failed",
                                               "skipped", "killed") if counts.get(k)]
        return ", ".join(parts)

    def _publish_progress(self, now: bool = True) -> None:
        """The summary as the pipeline run's `genforge.progress` tag, when it changes (in the
        loop at most every PUBLISH_S: each is a request to the tracking server)."""
        summary = self.progress_summary()
        due = now or time.monotonic() - self._published >= PUBLISH_S
        if summary != self._progress_tag and due:
            self._progress_tag, self._published = summary, time.monotonic()
            self.tracker.set_tags(self.parent_run, {"genforge.progress": summary})
            for state in self.jobs.values():
                if state.bar is not None and state.status == "running" and not state.alive:
                    state.bar.set_postfix_str("queued for resources")

    def _finish(self, state: JobState, status: str, error: str | None = None,
                keep_actor: bool = False) -> None:
        """Record the job's end; its actor is killed, or kept idle for the next job of the same
        resources (`keep_actor`)."""
        state.status, state.error = status, error
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[status]
        tags = {"genforge.error": error[:4000]} if error else {}
        if state.run_id is None and state.run_opened is not None:  # cancelled while queued
            opened = state.run_opened.result()
            state.run_id, state.params_logged = opened.info.run_id, opened.params_logged
            tags["genforge.attempt"] = str(opened.attempts)  # it was not launched after all
        if state.run_id:
            # A job that failed may have ended before its worker sent the run's params: they
            # go with the error (the same params again are no change).
            params = ({} if state.params_logged or status == "finished"
                      else self._params(state.planned))
            if tags or params:
                self._track(state, self.tracker.log, state.run_id, params, tags)
            self._track(state, self.tracker.finish, state.run_id, mlflow_status)
        if state.actor is not None:
            if keep_actor:
                self._idle.append((self._shape(state), state.actor))
            else:
                ray.kill(state.actor, no_restart=True)
            state.actor = None
            self.admission.started.remote([self._ticket(state)])  # what it holds is in Ray's view
        if state.bar is not None:
            state.bar.set_postfix_str(status if not error else f"{status}: {error[:60]}")
            state.bar.close()
        if status != "failed":
            self.echo(f"job '{state.name}': {status}" + (f" ({error})" if error else ""))
        else:
            self.echo(f"job '{state.name}' failed: {error}")
            for name in self.plan.dependents(state.name):
                if self.jobs[name].status == "pending":
                    self.jobs[name].status = "skipped"
                    self.jobs[name].error = f"upstream job '{state.name}' failed"

    def _collect(self, state: JobState) -> None:
        try:
            result = ray.get(state.ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
            if isinstance(exc, RayTaskError):
                return self._job_error(state, exc)
            if state.restarts < state.planned.job.resources.max_restarts:
                state.restarts += 1
                self.echo(f"job '{state.name}': worker died ({type(exc).__name__}); "
                          f"resuming from its last checkpoint (restart {state.restarts})")
                return self._launch(state)
            return self._finish(state, "failed", f"worker died {state.restarts + 1} times")
        except RayTaskError as exc:
            return self._job_error(state, exc)
        state.result = result
        if result.get("status") == "stopped":
            return self._finish(state, "killed", f"stopped at step {result['step']}")
        self._finish(state, "finished", keep_actor=True)

    def _job_error(self, state: JobState, exc: RayTaskError) -> None:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        message = f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
        # Storage that stayed away past botocore's retries is an infrastructure fault: the job
        # resumes from its last complete checkpoint, on the restart budget.
        infrastructure = (isinstance(cause, WorkersLost) or isinstance(cause, StorageError)
                          and not isinstance(cause, (NotFound, CheckpointError)))
        if infrastructure and state.restarts < state.planned.job.resources.max_restarts:
            state.restarts += 1
            self.echo(f"job '{state.name}': {message}; resuming from its last checkpoint "
                      f"(restart {state.restarts})")
            return self._launch(state, state.actor)  # its actor is alive
        if state.retries < state.planned.job.resources.max_retries:
            state.retries += 1
            self.echo(f"job '{state.name}': {message}; retrying ({state.retries})")
            return self._launch(state, state.actor)  # its actor is alive
        self._finish(state, "failed", message)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for state in self.jobs.values():
            limit = state.planned.job.resources.timeout_s
            if state.status == "running" and limit and now - state.started > limit:
                self._stop([state], "failed", f"timed out after {limit:g} s")

    def _stop(self, states: list[JobState], status: str, reason: str) -> None:
        """Ask actors to stop: each saves a checkpoint at its next step boundary and returns;
        after the grace period the rest are killed. What was saved is kept for a later run."""
        for state in states:
            state.actor.stop.remote()
        pending = {state.ref: state for state in states}
        deadline = time.monotonic() + STOP_GRACE_S
        while pending and time.monotonic() < deadline:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=deadline - time.monotonic())
            for ref in done:
                pending.pop(ref)
        for state in states:
            saved = ""
            try:
                result = ray.get(state.ref, timeout=0) if state.ref not in pending else {}
                if result.get("status") == "stopped":
                    saved = f"; checkpoint at step {result['step']} kept"
            except Exception:  # killed or failed while stopping: the last checkpoint stands
                pass
            self._finish(state, status, reason + saved)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        if not self.data_keys:
            self.stage_data()
        try:
            ray.init(address=self.settings.ray_address, namespace="genforge",
                     logging_level="ERROR", log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ServiceError(f"cannot connect to Ray at {self.settings.ray_address}: "
                               f"{str(exc).splitlines()[0]}") from None
        self.admission = admission.connect()
        self.experiment_id = self.tracker.experiment_id(self.experiment)
        self._unfinished = self.tracker.unfinished_runs(self.experiment_id)
        self.parent_run = self.tracker.start_run(
            self.experiment_id, f"{self.experiment} pipeline",
            {"genforge.spec": self.plan.spec.source, "genforge.code_version": self.plan.code_version,
             **self.submission_tags},
        ).run_id
        self._last_launch = time.monotonic()
        try:
            self._loop()
        except KeyboardInterrupt:
            self.echo("interrupted: stopping jobs, keeping what was saved")
            self._stop([s for s in self.jobs.values() if s.status == "running"], "killed",
                       "cancelled")
            queued = [s for s in self.jobs.values() if s.status == "queued"]
            self.admission.started.remote([self._ticket(s) for s in queued])  # withdrawn
            for state in queued:
                self._finish(state, "killed", "cancelled while queued")
            self._drain_tracking()
            self._publish_progress()
            self.tracker.finish(self.parent_run, "KILLED")
            return 130
        self._drain_tracking()
        self._publish_progress()
        failed = [s for s in self.jobs.values() if s.status in ("failed", "skipped", "killed")]
        self.tracker.finish(self.parent_run, "FAILED" if failed else "FINISHED")
        self._report()
        return 1 if failed else 0

    def _ticket(self, state: JobState) -> str:
        return f"{self.parent_run}/{state.name}"

    @staticmethod
    def _shape(state: JobState) -> tuple[float, float]:
        """The resources of the job's actor (none for a data-parallel job's coordinator)."""
        r = state.planned.job.resources
        return (0.0, 0.0) if r.workers > 1 else (r.cpus, r.gpus)

    def _admit(self) -> None:
        """Start the ready jobs that admission lets start (priority first, across pipelines).
        A job of the same resources as an idle actor takes it over, unless a job of higher
        priority waits for room; idle actors left over are killed, freeing their resources."""
        queued = sorted((s for s in self.jobs.values() if s.status == "queued"),
                        key=lambda s: -s.planned.job.resources.priority)
        # A job's run is opened when it is launched. When the pipeline waits for room (it has
        # launched nothing for OPEN_AHEAD_S), the runs of the jobs next in line are opened in the
        # background, SCHEDULED, so that MLflow shows what waits; not all of them (a pipeline of
        # thousands would flood the server). A run opened ahead costs two requests more.
        if time.monotonic() - self._last_launch >= OPEN_AHEAD_S:
            opened = sum(1 for s in queued if s.run_opened is not None)
            for state in [s for s in queued if s.run_opened is None][:max(0, PREOPEN - opened)]:
                state.run_opened = self._tracking.submit(self._open_run, state.planned, True)
        handover: dict[str, Any] = {}
        for state in queued:
            idle = next((i for i, (shape, _) in enumerate(self._idle)
                         if shape == self._shape(state)), None)
            if idle is not None:
                handover[self._ticket(state)] = self._idle.pop(idle)[1]
        granted: set[str] = set()
        if queued:
            asks = [(self._ticket(s), s.planned.job.resources.priority,
                     admission.request(s.planned.job.resources))
                    for s in queued if self._ticket(s) not in handover]
            takes = [(self._ticket(s), s.planned.job.resources.priority)
                     for s in queued if self._ticket(s) in handover]
            try:
                granted = set(ray.get(self.admission.ask.remote(asks, takes), timeout=30))
            except (RayActorError, ActorUnavailableError, GetTimeoutError):
                # its node left: Ray restarts it elsewhere, and every driver asks again
                self.admission = admission.connect()
        for state in queued:
            ticket = self._ticket(state)
            if ticket in granted:
                self._launch(state, handover.pop(ticket, None))
        for actor in [*handover.values(), *(actor for _, actor in self._idle)]:
            ray.kill(actor, no_restart=True)
        self._idle.clear()

    def _loop(self) -> None:
        while True:
            # jobs whose inputs are all there, again after cache hits (their dependents)
            while ready := [s for s in self.jobs.values() if s.status == "pending" and all(
                    self.jobs[d].status in ("finished", "cached") for d in s.planned.deps)]:
                for state, cached in zip(ready, map(self._cached, ready)):
                    if cached is not None:
                        state.status, state.result = "cached", cached
                        self.echo(f"job '{state.name}': cached ({state.planned.hash})")
                    else:
                        state.status = "queued"
            self._admit()
            running = {s.ref: s for s in self.jobs.values() if s.status == "running"}
            if not running:
                if any(s.status == "queued" for s in self.jobs.values()):
                    self._publish_progress(now=False)
                    time.sleep(POLL_S)  # the cluster is full of other pipelines' jobs
                    continue
                return
            done, rest = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            if done and rest:  # and every other job that has ended meanwhile
                done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in done:
                self._collect(running[ref])
            self._check_timeouts()
            self._poll_progress()
            self._publish_progress(now=False)

    def _report(self) -> None:
        for state in self.jobs.values():
            extra = state.result.get("checkpoint") or ", ".join(state.result.get("outputs", []))
            line = f"  {state.name:<16} {state.status:<9} {state.planned.hash}"
            if state.error:
                line += f"  {state.error}"
            elif extra:
                line += f"  {extra}"
            self.echo(line)
