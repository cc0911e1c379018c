"""Correct on a shared cluster, on the real stack: a cache keyed by content that reruns exactly
what changed (a spec's value, data regenerated at the same path, a checkpoint URI whose job was
retrained) and what depends on it, `--force` of one job or as a fresh run, one writer
per job across drivers, a job no node can run refused up front, and SIGTERM landing in every
phase with every run KILLED."""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from support import genforge, genforge_background, keys, write_spec
from workers.registry import FAMILIES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TINY = {"kind": "train", "family": "ddpm",
        "model": {"channels": 8, "channel_mult": [1], "timesteps": 100},
        "train": {"steps": 4, "batch_size": 8, "log_every": 1},
        "resources": {"cpus": 1}}
# ~0.2-0.4 s a step on one core: slow enough to be stopped, or joined, while it trains
SLOW = {"kind": "train", "family": "ddpm", "model": {"channels": 32, "timesteps": 100},
        "data": {"dataset": "digits", "image_size": 16},
        "train": {"steps": 30, "batch_size": 64, "checkpoint_every": 10, "log_every": 5},
        "resources": {"cpus": 1}}


def outcome(stderr: str) -> dict[str, str]:
    return {m[0]: m[1] for m in re.findall(
        r"job '([a-z0-9-]+)': (cached|started|finished by another driver)", stderr)}


def runs_of(local_stack, experiment: str) -> list:
    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def job_runs(local_stack, experiment: str, job: str) -> list:
    return [r for r in runs_of(local_stack, experiment) if r.data.tags.get("genforge.job") == job]


def write_images(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 255, (48, 8, 8), dtype=np.uint8), y=np.arange(48) % 3)


def test_the_cache_reruns_exactly_what_changed_and_force_starts_afresh(tmp_path, local_stack,
                                                                       stack_env, s3_client):
    """A job is cached while its spec and the content it reads are the same; a change reruns it
    and what depends on it, nothing else."""
    write_images(tmp_path / "d.npz", seed=0)

    def pipeline(seed: int):
        return write_spec(tmp_path / "train.yaml", {"experiment": "content", "jobs": [
            {"name": "a", **TINY, "data": {"dataset": "npz", "path": "d.npz", "image_size": 8}},
            {"name": "b", **TINY, "data": {"dataset": "digits", "image_size": 8}},
            {"name": "s", "kind": "sample", "family": "ddpm", "from": "a",
             "sample": {"num_images": 2, "steps": 5, "seed": seed}}]})

    def run(path, *flags: str) -> str:
        out = genforge(["run", *flags, str(path)], stack_env)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    assert outcome(run(pipeline(1))) == {"a": "started", "b": "started", "s": "started"}
    assert outcome(run(pipeline(1))) == {"a": "cached", "b": "cached", "s": "cached"}
    assert outcome(run(pipeline(2))) == {"a": "cached", "b": "cached", "s": "started"}
    write_images(tmp_path / "d.npz", seed=1)  # other images at the same path
    first = run(pipeline(2))
    assert outcome(first) == {"a": "started", "b": "cached", "s": "started"}
    prefix = re.search(r"^\s+a\s+finished\s+\w+\s+(s3://\S+)/checkpoints/", first, re.M)[1]

    # another spec reads that job by its prefix: the newest checkpoint there, pinned at planning
    reader = write_spec(tmp_path / "reader.yaml", {"experiment": "content-reader", "jobs": [
        {"name": "r", "kind": "sample", "family": "ddpm", "from": prefix,
         "sample": {"num_images": 2}}]})
    assert outcome(run(reader)) == {"r": "started"}
    assert outcome(run(reader)) == {"r": "cached"}
    # no steps given: DDIM's 50, not every one of the model's 100 timesteps
    (key,) = [k for k in keys(s3_client, local_stack.bucket, "genforge/content-reader/r/")
              if k.endswith("/result.json")]
    result = json.loads(s3_client.get_object(Bucket=local_stack.bucket, Key=key)["Body"].read())
    assert result["sampler"]["sampler"] == "ddim" and result["sampler"]["steps"] == 50

    # --force JOB: that job (and what depends on it) only
    assert outcome(run(pipeline(2), "--force", "b")) == {"a": "cached", "b": "started", "s": "cached"}
    # --force: every job again, training from step 0, each in a run of its own
    forced = run(pipeline(2), "--force")
    assert outcome(forced) == {"a": "started", "b": "started", "s": "started"}
    assert "training starts at step 0" in forced
    runs = sorted(job_runs(local_stack, "content", "a"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["FINISHED"] * 3
    client = MlflowClient(local_stack.tracking_uri)
    newest = runs[-1]
    assert sorted(m.step for m in client.get_metric_history(newest.info.run_id, "loss")) == [1, 2, 3, 4]
    assert "genforge.resumed_from" not in newest.data.tags
    # ...and what read its old checkpoint by URI is no longer a cache hit
    assert outcome(run(reader)) == {"r": "started"}


def test_a_bad_value_is_echoed(tmp_path, stack_env):
    spec = write_spec(tmp_path / "vae.yaml", {"experiment": "t", "jobs": [
        {"name": "v", "kind": "train", "family": "vae"}]})
    out = genforge(["run", str(spec)], stack_env)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"{spec}: job 'v': family: must be one of {', '.join(FAMILIES)} (got 'vae')"]


def test_a_job_no_node_can_run_is_refused_before_anything_runs(tmp_path, local_stack, stack_env):
    spec = write_spec(tmp_path / "big.yaml", {"experiment": "infeasible", "jobs": [
        {"name": "g", **TINY, "data": {"dataset": "digits", "image_size": 8},
         "resources": {"gpus": 8}}]})
    out = genforge(["run", str(spec)], stack_env)
    assert out.returncode == 2, out.stderr[-2000:]
    line = next(l for l in out.stderr.splitlines() if "job 'g'" in l)
    assert line == (f"{spec}: job 'g': resources: 8 GPUs and 1 CPU do not fit on the cluster's 1 "
                    "node (the largest has 2 GPUs and 2 CPUs): it could never start (with an "
                    "autoscaler that adds larger nodes, set GENFORGE_AUTOSCALING=1)")
    assert "Traceback" not in out.stderr and not runs_of(local_stack, "infeasible")


def test_two_drivers_on_one_spec_train_the_job_once(tmp_path, local_stack, stack_env):
    spec = write_spec(tmp_path / "two.yaml", {"experiment": "two-drivers", "jobs": [
        {"name": "ddpm", **SLOW}]})
    first = genforge_background(["run", str(spec)], stack_env, tmp_path / "first.log")
    time.sleep(1.0)
    second = genforge_background(["run", str(spec)], stack_env, tmp_path / "second.log")
    try:
        assert first.wait(timeout=400) == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        first.kill(), second.kill()
    logs = [outcome((tmp_path / f"{n}.log").read_text()) for n in ("first", "second")]
    assert sorted(log["ddpm"] for log in logs) == ["finished by another driver", "started"]
    (run,) = job_runs(local_stack, "two-drivers", "ddpm")
    history = MlflowClient(local_stack.tracking_uri).get_metric_history(run.info.run_id, "loss")
    assert run.info.status == "FINISHED" and run.data.tags["genforge.attempt"] == "1"
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30]  # once each


