"""What the MLflow UI shows of genforge's runs beyond their own metrics: experiments that open in
the model-training view, MLflow's system metrics of each job's run, and the device and CPU
hours of jobs and pipelines. In-process, against sqlite tracking stores."""

from __future__ import annotations

import logging
import sys
import time
import types

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from orchestrator import dag
from orchestrator.inprocess import run_jobs
from orchestrator.tracking import (KIND, KIND_TAG, SYSTEM_METRICS_ENV, Tracker, _warn_once,
                                   system_metrics, system_metrics_interval)
from orchestrator.usage import job_hours, pipeline_hours
from support import offline_driver
from workers.ddpm.worker import DDPMWorker


# ---- the experiment's kind ---------------------------------------------------------------------

def test_experiments_open_in_the_model_training_view_unless_a_user_chose_otherwise(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    client = tracker.client
    kind = lambda experiment_id: client.get_experiment(experiment_id).tags.get(KIND_TAG)  # noqa: E731

    assert kind(tracker.experiment_id("new")) == KIND == "custom_model_development"
    older = client.create_experiment("older")  # made before genforge tagged its experiments
    assert kind(older) is None
    assert tracker.experiment_id("older") == older and kind(older) == KIND
    chosen = client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    assert tracker.experiment_id("chosen") == chosen and kind(chosen) == "genai_development"
    client.delete_experiment(older)  # restored, still tagged
    assert tracker.experiment_id("older") == older and kind(older) == KIND


# ---- system metrics of a job's run --------------------------------------------------------------

def tiny_training() -> dict:
    """A DDPM job of 2 steps (a test makes it last: see its final metrics)."""
    return {"experiment": "sm", "defaults": {"data": {"dataset": "digits", "image_size": 8}},
            "jobs": [{"name": "ddpm", "kind": "train", "family": "ddpm",
                      "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
                      "train": {"steps": 2, "batch_size": 8, "log_every": 1,
                                "sample_images": 2}}]}


def fake_nvml(gpus: int) -> types.SimpleNamespace:
    """NVML as the nvidia-ml-py package presents it, on a node with `gpus` 16 GB GPUs: GPU i
    uses 4(i+1) GB, is 90-40i % busy and draws 300 of its 600 W."""
    mem = lambda i: types.SimpleNamespace(used=4e9 * (i + 1), total=16e9)  # noqa: E731
    return types.SimpleNamespace(
        NVMLError=type("NVMLError", (Exception,), {}), nvmlInit=lambda: None,
        nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: gpus,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetMemoryInfo=mem,
        nvmlDeviceGetUtilizationRates=lambda i: types.SimpleNamespace(gpu=90 - 40 * i),
        nvmlDeviceGetPowerUsage=lambda i: 300_000, nvmlDeviceGetEnforcedPowerLimit=lambda i: 600_000)


@pytest.mark.parametrize("interval", ["1", "0"])
def test_a_jobs_run_gets_system_metrics_every_interval_and_none_at_0(tmp_path, monkeypatch,
                                                                      interval):
    monkeypatch.setenv(SYSTEM_METRICS_ENV, interval)
    # MLflow's process-wide default names another store: the monitor must log to the run's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    # the job lasts 2.5 s more: 2 samples at 1 s
    monkeypatch.setattr(DDPMWorker, "final_metrics", lambda self: time.sleep(2.5) or {})
    # a node with two NVIDIA GPUs, as NVML reports them (nvidia-ml-py is a dependency)
    from mlflow.system_metrics.metrics import gpu_monitor

    monkeypatch.setattr(gpu_monitor, "pynvml", fake_nvml(2))
    monkeypatch.setitem(sys.modules, "pynvml", gpu_monitor.pynvml)
    results = run_jobs(tmp_path / "w", tiny_training())
    assert results["ddpm"]["status"] == "finished"
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    run_id = results["_runs"]["ddpm"]
    metrics = client.get_run(run_id).data.metrics
    system = {k for k in metrics if k.startswith("system/")}
    if interval == "0":
        assert system == set()
        return
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/gpu_0_utilization_percentage", "system/gpu_1_memory_usage_megabytes"):
        history = client.get_metric_history(run_id, key)
        assert len(history) >= 1 and all(m.value >= 0 for m in history), key
        assert sorted(m.step for m in history) == list(range(len(history)))
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert {k: metrics[f"system/gpu_{k}"] for k in (
        "0_utilization_percentage", "1_utilization_percentage", "0_memory_usage_megabytes",
        "1_memory_usage_percentage", "0_power_usage_watts", "1_power_usage_percentage")} == {
        "0_utilization_percentage": 90, "1_utilization_percentage": 50,
        "0_memory_usage_megabytes": 4000, "1_memory_usage_percentage": 50,
        "0_power_usage_watts": 300, "1_power_usage_percentage": 50}
    assert not any(k.startswith("system/gpu_2") for k in system)


def test_without_psutil_there_are_no_system_metrics_and_one_warning(monkeypatch, caplog):
    # MLflow's monitor imports psutil as it is imported: as if it were not installed
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)
    monkeypatch.delenv(SYSTEM_METRICS_ENV, raising=False)
    _warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        assert system_metrics("sqlite:///nowhere.db", "0" * 32, 10) is None
        assert system_metrics("sqlite:///nowhere.db", "1" * 32, 10) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["no system metrics in MLflow"]


