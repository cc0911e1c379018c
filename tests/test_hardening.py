"""A checkpoint URI from the user that points at something else than a sound checkpoint of the
job's family: each case ends in one clear line of genforge's own, never an error from inside
torch or safetensors. In-process, on file:// storage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.checkpoints import CheckpointError, encode_checkpoint, load_checkpoint, write_checkpoint
from orchestrator.inprocess import run_jobs
from orchestrator.spec import SpecError
from orchestrator.storage import FileStorage, StorageError
from workers.base import JobError

TINY = {"channels": 8, "channel_mult": [1], "timesteps": 10}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trained")
    run_jobs(work, {"experiment": "h", "defaults": {"data": {"dataset": "digits", "image_size": 8}},
                    "jobs": [{"name": "m", "kind": "train", "family": "ddpm", "model": TINY,
                              "train": {"steps": 2, "batch_size": 4, "sample_images": 1}}]})
    (job,) = (work / "store" / "h" / "m").iterdir()
    return job


def sample_from(tmp_path: Path, uri: str) -> Exception:
    spec = {"experiment": "h", "jobs": [{"name": "s", "kind": "sample", "family": "ddpm",
                                         "from": uri, "sample": {"num_images": 2, "steps": 2}}]}
    with pytest.raises(Exception) as info:
        run_jobs(tmp_path, spec)
    return info.value


def copy_of(trained: Path, tmp_path: Path) -> Path:
    job = tmp_path / "copy"
    shutil.copytree(trained, job)
    return job


def assert_clear(exc: Exception, *expected: str) -> None:
    # refused when the plan is made (the URI resolves to no checkpoint) or when the job loads it
    assert isinstance(exc, (SpecError, JobError, CheckpointError, StorageError)), repr(exc)
    text = str(exc)
    assert "\n" not in text and len(text) < 600, text
    for part in expected:
        assert part in text, text


def test_the_trained_checkpoint_samples(trained, tmp_path):
    spec = {"experiment": "h", "jobs": [{"name": "s", "kind": "sample", "family": "ddpm",
                                         "from": f"file://{trained}", "sample": {"num_images": 2, "steps": 2}}]}
    assert run_jobs(tmp_path, spec)["s"]["num_images"] == 2


def test_a_truncated_weights_file(trained, tmp_path):
    job = copy_of(trained, tmp_path)
    weights = job / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_clear(sample_from(tmp_path, f"file://{job}/checkpoints/step-000002"),
                 "model.safetensors", "size")


def test_a_corrupted_manifest(trained, tmp_path):
    job = copy_of(trained, tmp_path)
    (job / "checkpoints" / "step-000002" / "manifest.json").write_bytes(b"\x00{not json")
    assert_clear(sample_from(tmp_path, f"file://{job}"), "checkpoint")


def test_a_foreign_file_under_a_sound_manifest(trained, tmp_path):
    """Someone else's bytes with a manifest that vouches for them: the loader refuses them."""
    job = copy_of(trained, tmp_path)
    folder = job / "checkpoints" / "step-000002"
    (folder / "model.safetensors").write_bytes(b"GIF89a" + bytes(200))
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib

    manifest["files"]["model.safetensors"] = {
        "sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(), "size": 206}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_clear(sample_from(tmp_path, f"file://{folder}"), "model.safetensors does not load")


def test_weights_that_do_not_fit_the_model(trained, tmp_path):
    """A sound checkpoint whose manifest describes another model than its weights."""
    ckpt = load_checkpoint(FileStorage(trained))
    meta = {**ckpt.meta, "model": {**ckpt.meta["model"], "channels": 16}}
    target = FileStorage(tmp_path / "other")
    write_checkpoint(target, encode_checkpoint(2, tensors=ckpt.tensors, state=ckpt.state, meta=meta))
    assert_clear(sample_from(tmp_path, target.uri()),
                 "weights do not fit the model", "size mismatch")


def test_a_uri_that_is_not_a_checkpoint(trained, tmp_path):
    grid = next((trained / "samples").iterdir())
    assert_clear(sample_from(tmp_path, f"file://{grid}"))
    assert_clear(sample_from(tmp_path, f"file://{tmp_path}/nothing-here"))
