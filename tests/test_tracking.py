"""The worker's MLflow logger against a real (sqlite) tracking store, and MLflow's telemetry,
which genforge's processes leave off unless asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import RunLogger, Tracker
from support import offline_driver

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def no_lookup(*args, **kwargs):
    raise AssertionError("the run was looked up")


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    experiment = tracker.client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    return uri, tracker.start_run(experiment, "job", {"genforge.job": "job"}, {"seed": "1"})


def test_a_jobs_file_goes_to_the_runs_artifact_root_without_looking_the_run_up(run, tmp_path):
    uri, info = run
    log = RunLogger(uri, info.run_id, artifact_uri=info.artifact_uri, flush_s=60)
    log.client._tracking_client.get_run = no_lookup
    log.log_file(PNG, "outputs/grid.png")
    log.log_metrics({"sample_s_per_image": 0.25}, 0)
    log.close()
    assert log.dropped == []
    client = MlflowClient(uri)
    assert [f.path for f in client.list_artifacts(info.run_id, "outputs")] == ["outputs/grid.png"]
    got = client.download_artifacts(info.run_id, "outputs/grid.png", str(tmp_path / "down"))
    assert Path(got).read_bytes() == PNG
    assert client.get_run(info.run_id).data.metrics == {"sample_s_per_image": 0.25}


def test_without_the_artifact_root_the_logger_asks_for_the_run(run):
    uri, info = run
    log = RunLogger(uri, info.run_id, flush_s=60)
    log.client._tracking_client.get_run = no_lookup
    log.log_file(PNG, "outputs/grid.png")
    log.close()
    assert len(log.dropped) == 1 and "looked up" in log.dropped[0]


def counting_batches(log: RunLogger) -> list[dict]:
    """The logger's log_batch requests, as it sends them (and they still go through)."""
    calls, send = [], log.client.log_batch

    def log_batch(run_id, metrics=(), params=(), tags=()):
        calls.append({"metrics": len(metrics), "params": len(params), "tags": len(tags)})
        send(run_id, metrics=metrics, params=params, tags=tags)

    log.client.log_batch = log_batch
    return calls


def test_params_left_to_the_worker_go_with_its_metrics_in_one_request(run):
    uri, info = run
    log = RunLogger(uri, info.run_id, artifact_uri=info.artifact_uri, flush_s=60)
    calls = counting_batches(log)
    log.log_params({"sample.steps": "20", "seed": "1"})  # "seed" is the run's already
    log.set_tags({"genforge.node": "n1"})
    log.log_metrics({"sample_s_per_image": 0.5, "num_images": 64}, 0)
    log.close()
    assert calls == [{"metrics": 2, "params": 2, "tags": 1}]
    data = MlflowClient(uri).get_run(info.run_id).data
    assert data.params == {"seed": "1", "sample.steps": "20"}
    assert data.tags["genforge.node"] == "n1" and data.metrics["num_images"] == 64


def test_params_and_tags_past_mlflows_limits_are_split_across_requests(run):
    uri, info = run
    log = RunLogger(uri, info.run_id, flush_s=60)
    calls = counting_batches(log)
    log.log_params({f"p{i:03d}": str(i) for i in range(150)})
    log.set_tags({f"t{i:03d}": str(i) for i in range(120)})
    log.log_metrics({f"m{i:03d}": float(i) for i in range(900)}, 0)
    log.close()
    # at most 100 params, 100 tags and 1000 values in all per request
    assert calls == [{"metrics": 800, "params": 100, "tags": 100},
                     {"metrics": 100, "params": 50, "tags": 20}]
    data = MlflowClient(uri).get_run(info.run_id).data
    assert len(data.params) == 151 and len(data.metrics) == 900
    assert len([k for k in data.tags if k.startswith("t")]) == 120


def test_what_a_failed_request_held_is_kept_for_the_next_flush(run):
    uri, info = run
    log = RunLogger(uri, info.run_id, flush_s=60)
    calls, send = [], log.client.log_batch

    def log_batch(run_id, metrics=(), params=(), tags=()):
        calls.append(len(metrics))
        if len(calls) == 2:
            raise ConnectionError("the tracking server is away")
        send(run_id, metrics=metrics, params=params, tags=tags)

    log.client.log_batch = log_batch
    log.log_params({f"p{i:03d}": str(i) for i in range(150)})
    log.set_tags({"genforge.node": "n1"})
    log.log_metrics({f"m{i:03d}": float(i) for i in range(1000)}, 0)
    assert log.flush_metrics() is False  # the first request went, the second did not
    assert log.flush_metrics() is True  # the rest, on the next flush
    log.close()
    assert calls == [899, 101, 101]
    data = MlflowClient(uri).get_run(info.run_id).data
    assert len(data.params) == 151 and len(data.metrics) == 1000
    assert data.tags["genforge.node"] == "n1"