@pytest.mark.parametrize("value, seconds", [(None, 10.0), ("2.5", 2.5), ("0", 0.0),
                                            ("-3", 0.0), ("often", 10.0)])
def test_the_interval_is_the_drivers_setting(value, seconds):
    environ = {} if value is None else {SYSTEM_METRICS_ENV: value}
    assert system_metrics_interval(environ) == seconds


# ---- device and CPU hours ---------------------------------------------------------------------

@pytest.mark.parametrize("resources, held_s, hours", [
    ({"gpus": 2, "cpus": 8}, 1800, {"device_hours": 1.0}),
    ({"gpus": 0.25, "cpus": 2}, 3600, {"device_hours": 0.25}),  # a quarter of a GPU
    ({"gpus": 0, "cpus": 4}, 900, {"cpu_hours": 1.0}),
    ({"workers": 4, "gpus_per_worker": 1, "cpus": 2, "gpus": 0}, 900, {"device_hours": 1.0}),
    ({"workers": 2, "gpus_per_worker": 0, "cpus": 2, "gpus": 0}, 1800, {"cpu_hours": 2.0}),
])
def test_a_job_costs_device_hours_if_it_held_gpus_else_cpu_hours(resources, held_s, hours):
    assert job_hours(resources, held_s) == pytest.approx(hours)


def test_a_pipeline_sums_hours_by_family_and_kind_and_in_all():
    assert pipeline_hours([]) == {"device_hours": 0.0, "cpu_hours": 0.0}
    assert pipeline_hours([
        ("ddpm", "train", {"device_hours": 1.5}),
        ("ddpm", "train", {"device_hours": 0.5}),  # a trial of the same sweep, say
        ("ddpm", "sample", {"cpu_hours": 0.25}),
        ("gan", "train", {"device_hours": 3.0}),
        ("evaluate", "evaluate", {"cpu_hours": 1.0}),
    ]) == pytest.approx({
        "device_hours.ddpm.train": 2.0, "device_hours.gan.train": 3.0, "device_hours": 5.0,
        "cpu_hours.ddpm.sample": 0.25, "cpu_hours.evaluate.evaluate": 1.0, "cpu_hours": 1.25,
    })


