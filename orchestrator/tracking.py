"""MLflow tracking: the driver creates experiments and runs; workers log to an explicit run id.

Workers log through `RunLogger`, which buffers metrics and sends them with `log_batch` from a
background thread, so the training loop never waits on the tracking server; `system_metrics`
adds MLflow's own CPU, memory and GPU sampling to a job's run.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import tempfile
import threading
import time
from typing import Any, Mapping

from mlflow.entities import Metric, Param, RunInfo, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

# MLflow prints a "View run" URL to stdout whenever a run ends; the driver prints its own summary.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

log = logging.getLogger(__name__)

TAG_PREFIX = "genforge."
BATCH_LIMIT = 1000  # MLflow's limit of values (metrics, params and tags) per log_batch
PARAM_LIMIT = 100  # ...and of params, and of tags
JOB_TRIES = 3  # tries of an image or tag upload before it is dropped
# MLflow 3's UI opens an experiment by this tag: its GenAI view (traces, prompts) for
# "genai_development", the training view (runs, metric charts) for "custom_model_development";
# an experiment without it is guessed from what it holds (traces, runs; none yet: no kind).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# ...but where its sidebar has the GenAI / Model training switch (3.17), the page's own
# `workflowType` query parameter decides (else the browser's last choice, else GenAI), and the
# tag is not read: the links genforge prints carry the parameter (`ui_url`).
TRAINING_VIEW = "workflowType=machine_learning"
SYSTEM_METRICS_ENV = "GENFORGE_SYSTEM_METRICS_INTERVAL"


def ui_url(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None
           ) -> str:
    """The MLflow UI's page of the experiments, an experiment or one of its runs, in its
    model-training view; the tracking URI itself where it is no web server (sqlite, a folder)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    page = "experiments"
    if experiment_id:
        page += f"/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{tracking_uri.rstrip('/')}/#/{page}?{TRAINING_VIEW}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def batches(metrics: list[Metric], params: list[Param], tags: list[RunTag]
            ) -> list[tuple[list[Metric], list[Param], list[RunTag]]]:
    """What `log_batch` requests send, in order, within MLflow's limits per request (none if
    there is nothing to send)."""
    out, i = [], 0
    while i < len(metrics) or params or tags:
        some_params, some_tags = params[:PARAM_LIMIT], tags[:PARAM_LIMIT]
        room = BATCH_LIMIT - len(some_params) - len(some_tags)
        out.append((metrics[i:i + room], some_params, some_tags))
        i, params, tags = i + room, params[PARAM_LIMIT:], tags[PARAM_LIMIT:]
    return out


class Tracker:
    """Driver-side MLflow access: experiments, the pipeline's parent run, one child run a job."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def experiment_id(self, name: str) -> str:
        """The experiment `name`, made (or restored) if need be, tagged to open in MLflow's
        model-training view; an experiment made before genforge tagged them is tagged now, one
        whose kind a user chose keeps it."""
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, tags={KIND_TAG: KIND})
            except MlflowException:  # created concurrently by another driver
                found = self.client.get_experiment_by_name(name)
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        if KIND_TAG not in found.tags:
            self.client.set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
        return found.experiment_id

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str],
                  params: dict[str, str] | None = None, parent_id: str | None = None) -> RunInfo:
        """A new run, RUNNING (MLflow's default), with its tags; and its params, if given (a
        request of their own)."""
        all_tags = dict(tags)
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(experiment_id, run_name=name, tags=all_tags)
        self.log(run.info.run_id, params=params or {})
        return run.info

    def log(self, run_id: str, params: dict[str, str] | None = None,
            tags: dict[str, str] | None = None) -> None:
        """Params and tags in as few requests as MLflow's limits allow (none if both are empty).
        A param logged again with the same value is no change."""
        for _, some_params, some_tags in batches(
                [], [Param(k, v) for k, v in (params or {}).items()],
                [RunTag(k, str(v)) for k, v in (tags or {}).items()]):
            self.client.log_batch(run_id, params=some_params, tags=some_tags)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.log(run_id, tags=tags)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                               for k, v in metrics.items()])

    def unfinished_runs(self, experiment_id: str, job: str | None = None
                        ) -> dict[tuple[str, str], Any]:
        """The newest unfinished (RUNNING, SCHEDULED, FAILED or KILLED) job run of each (job
        name, hash), of every job or of `job`: a job that runs again resumes in it. (Two jobs
        of a spec that differ only in name have the same hash, but not the same runs.) One
        search for the whole pipeline."""
        found: dict[tuple[str, str], Any] = {}
        query = "attributes.status != 'FINISHED'"
        if job is not None:
            query += f" and tags.`genforge.job` = '{job}'"  # job names are [a-z0-9-]
        token = None
        while True:
            page = self.client.search_runs(
                [experiment_id], filter_string=query,
                order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
            for run in page:
                tags = run.data.tags
                if run.info.status != "FINISHED" and "genforge.job" in tags:
                    found.setdefault((tags["genforge.job"], tags.get("genforge.hash", "")), run)
            token = page.token
            if not token:
                return found

    def open_runs(self, experiment_id: str) -> list[Any]:
        """The experiment's runs that say RUNNING or SCHEDULED."""
        return [run for status in ("RUNNING", "SCHEDULED") for run in self.client.search_runs(
            [experiment_id], filter_string=f"attributes.status = '{status}'", max_results=5000)]

    def set_status(self, run_id: str, status: str) -> None:
        """One request. (`MlflowClient.update_run` reads the run first, to send its name and
        end time back unchanged: the server leaves both as they are when they are not sent.)"""
        self.client._tracking_client.store.update_run_info(
            run_id, RunStatus.from_string(status), end_time=None, run_name=None)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)



