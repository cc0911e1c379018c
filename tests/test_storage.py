"""Tests for orchestrator.storage and orchestrator.checkpoints.

FileStorage tests use tmp_path.  S3 tests run against the real SeaweedFS server of the
test stack (``local_stack`` in conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from orchestrator import stack
from orchestrator.checkpoints import (
    Checkpoint,
    CheckpointError,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint_uri,
    save_checkpoint,
)
from orchestrator.storage import (
    FileStorage,
    NotFound,
    S3Credentials,
    S3Storage,
    Storage,
    StorageError,
    open_storage,
    split_uri,
)

# =========================================================================== SeaweedFS fixture


@dataclass(frozen=True)
class SeaweedS3:
    endpoint_url: str
    bucket: str
    credentials: S3Credentials


@pytest.fixture(scope="session")
def seaweed_s3(local_stack) -> SeaweedS3:
    """The real SeaweedFS S3 server of the test stack (credentials enforced, 127.0.0.1 only)."""
    creds = stack.credentials(Path(local_stack.home))
    return SeaweedS3(
        endpoint_url=local_stack.s3_endpoint,
        bucket=local_stack.bucket,
        credentials=S3Credentials(local_stack.s3_endpoint, creds["access_key"], creds["secret_key"]),
    )


@pytest.fixture
def s3_storage(seaweed_s3) -> S3Storage:
    """A fresh, unique prefix in the test bucket."""
    return S3Storage(
        seaweed_s3.bucket,
        f"tests/{uuid.uuid4().hex[:12]}",
        seaweed_s3.credentials,
        max_attempts=3,
        connect_timeout=5,
        read_timeout=30,
    )


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "file":
        return FileStorage(tmp_path / "root")
    return request.getfixturevalue("s3_storage")


# =========================================================================== keys & URIs

BAD_KEYS = [
    "../x",
    "/abs",
    "a/../../b",
    "a/..",
    "./a",
    "a/./b",
    "%2e%2e/x",
    "a%2fb",
    "%2E%2E%2Fetc",
    "a\\b",
    "..\\x",
    "a//b",
    "a/",
    "",
    "a\x00b",
    "a\nb",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_file_storage_rejects_escaping_keys(tmp_path, key):
    root = tmp_path / "root"
    st = FileStorage(root)
    for op in (
        lambda: st.put_bytes(key, b"x"),
        lambda: st.get_bytes(key),
        lambda: st.exists(key),
        lambda: st.delete(key),
        lambda: st.put_file(key, __file__),
        lambda: st.get_file(key, tmp_path / "out"),
    ):
        with pytest.raises(StorageError):
            op()
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "abs").exists() and not Path("/abs").exists()


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../b", "%2e%2e/x", "a\\b", "a//b"])
def test_s3_storage_rejects_escaping_keys_without_network(key):
    # endpoint that does not exist: validation must happen before any request
    st = S3Storage("bucket", "p", S3Credentials("http://127.0.0.1:9", "AK", "SK"), max_attempts=1)
    with pytest.raises(StorageError):
        st.put_bytes(key, b"x")
    with pytest.raises(StorageError):
        st.child(key)


def test_escaping_keys_are_refused_by_both_storages(storage, seaweed_s3):
    """Against the real S3 server and a file:// root: nothing lands outside the prefix."""
    bucket = S3Storage(seaweed_s3.bucket, "", seaweed_s3.credentials)
    before = set(bucket.list(""))
    for key in BAD_KEYS:
        with pytest.raises(StorageError):
            storage.put_bytes(key, b"escaped")
        with pytest.raises(StorageError):
            storage.get_bytes(key)
    for prefix in ("../x", "/abs", "a/../../b", "%2e%2e/x"):
        with pytest.raises(StorageError):
            storage.child(prefix)
    storage.put_bytes("inside/ok", b"x")
    assert storage.list("") == ["inside/ok"]
    added = set(bucket.list("")) - before
    if isinstance(storage, S3Storage):
        assert added == {f"{storage.prefix}/inside/ok"}
    else:
        assert not added
        assert [p.name for p in storage.path.parent.iterdir()] == ["root"]


def test_child_and_list_prefix_reject_escapes(tmp_path):
    st = FileStorage(tmp_path / "root")
    for bad in ("../other", "/etc", "%2e%2e", "a/../.."):
        with pytest.raises(StorageError):
            st.child(bad)
        with pytest.raises(StorageError):
            st.list(bad)


