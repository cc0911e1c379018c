"""Staging an npz or IDX source a chunk at a time: the content key that reading it whole gave,
the very arrays the whole-array staging wrote, errors before the index, remote files fetched
once and removed, and memory that does not grow with the data set."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from orchestrator import datasets
from orchestrator.datasets import (INDEX, DataError, content_key, heldout_key, read_index,
                                   stage, write_shards)
from orchestrator.spec import DataSpec
from orchestrator.storage import FileStorage

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}


def idx(array: np.ndarray) -> bytes:
    """An array as an IDX file."""
    return (bytes([0, 0, IDX_CODES[array.dtype], array.ndim])
            + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes())


def staged_whole(storage: FileStorage, key: str, data: DataSpec, x: np.ndarray,
                 y: np.ndarray | None, shard_bytes: int) -> None:
    """What staging wrote before it streamed: the images whole, as uint8 (floats scaled by 255
    when the whole array is within [0, 1]), a seeded fraction held out, the rest written by
    `write_shards`."""
    x = x[..., None] if x.ndim == 3 else x
    if x.dtype != np.uint8:
        x = np.asarray(x, dtype=np.float64)
        scale = 255.0 if x.max(initial=0) <= 1.0 else 1.0
        x = np.clip(x * scale, 0, 255).round().astype(np.uint8)
    order = np.random.default_rng(data.split.seed).permutation(len(x))
    count = max(1, int(round(data.split.fraction * len(x))))
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    pick = (lambda a, i: None if a is None else a[i])  # noqa: E731
    write_shards(storage, key, x[kept], pick(y, kept), shard_bytes)
    buf = io.BytesIO()
    np.savez(buf, **({"x": x[held]} if y is None else {"x": x[held], "y": y[held]}))
    storage.put_bytes(heldout_key(key), buf.getvalue())


def assert_same_objects(a: FileStorage, b: FileStorage) -> None:
    """The same keys, the same index, and in every .npz or .npy the same arrays."""
    assert a.list() == b.list()
    for key in a.list():
        if key.endswith(".json"):
            assert json.loads(a.get_bytes(key)) == json.loads(b.get_bytes(key))
            continue
        got, want = (np.load(io.BytesIO(s.get_bytes(key)), allow_pickle=False) for s in (a, b))
        if key.endswith(".npy"):
            got, want = {"": got}, {"": want}
        assert sorted(got.keys()) == sorted(want.keys()), key
        for name in want.keys():
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert np.array_equal(got[name], want[name]), f"{key}: {name}"


def source(kind: str, folder: Path) -> tuple[DataSpec, np.ndarray, np.ndarray | None]:
    """A data set on disk, its spec, and its arrays as stored (for the reference)."""
    rng = np.random.default_rng(1)
    if kind == "npz":
        x, y = rng.integers(0, 256, (1000, 12, 12), dtype=np.uint8), rng.integers(0, 10, 1000)
        np.savez(folder / "d.npz", x=x, y=y)
        return DataSpec(dataset="npz", path=str(folder / "d.npz")), x, y
    if kind == "npz-float":  # the last chunk alone is past 1: no one chunk may decide
        x = rng.random((700, 6, 6, 3), dtype=np.float32)
        x[-1, 0, 0, 0] = 1.5
        np.savez(folder / "f.npz", images=x)
        return DataSpec(dataset="npz", path=str(folder / "f.npz"), x_key="images", y_key=None,
                        split={"fraction": 0.2, "seed": 3}), x, None
    if kind == "npz-fortran":  # within [0, 1]: scaled by 255; labels (n, 1) int32
        x, y = rng.random((500, 8, 8)), rng.integers(0, 3, (500, 1)).astype(np.int32)
        np.savez(folder / "u.npz", x=np.asfortranarray(x), y=y)
        return DataSpec(dataset="npz", path=str(folder / "u.npz")), x, y.reshape(-1).astype(np.int64)
    if kind == "idx.gz":
        x, y = rng.integers(0, 256, (1000, 10, 10), dtype=np.uint8), rng.integers(0, 10, 1000)
        (folder / "x.gz").write_bytes(gzip.compress(idx(x)))
        (folder / "y.gz").write_bytes(gzip.compress(idx(y.astype(np.uint8))))
        return (DataSpec(dataset="idx", path=str(folder / "x.gz"), labels=str(folder / "y.gz"),
                         split={"seed": 5}), x, y)
    x = (rng.random((600, 5, 5, 3)) * 300).astype(">f4")  # "idx": uncompressed, unlabelled
    (folder / "x.idx").write_bytes(idx(x))
    return DataSpec(dataset="idx", path=str(folder / "x.idx")), x, None


@pytest.mark.parametrize("kind", ["npz", "npz-float", "npz-fortran", "idx.gz", "idx"])
def test_streamed_staging_writes_what_whole_arrays_did(kind, tmp_path, monkeypatch):
    """Read in chunks of 7 rows or so (not a divisor of the 37 images a shard holds), every
    shard, the labels, the index and the held-out split are the arrays the whole-array staging
    wrote."""
    data, x, y = source(kind, tmp_path)
    row = int(np.prod(x.shape[1:])) * x.dtype.itemsize
    monkeypatch.setattr(datasets, "READ_CHUNK", 7 * row + 3)
    shard_bytes = 37 * int(np.prod(x.shape[1:3])) * (x.shape[3] if x.ndim == 4 else 1)
    streamed, whole = FileStorage(tmp_path / "streamed"), FileStorage(tmp_path / "whole")
    key = stage(data, streamed, shard_bytes=shard_bytes)
    staged_whole(whole, key, data, x, y, shard_bytes)
    assert len(read_index(streamed, key)["shards"]) > 2
    assert_same_objects(streamed, whole)


def test_a_held_out_file_is_staged_whole_beside_the_streamed_data(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "READ_CHUNK", 1000)
    data, x, y = source("idx.gz", tmp_path)
    hx = np.random.default_rng(2).integers(0, 256, (30, 10, 10), dtype=np.uint8)
    (tmp_path / "hx.gz").write_bytes(gzip.compress(idx(hx)))
    (tmp_path / "hy.gz").write_bytes(gzip.compress(idx(np.arange(30, dtype=np.uint8) % 10)))
    data = data.model_copy(update={"split": data.split.model_copy(update={
        "heldout": str(tmp_path / "hx.gz"), "heldout_labels": str(tmp_path / "hy.gz")})})
    storage = FileStorage(tmp_path / "store")
    key = stage(data, storage, shard_bytes=100 * 64)
    assert read_index(storage, key)["count"] == 1000
    held = np.load(io.BytesIO(storage.get_bytes(heldout_key(key))))
    assert np.array_equal(held["x"], hx[..., None]) and held["y"].tolist() == [i % 10 for i in range(30)]
    no_labels = data.model_copy(update={"split": data.split.model_copy(update={
        "heldout_labels": None})})
    with pytest.raises(DataError, match="must both have labels or both have none"):
        stage(no_labels, FileStorage(tmp_path / "other"))


def test_content_key_is_the_digest_of_the_whole_files(tmp_path):
    """The key is what it was when the files were read whole (already staged data keeps its
    key): pinned for a fixed IDX pair, and computed the old way for an npz, a held-out file
    and a folder; a file:// URI of the same file is the same data set."""
    pin = tmp_path / "pin"
    pin.mkdir()
    (pin / "x.idx").write_bytes(idx(np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)))
    (pin / "y.idx").write_bytes(idx(np.arange(4, dtype=np.uint8)))
    assert content_key(DataSpec(dataset="idx", path=str(pin / "x.idx"), labels=str(pin / "y.idx"),
                                split={"fraction": 0.25, "seed": 7})) == (
        "datasets/da32dce118fd8c028ce221ac5108fca5e2b737fd60ea51cfa93983946df6cc5d/index.json")

    def old(ident: bytes) -> str:
        return f"datasets/{hashlib.sha256(ident).hexdigest()}/{INDEX}"

    data, _, _ = source("npz", tmp_path)
    raw = Path(data.path).read_bytes()
    assert content_key(data) == old(raw + b"|x|y" + b"|split|0.1|0")
    assert content_key(data.model_copy(update={"path": f"file://{data.path}"})) == content_key(data)
    images, _, _ = source("idx.gz", tmp_path)
    with_heldout = DataSpec(dataset="idx", path=images.path, labels=images.labels, split={
        "heldout": str(pin / "x.idx"), "heldout_labels": str(pin / "y.idx")})
    assert content_key(with_heldout) == old(
        Path(images.path).read_bytes() + Path(images.labels).read_bytes() + b"|heldout|"
        + (pin / "x.idx").read_bytes() + (pin / "y.idx").read_bytes())

    files = hashlib.sha256()
    for cls, name in (("a", "0.png"), ("a", "1.png"), ("b", "0.png")):
        path = tmp_path / "imgs" / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{cls}{name}".encode())  # not decoded for the key
        files.update(f"{cls}/{name}".encode() + hashlib.sha256(path.read_bytes()).digest())
    folder = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), image_size=8)
    # a folder's key also names the order its images are staged in (shuffled, not by class)
    assert content_key(folder) == old(files.digest() + b"|8|1|order-0" + b"|split|0.1|0")


