"""Load on the tracking and storage paths of the real stack (loopback only): 16 short training
jobs at once on logical GPUs, each logging every step and checkpointing every 10 steps, against
the stack's MLflow server (sqlite) and SeaweedFS. No metric point is lost, no request fails,
every checkpoint is complete and verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import stack
from orchestrator.checkpoints import list_checkpoints, resolve_checkpoint_uri, verify_checkpoint
from orchestrator.storage import S3Credentials
from support import genforge, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

JOBS, STEPS, EVERY = 16, 60, 10


def test_sixteen_jobs_log_and_checkpoint_at_once(tmp_path, local_stack, stack_env):
    jobs = [{"name": f"j{i:02d}", "kind": "train", "family": "ddpm",
             "model": {"channels": 8, "channel_mult": [1], "timesteps": 10},
             "train": {"steps": STEPS, "batch_size": 8, "log_every": 1, "checkpoint_every": EVERY,
                       "keep_checkpoints": None,
                       "sample_images": 1, "seed": i},
             # 16 x 1/8 of the stack's 2 logical GPUs and 2 CPUs: all at once
             "resources": {"gpus": 0.125, "cpus": 0.125, "max_restarts": 0}}
            for i in range(JOBS)]
    spec = {"experiment": "e2e-load", "defaults": {"data": {"dataset": "digits", "image_size": 8}},
            "jobs": jobs}
    out = genforge(["run", str(write_spec(tmp_path / "load.yaml", spec))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "locked" not in out.stderr and "tracking:" not in out.stderr

    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name("e2e-load")
    runs = {r.data.tags["genforge.job"]: r for r in client.search_runs([exp.experiment_id])
            if "genforge.job" in r.data.tags}
    assert len(runs) == JOBS and {r.info.status for r in runs.values()} == {"FINISHED"}
    points = 0
    for run in runs.values():
        for key in ("loss", "lr", "steps_per_s", "images_per_s"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, STEPS + 1)), (run.data.tags["genforge.job"], key)
            points += len(steps)
    assert points == JOBS * STEPS * 4
    # they ran together: most of them between the first job's launch and its end
    spans = [(float(r.data.tags["genforge.launched"]), r.info.end_time / 1000) for r in runs.values()]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) >= JOBS // 2

    c = stack.credentials(Path(local_stack.home))
    creds = S3Credentials(local_stack.s3_endpoint, c["access_key"], c["secret_key"])
    for run in runs.values():
        job, _ = resolve_checkpoint_uri(run.data.tags["genforge.checkpoint"], creds)
        names = list_checkpoints(job)
        assert [int(n.split("-")[1]) for n in names] == list(range(EVERY, STEPS + 1, EVERY))
        for name in names:
            verify_checkpoint(job, name)  # every file's size and sha256 against its manifest