def test_symlink_escape_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    os.symlink(outside, root / "link")
    st = FileStorage(root)
    with pytest.raises(StorageError):
        st.get_bytes("link/secret.txt")
    with pytest.raises(StorageError):
        st.put_bytes("link/new.txt", b"x")
    assert not (outside / "new.txt").exists()
    assert st.list() == []


def test_split_uri_and_open_storage(tmp_path):
    assert split_uri("s3://bucket/a/b/") == ("s3", "bucket", "a/b")
    assert split_uri("s3://bucket") == ("s3", "bucket", "")
    assert split_uri(f"file://{tmp_path}") == ("file", str(tmp_path), "")
    assert isinstance(open_storage(f"file://{tmp_path}"), FileStorage)
    assert isinstance(open_storage(str(tmp_path)), FileStorage)
    s3 = open_storage("s3://bucket/pre/fix", S3Credentials("http://127.0.0.1:9", "AK", "SK"))
    assert isinstance(s3, S3Storage)
    assert s3.root == "s3://bucket/pre/fix"
    assert s3.uri("a/b.txt") == "s3://bucket/pre/fix/a/b.txt"
    assert s3.child("c/").root == "s3://bucket/pre/fix/c"
    with pytest.raises(StorageError, match="gs"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError):
        open_storage("relative/path")
    with pytest.raises(StorageError):
        open_storage("s3://bucket/../x")
    with pytest.raises(StorageError):
        open_storage("file://otherhost/x")


def test_credentials_repr_hides_secret(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.local:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    c = S3Credentials.from_env()
    assert c.endpoint_url == "http://s3.local:8333"
    assert c.access_key_id == "AKIDEXAMPLE"
    assert c.secret_access_key == "very-secret-value"
    assert c.region == "us-east-1"
    assert "very-secret-value" not in repr(c)
    assert "very-secret-value" not in str(c)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://primary:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    c2 = S3Credentials.from_env()
    assert c2.endpoint_url == "http://primary:1" and c2.region == "eu-west-1"


def test_not_found_is_file_not_found():
    e = NotFound("s3://b/k does not exist")
    assert isinstance(e, StorageError) and isinstance(e, FileNotFoundError)
    assert str(e) == "s3://b/k does not exist"


# =========================================================================== FileStorage


def test_file_round_trip_and_list(tmp_path):
    st = FileStorage(tmp_path / "root")
    st.check()  # root does not exist yet but can be created
    st.put_bytes("a.txt", b"hello")
    st.put_bytes("dir/sub/b.bin", bytes(range(256)))
    st.put_text("dir/c.txt", "ünïcode")
    assert st.get_bytes("a.txt") == b"hello"
    assert st.get_bytes("dir/sub/b.bin") == bytes(range(256))
    assert st.get_text("dir/c.txt") == "ünïcode"
    assert st.exists("a.txt") and not st.exists("nope") and not st.exists("dir")
    assert st.list() == ["a.txt", "dir/c.txt", "dir/sub/b.bin"]
    assert st.list("dir/") == ["dir/c.txt", "dir/sub/b.bin"]
    assert st.list("dir/s") == ["dir/sub/b.bin"]
    assert st.list("zzz/") == []
    assert st.uri("dir/c.txt") == f"file://{tmp_path}/root/dir/c.txt"

    child = st.child("dir")
    assert child.root == f"file://{tmp_path}/root/dir"
    assert child.list() == ["c.txt", "sub/b.bin"]
    assert open_storage(child.root).get_bytes("c.txt") == "ünïcode".encode()

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    st.put_file("files/src.bin", src)
    st.get_file("files/src.bin", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == src.read_bytes()

    with pytest.raises(NotFound):
        st.get_bytes("missing")
    with pytest.raises(FileNotFoundError):
        st.get_file("missing", tmp_path / "x")
    st.delete("a.txt")
    st.delete("a.txt")  # idempotent
    assert not st.exists("a.txt")
    st.put_bytes("a.txt", b"overwritten")
    st.put_bytes("a.txt", b"twice")
    assert st.get_bytes("a.txt") == b"twice"


def test_file_atomic_write(tmp_path, monkeypatch):
    st = FileStorage(tmp_path / "root")
    st.put_bytes("k/obj", b"old content")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match="No space left"):
        st.put_bytes("k/obj", b"new content that never lands")
    monkeypatch.undo()
    assert st.get_bytes("k/obj") == b"old content"
    # no temp file left behind, nothing extra listed
    assert sorted(p.name for p in (tmp_path / "root" / "k").iterdir()) == ["obj"]
    assert st.list() == ["k/obj"]

    # a temp file left by a crashed writer is invisible to list()
    (tmp_path / "root" / "k" / ".obj.genforge-tmp-abc123").write_bytes(b"partial")
    assert st.list() == ["k/obj"]


def test_file_check_errors(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        FileStorage(f).check()
    with pytest.raises(StorageError, match="not a directory"):
        FileStorage(f / "sub").check()


# =========================================================================== checkpoints helpers


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, generator=g)
    return {
        "layer.weight": w,
        "layer.weight_tied": w,  # shared storage: must be cloned, not rejected
        "layer.bias": torch.randn(4, generator=g),
        "t": w.t(),  # non-contiguous view
        "emb": torch.arange(10, dtype=torch.int64),
    }


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3, generator=g), "step": torch.tensor(5.0)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "rng": {"torch": torch.get_rng_state()},
        "epoch": seed,
        "note": "hello",
    }


