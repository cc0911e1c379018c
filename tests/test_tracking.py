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