class RunLogger:
    """Worker-side logger for one run. `log_metrics`, `log_image` and `log_file` return at once;
    a background thread sends metrics and tags in batches every `flush_s` seconds and uploads
    images and files."""

    def __init__(self, tracking_uri: str, run_id: str, *, artifact_uri: str | None = None,
                 flush_s: float = 5.0):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        # Files go straight to the run's artifact root when the driver passed it on: the
        # client would otherwise ask the server for the run first (a request per job).
        self._artifacts = (get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
                           if artifact_uri else None)
        self.flush_s = flush_s
        self._metrics: list[Metric] = []
        # metrics taken out of `_metrics` by a flush whose requests have not all succeeded:
        # one list per flush, emptied from the front as its requests are acknowledged
        self._in_flight: list[list[Metric]] = []
        self._tags: dict[str, str] = {}  # sent with the metrics: one request for both
        self._params: dict[str, str] = {}  # likewise
        self._lock = threading.Lock()
        # One flush at a time (the logger's thread, a checkpoint upload's, `deliver`): points
        # reach the run in the order they were logged, so the run's highest step says that
        # every earlier point arrived (what a resumed attempt relies on, see `last_logged_step`).
        self._sending = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._error: Exception | None = None
        self.dropped: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def last_logged_step(self, key: str) -> int:
        """The highest step of `key` already in the run (0 if none): a resumed attempt logs
        only after it, so the run's history has no step twice."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self._metrics.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def log_points(self, points: list[list]) -> None:
        """Metric points as `unsent` lists them ([key, value, timestamp_ms, step]), sent again
        with their own time and step (e.g. a resumed job's, saved in its checkpoint)."""
        with self._lock:
            self._metrics.extend(Metric(str(k), float(v), int(ts), int(step))
                                 for k, v, ts, step in points)

    def unsent(self) -> list[Metric]:
        """The metric points the server has not acknowledged: those in a request being sent,
        then those buffered, in order."""
        with self._lock:
            return [m for flight in self._in_flight for m in flight] + list(self._metrics)

    def lost(self) -> list[str]:
        """After `close`: what never reached the run, one line each (empty if nothing)."""
        with self._lock:
            metrics, params, tags = list(self._metrics), dict(self._params), dict(self._tags)
        why = f"{type(self._error).__name__}: {self._error}" if self._error else "not sent"
        why = " ".join(why.split())[:200]
        out = []
        if metrics:
            steps = [m.step for m in metrics]
            out.append(f"{len(metrics)} metric points of steps {min(steps)}..{max(steps)}: {why}")
        if params or tags:
            out.append(f"{len(params)} params and {len(tags)} tags: {why}")
        return out + list(self.dropped)

    def log_image(self, image, key: str, step: int) -> None:
        """`image`: HxWxC uint8 numpy array."""
        self._jobs.put((lambda: self.client.log_image(self.run_id, image, key=key, step=step), 0,
                        f"image '{key}' of step {step}"))

    def log_file(self, data: bytes, path: str) -> None:
        """`data` as the run's artifact `path` (e.g. "outputs/grid.png")."""
        self._jobs.put((lambda: self._log_bytes(data, path), 0, f"file {path}"))

    def _log_bytes(self, data: bytes, path: str) -> None:
        directory, _, name = path.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="genforge-artifact-") as tmp:
            local = os.path.join(tmp, name)
            with open(local, "wb") as f:
                f.write(data)
            if self._artifacts is not None:
                self._artifacts.log_artifact(local, directory or None)
            else:
                self.client.log_artifact(self.run_id, local, directory or None)

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self._tags.update((k, str(v)) for k, v in tags.items())

    def log_params(self, params: dict[str, str]) -> None:
        """Sent with the next metrics, like tags."""
        with self._lock:
            self._params.update((k, str(v)) for k, v in params.items())

    def flush_metrics(self) -> bool:
        """Send the buffered metrics now (from any thread); False if the server is away, in
        which case they stay buffered for the next try."""
        try:
            self._flush_metrics()
            return True
        except Exception:
            return False

    def deliver(self, timeout: float) -> bool:
        """Send every metric point logged so far, trying again for up to `timeout` seconds
        while the server is away; whether none is left unsent (buffered or in flight)."""
        deadline = time.monotonic() + timeout
        while True:
            self.flush_metrics()
            if not self.unsent():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)

    def _flush_metrics(self) -> None:
        with self._sending:
            self._send_buffered()

    def _send_buffered(self) -> None:
        with self._lock:
            pending, self._metrics = self._metrics, []
            tags, self._tags = self._tags, {}
            params, self._params = self._params, {}
            flight = list(pending)
            self._in_flight.append(flight)
        requests = batches(pending, [Param(k, v) for k, v in params.items()],
                           [RunTag(k, v) for k, v in tags.items()])
        try:
            for n, (some_metrics, some_params, some_tags) in enumerate(requests):
                try:
                    self.client.log_batch(self.run_id, metrics=some_metrics, params=some_params,
                                          tags=some_tags)
                except Exception:
                    rest = requests[n:]
                    with self._lock:  # kept, in order, for the next flush
                        self._metrics[:0] = [m for r in rest for m in r[0]]
                        self._params = {**{p.key: p.value for r in rest for p in r[1]}, **self._params}
                        self._tags = {**{t.key: t.value for r in rest for t in r[2]}, **self._tags}
                        flight.clear()
                    raise
                with self._lock:
                    del flight[:len(some_metrics)]
        finally:
            with self._lock:
                self._in_flight = [f for f in self._in_flight if f is not flight]

    def _drain_jobs(self) -> None:
        retry = []
        while True:
            try:
                job, tries, what = self._jobs.get_nowait()
            except queue.Empty:
                break
            try:
                job()
            except Exception as exc:
                if tries + 1 < JOB_TRIES:
                    retry.append((job, tries + 1, what))
                else:
                    self.dropped.append(" ".join(f"{what}: {type(exc).__name__}: {exc}".split())[:200])
        for item in retry:
            self._jobs.put(item)

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            self._run_safely()
        for _ in range(JOB_TRIES):  # the final flush, with the same retries
            self._run_safely()
            if self._error is None and self._jobs.empty():
                break
            time.sleep(1)

    def _run_safely(self) -> None:
        # The tracking server may be away for a while (restart, storage behind it): metrics
        # stay buffered and images are retried; training never waits on it.
        self._error = None
        try:
            self._flush_metrics()
        except Exception as exc:
            self._error = exc
        self._drain_jobs()

    def close(self) -> None:
        """Send everything still buffered; raises if metrics could not be sent. Images and
        files that failed every try are listed in `dropped`, not raised; `lost` lists all
        that never arrived."""
        self._stop.set()
        self._thread.join(timeout=180)
        if self._error is not None:
            raise RuntimeError(f"logging to MLflow failed: {self._error}") from self._error


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def system_metrics_interval(environ: Mapping[str, str] | None = None,
                            default: float = 10.0) -> float:
    """The seconds between samples of the machine in a job's run: GENFORGE_SYSTEM_METRICS_INTERVAL
    as the driver sees it (default 10; 0 turns them off). The driver hands it to each job."""
    raw = (os.environ if environ is None else environ).get(SYSTEM_METRICS_ENV)
    if not raw:
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        _warn_once(f"{SYSTEM_METRICS_ENV}={raw!r} is not a number of seconds: system metrics "
                   f"are sampled every {default:g} s")
        return default


