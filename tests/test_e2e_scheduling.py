"""Scheduling on the real stack (2 logical GPUs): a queued high-priority pipeline starts before
an earlier low-priority one, a waiting pipeline says "queued", and quarter-GPU sampling jobs
pack four to a GPU."""

from __future__ import annotations

import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from support import genforge, genforge_background, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def train(name: str, steps: int, gpus: float, **resources) -> dict:
    return {"name": name, "kind": "train", "family": "ddpm",
            "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
            "train": {"steps": steps, "batch_size": 8, "log_every": 5, "sample_images": 2},
            "resources": {"gpus": gpus, "cpus": 0.5, **resources}}


def spec(experiment: str, *jobs: dict) -> dict:
    return {"experiment": experiment,
            "defaults": {"data": {"dataset": "digits", "image_size": 8}}, "jobs": list(jobs)}


def pipeline_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], "tags.`genforge.spec` != ''") if exp else []
    return found[0] if found else None


def job_runs(client: MlflowClient, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags["genforge.job"]: r for r in client.search_runs([exp.experiment_id])
            if "genforge.job" in r.data.tags}


def wait_for(what, timeout: float = 180, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def test_a_high_priority_pipeline_starts_before_an_earlier_low_one(tmp_path, local_stack, stack_env):
    client = MlflowClient(local_stack.tracking_uri)
    specs = {
        "fill": spec("e2e-prio-fill", train("fill", 1_000_000, gpus=2)),
        "low": spec("e2e-prio-low", train("low", 10, gpus=2, priority=0)),
        "high": spec("e2e-prio-high", train("high", 10, gpus=2, priority=5)),
    }
    procs = {}
    try:
        procs["fill"] = genforge_background(["run", str(write_spec(tmp_path / "fill.yaml", specs["fill"]))],
                                            stack_env, tmp_path / "fill.log")
        # the fill job holds both logical GPUs...
        wait_for(lambda: (runs := job_runs(client, "e2e-prio-fill") if
                          client.get_experiment_by_name("e2e-prio-fill") else {}) and
                 client.get_metric_history(runs["fill"].info.run_id, "loss"))
        # ...when the low-priority pipeline comes, then the high-priority one
        for name in ("low", "high"):
            procs[name] = genforge_background(["run", str(write_spec(tmp_path / f"{name}.yaml", specs[name]))],
                                              stack_env, tmp_path / f"{name}.log")
            exp = f"e2e-prio-{name}"
            run = wait_for(lambda: pipeline_run(client, exp) and
                           client.get_run(pipeline_run(client, exp).info.run_id).data.tags.get("genforge.progress"))
            assert run == "0/1 done, 1 queued", run
        # their runs are opened ahead once their pipelines have waited: SCHEDULED, with their
        # params, and no launch yet (MLflow creates a run RUNNING; the next request of its
        # opening sets it SCHEDULED)
        for name in ("low", "high"):
            run = wait_for(lambda: (r := job_runs(client, f"e2e-prio-{name}").get(name)) and
                           r.info.status == "SCHEDULED" and r)
            assert "genforge.launched" not in run.data.tags
            assert run.data.params["train.steps"] == "10"
        procs["fill"].send_signal(signal.SIGINT)  # the GPUs come free
        assert procs["fill"].wait(timeout=120) == 130
        for name in ("low", "high"):
            assert procs[name].wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
    finally:
        for proc in procs.values():
            proc.kill()
    fill = job_runs(client, "e2e-prio-fill")["fill"]
    high = job_runs(client, "e2e-prio-high")["high"]
    low = job_runs(client, "e2e-prio-low")["low"]
    # high was launched after fill ended, low after high ended
    launched = {name: 1000 * float(run.data.tags["genforge.launched"])
                for name, run in (("high", high), ("low", low))}
    assert fill.info.status == "KILLED"
    assert fill.info.end_time <= launched["high"] + 1000
    assert high.info.end_time <= launched["low"] + 1000
    assert "queued" not in client.get_run(pipeline_run(client, "e2e-prio-low").info.run_id).data.tags["genforge.progress"]


def test_quarter_gpu_sampling_jobs_pack_four_to_a_gpu(tmp_path, local_stack, stack_env):
    samplers = [{"name": f"s{i}", "kind": "sample", "family": "ddpm", "from": "model",
                 "sample": {"num_images": 1024, "steps": 20, "seed": i},
                 "resources": {"gpus": 0.25, "cpus": 0.25}} for i in range(8)]
    path = write_spec(tmp_path / "pack.yaml", spec("e2e-pack", train("model", 20, gpus=1), *samplers))
    out = genforge(["run", str(path)], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = job_runs(MlflowClient(local_stack.tracking_uri), "e2e-pack")
    spans = [(1000 * float(runs[f"s{i}"].data.tags["genforge.launched"]), runs[f"s{i}"].info.end_time)
             for i in range(8)]
    # they ran side by side, more at once than two whole GPUs would hold
    most = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert most >= 5, spans