def stop_when(log, pattern: str, process, after: float, timeout: float = 240) -> float:
    """SIGTERM `process` `after` seconds once its log shows `pattern`; returns how long it
    then took to exit."""
    deadline = time.monotonic() + timeout
    while pattern not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    time.sleep(after)
    process.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    process.wait(timeout=90)
    return time.monotonic() - t0


def test_sigterm_lands_in_training_and_in_evaluation(tmp_path, local_stack, stack_env):
    """As Kubernetes, Slurm or `timeout` stop a driver: exit 143, every run it opened KILLED
    with the reason, a checkpoint at a step boundary of a training job; an evaluation stops
    between its batches, not at the end of the grace period."""
    slow = {**SLOW, "train": {**SLOW["train"], "steps": 400}}
    spec = write_spec(tmp_path / "term.yaml", {"experiment": "sigterm", "jobs": [
        {"name": "ddpm", **slow},
        {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm"}]})
    driver = genforge_background(["run", str(spec)], stack_env, tmp_path / "train.log")
    took = stop_when(tmp_path / "train.log", "job 'ddpm': started", driver, after=8)
    log = (tmp_path / "train.log").read_text()
    assert driver.returncode == 143 and took < 20, log[-3000:]
    assert "SIGTERM: stopping jobs" in log and "Traceback" not in log and "SIGTERM received" not in log
    (run,) = job_runs(local_stack, "sigterm", "ddpm")
    assert run.info.status == "KILLED"
    assert re.fullmatch(r"cancelled; checkpoint at step \d+ kept", run.data.tags["genforge.error"])
    pipeline = [r for r in runs_of(local_stack, "sigterm") if "genforge.job" not in r.data.tags]
    assert [r.info.status for r in pipeline] == ["KILLED"]

    # an evaluation sampling 1000-step ancestral chains: stopped between two batches
    score = write_spec(tmp_path / "score.yaml", {"experiment": "sigterm-eval", "jobs": [
        {"name": "gen", **TINY, "model": {"channels": 8, "channel_mult": [1], "timesteps": 1000},
         "data": {"dataset": "digits", "image_size": 8}},
        {"name": "score", "kind": "evaluate", "from": ["gen"],
         "data": {"dataset": "digits", "image_size": 8},
         "evaluate": {"num_samples": 150, "classifier": {"steps": 20, "width": 8},
                      "sample": {"sampler": "ancestral", "batch_size": 10}}}]})
    driver = genforge_background(["run", str(score)], stack_env, tmp_path / "eval.log")
    took = stop_when(tmp_path / "eval.log", "job 'score': started", driver, after=12)
    log = (tmp_path / "eval.log").read_text()
    assert driver.returncode == 143 and took < 20, log[-3000:]
    (run,) = job_runs(local_stack, "sigterm-eval", "score")
    assert run.info.status == "KILLED" and run.data.tags["genforge.error"].startswith(
        "cancelled while "), run.data.tags
    assert all(r.info.status != "RUNNING" for r in runs_of(local_stack, "sigterm-eval"))
