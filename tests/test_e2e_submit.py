"""`genforge submit | jobs | logs | cancel` against the test stack's Ray job server: the driver
runs on the cluster as a Ray job, reading staged data from S3 and the service settings from the
job's environment."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from support import genforge, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def spec(experiment: str, steps: int, **train) -> dict:
    return {"experiment": experiment,
            "defaults": {"data": {"dataset": "digits", "image_size": 8},
                         "resources": {"cpus": 1, "gpus": 0}},
            "jobs": [{"name": "ddpm", "kind": "train", "family": "ddpm",
                      "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
                      "train": {"steps": steps, "batch_size": 8, "log_every": 2,
                                "sample_images": 2, **train}},
                     {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm",
                      "sample": {"num_images": 4, "steps": 5}}]}


def runs_of(local_stack, experiment: str, submission: str) -> dict:
    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    found = client.search_runs([exp.experiment_id], f"tags.`genforge.submission` = '{submission}'")
    return {r.data.tags.get("genforge.job", "pipeline"): r for r in found}


def test_submit_runs_the_driver_as_a_ray_job(tmp_path, local_stack, stack_env, s3_client):
    path = write_spec(tmp_path / "s.yaml", spec("e2e-submit", 4))
    out = genforge(["submit", str(path), "--wait"], stack_env)
    submission = out.stdout.strip()
    assert out.returncode == 0, genforge(["logs", submission], stack_env).stdout[-3000:]
    assert submission.startswith("genforge-e2e-submit-")

    runs = runs_of(local_stack, "e2e-submit", submission)
    assert {name: r.info.status for name, r in runs.items()} == {
        "pipeline": "FINISHED", "ddpm": "FINISHED", "grid": "FINISHED"}
    assert runs["pipeline"].data.tags["genforge.progress"] == "2/2 done"
    # the cluster read the data from the copy staged in S3, not from this machine
    assert runs["ddpm"].data.params["data.path"].startswith("s3://")
    assert any(k.startswith("genforge/e2e-submit/grid/") and k.endswith("images.npz")
               for k in keys(s3_client, local_stack.bucket, "genforge/e2e-submit/"))

    logs = genforge(["logs", submission], stack_env)
    assert logs.returncode == 0 and "job 'ddpm': finished" in logs.stdout
    listed = genforge(["jobs"], stack_env)
    line = next(l for l in listed.stdout.splitlines() if l.startswith(submission))
    assert "SUCCEEDED" in line and "2/2 done" in line
    # `run` and `submit` of one spec share their cache: the jobs' hashes are the same
    again = genforge(["run", str(path)], stack_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "job 'ddpm': cached" in again.stderr and "job 'grid': cached" in again.stderr
    # the credentials went to the job as environment, never into its output or the runs
    secret = stack_env_secret(local_stack)
    assert secret not in logs.stdout and secret not in str(runs["ddpm"].data.params)


def stack_env_secret(local_stack) -> str:
    from pathlib import Path

    from orchestrator import stack

    return stack.credentials(Path(local_stack.home))["secret_key"]


def test_cancel_stops_the_submission_and_kills_its_runs(tmp_path, local_stack, stack_env,
                                                       s3_client):
    long = spec("e2e-cancel", 100_000, checkpoint_every=20)
    out = genforge(["submit", str(write_spec(tmp_path / "long.yaml", long))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    submission = out.stdout.strip()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until it has trained and saved a checkpoint
        runs = runs_of(local_stack, "e2e-cancel", submission)
        if "ddpm" in runs and any(k.endswith("manifest.json") for k in
                                  keys(s3_client, local_stack.bucket, "genforge/e2e-cancel/ddpm/")):
            break
        time.sleep(2)
    else:
        pytest.fail("the submitted job never saved a checkpoint")
    listed = genforge(["jobs"], stack_env)
    assert "RUNNING" in next(l for l in listed.stdout.splitlines() if l.startswith(submission))

    cancelled = genforge(["cancel", submission], stack_env)
    assert cancelled.returncode == 0, cancelled.stderr[-2000:]
    assert cancelled.stdout.strip() == f"{submission}: STOPPED"
    runs = runs_of(local_stack, "e2e-cancel", submission)
    assert runs["ddpm"].info.status == "KILLED" and runs["pipeline"].info.status == "KILLED"
    assert "cancelled" in runs["ddpm"].data.tags.get("genforge.error", "")
    logs = genforge(["logs", submission], stack_env).stdout
    assert "interrupted: stopping jobs" in logs
