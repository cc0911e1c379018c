"""Fault injection on the real stack: a killed worker, a killed driver, storage that goes away.
Each test runs a small pipeline through the CLI and checks the outcome from the outside."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from orchestrator import stack
from orchestrator.checkpoints import list_checkpoints, load_checkpoint, verify_checkpoint
from orchestrator.storage import S3Credentials, open_storage
from support import genforge, genforge_background, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# ~0.4 s a step on one core: slow enough to be interrupted between checkpoints
SLOW_TRAIN = {
    "kind": "train", "family": "ddpm",
    "model": {"channels": 32, "timesteps": 100},
    "data": {"dataset": "digits", "image_size": 16},
    "train": {"steps": 60, "batch_size": 64, "checkpoint_every": 10, "log_every": 5},
    "resources": {"cpus": 1, "gpus": 0.5, "max_restarts": 3},
}


def job_storage(local_stack, experiment: str, job: str):
    creds = stack.credentials(Path(local_stack.home))
    root = open_storage(local_stack.storage, S3Credentials(local_stack.s3_endpoint,
                                                           creds["access_key"], creds["secret_key"]))
    prefixes = {k.split("/")[2] for k in root.list(f"{experiment}/{job}/")}
    assert len(prefixes) == 1, prefixes
    return root.child(f"{experiment}/{job}/{prefixes.pop()}")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_at_least(local_stack, experiment: str, job: str, step: int):
    def check():
        try:
            names = list_checkpoints(job_storage(local_stack, experiment, job))
        except AssertionError:
            return None
        return names if names and int(names[-1].split("-")[1]) >= step else None
    return check


def alive_job_actors(local_stack) -> list:
    return list_actors(address=local_stack.dashboard_url,
                       filters=[("class_name", "=", "JobActor"), ("state", "=", "ALIVE")])


def run_of(local_stack, experiment: str, job: str):
    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("genforge.job") == job]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def assert_history_complete(client, run, steps: int, every: int) -> None:
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(logged) == list(range(every, steps + 1, every)), sorted(logged)


def start_slow_job(tmp_path, local_stack, stack_env, experiment: str, steps: int = 60):
    """`genforge run` of one slow training job in the background, returned once the job has
    written its first checkpoint."""
    job = {"name": "ddpm", **SLOW_TRAIN, "train": {**SLOW_TRAIN["train"], "steps": steps}}
    spec = write_spec(tmp_path / f"{experiment}.yaml", {"experiment": experiment, "jobs": [job]})
    driver = genforge_background(["run", str(spec)], stack_env, tmp_path / "run.log")
    try:
        wait_for(checkpoint_at_least(local_stack, experiment, "ddpm", 10), 240, "a checkpoint")
    except BaseException:
        driver.kill()
        raise
    return spec, driver


def test_killed_worker_resumes_from_its_checkpoint(tmp_path, local_stack, stack_env):
    _, driver = start_slow_job(tmp_path, local_stack, stack_env, "faults-kill")
    try:
        (actor,) = alive_job_actors(local_stack)
        os.kill(actor.pid, signal.SIGKILL)
        assert driver.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        driver.kill()
    log = (tmp_path / "run.log").read_text()
    assert "worker died" in log and "restart 1" in log
    ckpt = load_checkpoint(job_storage(local_stack, "faults-kill", "ddpm"))
    assert ckpt.step == 60 and ckpt.meta["family"] == "ddpm"
    client, run = run_of(local_stack, "faults-kill", "ddpm")
    assert run.info.status == "FINISHED" and run.data.tags["genforge.attempt"] == "2"
    assert int(run.data.tags["genforge.resumed_at_step"]) in range(11, 61, 10)
    assert_history_complete(client, run, 60, 5)


def test_rerun_after_driver_death_resumes_and_reuses(tmp_path, local_stack, stack_env):
    spec = write_spec(tmp_path / "driver.yaml", {"experiment": "faults-driver", "jobs": [
        {"name": "quick", **SLOW_TRAIN, "train": {"steps": 3, "batch_size": 8}},
        {"name": "slow", **SLOW_TRAIN},
    ]})
    driver = genforge_background(["run", str(spec)], stack_env, tmp_path / "run1.log")
    try:
        wait_for(checkpoint_at_least(local_stack, "faults-driver", "slow", 10), 240, "a checkpoint")
        wait_for(lambda: job_storage(local_stack, "faults-driver", "quick").exists("result.json"),
                 120, "the quick job to finish")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    # the driver owned the actors: Ray stops them with it
    wait_for(lambda: not alive_job_actors(local_stack), 60, "the orphaned actor to go")
    slow = job_storage(local_stack, "faults-driver", "slow")
    saved = load_checkpoint(slow).step
    assert 10 <= saved < 60

    again = genforge(["run", str(spec)], stack_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "job 'quick': cached" in again.stderr
    assert "job 'slow': started (attempt 2" in again.stderr
    client, run = run_of(local_stack, "faults-driver", "slow")  # the same run, continued
    assert run.info.status == "FINISHED"
    assert run.data.tags["genforge.resumed_at_step"] == str(saved + 1)
    assert load_checkpoint(slow).step == 60
    assert_history_complete(client, run, 60, 5)


def test_storage_outage_never_yields_a_corrupt_checkpoint(tmp_path, local_stack, stack_env):
    home = Path(local_stack.home)
    _, driver = start_slow_job(tmp_path, local_stack, stack_env, "faults-s3")
    try:
        weed = stack.StackState.load(home).pids["seaweedfs"]
        os.kill(weed, signal.SIGKILL)
        time.sleep(4)
        stack.up(home)  # brings back exactly the missing service, same ports and data
        rc = driver.wait(timeout=400)
    finally:
        driver.kill()
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" not in log
    if rc != 0:  # failing is allowed, but clearly and by name
        assert rc == 1 and "job 'ddpm' failed:" in log, log[-3000:]
    store = job_storage(local_stack, "faults-s3", "ddpm")
    for name in list_checkpoints(store):
        manifest = verify_checkpoint(store, name)
        assert json.dumps(manifest)  # every listed checkpoint verifies against its manifest
    latest = load_checkpoint(store)
    assert latest.step >= 10
    if rc == 0:
        assert latest.step == 60


def test_ctrl_c_saves_a_checkpoint_and_the_next_run_resumes(tmp_path, local_stack, stack_env):
    # long enough that Ctrl-C lands mid-training even when the machine is slow to notice the
    # first checkpoint (110 steps after it: 30 s or more)
    spec, driver = start_slow_job(tmp_path, local_stack, stack_env, "faults-cancel", steps=120)
    try:
        time.sleep(1.5)  # between two periodic checkpoints
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130
    finally:
        driver.kill()
    log = (tmp_path / "run.log").read_text()
    assert "interrupted" in log and "Traceback" not in log
    client, run = run_of(local_stack, "faults-cancel", "ddpm")
    assert run.info.status == "KILLED"
    # the stopped worker saved at its next step boundary, not only at the periodic ones
    stopped_at = load_checkpoint(job_storage(local_stack, "faults-cancel", "ddpm")).step
    assert f"checkpoint at step {stopped_at} kept" in log
    assert 10 < stopped_at < 120

    again = genforge(["run", str(spec)], stack_env)
    assert again.returncode == 0, again.stderr[-3000:]
    client, run = run_of(local_stack, "faults-cancel", "ddpm")
    assert run.info.status == "FINISHED"
    assert run.data.tags["genforge.resumed_at_step"] == str(stopped_at + 1)
    assert_history_complete(client, run, 120, 5)


def test_timeout_fails_the_job_and_keeps_its_checkpoint(tmp_path, local_stack, stack_env):
    job = {"name": "ddpm", **SLOW_TRAIN,
           "resources": {**SLOW_TRAIN["resources"], "timeout_s": 12}}
    spec = write_spec(tmp_path / "timeout.yaml", {"experiment": "faults-timeout", "jobs": [job]})
    out = genforge(["run", str(spec)], stack_env)
    assert out.returncode == 1
    assert "job 'ddpm' failed: timed out after 12 s; checkpoint at step" in out.stderr
    client, run = run_of(local_stack, "faults-timeout", "ddpm")
    assert run.info.status == "FAILED" and "timed out" in run.data.tags["genforge.error"]
    assert load_checkpoint(job_storage(local_stack, "faults-timeout", "ddpm")).step >= 1


def test_corrupt_checkpoint_is_a_job_error_retried_then_reported(tmp_path, local_stack,
                                                                 stack_env, s3_client):
    # a "checkpoint" whose files do not match their manifest
    prefix = "genforge/faults-corrupt/forged/0000/checkpoints/step-000001"
    files = {"model.safetensors": b"not safetensors", "state.pt": b"not a pickle"}
    for name, body in files.items():
        s3_client.put_object(Bucket=local_stack.bucket, Key=f"{prefix}/{name}", Body=body)
    manifest = {"step": 1, "format": 1, "meta": {"family": "ddpm"},
                "files": {n: {"sha256": "0" * 64, "size": len(b)} for n, b in files.items()}}
    s3_client.put_object(Bucket=local_stack.bucket, Key=f"{prefix}/manifest.json",
                         Body=json.dumps(manifest).encode())
    uri = f"s3://{local_stack.bucket}/genforge/faults-corrupt/forged/0000"
    job = {"name": "grid", "kind": "sample", "family": "ddpm", "from": uri,
           "resources": {"cpus": 1, "max_retries": 1}}
    spec = write_spec(tmp_path / "corrupt.yaml", {"experiment": "faults-corrupt", "jobs": [job]})
    out = genforge(["run", str(spec)], stack_env)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "retrying (1)" in out.stderr
    failure = next(l for l in out.stderr.splitlines() if l.startswith("job 'grid' failed:"))
    assert "CheckpointError" in failure and "Traceback" not in out.stderr
    client, run = run_of(local_stack, "faults-corrupt", "grid")
    assert run.info.status == "FAILED" and run.data.tags["genforge.attempt"] == "2"
    assert run.data.params["from"] == uri  # the run has its params, though the job failed