def _flip_bytes(storage: Storage, key: str) -> None:
    data = bytearray(storage.get_bytes(key))
    mid = len(data) // 2
    for i in range(mid, min(mid + 8, len(data))):
        data[i] ^= 0xFF
    storage.put_bytes(key, bytes(data))


# =========================================================================== checkpoints (file + s3)


def test_checkpoint_save_and_load_latest(storage):
    uri1 = save_checkpoint(storage, 100, tensors=_tensors(1), state=_state(1), meta={"loss": 1.5})
    uri2 = save_checkpoint(storage, 200, tensors=_tensors(2), state=_state(2), meta={"loss": 0.5})
    assert uri1 == storage.uri("checkpoints/step-000100")
    assert uri2 == storage.uri("checkpoints/step-000200")
    assert list_checkpoints(storage) == ["step-000100", "step-000200"]
    assert storage.get_bytes("checkpoints/LATEST").decode().strip() == "step-000200"
    assert set(storage.list("checkpoints/step-000200/")) == {
        "checkpoints/step-000200/model.safetensors",
        "checkpoints/step-000200/state.pt",
        "checkpoints/step-000200/manifest.json",
    }

    c = load_checkpoint(storage)
    assert isinstance(c, Checkpoint)
    assert c.step == 200 and c.uri == uri2 and c.meta == {"loss": 0.5}
    expected = _tensors(2)
    assert set(c.tensors) == set(expected)
    for k, v in expected.items():
        assert torch.equal(c.tensors[k], v), k
    assert c.state["epoch"] == 2 and c.state["note"] == "hello"
    assert torch.equal(c.state["optimizer"]["state"][0]["exp_avg"], _state(2)["optimizer"]["state"][0]["exp_avg"])
    assert c.state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert latest_step(storage) == 200

    older = load_checkpoint(storage, "step-000100")
    assert older.step == 100 and older.meta == {"loss": 1.5}

    manifest = json.loads(storage.get_bytes("checkpoints/step-000200/manifest.json"))
    assert manifest["format"] == 1 and manifest["step"] == 200
    assert set(manifest["files"]) == {"model.safetensors", "state.pt"}
    assert "created" in manifest


def test_checkpoint_corrupt_latest_falls_back(storage):
    save_checkpoint(storage, 1, tensors=_tensors(1), state=_state(1))
    save_checkpoint(storage, 2, tensors=_tensors(2), state=_state(2))
    _flip_bytes(storage, "checkpoints/step-000002/model.safetensors")
    c = load_checkpoint(storage)
    assert c.step == 1
    assert torch.equal(c.tensors["layer.bias"], _tensors(1)["layer.bias"])
    assert latest_step(storage) == 1
    with pytest.raises(CheckpointError, match="step-000002"):
        load_checkpoint(storage, "step-000002")


