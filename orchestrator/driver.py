"""The Ray driver: stage data, look up the cache, launch one actor per job, watch, retry.

A job is ready as soon as every job it reads has finished, and starts when the cluster has
room for it: `orchestrator/admission.py` decides, by priority, across all pipelines. Before a
ready job is queued the driver takes its lease (`orchestrator/lease.py`): one writer per job,
whichever driver or machine runs it; a job another driver runs is waited for. Progress comes
from the actors' `progress()` method, polled a few times a second, never from their output.

A stop (SIGINT, or SIGTERM from a batch scheduler) asks every running job to stop at its next
step boundary, marks every run KILLED and exits 128 + the signal's number.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
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

from orchestrator import admission, datasets, lease, signals
from orchestrator.actor import JobActor, WorkersLost
from orchestrator.checkpoints import CheckpointError, pin_checkpoint, resolve_checkpoint_uri
from orchestrator.plan import (Plan, PlannedJob, build_plan, check_uri_references, is_uri,
                               resolve_checkpoint, resolve_inputs, stages_data)
from orchestrator.settings import ServiceError, Settings
from orchestrator.spec import SpecError, model_needs_labels
from orchestrator.storage import NotFound, Storage, StorageError, open_storage
from orchestrator.submit import SUBMISSION_ENV
from orchestrator.task import Task
from orchestrator.tracking import RunInfo, Tracker, flatten

STOP_GRACE_S = 30.0  # how long a stopped job may take to save its checkpoint
PREOPEN = 16  # job runs opened ahead of their launch, at most
OPEN_AHEAD_S = 3.0  # ...once the pipeline has launched nothing for this long
PUBLISH_S = 2.0  # the pipeline's progress tag changes at most this often while it runs
POLL_S = 1.0  # progress polls and the loop's reaction time; each poll is an RPC to every actor
WATCH_S = 2.0  # how often a job that another driver runs is looked at
STORAGE_PATIENCE_S = 300.0  # a job whose lookups fail this long (storage away) fails
RESTART_BACKOFF_S = 2.0  # a job that lost its storage restarts after 2, 4, 8 ... s
RESULT = "result.json"
AUTOSCALING_ENV = "GENFORGE_AUTOSCALING"  # set: requests larger than any node wait for one


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A ServiceError at once when nothing listens at a `host:port` Ray address: `ray.init`
    itself retries an unreachable GCS for minutes."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray://: Ray's own way of finding the cluster
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ServiceError(f"cannot connect to Ray at {address}: {exc.strerror or exc}") from None


class OpenedRun(NamedTuple):
    info: RunInfo
    attempts: int  # attempts the run has seen
    status: str  # SCHEDULED (opened ahead of its launch) or RUNNING
    params_logged: bool  # else the worker logs them with its first metrics


@dataclass
class JobState:
    planned: PlannedJob
    # pending | queued (ready, its lease held, waiting for room) | elsewhere (another driver
    # runs it) | running | restarting (on its actor, once storage has had time to come back)
    # | finished | cached | failed | skipped | killed
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
    taken: lease.Taken | None = None  # elsewhere: the lease of the driver that runs it
    unreachable_since: float | None = None  # its lookups have failed since (storage away)
    not_before: float = 0.0  # restarting: when it is launched again
    adopt: bool = False  # its run is looked up again at its launch (a driver before ran it)

    @property
    def name(self) -> str:
        return self.planned.name


class Driver:
    def __init__(self, plan: Plan, settings: Settings, *, force: bool | set[str] = False,
                 echo: Callable[[str], None] = lambda m: tqdm.write(m, file=sys.stderr)):
        self.plan = plan
        self.settings = settings
        # True: every job; a set: those jobs and every job that reads them (what they read
        # is made again, so what was made from it is stale)
        self.force = force if isinstance(force, bool) else set().union(
            *({name} | plan.dependents(name) for name in force))
        self.echo = echo
        self.experiment = plan.spec.experiment
        self.root = open_storage(settings.storage, settings.s3)
        self.tracker = Tracker(settings.tracking_uri)
        self.jobs = {p.name: JobState(p) for p in plan.jobs}
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
        self._watched = 0.0  # when the jobs other drivers run were last looked at
        self._stopping = False  # a stop is under way: another signal only hurries it
        self._hurry = False
        self.leases: lease.Keeper | None = None  # see open_leases

    # ---- setup ------------------------------------------------------------------------------
    def prefix(self, planned: PlannedJob) -> str:
        return f"{self.experiment}/{planned.name}/{planned.hash}"

    def _storage(self, state: JobState) -> Storage:
        return self.root.child(self.prefix(state.planned))

    def prepare(self) -> None:
        """Before anything runs: stage every data set, resolve every checkpoint URI to the
        exact checkpoint it names, and plan with them (the jobs' hashes); then the checks that
        need what was read (labels, held-out sizes, what each checkpoint holds). Bad input is
        a SpecError, unreachable storage a ServiceError."""
        spec = self.plan.spec
        base = Path(spec.source).parent

        def stage(job) -> str:
            try:
                return datasets.stage(job.data, self.root, self.settings.s3, base=base)
            except datasets.DataError as exc:
                raise SpecError([f"{spec.source}: job '{job.name}': data: {exc}"]) from None
            except StorageError as exc:
                raise ServiceError(f"storage {self.settings.storage}: {exc}") from None

        inputs = resolve_inputs(spec, stage, functools.lru_cache(maxsize=None)(
            lambda uri: resolve_checkpoint(uri, self.settings.s3)))
        self.plan = build_plan(spec, inputs)
        check_uri_references(self.plan)
        self._check_data()
        self.jobs = {p.name: JobState(p) for p in self.plan.jobs}

    def _check_data(self) -> None:
        """Labels where a job needs them, enough held-out images for an evaluation."""
        problems = []
        jobs = {j.name: j for j in self.plan.spec.jobs}
        for p in self.plan.jobs:
            if not stages_data(p.job):
                continue
            needs = ("evaluation's feature classifier" if p.job.kind == "evaluate" else
                     "model.class_conditional" if model_needs_labels(p.job, jobs) else None)
            sizes = datasets.split_sizes(self.root, p.data_key) if needs else None
            where = f"{self.plan.spec.source}: job '{p.name}'"
            if needs and not sizes["labelled"]:
                problems.append(f"{where}: data: {p.job.data.path or p.job.data.dataset} has no "
                                f"labels ('{p.job.data.y_key}'), which the {needs} needs")
            elif p.job.kind == "evaluate" and sizes["heldout"] < p.job.evaluate.num_samples:
                problems.append(f"{where}: evaluate.num_samples: {p.job.evaluate.num_samples} but "
                                f"the held-out split has {sizes['heldout']} images to compare with")
        if problems:
            raise SpecError(problems)

    def check_feasible(self, nodes: list[dict[str, float]]) -> None:
        """Refuse, before anything runs, a job whose resources no node of the cluster (`nodes`:
        each alive node's resources) can ever give it. With GENFORGE_AUTOSCALING set, such a
        job waits for the autoscaler to add a node that can, as Ray's own requests do."""
        if os.environ.get(AUTOSCALING_ENV, "").lower() in ("1", "true", "yes"):
            return
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        problems = []
        for p in self.plan.jobs:
            need = admission.bundles(p.job.resources)
            if not admission.packs(need, nodes):
                problems.append(
                    f"{self.plan.spec.source}: job '{p.name}': resources: "
                    f"{admission.describe(need)} do not fit on the cluster's {len(nodes)} "
                    f"node{'s' if len(nodes) != 1 else ''} (the largest has "
                    f"{admission.describe([largest])}): it could never start (with an "
                    f"autoscaler that adds larger nodes, set {AUTOSCALING_ENV}=1)")
        if problems:
            raise SpecError(problems)

    def _is_forced(self, name: str) -> bool:
        return self.force is True or (isinstance(self.force, set) and name in self.force)

    def _cached(self, state: JobState) -> dict[str, Any] | None:
        if self._is_forced(state.name):
            return None
        try:
            return json.loads(self._storage(state).get_bytes(RESULT))
        except (NotFound, ValueError):
            return None

    # ---- one writer per job -----------------------------------------------------------------
    def _claim(self, state: JobState) -> None:
        """A ready job that is not cached: this driver's to run once it holds its lease (then
        it is queued), else another driver runs it (then it is watched)."""
        got = None
        while got is None:  # released between our two requests: ask again
            got = lease.acquire(self._storage(state), self.me)
        if isinstance(got, lease.Taken):
            state.status, state.taken = "elsewhere", got
            self.echo(f"job '{state.name}': running in another driver ({lease.describe(got)}); "
                      f"waiting for it")
            return
        self._own(state, got)

    def _own(self, state: JobState, held: lease.Lease) -> None:
        self.leases.hold(state.name, held)
        state.taken = None
        cached = self._cached(state)  # finished by the driver that held it before
        if cached is not None:
            self.leases.release(state.name)
            return self._cache_hit(state, cached, "finished by another driver")
        if self._is_forced(state.name):
            self._clear(state)
        self._pin_inputs(state)
        state.status = "queued"

    def _cache_hit(self, state: JobState, result: dict[str, Any], how: str = "cached") -> None:
        state.status, state.result = "cached", result
        self.echo(f"job '{state.name}': {how} ({state.planned.hash})")

    def _clear(self, state: JobState) -> None:
        """A forced job starts afresh: what an earlier run left under its prefix goes, its
        result first (so that no reader takes it for finished), then its checkpoints (each made
        incomplete before its files go), once this driver holds the job's lease."""
        storage = self._storage(state)
        storage.delete(RESULT)
        keys = [k for k in storage.list() if k != lease.LEASE_KEY and not k.startswith("pins/")]
        for key in sorted(keys, key=lambda k: not k.endswith("manifest.json")):
            storage.delete(key)
        if keys:
            self.echo(f"job '{state.name}': forced: {len(keys)} objects of an earlier run "
                      f"removed; training starts at step 0")

    def _pin_inputs(self, state: JobState) -> None:
        """The checkpoints the job reads by URI are pinned: their job's retention keeps them
        (best effort: the storage they are in may be read-only to this user)."""
        for uri in state.planned.checkpoints.values():
            try:
                storage, name = resolve_checkpoint_uri(uri, self.settings.s3)
                pin_checkpoint(storage, name, state.planned.hash)
            except StorageError as exc:
                self.echo(f"job '{state.name}': could not pin {uri} ({exc})")

    def _watch_elsewhere(self) -> None:
        """The jobs other drivers run, every WATCH_S: finished there (a cache hit here), their
        lease released (this driver runs them, resuming from their checkpoints), or stale (its
        holder died or stopped answering: taken over)."""
        if time.monotonic() - self._watched < WATCH_S:
            return
        self._watched = time.monotonic()
        for state in [s for s in self.jobs.values() if s.status == "elsewhere"]:
            self._tolerant(state, self._watch)
        self._give_up_on_storage()

    def _watch(self, state: JobState) -> None:
        cached = self._cached(state)
        if cached is not None:
            state.taken = None
            return self._cache_hit(state, cached, "finished by another driver")
        storage = self._storage(state)
        now = lease.look(storage, state.taken)
        if now is None:
            got = lease.acquire(storage, self.me)
            if isinstance(got, lease.Lease):
                self.echo(f"job '{state.name}': the other driver let it go; running it here")
                state.adopt = True
                self._own(state, got)
            elif got is not None:
                state.taken = got
            return
        state.taken = now
        if lease.stale(now, self._ray_jobs.dead):
            got = lease.take_over(storage, now, self.me)
            if got is not None:
                why = ("its driver has ended" if now.holder and self._ray_jobs.dead(now.holder)
                       else f"not renewed for {lease.TTL_S:g} s")
                self.echo(f"job '{state.name}': taken over from {lease.describe(now)} ({why}); "
                          f"resuming it here")
                state.adopt = True
                self._own(state, got)

    def _tolerant(self, state: JobState, look: Callable[[JobState], None]) -> None:
        """`look(state)` (a cache lookup, a lease), with storage that is away for a while
        tolerated: the job is looked at again on the next turn of the loop, and fails once
        storage has been away for STORAGE_PATIENCE_S (see `_give_up_on_storage`)."""
        try:
            look(state)
        except StorageError as exc:
            if state.unreachable_since is None:
                state.unreachable_since = time.monotonic()
                self.echo(f"job '{state.name}': {exc}; trying again")
            state.error = str(exc)
            return
        if state.unreachable_since is not None:
            state.unreachable_since, state.error = None, None
            self.echo(f"job '{state.name}': storage is back")

    def _give_up_on_storage(self) -> None:
        for state in self.jobs.values():
            since = state.unreachable_since
            if since is not None and time.monotonic() - since > STORAGE_PATIENCE_S:
                state.unreachable_since = None
                self._finish(state, "failed", f"storage unreachable for "
                                              f"{time.monotonic() - since:.0f} s: {state.error}")

    def _restart_due(self) -> None:
        for state in self.jobs.values():
            if state.status == "restarting" and time.monotonic() >= state.not_before:
                self._launch(state, state.actor)  # its actor is alive

    def _lost_leases(self) -> None:
        """Jobs whose lease another driver took over (this one looked dead to it): stopped at
        once, without a grace period, since the other driver may be writing already."""
        for name in self.leases.lost():
            state = self.jobs[name]
            if state.status in ("running", "queued", "restarting"):
                if state.status == "queued":
                    self.admission.started.remote([self._ticket(state)])  # withdrawn
                self._finish(state, "killed", "lost its lease: another driver took the job over")

    # ---- launching --------------------------------------------------------------------------
    def _uri(self, planned: PlannedJob, ref: str) -> str:
        """What the job reads for `ref`: the exact checkpoint a URI resolved to at planning;
        for a job of the spec, the checkpoint its result names (a sample job's prefix)."""
        if is_uri(ref):
            return planned.checkpoints[ref]
        upstream = self.jobs[ref]
        return upstream.result.get("checkpoint") or self.root.uri(self.prefix(upstream.planned))

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
        reused = actor is not None
        task = Task(
            job=p.job.resolved(), job_hash=p.hash, experiment=self.experiment,
            storage_root=self.settings.storage, prefix=self.prefix(p),
            tracking_uri=self.settings.tracking_uri, run_id=state.run_id,
            artifact_uri=state.artifact_uri, params={} if state.params_logged else self._params(p),
            code_version=p.code, sources=tuple(self._uri(p, ref) for ref in p.job.sources),
            data_key=p.data_key, refs={field: self._uri(p, ref) for field, ref in p.job.references},
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
            return self._open_run(state, ahead=False)
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

    def _open_run(self, state: JobState, ahead: bool) -> OpenedRun:
        """A new child run, or the unfinished run of the same job hash (a resumed job keeps its
        metric history in one run; a forced job starts a new one). Opened `ahead` of its
        launch, it says SCHEDULED and has its params; opened at the launch, it says RUNNING
        (MLflow's default) and its params go with the job's first metrics: one request, where a
        run opened ahead takes four with its RUNNING at the launch. Its `genforge.attempt` tag
        names the attempt that the launch will be."""
        p = state.planned
        status = "SCHEDULED" if ahead else "RUNNING"
        if state.adopt:  # another driver ran it since this one started: its run, if it left one
            self._unfinished.update(self.tracker.unfinished_runs(self.experiment_id, p.name))
        run = self._unfinished.pop((p.name, p.hash), None)
        if run is not None and not self._is_forced(p.name):
            attempts = int(run.data.tags.get("genforge.attempt", "0"))
            self.tracker.set_status(run.info.run_id, status)
            self.tracker.set_tags(run.info.run_id, {"mlflow.parentRunId": self.parent_run,
                                                    "genforge.attempt": str(attempts + 1),
                                                    **self.driver_tags})
            return OpenedRun(run.info, attempts, status, params_logged=True)
        tags = {
            **self.driver_tags,
            "genforge.job": p.name, "genforge.family": p.job.family or "-", "genforge.kind": p.job.kind,
            "genforge.hash": p.hash, "genforge.code_version": p.code,
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
        parts += [f"{counts[k]} {k}" for k in ("running", "restarting", "queued", "elsewhere",
                                               "pending", "failed", "skipped", "killed")
                  if counts.get(k)]
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
        if self.leases is not None:
            self.leases.release(state.name)  # its result is written: a waiting driver finds it
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
            # Dead, or unreachable for now (ActorUnavailableError): either way it is killed
            # before the job is launched again, so that it never writes beside its successor.
            ray.kill(state.actor, no_restart=True)
            state.actor = None
            if state.restarts < state.planned.job.resources.max_restarts:
                state.restarts += 1
                self.echo(f"job '{state.name}': worker died ({type(exc).__name__}); "
                          f"resuming from its last checkpoint (restart {state.restarts})")
                return self._launch(state)
            return self._finish(state, "failed", f"worker died {state.restarts + 1} times")
        except RayTaskError as exc:
            return self._job_error(state, exc)
        state.result = result
        if result.get("tracking_lost"):  # the job's result stands; its run misses this
            lost = "; ".join(result["tracking_lost"])
            self.echo(f"job '{state.name}': tracking lost {lost}"[:1000])
            self._track(state, self.tracker.set_tags, state.run_id,
                        {"genforge.tracking_lost": lost[:4000]})
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
            # storage lost: give it time to come back before the next attempt needs it
            wait = (min(RESTART_BACKOFF_S * 2 ** (state.restarts - 1), 60.0)
                    if isinstance(cause, StorageError) else 0.0)
            self.echo(f"job '{state.name}': {message}; resuming from its last checkpoint"
                      f"{f' in {wait:g} s' if wait else ''} (restart {state.restarts})")
            if wait:
                state.status, state.not_before = "restarting", time.monotonic() + wait
                return None
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
        """Ask actors to stop: each saves a checkpoint at its next step boundary (a phase
        without steps, such as sampling, stops between batches) and returns; after the grace
        period, or at once on a second signal, the rest are killed. What was saved is kept for
        a later run."""
        for state in states:
            state.actor.stop.remote()
        pending = {state.ref: state for state in states}
        deadline = time.monotonic() + STOP_GRACE_S
        while pending and time.monotonic() < deadline and not self._hurry:
            done, _ = ray.wait(list(pending), num_returns=1,
                               timeout=min(0.5, deadline - time.monotonic()))
            for ref in done:
                pending.pop(ref)
        for state in states:
            try:
                result = ray.get(state.ref, timeout=0) if state.ref not in pending else {}
            except Exception:  # killed or failed while stopping: the last checkpoint stands
                result = {}
            if result.get("status") == "finished":  # it finished before it could stop
                state.result = result
                self._finish(state, "finished")
                continue
            saved = ""
            if result.get("checkpoint"):
                saved = f"; checkpoint at step {result['step']} kept"
            elif result.get("phase"):
                saved = f" while {result['phase']}"
            self._finish(state, status, reason + saved)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        if self.plan.inputs is None:
            self.prepare()
        _reachable(self.settings.ray_address)
        try:
            connected = ray.init(address=self.settings.ray_address, namespace="genforge",
                                 logging_level="ERROR", log_to_driver=False,
                                 configure_logging=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ServiceError(f"cannot connect to Ray at {self.settings.ray_address}: "
                               f"{str(exc).splitlines()[0]}") from None
        # Ray's core worker installs its own handlers (a crash dump, then death) when it
        # starts: the driver's own go back over them, so that a stop always lands.
        signals.handle(self._on_signal)
        self.check_feasible([n["Resources"] for n in ray.nodes() if n.get("Alive")])
        context = ray.get_runtime_context()
        dashboard = connected.dashboard_url
        self.open_leases(context.get_job_id(), context.gcs_address,
                         f"http://{dashboard}" if dashboard else None)
        self.parent_run = None
        try:
            self.admission = admission.connect()
            self.experiment_id = self.tracker.experiment_id(self.experiment)
            self._close_orphans()
            self._unfinished = self.tracker.unfinished_runs(self.experiment_id)
            self.parent_run = self.tracker.start_run(
                self.experiment_id, f"{self.experiment} pipeline",
                {"genforge.spec": self.plan.spec.source,
                 "genforge.code_version": self.plan.code_version, **self.driver_tags},
            ).run_id
            self._last_launch = time.monotonic()
            self._loop()
        except KeyboardInterrupt as exc:
            return self._cancel(exc)
        finally:
            self.leases.close()
        self._drain_tracking()
        self._publish_progress()
        failed = [s for s in self.jobs.values() if s.status in ("failed", "skipped", "killed")]
        self.tracker.finish(self.parent_run, "FAILED" if failed else "FINISHED")
        self._report()
        return 1 if failed else 0

    @property
    def driver_tags(self) -> dict[str, str]:
        """What every run this driver opens or adopts says of it: its submission, and its Ray
        job (so that a later driver can close the runs it leaves open if it dies)."""
        mine = {"genforge.driver": f"{self.me.ray_job}@{self.me.gcs}"} if self.me.ray_job else {}
        return {**self.submission_tags, **mine}

    def _close_orphans(self) -> None:
        """Runs left RUNNING or SCHEDULED by a driver of this cluster that has ended without
        closing them (killed -9, its node gone): a job run whose job has its result is
        FINISHED, any other KILLED, with the reason. A rerun then resumes in it."""
        for run in self.tracker.open_runs(self.experiment_id):
            ray_job, _, gcs = run.data.tags.get("genforge.driver", "").partition("@")
            if not self._ray_jobs.ended(ray_job, gcs):
                continue
            tags = run.data.tags
            job = (self.root.child(f"{self.experiment}/{tags['genforge.job']}/"
                                   f"{tags.get('genforge.hash')}") if "genforge.job" in tags
                   else None)
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

    def open_leases(self, ray_job: str | None = None, gcs: str | None = None,
                    dashboard: str | None = None) -> None:
        """Who this driver is to other drivers (its Ray job, on the cluster at `gcs`, whose
        dashboard says which jobs ended), and the keeper of its leases."""
        self.me = lease.this_driver(ray_job, gcs)
        self._ray_jobs = lease.RayJobs(gcs, dashboard)
        if not lease.conditional_writes(self.root):
            self.echo(f"storage {self.settings.storage} ignores conditional writes: two drivers "
                      f"of one spec cannot be kept from running a job twice")
        self.leases = lease.Keeper(self.me, on_error=lambda m: self.echo(f"lease: {m}"))

    def _on_signal(self, signum, frame) -> None:
        if self._stopping:  # a second stop: the jobs that are still stopping are killed now
            self._hurry = True
            return
        signals.raise_interrupted(signum, frame)

    def _cancel(self, exc: KeyboardInterrupt) -> int:
        """Stop every job: the running ones at a step boundary, the queued ones at once; every
        run this driver opened ends KILLED. Returns the exit code (128 + the signal)."""
        self._stopping = True
        name = "SIGTERM" if signals.signum_of(exc) == signal.SIGTERM else "interrupted"
        self.echo(f"{name}: stopping jobs, keeping what was saved")
        self._stop([s for s in self.jobs.values() if s.status == "running"], "killed",
                   "cancelled")
        queued = [s for s in self.jobs.values() if s.status == "queued"]
        if queued:
            self.admission.started.remote([self._ticket(s) for s in queued])  # withdrawn
        for state in queued:
            self._finish(state, "killed", "cancelled while queued")
        for state in [s for s in self.jobs.values() if s.status == "restarting"]:
            self._finish(state, "killed", "cancelled while waiting to restart")
        self._drain_tracking()
        if self.parent_run is not None:
            self._publish_progress()
            self.tracker.finish(self.parent_run, "KILLED")
        return signals.exit_code(exc)

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
                state.run_opened = self._tracking.submit(self._open_run, state, True)
        handover: dict[str, Any] = {}
        for state in queued:
            idle = next((i for i, (shape, _) in enumerate(self._idle)
                         if shape == self._shape(state)), None)
            if idle is not None:
                handover[self._ticket(state)] = self._idle.pop(idle)[1]
        granted: set[str] = set()
        # Launched on an actor that has not yet said it holds its resources: their grants are
        # named as held, or admission lets them go (as it does those of a driver that died).
        holding = [self._ticket(s) for s in self.jobs.values()
                   if s.status == "running" and not s.alive]
        if queued or holding:
            asks = [(self._ticket(s), s.planned.job.resources.priority,
                     admission.request(s.planned.job.resources))
                    for s in queued if self._ticket(s) not in handover]
            takes = [(self._ticket(s), s.planned.job.resources.priority)
                     for s in queued if self._ticket(s) in handover]
            try:
                granted = set(ray.get(self.admission.ask.remote(asks, takes, holding),
                                      timeout=30))
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

    def _ready(self) -> None:
        """Jobs whose inputs are all there (again after cache hits: their dependents) are
        cache hits, or queued once this driver holds their lease, or watched while another
        driver runs them. Their lookups go out on threads: each is a request or three."""
        tried: set[str] = set()
        while ready := [s for s in self._waiting_to_settle() if s.name not in tried]:
            def settle(state: JobState) -> None:
                cached = self._cached(state)
                if cached is not None:
                    self._cache_hit(state, cached)
                else:
                    self._claim(state)

            tried.update(s.name for s in ready)
            list(self._lookups.map(lambda state: self._tolerant(state, settle), ready))
        self._give_up_on_storage()

    def _waiting_to_settle(self) -> list[JobState]:
        """Jobs whose inputs are all there that are not yet cached, queued or watched."""
        return [s for s in self.jobs.values() if s.status == "pending" and all(
            self.jobs[d].status in ("finished", "cached") for d in s.planned.deps)]

    def _loop(self) -> None:
        with ThreadPoolExecutor(8, thread_name_prefix="lookup") as self._lookups:
            while True:
                self._ready()
                self._admit()
                self._restart_due()
                self._lost_leases()
                running = {s.ref: s for s in self.jobs.values() if s.status == "running"}
                if not running:
                    if (any(s.status in ("queued", "elsewhere", "restarting")
                            for s in self.jobs.values())
                            or self._waiting_to_settle()):  # storage away for a moment
                        self._publish_progress(now=False)
                        time.sleep(POLL_S)  # the cluster is full, or another driver runs them
                        self._watch_elsewhere()
                        continue
                    return
                done, rest = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                if done and rest:  # and every other job that has ended meanwhile
                    done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                for ref in done:
                    self._collect(running[ref])
                self._check_timeouts()
                self._poll_progress()
                self._watch_elsewhere()
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