def test_the_driver_logs_each_jobs_hours_over_its_attempts_and_the_pipelines_sums(tmp_path):
    driver = offline_driver(tmp_path, [
        {"name": "gpu", "kind": "sample", "family": "ddpm", "from": "s3://b/x/y/z",
         "resources": {"gpus": 0.5, "cpus": 1}},
        {"name": "cpu", "kind": "sample", "family": "ddpm", "from": "s3://b/x/y/z",
         "resources": {"cpus": 2}},
        {"name": "cached", "kind": "sample", "family": "ddpm", "from": "s3://b/x/y/z"}])
    client = driver.tracker.client
    gpu, cpu = driver.jobs["gpu"], driver.jobs["cpu"]
    for state in (gpu, cpu):
        driver.runs.launch(state.planned)
        state.status, state.started = "running", time.monotonic() - 1800
    driver._attempt_ended(gpu)  # its first attempt's worker died: it is launched again
    gpu.started = time.monotonic() - 1800
    driver._finish(gpu, "finished")
    driver._finish(cpu, "failed", "JobError: bad data")
    driver._finish(cpu, "failed", "JobError: bad data")  # no attempt is counted twice
    driver._cache_hit(driver.jobs["cached"], {})
    driver.runs.drain()
    driver._log_hours()

    def metrics(state):
        return client.get_run(driver.runs[state.name].id).data.metrics

    assert metrics(gpu) == pytest.approx({"device_hours": 0.5}, rel=1e-3)  # 2 x 30 min x 0.5
    assert metrics(cpu) == pytest.approx({"cpu_hours": 1.0}, rel=1e-3)  # 30 min x 2 CPUs
    assert client.get_run(driver.runs.parent).data.metrics == pytest.approx({
        "device_hours.ddpm.sample": 0.5, "device_hours": 0.5,
        "cpu_hours.ddpm.sample": 1.0, "cpu_hours": 1.0}, rel=1e-3)


# ---- the pipeline's picture --------------------------------------------------------------------

def test_a_pipelines_picture_puts_each_job_right_of_what_it_reads_coloured_by_its_state():
    nodes = [dag.Node("ddpm", "train", "ddpm", "finished", (), "3 finished, 13 pruned"),
             dag.Node("vq", "train", "vqgan", "cached", ()),
             dag.Node("ar", "train", "autoregressive", "failed", ("vq",)),
             dag.Node("grid", "sample", "ddpm", "finished", ("ddpm",)),
             dag.Node("score", "evaluate", None, "skipped", ("grid", "ar", "ddpm"))]
    assert dag.depths(nodes) == {"ddpm": 0, "vq": 0, "ar": 1, "grid": 1, "score": 2}
    picture = dag.draw(nodes)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert picture.shape[1] > picture.shape[0]  # 3 columns of at most 2 boxes
    def rgb(state: str) -> tuple[int, ...]:
        return tuple(int(dag.COLOURS[state][i:i + 2], 16) for i in (1, 3, 5))

    seen = {tuple(p) for p in picture.reshape(-1, 3)}
    assert {rgb(s) for s in ("finished", "cached", "failed", "skipped")} <= seen
    assert rgb("pruned") not in seen
    third = picture[:, 2 * picture.shape[1] // 3:]  # the last column holds the skipped job only
    assert (third == rgb("skipped")).all(-1).sum() > 1000
    assert not (third == rgb("finished")).all(-1).any()


def test_the_driver_logs_the_pipelines_picture_to_its_run(tmp_path):
    driver = offline_driver(tmp_path, [
        {"name": "a", "kind": "sample", "family": "ddpm", "from": "s3://b/x/y/z"},
        {"name": "b", "kind": "sample", "family": "ddpm", "from": "s3://b/x/y/z"}])
    driver._cache_hit(driver.jobs["a"], {})
    driver._finish(driver.jobs["b"], "failed", "JobError: bad data")
    driver.runs.drain()
    driver._log_picture()
    client = driver.tracker.client
    assert "pipeline.png" in {a.path for a in client.list_artifacts(driver.runs.parent)}


def test_links_to_the_ui_open_its_model_training_view():
    from orchestrator.tracking import ui_url

    assert ui_url("http://127.0.0.1:5000/") == (
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")
    assert ui_url("https://mlflow.team", "7", "abc") == (
        "https://mlflow.team/#/experiments/7/runs/abc?workflowType=machine_learning")
    assert ui_url("sqlite:///m.db", "7") == "sqlite:///m.db"  # no web page to link to
