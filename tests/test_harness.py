"""The shared training harness in-process, on file:// storage and a local MLflow store:
NaN detection, resume from the latest checkpoint, no metric step logged twice."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.checkpoints import load_checkpoint
from orchestrator.datasets import stage
from orchestrator.spec import parse_spec
from orchestrator.storage import open_storage
from orchestrator.task import Task
from workers.base import JobError
from workers.ddpm import DDPMWorker


def make_task(tmp_path, steps: int, attempt: int = 1, run_id: str | None = None, **train) -> Task:
    spec = parse_spec({"experiment": "h", "jobs": [{
        "name": "ddpm", "kind": "train", "family": "ddpm",
        "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
        "data": {"dataset": "digits", "image_size": 8},
        "train": {"steps": steps, "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
                  "sample_images": 2, **train}}]})
    root_uri = f"file://{tmp_path / 'store'}"
    key = stage(spec.jobs[0].data, open_storage(root_uri))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if run_id is None:
        client = MlflowClient(tracking)
        exp = client.get_experiment_by_name("h") or client.get_experiment(client.create_experiment("h"))
        run_id = client.create_run(exp.experiment_id).info.run_id
    return Task(job=spec.jobs[0].resolved(), job_hash="0" * 16, experiment="h",
                storage_root=root_uri, prefix="h/ddpm/0", tracking_uri=tracking, run_id=run_id,
                code_version="test", data_key=key, attempt=attempt)


class NaNAtStep3(DDPMWorker):
    def train_step(self, batch, labels, gen):
        losses = super().train_step(batch, labels, gen)
        if self._progress["step"] >= 2:  # the step being taken is 3
            losses["loss"] = torch.tensor(math.nan)
        return losses


def test_non_finite_loss_stops_the_job(tmp_path):
    worker = NaNAtStep3(make_task(tmp_path, steps=10))
    with pytest.raises(JobError, match=r"loss is not finite \(nan\) at step 3"):
        worker.run()


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    first = make_task(tmp_path, steps=4)
    assert DDPMWorker(first).run()["step"] == 4
    store = open_storage(first.storage_root).child(first.prefix)
    assert load_checkpoint(store).step == 4
    # a longer run of the same job (as a second attempt) resumes at step 5, logs 5..6 only
    again = make_task(tmp_path, steps=6, attempt=2, run_id=first.run_id)
    result = DDPMWorker(again).run()
    assert result["step"] == 6 and result["timing"]["steps_run"] == 2
    history = MlflowClient(first.tracking_uri).get_metric_history(first.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    tags = MlflowClient(first.tracking_uri).get_run(first.run_id).data.tags
    assert tags["genforge.resumed_at_step"] == "5"