def test_checkpoint_truncated_latest_falls_back(storage):
    save_checkpoint(storage, 1, tensors=_tensors(1), state=_state(1))
    save_checkpoint(storage, 2, tensors=_tensors(2), state=_state(2))
    data = storage.get_bytes("checkpoints/step-000002/state.pt")
    storage.put_bytes("checkpoints/step-000002/state.pt", data[: len(data) // 3])
    assert load_checkpoint(storage).step == 1


def test_checkpoint_incomplete_newest_ignored(storage):
    save_checkpoint(storage, 1, tensors=_tensors(1), state=_state(1))
    save_checkpoint(storage, 2, tensors=_tensors(2), state=_state(2))
    storage.delete("checkpoints/step-000002/manifest.json")  # crash before the manifest
    assert list_checkpoints(storage) == ["step-000001"]
    assert load_checkpoint(storage).step == 1  # LATEST still says step-000002
    with pytest.raises(NotFound):
        load_checkpoint(storage, "step-000002")


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe\x00garbage", b"step-999999", b"../../etc/passwd"])
def test_checkpoint_latest_garbage_falls_back(storage, garbage):
    save_checkpoint(storage, 1, tensors=_tensors(1), state=_state(1))
    save_checkpoint(storage, 2, tensors=_tensors(2), state=_state(2))
    storage.put_bytes("checkpoints/LATEST", garbage)
    assert load_checkpoint(storage).step == 2
    storage.delete("checkpoints/LATEST")
    assert load_checkpoint(storage).step == 2


def test_checkpoint_none_at_all(storage):
    with pytest.raises(NotFound):
        load_checkpoint(storage)
    assert latest_step(storage) is None
    storage.put_bytes("checkpoints/LATEST", b"step-000005")
    with pytest.raises(NotFound):
        load_checkpoint(storage)


def test_checkpoint_all_corrupt_raises_checkpoint_error(storage):
    save_checkpoint(storage, 1, tensors=_tensors(1), state=_state(1))
    _flip_bytes(storage, "checkpoints/step-000001/model.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(storage)
    msg = str(ei.value)
    assert "\n" not in msg
    assert storage.uri("checkpoints") in msg
    with pytest.raises(CheckpointError):
        latest_step(storage)


def test_checkpoint_manifest_garbage(storage):
    save_checkpoint(storage, 1, tensors=_tensors(1), state=_state(1))
    save_checkpoint(storage, 2, tensors=_tensors(2), state=_state(2))
    storage.put_bytes("checkpoints/step-000002/manifest.json", b"{not json")
    assert load_checkpoint(storage).step == 1


class _Evil:
    """Pickle payload: creating a file proves code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _forge_state(storage: Storage, name: str, payload: bytes) -> None:
    """Replace state.pt and rewrite the manifest so sizes and hashes match (a forgery)."""
    import hashlib

    storage.put_bytes(f"checkpoints/{name}/state.pt", payload)
    mkey = f"checkpoints/{name}/manifest.json"
    manifest = json.loads(storage.get_bytes(mkey))
    manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    storage.put_bytes(mkey, json.dumps(manifest).encode())


def test_checkpoint_malicious_pickle_refused(storage, tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"optimizer": _Evil(str(marker))}, buf)
    payload = buf.getvalue()

    # sanity: the payload really executes code when loaded unsafely
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()
    marker.unlink()

    save_checkpoint(storage, 7, tensors=_tensors(7), state=_state(7))
    _forge_state(storage, "step-000007", payload)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(storage)
    with pytest.raises(CheckpointError):
        load_checkpoint(storage, "step-000007")
    assert not marker.exists()

    # with an older good checkpoint around, the forged newest one is skipped
    save_checkpoint(storage, 3, tensors=_tensors(3), state=_state(3))
    assert storage.get_bytes("checkpoints/LATEST").decode() == "step-000007"  # LATEST never moves back
    c = load_checkpoint(storage)
    assert c.step == 3
    assert not marker.exists()


def test_save_checkpoint_rejects_unsafe_state(tmp_path):
    import numpy as np

    st = FileStorage(tmp_path / "job")
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(st, 1, tensors=_tensors(1), state={"rng": np.random.get_state()})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(st, 1, tensors=_tensors(1), meta={"x": object()})
    with pytest.raises(CheckpointError):
        save_checkpoint(st, -1, tensors=_tensors(1))
    with pytest.raises(CheckpointError):
        save_checkpoint(st, 1, tensors={"a": [1, 2, 3]})
    assert st.list() == []  # nothing uploaded on refusal


def test_resave_same_step_and_prune(tmp_path):
    st = FileStorage(tmp_path / "job")
    for step in (10, 20, 30, 40):
        save_checkpoint(st, step, tensors=_tensors(step), state=_state(step))
    save_checkpoint(st, 40, tensors=_tensors(99), state=_state(99))  # overwrite
    c = load_checkpoint(st)
    assert c.step == 40 and c.state["epoch"] == 99
    st.put_bytes("checkpoints/step-000015/model.safetensors", b"leftover of a crash")
    deleted = prune_checkpoints(st, keep_last=2)
    assert deleted == ["step-000010", "step-000015", "step-000020"]
    assert list_checkpoints(st) == ["step-000030", "step-000040"]
    assert load_checkpoint(st).step == 40


def test_checkpoint_reuse_reads_the_manifest_only_while_the_files_are_the_same(tmp_path):
    st = FileStorage(tmp_path / "job")
    save_checkpoint(st, 40, tensors=_tensors(1), state=_state(1), meta={"model": {"ch": 8}})
    reads: list[str] = []
    get_bytes = st.get_bytes
    st.get_bytes = lambda key: reads.append(key) or get_bytes(key)

    first = load_checkpoint(st, "step-000040", reuse=True)
    assert sorted(k.rsplit("/", 1)[1] for k in reads) == ["manifest.json", "model.safetensors", "state.pt"]
    first.meta["model"]["ch"] = 64  # a job changing its copy changes nothing for the next
    reads.clear()
    again = load_checkpoint(st, "step-000040", reuse=True)
    assert reads == ["checkpoints/step-000040/manifest.json"]
    assert again.meta == {"model": {"ch": 8}} and again.step == 40
    assert all(again.tensors[k] is first.tensors[k] for k in first.tensors)
    assert load_checkpoint(st, "step-000040").tensors["layer.bias"] is not first.tensors["layer.bias"]

    # rewritten in place: other hashes in the manifest, so it is read again
    save_checkpoint(st, 40, tensors=_tensors(2), state=_state(2), meta={"model": {"ch": 8}})
    reads.clear()
    fresh = load_checkpoint(st, "step-000040", reuse=True)
    assert len(reads) == 4 and fresh.state["epoch"] == 2
    assert all(torch.equal(fresh.tensors[k], v) for k, v in _tensors(2).items())


def test_resolve_checkpoint_uri(tmp_path):
    creds = S3Credentials("http://127.0.0.1:9", "AK", "SK")
    st, name = resolve_checkpoint_uri("s3://bkt/jobs/run1", creds)
    assert st.root == "s3://bkt/jobs/run1" and name is None
    st, name = resolve_checkpoint_uri("s3://bkt/jobs/run1/checkpoints/", creds)
    assert st.root == "s3://bkt/jobs/run1" and name is None
    st, name = resolve_checkpoint_uri("s3://bkt/jobs/run1/checkpoints/step-000500", creds)
    assert st.root == "s3://bkt/jobs/run1" and name == "step-000500"
    st, name = resolve_checkpoint_uri("s3://bkt/jobs/run1/checkpoints/step-000500/model.safetensors", creds)
    assert st.root == "s3://bkt/jobs/run1" and name == "step-000500"
    st, name = resolve_checkpoint_uri("s3://bkt/checkpoints/LATEST", creds)
    assert st.root == "s3://bkt" and name is None

    job = FileStorage(tmp_path / "job")
    save_checkpoint(job, 5, tensors=_tensors(5), state=_state(5))
    st, name = resolve_checkpoint_uri(job.uri("checkpoints/step-000005"), None)
    assert isinstance(st, FileStorage) and st.root == job.root and name == "step-000005"
    assert load_checkpoint(st, name).step == 5
    with pytest.raises(StorageError):
        resolve_checkpoint_uri("s3://bkt/jobs/../x/checkpoints", creds)


# =========================================================================== S3-only


def test_s3_round_trip(s3_storage, tmp_path):
    st = s3_storage
    st.check()
    st.put_bytes("a.txt", b"hello")
    st.put_bytes("dir/sub/b.bin", bytes(range(256)))
    assert st.get_bytes("a.txt") == b"hello"
    assert st.get_bytes("dir/sub/b.bin") == bytes(range(256))
    assert st.exists("a.txt") and not st.exists("missing")
    with pytest.raises(NotFound) as ei:
        st.get_bytes("missing")
    assert isinstance(ei.value, FileNotFoundError)
    assert st.uri("missing") in str(ei.value)

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(300_000))
    st.put_file("files/big.bin", src)
    st.get_file("files/big.bin", tmp_path / "dl" / "big.bin")
    assert (tmp_path / "dl" / "big.bin").read_bytes() == src.read_bytes()
    with pytest.raises(NotFound):
        st.get_file("files/nope.bin", tmp_path / "dl" / "nope.bin")

    assert st.list() == ["a.txt", "dir/sub/b.bin", "files/big.bin"]
    child = st.child("dir")
    assert child.list() == ["sub/b.bin"]
    assert child.client is st.client  # shares the client
    st.delete("a.txt")
    st.delete("a.txt")
    assert not st.exists("a.txt")

    # picklable (Ray ships storages to workers); the copy recreates its client
    clone = pickle.loads(pickle.dumps(st))
    assert clone.root == st.root and clone.get_bytes("dir/sub/b.bin") == bytes(range(256))


def test_s3_multipart_upload(seaweed_s3, tmp_path):
    st = S3Storage(
        seaweed_s3.bucket, f"tests/{uuid.uuid4().hex[:12]}", seaweed_s3.credentials,
        multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024,
    )
    src = tmp_path / "mp.bin"
    src.write_bytes(os.urandom(11 * 1024 * 1024))
    st.put_file("mp.bin", src)
    st.get_file("mp.bin", tmp_path / "mp2.bin")
    assert (tmp_path / "mp2.bin").read_bytes() == src.read_bytes()


def test_s3_list_paginates(seaweed_s3):
    st = S3Storage(seaweed_s3.bucket, f"tests/{uuid.uuid4().hex[:12]}", seaweed_s3.credentials, page_size=7)
    keys = [f"k/{i:03d}" for i in range(30)] + ["other/x", "k2"]
    for k in keys:
        st.put_bytes(k, b"x")
    calls = []
    st.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    assert st.list("k/") == sorted(keys[:30])
    assert len(calls) >= 5  # 30 keys / 7 per page
    assert st.list("k") == sorted(keys[:30] + ["k2"])
    assert st.list() == sorted(keys)


def test_s3_wrong_secret(seaweed_s3):
    wrong = "WRONG-secret-value-123"
    creds = S3Credentials(seaweed_s3.endpoint_url, seaweed_s3.credentials.access_key_id, wrong)
    st = S3Storage(seaweed_s3.bucket, "tests/denied", creds, max_attempts=2)
    with pytest.raises(StorageError) as ei:
        st.check()
    msg = str(ei.value)
    assert "access denied" in msg and "\n" not in msg
    assert wrong not in msg and wrong not in repr(ei.value)
    with pytest.raises(StorageError) as ei2:
        st.put_bytes("x", b"y")
    assert wrong not in str(ei2.value)
    assert not isinstance(ei2.value, NotFound)
    assert wrong not in repr(creds) and wrong not in repr(st)

    unknown = S3Storage(seaweed_s3.bucket, "", S3Credentials(seaweed_s3.endpoint_url, "NOBODY", wrong), max_attempts=1)
    with pytest.raises(StorageError) as ei3:
        unknown.check()
    assert wrong not in str(ei3.value)


def test_s3_missing_bucket(seaweed_s3):
    # NB: SeaweedFS auto-creates a missing bucket on PutObject for an Admin identity,
    # so a typo in the bucket name is only caught by check() (or reads/lists) —
    # which is why the driver calls check() before starting. Don't write here.
    st = S3Storage("no-such-bucket-xyz", "jobs", seaweed_s3.credentials, max_attempts=2)
    with pytest.raises(StorageError) as ei:
        st.check()
    msg = str(ei.value)
    assert "no-such-bucket-xyz" in msg and "does not exist" in msg and "\n" not in msg
    assert seaweed_s3.credentials.secret_access_key not in msg
    with pytest.raises(StorageError, match="does not exist"):
        st.list()


def test_s3_unreachable_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    st = S3Storage("bkt", "", S3Credentials(f"http://127.0.0.1:{port}", "AK", "SECRET-zzz"),
                   max_attempts=1, connect_timeout=1, read_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach") as ei:
        st.check()
    assert time.monotonic() - t0 < 10
    assert "SECRET-zzz" not in str(ei.value)


def test_s3_checkpoint_via_resolved_uri(s3_storage, seaweed_s3):
    save_checkpoint(s3_storage, 500, tensors=_tensors(5), state=_state(5), meta={"job": "x"})
    st, name = resolve_checkpoint_uri(s3_storage.uri("checkpoints/step-000500"), seaweed_s3.credentials)
    assert st.root == s3_storage.root and name == "step-000500"
    c = load_checkpoint(st, name)
    assert c.step == 500 and c.meta == {"job": "x"}
    assert c.uri == f"{s3_storage.root}/checkpoints/step-000500"
