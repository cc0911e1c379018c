"""Data-parallel training through Ray Train on the real stack: a 2-worker DDPM job (gloo on CPU)
follows the loss curve of the 1-worker job with the same global batch, its checkpoint samples
in a single-worker job, and a job whose rank dies resumes from its checkpoint. Other families
on two ranks run in-process (tests/test_parallel.py)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import ROOT, genforge, genforge_background, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DDPM = {"channels": 8, "channel_mult": [1, 2], "timesteps": 50}


def train(name: str, workers: int, steps: int, family: str = "ddpm", model=DDPM, **extra) -> dict:
    return {"name": name, "kind": "train", "family": family, "model": model,
            "train": {"steps": steps, "batch_size": 32, "log_every": 5, "sample_images": 4,
                      "lr": 1e-3, "seed": 3, **extra},
            "resources": {"cpus": 1, "workers": workers, "max_restarts": 2}}


def spec(experiment: str, *jobs: dict) -> dict:
    return {"experiment": experiment,
            "defaults": {"data": {"dataset": "digits", "image_size": 8}}, "jobs": list(jobs)}


def runs(tracking_uri: str, experiment: str) -> dict:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags["genforge.job"]: r for r in client.search_runs([exp.experiment_id])
            if "genforge.job" in r.data.tags}


def losses(tracking_uri: str, run) -> np.ndarray:
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "loss")
    return np.array([m.value for m in sorted(history, key=lambda m: m.step)])


def test_two_workers_follow_the_one_worker_loss_curve(tmp_path, local_stack, stack_env, s3_client):
    # jobspecs/data-parallel.yaml in tiny form, beside the same job on one worker
    example = yaml.safe_load((ROOT / "jobspecs" / "data-parallel.yaml").read_text())
    dp, sample = example["jobs"]
    dp.update(model=DDPM, train=train("two", 2, 150)["train"])
    one = {**dp, "name": "one", "resources": {"workers": 1}}
    sample.update({"from": "two", "sample": {"num_images": 6, "steps": 10}})
    example.update(experiment="e2e-dp", jobs=[one, {**dp, "name": "two"}, sample])
    example["defaults"]["data"]["image_size"] = 8
    out = genforge(["run", str(write_spec(tmp_path / "dp.yaml", example))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    found = runs(local_stack.tracking_uri, "e2e-dp")
    one, two = losses(local_stack.tracking_uri, found["one"]), losses(local_stack.tracking_uri, found["two"])
    assert len(one) == len(two) == 30
    # the same global batch: the curves agree (the noise each rank draws differs, so within
    # the noise of a 32-image loss), and both fall well below where they started
    assert abs(one[-10:].mean() - two[-10:].mean()) < 0.15 * one[-10:].mean()
    assert np.abs(one - two).mean() < 0.15 * one.mean()
    assert two[-10:].mean() < 0.5 * two[:2].mean()
    tags = found["two"].data.tags
    assert tags["genforge.workers"] == "2" and len(tags["genforge.worker_nodes.1"].split(",")) == 2
    assert "genforge.workers" not in found["one"].data.tags
    # rank 0 wrote the same layout as a single-worker job; the sample job reads it
    listed = keys(s3_client, local_stack.bucket, "genforge/e2e-dp/")
    for job in ("one", "two"):
        assert any(k.startswith(f"genforge/e2e-dp/{job}/") and "/checkpoints/step-000150/manifest.json" in k
                   for k in listed), job
        assert any(k.startswith(f"genforge/e2e-dp/{job}/") and k.endswith("/result.json")
                   for k in listed), job
    npz = next(k for k in listed if k.startswith("genforge/e2e-dp/grid/") and k.endswith("images.npz"))
    body = s3_client.get_object(Bucket=local_stack.bucket, Key=npz)["Body"].read()
    import io

    images = np.load(io.BytesIO(body))["images"]
    assert images.shape == (6, 8, 8, 1) and images.std() > 0
    assert found["grid"].info.status == "FINISHED"


def test_a_rank_that_dies_resumes_from_the_checkpoint(tmp_path, local_stack, stack_env):
    import ray
    from ray.util.state import list_actors

    job = train("dp", 2, 400, checkpoint_every=40)
    path = write_spec(tmp_path / "dp.yaml", spec("e2e-dp-fault", job))
    proc = genforge_background(["run", str(path)], stack_env, tmp_path / "run.log")
    try:
        ray.init(address=local_stack.ray_address, logging_level="ERROR", log_to_driver=False)
        client = MlflowClient(local_stack.tracking_uri)
        deadline = time.monotonic() + 240
        pid = None
        while time.monotonic() < deadline and pid is None:  # a checkpoint first, then the kill
            time.sleep(1)
            exp = client.get_experiment_by_name("e2e-dp-fault")
            found = client.search_runs([exp.experiment_id]) if exp else []
            step = max((m.step for r in found for m in
                        client.get_metric_history(r.info.run_id, "loss")), default=0)
            if step >= 60:
                workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                           ("state", "=", "ALIVE")])]
                pid = workers[-1].pid if workers else None
        assert pid, (tmp_path / "run.log").read_text()[-3000:]
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        proc.kill()
        ray.shutdown()
    run = runs(local_stack.tracking_uri, "e2e-dp-fault")["dp"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["genforge.attempt"] == "2"
    assert int(run.data.tags["genforge.resumed_at_step"]) > 40
    assert len(run.data.tags["genforge.worker_nodes.2"].split(",")) == 2
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # no step logged twice