def system_metrics(tracking_uri: str, run_id: str, interval: float, *,
                   resume: bool = False) -> Any:
    """MLflow's system metrics for a job's run, sampled in the worker's process every
    `interval` seconds, started; its `finish()` stops it and sends what it sampled. None when
    they are off (`interval` 0), or cannot be had: watching the machine never fails a job.

    MLflow's `SystemMetricsMonitor` logs `system/cpu_utilization_percentage`,
    `system/system_memory_usage_megabytes` and the like: of the node, not of the job alone.
    GPUs are sampled through NVML when nvidia-ml-py is installed (the `gpu` extra): e.g.
    `system/gpu_0_utilization_percentage`. Without psutil there are none (one warning).
    MLflow's own MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, if set, overrides the interval.

    The monitor is given the run's tracking URI: it would otherwise log to MLflow's
    process-wide default. It looks the run up once an interval and ends by itself once the
    run is no longer RUNNING or the server cannot be reached. A `resume`d attempt continues
    the steps of the run's system metrics rather than logging from step 0 again."""
    if interval <= 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:  # psutil (MLflow's CPU and memory sampling needs it)
        _warn_once(f"no system metrics in MLflow: {exc} (pip install psutil)")
        return None
    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval,
                                       resume_logging=resume, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001
        log.warning("no system metrics for run %s: %s: %s", run_id, type(exc).__name__, exc)
        return None