def test_a_run_opened_at_launch_is_running_and_one_opened_ahead_is_scheduled_with_params(tmp_path):
    driver = offline_driver(tmp_path, [
        {"name": f"s{i}", "kind": "sample", "family": "ddpm", "from": "s3://b/x/y/z",
         "sample": {"steps": 7}} for i in range(3)])
    client = driver.tracker.client
    at_launch, ahead, failed = (driver.jobs[f"s{i}"] for i in range(3))

    opened = driver.runs.open(at_launch.planned, ahead=False)
    run = client.get_run(opened.info.run_id)
    assert (opened.status, opened.params_logged, run.info.status) == ("RUNNING", False, "RUNNING")
    assert run.data.params == {} and run.data.tags["genforge.attempt"] == "1"

    opened = driver.runs.open(ahead.planned, ahead=True)
    run = client.get_run(opened.info.run_id)
    assert (opened.status, opened.params_logged, run.info.status) == ("SCHEDULED", True, "SCHEDULED")
    assert run.data.params["sample.steps"] == "7" and run.data.params["kind"] == "sample"

    # a job whose worker never sent the params (it died first): they go with its error
    opened = driver.runs.open(failed.planned, ahead=False)
    driver.runs[failed.name].id, failed.status = opened.info.run_id, "running"
    driver._finish(failed, "failed", "worker died 4 times")
    driver.runs.drain()
    run = client.get_run(opened.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["genforge.error"] == "worker died 4 times"
    assert run.data.params["sample.steps"] == "7"


def telemetry_client(code: str, **env: str) -> str:
    # A clean environment: MLflow turns its telemetry off by itself under CI or pytest.
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    out = subprocess.run(
        [sys.executable, "-c", code + "; from mlflow.telemetry import get_telemetry_client; "
         "print(get_telemetry_client() is not None)"],
        env={**base, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_mlflow_telemetry_is_off_in_genforge_processes_unless_asked_for():
    assert telemetry_client("import mlflow") == "True"  # MLflow's own default
    assert telemetry_client("import orchestrator, mlflow") == "False"
    assert telemetry_client("import workers.base") == "False"
    assert telemetry_client("import orchestrator, mlflow", MLFLOW_DISABLE_TELEMETRY="false") == "True"


def test_unsent_metrics_are_the_buffered_and_the_in_flight_ones_and_what_is_lost_is_said(run):
    import threading

    uri, info = run
    log = RunLogger(uri, info.run_id, flush_s=60)
    sending, release = threading.Event(), threading.Event()

    def log_batch(run_id, metrics=(), params=(), tags=()):
        sending.set()
        release.wait(30)
        raise ConnectionError("the tracking server is away")

    log.client.log_batch = log_batch
    log.log_metrics({"loss": 0.5, "lr": 1e-3}, 1)
    log.log_metrics({"loss": 0.25, "lr": 1e-3}, 2)
    flush = threading.Thread(target=log.flush_metrics)
    flush.start()
    assert sending.wait(30)
    log.log_metrics({"loss": 0.125}, 3)  # buffered while steps 1 and 2 are in flight
    points = sorted((m.step, m.key, m.value) for m in log.unsent())
    assert points == [(1, "loss", 0.5), (1, "lr", 1e-3), (2, "loss", 0.25), (2, "lr", 1e-3),
                      (3, "loss", 0.125)]
    release.set()
    flush.join()
    assert sorted((m.step, m.key) for m in log.unsent()) == [(s, k) for s, k, _ in points]
    with pytest.raises(RuntimeError, match="logging to MLflow failed"):
        log.close()
    lost = log.lost()
    assert len(lost) == 1 and lost[0].startswith("5 metric points of steps 1..3: ConnectionError")
    assert MlflowClient(uri).get_metric_history(info.run_id, "loss") == []


def test_points_logged_again_keep_their_step_and_time(run):
    uri, info = run
    log = RunLogger(uri, info.run_id, flush_s=60)
    log.log_points([["loss", 0.5, 1_000_000, 7], ["lr", 0.001, 1_000_001, 7]])
    log.close()
    assert log.lost() == []
    (loss,) = MlflowClient(uri).get_metric_history(info.run_id, "loss")
    assert (loss.step, loss.value, loss.timestamp) == (7, 0.5, 1_000_000)


def test_a_flush_never_delivers_points_ahead_of_an_earlier_one_still_in_flight(run):
    """Two threads flush (the logger's own and a checkpoint upload's). Were the second to send
    step 3 while steps 1 and 2 were in a request that then failed, the run would hold step 3
    and not 1 and 2: a resumed attempt, which logs only after the run's highest step, would
    never log them."""
    import threading

    uri, info = run
    log = RunLogger(uri, info.run_id, flush_s=60)
    sending, release, send = threading.Event(), threading.Event(), log.client.log_batch
    calls = []

    def log_batch(run_id, metrics=(), params=(), tags=()):
        calls.append(sorted({m.step for m in metrics}))
        if len(calls) == 1:  # the first request hangs, then fails
            sending.set()
            release.wait(30)
            raise ConnectionError("the tracking server went away")
        send(run_id, metrics=metrics, params=params, tags=tags)

    log.client.log_batch = log_batch
    log.log_metrics({"loss": 0.5}, 1)
    log.log_metrics({"loss": 0.25}, 2)
    first = threading.Thread(target=log.flush_metrics)
    first.start()
    assert sending.wait(30)
    log.log_metrics({"loss": 0.125}, 3)
    second = threading.Thread(target=log.flush_metrics)
    second.start()
    second.join(1.0)  # it waits for the first, or (the defect) sends step 3 now
    history = lambda: [m.step for m in MlflowClient(uri).get_metric_history(info.run_id, "loss")]
    assert history() == []
    release.set()
    first.join(30)
    second.join(30)
    log.close()
    assert calls == [[1, 2], [1, 2, 3]]
    assert sorted(history()) == [1, 2, 3] and log.unsent() == []