def test_a_remote_source_is_downloaded_once_and_removed(tmp_path, monkeypatch):
    """An s3:// npz (a local folder standing in for the bucket): downloaded once for the key
    and the staging together, to a temporary file removed after; content_key alone removes its
    download too. The staged data set is the local file's."""
    data, _, _ = source("npz", tmp_path)
    bucket = FileStorage(tmp_path / "bucket")
    bucket.put_file("d.npz", data.path)
    downloads = []

    class Bucket(FileStorage):
        def get_file(self, key, local_path):
            downloads.append(key)
            super().get_file(key, local_path)

    monkeypatch.setattr(datasets, "open_storage", lambda uri, credentials=None: (
        Bucket(tmp_path / "bucket") if uri == "s3://bucket" else pytest.fail(uri)))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    remote = data.model_copy(update={"path": "s3://bucket/d.npz"})
    storage = FileStorage(tmp_path / "store")
    assert stage(remote, storage) == content_key(data)
    assert downloads == ["d.npz"] and list(scratch.iterdir()) == []
    assert content_key(remote) == content_key(data)
    assert downloads == ["d.npz"] * 2 and list(scratch.iterdir()) == []
    with pytest.raises(DataError, match="s3://bucket/nope.npz: cannot read"):
        stage(remote.model_copy(update={"path": "s3://bucket/nope.npz"}), storage)


