"""The Ray driver: stage data, look up the cache, launch one actor per job, watch, retry.

A job is ready as soon as every job it reads has finished, and starts when the cluster has
room for it: `orchestrator/admission.py` decides, by priority, across all pipelines. Before a
ready job is queued the driver takes its lease (`orchestrator/lease.py`): one writer per job,
whichever driver or machine runs it; a job another driver runs is waited for. Progress comes
from the actors' `progress()` method, polled a few times a second, never from their output.

A stop (SIGINT, or SIGTERM from a batch scheduler) asks every running job to stop at its next
step boundary, marks every run KILLED and exits 128 + the signal's number.

The job runs' lifecycle is `orchestrator/runs.py`'s, the progress display
`orchestrator/progress.py`'s.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from mlflow.exceptions import MlflowException
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError,
                            RayActorError, RayTaskError)
from tqdm import tqdm

from orchestrator import admission, datasets, lease, signals, usage
from orchestrator.actor import JobActor
from orchestrator.sweep import split_label
from orchestrator.sweeping import Sweeper, sweep_uri
from orchestrator.checkpoints import CheckpointError, pin_checkpoint, resolve_checkpoint_uri
from orchestrator.plan import (Plan, PlannedJob, build_plan, check_uri_references, is_uri,
                               resolve_checkpoint, resolve_inputs, stages_data)
from orchestrator.progress import Progress
from orchestrator.runs import RESULT, JobRuns, job_prefix, run_params
from orchestrator.settings import ServiceError, Settings
from orchestrator.spec import SpecError, metric_mode, model_needs_labels
from orchestrator.storage import NotFound, Storage, StorageError, open_storage
from orchestrator.submit import SUBMISSION_ENV
from orchestrator.task import Task, WorkersLost
from orchestrator.tracking import Tracker, system_metrics_interval, ui_url

STOP_GRACE_S = 30.0  # how long a stopped job may take to save its checkpoint
POLL_S = 1.0  # progress polls and the loop's reaction time; each poll is an RPC to every actor
WATCH_S = 2.0  # how often a job that another driver runs is looked at
STORAGE_PATIENCE_S = 300.0  # a job whose lookups fail this long (storage away) fails
RESTART_BACKOFF_S = 2.0  # a job that lost its storage restarts after 2, 4, 8 ... s
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


@dataclass
class JobState:
    planned: PlannedJob
    # pending | queued (ready, its lease held, waiting for room) | elsewhere (another driver
    # runs it) | running | restarting (on its actor, once storage has had time to come back)
    # | sweeping (a swept job whose trials run) | finished | cached | failed | skipped | killed
    # | pruned (a trial its sweep stopped early)
    status: str = "pending"
    actor: Any = None
    ref: Any = None
    restarts: int = 0
    retries: int = 0
    started: float = 0.0  # when its running attempt was launched (0.0: none is running)
    held_s: float = 0.0  # its ended attempts' wall time, launch to end (see orchestrator/usage.py)
    alive: bool = False  # its actor answered: it has its resources (else it is queued)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    taken: lease.Taken | None = None  # elsewhere: the lease of the driver that runs it
    unreachable_since: float | None = None  # its lookups have failed since (storage away)
    not_before: float = 0.0  # restarting: when it is launched again
    trial: tuple[str, int] | None = None  # a sweep's trial: (the sweep, its index)
    prune: str | None = None  # why the sweep asked this running trial to stop
    progress: dict[str, Any] = field(default_factory=dict)  # its actor's last report

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
        # handed to every job: 10 s unless set (bench/system_metrics.py measures the cost)
        self.system_metrics_s = system_metrics_interval()
        self.registry_errors: list[str] = []  # `register:` or `promote:` the registry refused
        self.runs = JobRuns(self.tracker, self.root, self.experiment, self._is_forced, echo)
        self.progress = Progress(self.tracker)
        self.jobs = {p.name: JobState(p) for p in plan.jobs}
        # a Ray job submitted by `genforge submit`: every run says which submission made it
        submission = os.environ.get(SUBMISSION_ENV)
        self.submission_tags = {"genforge.submission": submission} if submission else {}
        self._idle: list[tuple[tuple[float, float], Any]] = []  # finished jobs' actors, for reuse
        self._watched = 0.0  # when the jobs other drivers run were last looked at
        self._stopping = False  # a stop is under way: another signal only hurries it
        self._hurry = False
        self.leases: lease.Keeper | None = None  # see open_leases
        self.sweeps: dict[str, Sweeper] = {}  # the swept jobs whose trials run

    # ---- setup ------------------------------------------------------------------------------
    def prefix(self, planned: PlannedJob) -> str:
        return job_prefix(self.experiment, planned.job.name, planned.hash)

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
            lambda uri: resolve_checkpoint(uri, self.settings.s3, self.settings.tracking_uri)))
        self.plan = build_plan(spec, inputs)
        check_uri_references(self.plan)
        self._check_data()
        for p in self.plan.jobs:  # who reads what: `genforge data ls` and `data rm`
            if p.data_key is not None:
                datasets.note_reader(self.root, p.data_key, self.prefix(p))
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
        if state.planned.job.sweep is not None:  # its trials are the jobs that run
            state.status = "sweeping"  # (its Sweeper starts on the loop's thread)

    def _cache_hit(self, state: JobState, result: dict[str, Any], how: str = "cached") -> None:
        state.status, state.result = "cached", result
        self.echo(f"job '{state.name}': {how} ({state.planned.hash})")
        self._publish_model(state)

    def _publish_model(self, state: JobState) -> None:
        """`register:` and `promote:` of a job that has finished (or was cached), before its
        dependents start (an evaluation promotes what its sources registered). A registry that
        refuses leaves the job's result as it is; the pipeline ends failed, saying why."""
        job, run = state.planned.job, self.runs[state.name]
        if job.register_ is None and job.promote is None:
            return
        from orchestrator import models  # MLflow's model logging: only for the jobs that use it

        try:
            if job.register_ is not None:
                spec = job.register_
                version, new = models.register_job(
                    self.settings.tracking_uri, spec.name, spec.alias, state.planned.hash,
                    state.result, run.id, self.settings.s3)
                line = (f"{'registered' if new else 'already registered as'} {spec.name} "
                        f"version {version.version}" + (f" (@{spec.alias})" if spec.alias else ""))
                tags = {"genforge.registered": f"{spec.name}/{version.version}"}
            else:
                spec = job.promote
                scored = [(self._uri(state.planned, source["ref"]), source["metrics"][spec.metric])
                          for source in state.result["metrics"]["sources"]
                          if isinstance(source["metrics"].get(spec.metric), float)]
                line = models.promote(self.settings.tracking_uri, spec.name, spec.alias,
                                      spec.metric, metric_mode(spec.metric, spec.mode), scored,
                                      run.id)
                tags = {"genforge.promote": line}
        except (models.ModelError, MlflowException) as exc:
            line = f"{'register' if job.register_ else 'promote'}: {str(exc).splitlines()[0]}"
            self.registry_errors.append(f"job '{state.name}': {line}")
            tags = {"genforge.registry_error": line}
        self.echo(f"job '{state.name}': {line}")
        if run.id:
            self.runs.tag(state.name, tags)

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
                self.runs[state.name].adopt = True
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
                self.runs[state.name].adopt = True
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
        base, trial = split_label(ref)
        if trial is not None and ref not in self.jobs:  # a trial of a sweep cached whole
            return sweep_uri(self.jobs[base].result, trial) or ""
        upstream = self.jobs[ref]
        return upstream.result.get("checkpoint") or self.root.uri(self.prefix(upstream.planned))

    def _launch(self, state: JobState, actor: Any = None) -> None:
        """Start the job's next attempt, on `actor` (an idle one of the same resources) or on a
        new one."""
        p = state.planned
        run = self.runs.launch(p)
        reused = actor is not None
        task = Task(
            job=p.job.resolved(), job_hash=p.hash, experiment=self.experiment,
            storage_root=self.settings.storage, prefix=self.prefix(p),
            tracking_uri=self.settings.tracking_uri, run_id=run.id,
            artifact_uri=run.artifact_uri, params={} if run.params_logged else run_params(p),
            code_version=p.code, sources=tuple(self._uri(p, ref) for ref in p.job.sources),
            data_key=p.data_key, refs={field: self._uri(p, ref) for field, ref in p.job.references},
            attempt=run.attempt, launched=time.time(), s3=self.settings.s3,
            system_metrics_s=self.system_metrics_s,
        )
        if actor is None:
            r = p.job.resources
            # a data-parallel job's actor only coordinates: Ray Train reserves its workers
            parallel = r.workers > 1
            actor = ray.remote(JobActor).options(
                num_cpus=0 if parallel else r.cpus, num_gpus=0 if parallel else r.gpus,
                max_concurrency=4, max_restarts=0,
                name=f"genforge:{self.experiment}:{p.name}:{run.id[:8]}:{run.attempt}",
                namespace="genforge",
            ).remote()
        state.actor = actor
        state.ref = actor.run.remote(task)
        state.status, state.started = "running", time.monotonic()
        # An actor that ran a job before holds its resources: it is first asked for progress
        # once the job has run for POLL_S. A new one is asked at once, to learn that it holds
        # them (a data-parallel job's workers are placed anew each time).
        state.alive = reused and p.job.resources.workers == 1
        self.progress.launched(state, len(self.jobs))
        self.echo(f"job '{p.name}': started (attempt {run.attempt}, run {run.id})")
        self.progress.show(p.name, f"attempt {run.attempt}" if run.attempt > 1 else "starting")

    # ---- watching ---------------------------------------------------------------------------
    def _poll_progress(self) -> None:
        """The actors' progress reports (see `Progress.poll`), and what they say of the
        resources their jobs hold."""
        for state, prog in self.progress.poll(
                [s for s in self.jobs.values() if s.status == "running"], POLL_S):
            # It holds its resources, and admission's books can let go: a job's own actor holds
            # them once it answers at all (Ray placed it), even while it still imports its
            # family's worker, which takes seconds in a cold process; a data-parallel job's
            # actor holds none, its workers hold them once it is past "starting" and "queued".
            holds = (state.planned.job.resources.workers == 1
                     or prog.get("phase") not in ("queued", "starting"))
            if prog:
                state.progress = prog
            if not state.alive and prog and holds:
                state.alive = True
                self.admission.started.remote([self._ticket(state)])

    def _publish_progress(self, now: bool = True) -> None:
        self.progress.publish(self.jobs.values(), self.runs.parent, now)

    def _finish(self, state: JobState, status: str, error: str | None = None,
                keep_actor: bool = False) -> None:
        """Record the job's end; its actor is killed, or kept idle for the next job of the same
        resources (`keep_actor`)."""
        state.status, state.error = status, error
        self._attempt_ended(state)
        if state.held_s:
            self.runs.metrics(state.name, self._hours(state))
        if status == "finished":
            self._publish_model(state)
        self.runs.finish(state.planned, status, error)
        if state.actor is not None:
            if keep_actor:
                self._idle.append((self._shape(state), state.actor))
            else:
                ray.kill(state.actor, no_restart=True)
            state.actor = None
            self.admission.started.remote([self._ticket(state)])  # what it holds is in Ray's view
        if self.leases is not None:
            self.leases.release(state.name)  # its result is written: a waiting driver finds it
        self.progress.ended(state.name, status if not error else f"{status}: {error[:60]}")
        if status != "failed":
            self.echo(f"job '{state.name}': {status}" + (f" ({error})" if error else ""))
        else:
            self.echo(f"job '{state.name}' failed: {error}")
            for name in self.plan.dependents(state.name):
                if self.jobs[name].status == "pending":
                    self.jobs[name].status = "skipped"
                    self.jobs[name].error = f"upstream job '{state.name}' failed"

    def _attempt_ended(self, state: JobState) -> None:
        """The attempt that has just ended (its actor returned, failed or was stopped) adds
        its wall time to the job's, once."""
        if state.started:
            state.held_s += time.monotonic() - state.started
            state.started = 0.0

    @staticmethod
    def _hours(state: JobState) -> dict[str, float]:
        return usage.job_hours(state.planned.job.resources.model_dump(), state.held_s)

    def _log_hours(self) -> None:
        """The pipeline's run, as it ends: the device and CPU hours its jobs held, by family
        and kind and in all."""
        self.tracker.log_metrics(self.runs.parent, usage.pipeline_hours(
            (s.planned.job.family or s.planned.job.kind, s.planned.job.kind, self._hours(s))
            for s in self.jobs.values() if s.held_s))

    def _end_pipeline_run(self, status: str) -> None:
        """The pipeline's run ends `status`, its jobs' hours and its picture logged first."""
        self._log_hours()
        self._log_picture()
        self.tracker.finish(self.runs.parent, status)

    def _log_picture(self) -> None:
        """The pipeline's run, as it ends: a picture of its jobs, what each reads and how it
        ended (`pipeline.png`; a swept job's box counts its trials by state)."""
        from orchestrator import dag

        trials: dict[str, Counter[str]] = defaultdict(Counter)
        for s in self.jobs.values():
            if s.trial is not None:
                trials[s.trial[0]][s.status] += 1
        nodes = [dag.Node(s.name, s.planned.job.kind, s.planned.job.family, s.status,
                          s.planned.deps, "trials: " + ", ".join(
                              f"{n} {state}" for state, n in sorted(trials[s.name].items()))
                          if s.name in trials else "")
                 for s in self.jobs.values() if s.trial is None]
        try:
            self.tracker.client.log_image(self.runs.parent, dag.draw(nodes), "pipeline.png")
        except MlflowException as exc:  # a picture is no reason for the pipeline to fail
            self.echo(f"pipeline.png not logged: {str(exc).splitlines()[0][:200]}")

    def _collect(self, state: JobState) -> None:
        self._attempt_ended(state)
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
            self.runs.tag(state.name, {"genforge.tracking_lost": lost[:4000]})
        if result.get("status") == "stopped":
            if state.prune is not None:
                return self._finish(state, "pruned", state.prune)
            return self._finish(state, "killed", f"stopped at step {result['step']}")
        self._finish(state, "finished", keep_actor=True)

    def prune(self, state: JobState, reason: str) -> None:
        """Ask a running trial to stop (its sweep's pruner says so): it saves its checkpoint at
        its next step and ends `pruned`."""
        state.prune = reason
        self.echo(f"job '{state.name}': {reason}; stopping it")
        state.actor.stop.remote()

    def finish(self, state: JobState, status: str, error: str | None = None) -> None:
        """A job's end that is not its actor's (a sweep's, once its trials have ended)."""
        self.sweeps.pop(state.name, None)
        self._finish(state, status, error)

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
        try:
            self.admission = admission.connect()
            self.runs.open_pipeline({"genforge.spec": self.plan.spec.source,
                                     "genforge.code_version": self.plan.code_version},
                                    self._ray_jobs.ended)
            self.echo("pipeline run: " + ui_url(self.settings.tracking_uri,
                                                self.runs.experiment_id, self.runs.parent))
            self._loop()
        except KeyboardInterrupt as exc:
            return self._cancel(exc)
        finally:
            self.leases.close()
        self.runs.drain()
        self._publish_progress()
        # a trial that failed is its sweep's business: the sweep fails if none finished
        failed = [s for s in self.jobs.values()
                  if s.status in ("failed", "skipped", "killed") and s.trial is None]
        for line in self.registry_errors:
            self.echo(line)
        self._end_pipeline_run("FAILED" if failed else "FINISHED")
        self._report()
        return 1 if failed or self.registry_errors else 0

    @property
    def driver_tags(self) -> dict[str, str]:
        """What every run this driver opens or adopts says of it: its submission, and its Ray
        job (so that a later driver can close the runs it leaves open if it dies)."""
        mine = {"genforge.driver": f"{self.me.ray_job}@{self.me.gcs}"} if self.me.ray_job else {}
        return {**self.submission_tags, **mine}

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
        self.runs.driver_tags = self.driver_tags

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
        for state in [s for s in self.jobs.values() if s.status == "sweeping"]:
            self.finish(state, "killed", "cancelled; its study resumes in a later run")
        self.runs.drain()
        if self.runs.parent is not None:
            self._publish_progress()
            self._end_pipeline_run("KILLED")
        return signals.exit_code(exc)

    def _ticket(self, state: JobState) -> str:
        return f"{self.runs.parent}/{state.name}"

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
        self.runs.open_ahead([s.planned for s in queued])
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
                self._sweep()
                self._ready()
                self._admit()
                self._restart_due()
                self._lost_leases()
                running = {s.ref: s for s in self.jobs.values() if s.status == "running"}
                if not running:
                    if (any(s.status in ("queued", "elsewhere", "restarting", "sweeping")
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

    def _sweep(self) -> None:
        """The sweeps' turn: a sweep this driver now holds starts (or resumes its study); each
        running one tells its study what its trials did and starts the next ones."""
        for state in [s for s in self.jobs.values() if s.status == "sweeping"]:
            if state.name not in self.sweeps:
                self.sweeps[state.name] = Sweeper(self, state)
        for sweeper in list(self.sweeps.values()):
            sweeper.tick()

    def _report(self) -> None:
        for state in self.jobs.values():
            extra = state.result.get("checkpoint") or ", ".join(state.result.get("outputs", []))
            line = f"  {state.name:<16} {state.status:<9} {state.planned.hash}"
            if state.error:
                line += f"  {state.error}"
            elif extra:
                line += f"  {extra}"
            self.echo(line)
