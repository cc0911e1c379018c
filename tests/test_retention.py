"""Checkpoint retention: `prune_checkpoints` keeps the newest N, LATEST's target and every
pinned checkpoint; `train.keep_checkpoints` validates and a training job prunes as it goes."""

from __future__ import annotations

import json

import pytest
import torch

import orchestrator.checkpoints as ck
from orchestrator.checkpoints import (CheckpointError, list_checkpoints, load_checkpoint,
                                      prune_checkpoints, save_checkpoint)
from orchestrator.inprocess import run_jobs
from orchestrator.spec import SpecError, TrainSpec, parse_spec
from orchestrator.storage import open_storage


def _save(store, *steps: int) -> None:
    for step in steps:
        save_checkpoint(store, step, tensors={"w": torch.full((2,), float(step))},
                        state={"step": step})


@pytest.fixture
def store(tmp_path):
    return open_storage(f"file://{tmp_path / 'job'}")


def names(*steps: int) -> list[str]:
    return [f"step-{s:06d}" for s in steps]


def test_keep_two_of_five_leaves_the_newest_two(store):
    _save(store, 1, 2, 3, 4, 5)
    assert prune_checkpoints(store, keep_last=2) == names(1, 2, 3)
    assert list_checkpoints(store) == names(4, 5)
    assert not store.list("checkpoints/step-000001/")  # its files too, not only the manifest
    assert load_checkpoint(store).step == 5


def test_a_pinned_older_checkpoint_survives(store):
    _save(store, 1, 2, 3, 4, 5)
    ck.pin_checkpoint(store, "step-000002", "ab12cd34ef56ab78")
    assert ck.pinned_checkpoints(store) == {"step-000002"}
    pin = json.loads(store.get_bytes("pins/ab12cd34ef56ab78"))
    assert pin["checkpoint"] == "step-000002" and pin["pinned_at"].endswith("+00:00")
    assert prune_checkpoints(store, keep_last=2) == names(1, 3)
    assert list_checkpoints(store) == names(2, 4, 5)
    assert load_checkpoint(store, "step-000002").step == 2


def test_pins_are_validated_and_malformed_ones_ignored(store):
    _save(store, 1)
    for reader in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(CheckpointError, match="reader"):
            ck.pin_checkpoint(store, "step-000001", reader)
    with pytest.raises(CheckpointError, match="checkpoint name"):
        ck.pin_checkpoint(store, "LATEST", "abc")
    store.put_bytes("pins/garbage", b"\x00{not json")
    store.put_bytes("pins/list", b"[1, 2]")
    store.put_bytes("pins/badname", json.dumps({"checkpoint": "../x"}).encode())
    ck.pin_checkpoint(store, "step-000001", "good")
    assert ck.pinned_checkpoints(store) == {"step-000001"}


def test_latest_target_survives_even_when_not_among_the_newest(store):
    _save(store, 1, 2, 3, 4, 5)
    store.put_bytes("checkpoints/LATEST", b"step-000002")  # e.g. LATEST rolled back by hand
    assert prune_checkpoints(store, keep_last=1) == names(1, 3, 4)
    assert list_checkpoints(store) == names(2, 5)


def test_an_incomplete_newer_checkpoint_may_be_being_written(store):
    _save(store, 1, 2, 3)
    store.put_bytes("checkpoints/step-000004/model.safetensors", b"half an upload")
    assert prune_checkpoints(store, keep_last=1) == names(1, 2)
    assert store.exists("checkpoints/step-000004/model.safetensors")


def test_a_pin_written_while_pruning_keeps_the_checkpoint(store, monkeypatch):
    """The reader pins after the pruner read the pins: the pruner checks again once the
    checkpoint is incomplete and completes it again."""
    _save(store, 1, 2, 3)
    delete = store.delete

    def racing_delete(key):
        delete(key)
        if key == "checkpoints/step-000001/manifest.json":
            ck.pin_checkpoint(store, "step-000001", "latecomer")

    monkeypatch.setattr(store, "delete", racing_delete)
    assert prune_checkpoints(store, keep_last=1) == names(2)
    assert list_checkpoints(store) == names(1, 3)
    assert load_checkpoint(store, "step-000001").step == 1


def test_keep_checkpoints_validates():
    assert TrainSpec().keep_checkpoints == 3
    assert TrainSpec(keep_checkpoints=None).keep_checkpoints is None
    assert TrainSpec(keep_checkpoints=1).keep_checkpoints == 1
    job = {"name": "a", "kind": "train", "family": "ddpm", "data": {"dataset": "digits"}}
    with pytest.raises(SpecError) as err:
        parse_spec({"experiment": "x", "jobs": [{**job, "train": {"keep_checkpoints": 0}}]})
    assert len(err.value.lines) == 1 and "keep_checkpoints" in err.value.lines[0]
    spec = parse_spec({"experiment": "x", "jobs": [{**job, "train": {"keep_checkpoints": None}}]})
    assert "keep_checkpoints" not in spec.jobs[0].resolved()["train"]  # None: keep every one


def test_a_training_job_keeps_its_newest_checkpoints(tmp_path):
    spec = {"experiment": "keep", "jobs": [{
        "name": "ddpm", "kind": "train", "family": "ddpm",
        "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
        "data": {"dataset": "digits", "image_size": 8},
        "resources": {"cpus": 1},
        "train": {"steps": 6, "batch_size": 8, "log_every": 1, "checkpoint_every": 1,
                  "sample_images": 2, "keep_checkpoints": 2}}]}
    result = run_jobs(tmp_path, spec)["ddpm"]
    assert result["step"] == 6
    job = open_storage(result["checkpoint"].rsplit("/checkpoints/", 1)[0])
    assert list_checkpoints(job) == names(5, 6)
    assert {k.split("/")[1] for k in job.list("checkpoints/step-")} == set(names(5, 6))
    assert load_checkpoint(job).step == 6


def test_a_failed_prune_does_not_fail_the_checkpoint(store, monkeypatch, caplog):
    from orchestrator.storage import StorageError
    from workers.base import NullLogger
    from workers import base
    from workers.base import Worker

    def broken(storage, keep_last):
        raise StorageError("storage went away")

    monkeypatch.setattr(base, "prune_checkpoints", broken)
    worker = Worker.__new__(Worker)
    worker.job, worker.storage, worker.log = {"train": {"keep_checkpoints": 1}}, store, NullLogger()
    _save(store, 1)
    uri = worker._upload_checkpoint(ck.encode_checkpoint(2, tensors={"w": torch.zeros(2)}))
    assert uri == store.uri("checkpoints/step-000002")
    assert list_checkpoints(store) == names(1, 2)
    assert "could not prune" in caplog.text and "storage went away" in caplog.text