def test_bad_sources_are_refused_and_nothing_is_indexed(tmp_path, monkeypatch):
    """A gzip IDX file is found short (or long) only once it is read to its end: the error
    comes then, and no index marks the half-written data set as staged; an uncompressed one is
    refused before anything is written."""
    monkeypatch.setattr(datasets, "READ_CHUNK", 1000)
    x = np.random.default_rng(0).integers(0, 256, (500, 10, 10), dtype=np.uint8)
    raw = idx(x)
    for name, content, error in (
            ("short.gz", gzip.compress(raw[:-150]), r"IDX data is 49850 bytes, its header "
                                                    r"\(500, 10, 10\) promises 50000 \(truncated\?\)"),
            ("long.gz", gzip.compress(raw + b"\0" * 7), "IDX data is 50007 bytes"),
            ("cut.gz", gzip.compress(raw)[:-100], "corrupt gzip data"),
            ("short.idx", raw[:-150], "IDX data is 49850 bytes")):
        (tmp_path / name).write_bytes(content)
        storage = FileStorage(tmp_path / f"store-{name}")
        with pytest.raises(DataError, match=f"{name}: {error}"):
            stage(DataSpec(dataset="idx", path=str(tmp_path / name)), storage, shard_bytes=2000)
        assert not [k for k in storage.list() if k.endswith(INDEX)]
        if name.endswith(".idx"):
            assert storage.list() == []
    np.savez(tmp_path / "flat.npz", x=np.zeros((4, 64), np.uint8))
    (tmp_path / "text.npz").write_text("not a zip")
    for name, error in (("flat.npz", r"images must be \(N, H, W\) or \(N, H, W, 1\|3\), got \(4, 64\)"),
                        ("text.npz", "not a readable npz file")):
        with pytest.raises(DataError, match=f"{name}: {error}"):
            stage(DataSpec(dataset="npz", path=str(tmp_path / name)), FileStorage(tmp_path / "s"))


class KernelCopy(FileStorage):
    """FileStorage whose put_file copies in the kernel: FileStorage's own copies through a
    4 MiB buffer, two at a time at most, whatever the size, which is the storage's, not the
    staging's."""

    def put_file(self, key, local_path):
        target = self.path.joinpath(*key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, target)


def test_staging_holds_chunks_not_the_data_set(tmp_path):
    """60,000 28x28 images (45 MiB) staged in 1 MB shards: what the staging allocates at its
    peak (numpy reports its arrays to tracemalloc) is well under a quarter of the array, where
    reading the array whole, the old staging's first step, takes all of it."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60_000, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", x=x, y=rng.integers(0, 10, len(x)))
    size = x.nbytes
    del x
    np.savez(tmp_path / "tiny.npz", x=np.zeros((20, 28, 28), np.uint8), y=np.zeros(20, int))
    stage(DataSpec(dataset="npz", path=str(tmp_path / "tiny.npz")), KernelCopy(tmp_path / "warm"))
    tracemalloc.start()  # after a first staging: the modules it imports are not counted
    try:
        storage = KernelCopy(tmp_path / "store")
        key = stage(DataSpec(dataset="npz", path=str(tmp_path / "big.npz")), storage,
                    shard_bytes=2**20)
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = np.load(tmp_path / "big.npz")["x"]
        read_whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streamed < size / 4, f"peak {streamed / 2**20:.1f} MiB staging {size / 2**20:.1f} MiB"
    assert read_whole >= size == whole.nbytes
    index = read_index(storage, key)
    assert index["count"] == 54_000 and len(index["shards"]) == 41
