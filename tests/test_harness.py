"""The shared training harness in-process, on file:// storage and a local MLflow store:
NaN detection, resume from the latest checkpoint, no metric step logged twice."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.checkpoints import load_checkpoint
from orchestrator.datasets import stage
from orchestrator.spec import parse_spec
from orchestrator.storage import open_storage
from orchestrator.task import Task
from workers.base import JobError
from workers.ddpm.worker import DDPMWorker


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


@pytest.mark.parametrize("sample_steps, evaluations", [(None, 20), (3, 3)])
def test_the_training_grids_take_train_sample_steps(tmp_path, sample_steps, evaluations):
    """A grid is sampled with the family's default (DDIM: 50, or every timestep if fewer:
    here 20), or with `train.sample_steps`."""
    counted = []

    class Counting(DDPMWorker):
        def _log_grid(self, step, n):
            calls = []
            hook = self.sampling_module("net").register_forward_hook(lambda *_: calls.append(1))
            try:
                super()._log_grid(step, n)
            finally:
                hook.remove()
            counted.append(len(calls))

    train = {} if sample_steps is None else {"sample_steps": sample_steps}
    assert Counting(make_task(tmp_path, steps=2, **train)).run()["status"] == "finished"
    assert counted == [evaluations]


# ---- stopping outside the training loop ------------------------------------------------------

def job_store(task: Task):
    return open_storage(task.storage_root).child(task.prefix)


def test_a_training_job_stopped_during_its_final_metrics_stops_there(tmp_path):
    grids = []

    class StopInFinalMetrics(DDPMWorker):
        def final_metrics(self):
            self.request_stop()  # as the driver's stop arrives while they are measured
            return {"heldout": 1.0}

        def _log_grid(self, step, n):
            grids.append(step)
            super()._log_grid(step, n)

    task = make_task(tmp_path, steps=2)
    result = StopInFinalMetrics(task).run()
    assert result == {"status": "stopped", "step": 2, "phase": "sampling"}
    assert grids == [] and not job_store(task).exists("result.json")
    assert load_checkpoint(job_store(task)).step == 2  # the final checkpoint stands
    # the next attempt trains no step, rewrites no checkpoint and finishes the job
    manifest = tmp_path / "store" / task.prefix / "checkpoints" / "step-000002" / "manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    again = DDPMWorker(make_task(tmp_path, steps=2, attempt=2, run_id=task.run_id)).run()
    assert again["status"] == "finished" and again["timing"]["steps_run"] == 0
    assert again["checkpoint"] == load_checkpoint(job_store(task)).uri
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    assert job_store(task).exists("result.json")


def test_a_stop_before_the_training_loop_returns_after_loading_the_data(tmp_path):
    task = make_task(tmp_path, steps=4)
    worker = DDPMWorker(task)
    worker.request_stop()
    result = worker.run()
    assert result == {"status": "stopped", "step": 0, "phase": "loading data"}
    assert not job_store(task).exists("result.json")
    assert not job_store(task).list("checkpoints/")


def sample_task(tmp_path, source: str, run_id: str, **sample) -> Task:
    spec = parse_spec({"experiment": "h", "jobs": [{
        "name": "grid", "kind": "sample", "family": "ddpm", "from": source,
        "sample": {"num_images": 12, "batch_size": 4, "steps": 2, **sample}}]})
    return Task(job=spec.jobs[0].resolved(), job_hash="1" * 16, experiment="h",
                storage_root=f"file://{tmp_path / 'store'}", prefix="h/grid/1",
                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_id=run_id,
                code_version="test", refs={"from": source}, sources=(source,))


def test_ema_decay_0_keeps_no_average_and_its_samples_are_the_trained_weights(tmp_path):
    (tmp_path / "a").mkdir()
    averaged = DDPMWorker(make_task(tmp_path / "a", steps=2)).run()["checkpoint"]
    trained = make_task(tmp_path, steps=2, ema_decay=0)
    assert trained.job["train"]["ema_decay"] == 0
    plain = DDPMWorker(trained).run()["checkpoint"]
    tensors = load_checkpoint(job_store(trained)).tensors
    assert any(k.startswith("net/") for k in tensors)
    assert not any(k.startswith("ema.") for k in tensors)
    # the same seeds and batches: with an average the samples differ, without one they are
    # the trained weights' (sample.use_ema: false of the averaged model draws the same)
    def draw(source: str, run_id: str, out: str, **sample) -> np.ndarray:
        task = sample_task(tmp_path, source, run_id, **sample)
        task = dataclasses.replace(task, prefix=f"h/{out}/1")
        DDPMWorker(task).run()
        return np.load(io.BytesIO(open_storage(task.storage_root).child(task.prefix)
                                  .get_bytes("outputs/images.npz")))["images"]

    assert np.array_equal(draw(plain, trained.run_id, "plain"),
                          draw(averaged, trained.run_id, "raw", use_ema=False))
    assert not np.array_equal(draw(plain, trained.run_id, "plain2"),
                              draw(averaged, trained.run_id, "avg"))


def test_a_sampling_job_stops_between_batches(tmp_path):
    trained = make_task(tmp_path, steps=2)
    checkpoint = DDPMWorker(trained).run()["checkpoint"]
    batches = []

    class StopAfterTheFirstBatch(DDPMWorker):
        def generate(self, n, sample_cfg, gen, progress=None):
            batches.append(n)
            out = super().generate(n, sample_cfg, gen, progress)
            self.request_stop()
            return out

    task = sample_task(tmp_path, checkpoint, trained.run_id)
    result = StopAfterTheFirstBatch(task).run()
    assert result == {"status": "stopped", "step": 4, "phase": "sample"}
    assert batches == [4]  # of 3
    assert not job_store(task).exists("result.json")
    assert not job_store(task).exists("outputs/images.npz")


def test_a_sampling_job_stopped_from_another_thread(tmp_path):
    import threading

    trained = make_task(tmp_path, steps=2)
    checkpoint = DDPMWorker(trained).run()["checkpoint"]
    started = threading.Event()
    batches = []

    class Slow(DDPMWorker):
        def generate(self, n, sample_cfg, gen, progress=None):
            batches.append(n)
            started.set()
            time.sleep(0.5)
            return super().generate(n, sample_cfg, gen, progress)

    task = sample_task(tmp_path, checkpoint, trained.run_id, num_images=80)
    worker = Slow(task)
    stopper = threading.Thread(target=lambda: started.wait(60) and worker.request_stop())
    stopper.start()
    result = worker.run()
    stopper.join()
    assert result["status"] == "stopped" and result["phase"] == "sample"
    assert "checkpoint" not in result and len(batches) < 20
    assert result["step"] == 4 * len(batches)
    assert not job_store(task).exists("result.json")


# ---- tracking that fails -----------------------------------------------------------------------

def tracking_away(worker) -> None:
    def log_batch(*args, **kwargs):
        raise ConnectionError("the tracking server is away")

    worker.log.client.log_batch = log_batch


class Failing(Exception):
    pass


def test_a_jobs_own_error_is_raised_when_the_logger_cannot_close(tmp_path):
    worker = NaNAtStep3(make_task(tmp_path, steps=10))
    tracking_away(worker)
    with pytest.raises(JobError, match=r"loss is not finite \(nan\) at step 3") as info:
        worker.run()
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "logging to MLflow failed" in notes


def test_a_job_that_finished_reports_what_tracking_lost(tmp_path, monkeypatch):
    from workers import base

    monkeypatch.setattr(base, "DELIVER_S", 2.0)  # the server stays away past the wait
    task = make_task(tmp_path, steps=3)
    worker = DDPMWorker(task)
    tracking_away(worker)
    result = worker.run()
    assert result["status"] == "finished" and job_store(task).exists("result.json")
    lost = result["tracking_lost"]
    assert any("metric points of steps 1..3" in line and "ConnectionError" in line for line in lost)
    assert all("\n" not in line for line in lost)
    stored = json.loads(job_store(task).get_bytes("result.json"))
    assert stored["step"] == 3 and "tracking_lost" not in stored


def test_a_job_is_complete_only_once_its_metrics_are_in_its_run(tmp_path):
    """A tracking server away at the end of the job: result.json (after which the job is a
    cache hit, never run again) waits for the metrics, which would otherwise die with the
    process if its driver were killed then."""
    task = make_task(tmp_path, steps=3)
    worker = DDPMWorker(task)
    send = worker.log.client.log_batch
    away = {"calls": 0}

    def flaky(*args, **kwargs):
        away["calls"] += 1
        if away["calls"] <= 2:
            raise ConnectionError("the tracking server is away")
        return send(*args, **kwargs)

    worker.log.client.log_batch = flaky
    written = []
    put = worker.storage.put_bytes

    def put_bytes(key, data):
        if key == "result.json":  # the run's history when the result is written
            written.append(sorted(m.step for m in MlflowClient(task.tracking_uri)
                                  .get_metric_history(task.run_id, "loss")))
        return put(key, data)

    worker.storage.put_bytes = put_bytes
    result = worker.run()
    assert result["status"] == "finished" and "tracking_lost" not in result
    assert written == [[1, 2, 3]]


def test_a_resumed_job_logs_the_metrics_its_checkpoint_saved_unsent(tmp_path):
    """Attempt 1 writes its checkpoint at step 2 while the tracking server is away, then dies;
    attempt 2 resumes at step 3 and logs steps 1 and 2 from the checkpoint: no gap."""

    class DiesAtStep3(DDPMWorker):
        def train_step(self, batch, labels, gen):
            if self.step == 3:
                raise Failing("the worker died")
            return super().train_step(batch, labels, gen)

    first = make_task(tmp_path, steps=4)
    worker = DiesAtStep3(first)
    tracking_away(worker)
    with pytest.raises(Failing):
        worker.run()
    client = MlflowClient(first.tracking_uri)
    assert client.get_metric_history(first.run_id, "loss") == []
    saved = load_checkpoint(job_store(first)).state["unsent_metrics"]
    assert sorted({p[3] for p in saved}) == [1, 2] and all(len(p) == 4 for p in saved)

    result = DDPMWorker(make_task(tmp_path, steps=4, attempt=2, run_id=first.run_id)).run()
    assert result["status"] == "finished" and result["timing"]["steps_run"] == 2
    for key in ("loss", "steps_per_s"):
        history = client.get_metric_history(first.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3, 4], key
