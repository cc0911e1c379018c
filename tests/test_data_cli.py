"""`genforge data stage | ls | rm` on file:// storage: a spec's data staged ahead, listed with its
size and readers, and removed, except while a job that reads it runs."""

from __future__ import annotations

import pytest

from orchestrator import datasets
from orchestrator.cli import main
from orchestrator.storage import open_storage
from support import write_spec

SPEC = {"experiment": "d", "jobs": [
    {"name": "a", "kind": "train", "family": "ddpm", "data": {"dataset": "digits", "image_size": 8}},
    {"name": "g", "kind": "sample", "family": "ddpm", "from": "a"}]}


@pytest.fixture()
def env(tmp_path, monkeypatch):
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GENFORGE_STORAGE", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("GENFORGE_HOME", str(tmp_path / "home"))
    return open_storage(f"file://{tmp_path / 'store'}")


def test_stage_list_and_remove(tmp_path, env, capsys):
    spec = write_spec(tmp_path / "s.yaml", SPEC)
    assert main(["data", "stage", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a: file://") and "1617 images 8x8x1 in 1 shards" in out
    (data,) = datasets.staged(env)
    assert data["index"]["count"] == 1617 and data["readers"] == []
    datasets.note_reader(env, data["key"], "d/a/0123456789abcdef")  # as the driver does
    assert main(["data", "ls"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[1].split()[:4] == [data["digest"][:12], "1617", "8x8x1", "1"]
    assert listing[1].endswith("d/a")

    env.put_bytes("d/a/0123456789abcdef/LEASE", b"{}")  # the job that reads it is running
    assert main(["data", "rm", data["digest"][:8]]) == 1
    err = capsys.readouterr().err
    assert err == (f"genforge: datasets/{data['digest']}: job d/a/0123456789abcdef is reading "
                   "it; remove it once that job has ended\n")
    assert env.exists(data["key"])

    env.delete("d/a/0123456789abcdef/LEASE")
    assert main(["data", "rm", data["digest"][:8]]) == 0
    assert env.list("datasets/") == [] and datasets.staged(env) == []
    assert main(["data", "rm", "ffff"]) == 1
    assert "no staged data set is 'ffff'" in capsys.readouterr().err
