"""Staging: the driver turns a data spec into one canonical, content-addressed object.

Whatever the source (scikit-learn's digits, an npz file, gzip IDX files, a folder of images
with one subfolder per class; local or s3://), the staged form lives under `datasets/<sha256>/`:

    shards/train-000000.npz ...   the training split in shards of at most SHARD_BYTES of pixels,
                                  each with `x` uint8 (n, H, W, C) and, labelled, `y` int64 (n,)
    labels.npy                    every training label, in shard order (labelled data only)
    heldout.npz                   the held-out split (a file of its own, or a seeded fraction)
    index.json                    count, shape, whether labelled, the shards and their counts;
                                  written last: its presence means the rest is there

A training job streams the shards a few at a time (workers/stream.py), so its memory does not
grow with the data set. Workers read only these objects, so a job can run on any node. The key
(`.../index.json`) is the digest of the source bytes and the split, so the same data is
uploaded once. A data set staged before shards (one `data.npz`) is rewritten as shards the
first time it is staged again.

Staging holds no source whole either: its files are hashed and read READ_CHUNK bytes at a time
(an s3:// file is downloaded once to a temporary file first), an npz or IDX array in chunks of
rows, a folder DECODE_CHUNK images at a time; both splits are written as the rows come (a
held-out file of its own is read whole).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
import zlib
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterable, Iterator, NamedTuple

import numpy as np

from orchestrator.spec import DataSpec, SplitSpec
from orchestrator.storage import S3Credentials, Storage, StorageError, open_storage, split_uri

# pixels per staged shard: tens of MB, a few in memory at a time (GENFORGE_SHARD_MB sets it
# where a cluster's object store or memory wants other sizes)
SHARD_BYTES = int(float(os.environ.get("GENFORGE_SHARD_MB", "32")) * 2**20)
# bytes of a source file read at a time: hashed, or decoded as whole rows of its array (at
# least one row)
READ_CHUNK = 2 * 2**20
INDEX = "index.json"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

class DataError(Exception):
    """Data that cannot be staged; the message names the file and the problem."""


class _Sources:
    """A data spec's files as local paths, each fetched once: the content key and the staging
    both read them. Local paths are used as they are (relative ones taken from `base`, the spec
    file's folder), file:// ones at their path; s3:// ones are downloaded to a temporary folder
    of the sources' own, removed when they are closed (on leaving a `with`)."""

    def __init__(self, credentials: S3Credentials | None, base: Path | None):
        self.credentials, self.base = credentials, base
        self._files: dict[str, Path] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
            self._files.clear()

    def local(self, path: str) -> Path:
        local = Path(path).expanduser()
        return self.base / local if self.base is not None and not local.is_absolute() else local

    def scratch(self) -> Path:
        """The temporary folder (made on first use)."""
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="genforge-staging-")
        return Path(self._scratch.name)

    def file(self, path: str) -> Path:
        """`path` as a local file: a remote one downloaded the first time."""
        if path not in self._files:
            self._files[path] = self._fetch(path)
        return self._files[path]

    def _fetch(self, path: str) -> Path:
        if "://" not in path:
            return self.local(path)
        parent, _, name = path.rpartition("/")
        try:
            scheme, location, _ = split_uri(path)
            if scheme == "file":
                return Path(location)
            target = self.scratch() / f"{len(self._files)}-{name}"
            open_storage(parent, self.credentials).get_file(name, target)
            return target
        except StorageError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        """`path` opened for reading; an error reading it names it."""
        try:
            with open(self.file(path), "rb") as f:
                yield f
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None

    def hash(self, path: str, digest: hashlib._Hash) -> None:
        """Feed `path`'s bytes to `digest`, READ_CHUNK at a time."""
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        with self.open(path) as f:
            while count := f.readinto(buf):
                digest.update(view[:count])


Opener = Callable[[], ContextManager[BinaryIO]]


class _Header(NamedTuple):
    """An array's file opened at its data, and what its header says of it."""

    stream: BinaryIO
    shape: tuple[int, ...]
    dtype: np.dtype
    size: int | None = None  # bytes of data in the file, where known without reading them
    fortran: bool = False  # stored column after column (.npy only)


class _Array:
    """An array in a file behind a header (an IDX file, an npz's .npy member), read in chunks
    of whole rows, about READ_CHUNK bytes each, never whole. `header()` opens the file anew at
    its data (a second pass reads it again). The data must be exactly as long as the header
    promises: checked before reading where the file's size tells, else (a compressed stream)
    once it is read to its end."""

    def __init__(self, header: Callable[[], ContextManager[_Header]], name: str, what: str):
        self.header, self.name, self.what = header, name, what
        with header() as head:
            self.shape, self.dtype, self.fortran = head.shape, head.dtype, head.fortran
            if head.size is not None:
                self._check(head.size)

    def _check(self, size: int) -> None:
        expected = math.prod(self.shape) * self.dtype.itemsize
        if size != expected:
            raise DataError(f"{self.name}: {self.what} is {size} bytes, its header "
                            f"{self.shape} promises {expected} (truncated?)")

    def chunks(self) -> Iterator[np.ndarray]:
        """The rows in order, a chunk at a time (at least one chunk, if empty; one chunk, the
        whole array, when it is stored in Fortran order)."""
        n, row = self.shape[0], math.prod(self.shape[1:]) * self.dtype.itemsize
        per = max(1, n if self.fortran else READ_CHUNK // max(1, row))
        with self.header() as head:
            done = 0
            for start in range(0, max(n, 1), per):
                count = min(per, n - start)
                raw = head.stream.read(count * row)
                done += len(raw)
                if len(raw) < count * row:
                    self._check(done)
                yield np.frombuffer(raw, self.dtype).reshape(
                    (count, *self.shape[1:]), order="F" if self.fortran else "C")
            self._check(done + _remaining(head.stream))

    def whole(self) -> np.ndarray:
        """The array read whole (what is small: labels)."""
        return np.concatenate(list(self.chunks()))


def _remaining(stream: BinaryIO) -> int:
    """The bytes left in `stream`, read to its end a chunk at a time."""
    count = 0
    while chunk := stream.read(READ_CHUNK):
        count += len(chunk)
    return count


@contextlib.contextmanager
def _idx_header(open_file: Opener, name: str) -> Iterator[_Header]:
    """An IDX file (the MNIST file format), gzip-compressed or not, opened at its data."""
    with open_file() as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw) if compressed else contextlib.nullcontext(raw) as f:
                magic = f.read(4)
                if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
                    raise DataError(f"{name}: not an IDX file (bad magic number)")
                dims = f.read(4 * magic[3])
                if magic[3] == 0 or len(dims) < 4 * magic[3]:
                    raise DataError(f"{name}: truncated IDX header")
                shape = tuple(int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4))
                size = None
                if not compressed:  # its length known beforehand
                    size = raw.seek(0, io.SEEK_END) - 4 - len(dims)
                    raw.seek(4 + len(dims))
                yield _Header(f, shape, np.dtype(IDX_DTYPES[magic[2]]), size)
        except (OSError, EOFError, zlib.error) as exc:
            if not compressed:
                raise
            raise DataError(f"{name}: corrupt gzip data ({exc})") from None


def _idx_array(open_file: Opener, name: str) -> _Array:
    return _Array(partial(_idx_header, open_file, name), name, "IDX data")


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """An IDX array (the MNIST file format), gzip-compressed or not, from its bytes."""
    return _idx_array(lambda: contextlib.nullcontext(io.BytesIO(raw)), name).whole()


@contextlib.contextmanager
def _npz_member(open_file: Opener, name: str, key: str, required: bool = True
                ) -> Iterator[BinaryIO | None]:
    """The array `key` of an npz file, opened (None where it has none and none is required)."""
    with open_file() as raw:
        try:
            with zipfile.ZipFile(raw) as archive:
                members = {n.removesuffix(".npy"): n for n in archive.namelist()}
                if key not in members:
                    if required:
                        raise DataError(f"{name}: no array '{key}' (has: {', '.join(members)})")
                    yield None
                    return
                with archive.open(members[key]) as member:
                    yield member
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
            raise DataError(f"{name}: not a readable npz file ({exc})") from None


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """An .npy stream's shape, Fortran order and dtype, the stream read to its data."""
    read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    return read_header(f)


@contextlib.contextmanager
def _npz_header(open_file: Opener, name: str, key: str) -> Iterator[_Header]:
    """The array `key` of an npz file, opened at its data."""
    with _npz_member(open_file, name, key) as member:
        shape, fortran, dtype = _npy_header(member)
        if dtype.hasobject:
            raise DataError(f"{name}: array '{key}' holds Python objects, which are not loaded")
        yield _Header(member, shape, dtype, fortran=fortran)


def _npz_labels(open_file: Opener, name: str, key: str) -> np.ndarray | None:
    """The array `key` of an npz file read whole (labels: small), if it has one."""
    with _npz_member(open_file, name, key, required=False) as member:
        return None if member is None else np.lib.format.read_array(member, allow_pickle=False)


def _image_shape(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """(N, H, W, C) of images stored as (N, H, W) or (N, H, W, 1|3)."""
    images = (*shape, 1) if len(shape) == 3 else tuple(shape)
    if len(images) != 4 or images[-1] not in (1, 3):
        raise DataError(f"{name}: images must be (N, H, W) or (N, H, W, 1|3), got {shape}")
    return images


def _scale(chunks: Iterable[np.ndarray]) -> float:
    """What pixels other than uint8 are multiplied by: 255 when the whole array (every chunk)
    is within [0, 1], else 1."""
    peak = np.max([np.max(chunk, initial=0) for chunk in chunks], initial=0)
    return 255.0 if peak <= 1.0 else 1.0


def _to_uint8(x: np.ndarray, scale: float) -> np.ndarray:
    """Pixels as uint8: scaled by `scale`, clipped to [0, 255] and rounded (uint8 as it is)."""
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float64)
    x *= scale
    return np.clip(x, 0, 255, out=x).round(out=x).astype(np.uint8)


def _arrays(data: DataSpec, sources: _Sources) -> tuple[_Array, np.ndarray | None]:
    """An npz or IDX data set's images (their header checked, nothing read) and its labels
    (read: 8 bytes an image), checked to match."""
    open_file = partial(sources.open, data.path)
    if data.dataset == "npz":
        x = _Array(partial(_npz_header, open_file, data.path, data.x_key), data.path,
                   f"array '{data.x_key}'")
        _image_shape(x.shape, data.path)
        y = _npz_labels(open_file, data.path, data.y_key) if data.y_key else None
    else:  # idx
        x = _idx_array(open_file, data.path)
        _image_shape(x.shape, data.path)
        y = (_idx_array(partial(sources.open, data.labels), data.labels).whole() if data.labels
             else None)
    if y is not None:
        y = np.asarray(y).astype(np.int64, copy=False).reshape(-1)
        if len(y) != x.shape[0]:
            raise DataError(f"{data.path}: {x.shape[0]} images but {len(y)} labels")
    return x, y


def _images(x: _Array, y: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The images of `x` as uint8 (n, H, W, C) with their labels, a chunk at a time. Float
    pixels take a first pass: whether they are scaled by 255 is the whole array's to say."""
    shape = _image_shape(x.shape, x.name)
    scale = 1.0 if x.dtype == np.uint8 else _scale(x.chunks())
    done = 0
    for chunk in x.chunks():
        yield (_to_uint8(chunk.reshape((len(chunk), *shape[1:])), scale),
               None if y is None else y[done:done + len(chunk)])
        done += len(chunk)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DECODE_CHUNK = 256  # images a decoding worker takes at a time
PARALLEL_FROM = 2 * DECODE_CHUNK  # folders this small are decoded in the staging process


FOLDER_ORDER_SEED = 0  # a folder's images are staged in this seed's permutation


class _Folder:
    """A folder data set: one subfolder per class (classes in sorted order), local or under an
    s3:// (or file://) prefix; its files read one at a time, never all held."""

    def __init__(self, path: str, sources: _Sources):
        self.path = path
        if "://" in path:
            self.storage: Storage | None = open_storage(path.rstrip("/"), sources.credentials)
            try:
                names = [k for k in self.storage.list() if k.count("/") == 1]
            except StorageError as exc:
                raise DataError(f"{path}: cannot list ({exc})") from None
        else:
            self.storage, root = None, sources.local(path)
            self.root = root
            classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            names = [f"{c}/{f.name}" for c in classes for f in sorted((root / c).iterdir())
                     if f.is_file()]
        names = [n for n in names if not n.split("/")[1].startswith(".")]
        classes = sorted({n.split("/")[0] for n in names})
        if not classes:
            raise DataError(f"{path}: no class subfolders (expected <class>/<image>.png)")
        for name in names:
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: {name} is not a PNG or JPEG file")
        if not names:
            raise DataError(f"{path}: no images in its class subfolders")
        label = {c: i for i, c in enumerate(classes)}
        self.files = [(label[n.split("/")[0]], n) for n in sorted(names, key=lambda n: (
            label[n.split("/")[0]], n))]
        # Staged in a seeded order, not class by class: a training stream shuffles a few
        # shards at a time, and shards of one class each would give it batches of few classes.
        order = np.random.default_rng(FOLDER_ORDER_SEED).permutation(len(self.files))
        self.staged = [self.files[i] for i in order]

    def read(self, name: str) -> bytes:
        try:
            if self.storage is not None:
                return self.storage.get_bytes(name)
            return (self.root / name).read_bytes()
        except (StorageError, OSError) as exc:
            raise DataError(f"{self.path}: cannot read {name} ({exc})") from None

    def chunks(self, data: DataSpec, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The images decoded and resized, DECODE_CHUNK at a time, in order: by `workers`
        processes when there are many (at most two chunks each in flight)."""
        parts = [self.staged[i:i + DECODE_CHUNK] for i in range(0, len(self.staged), DECODE_CHUNK)]

        def job(part: list[tuple[int, str]]) -> tuple:
            return ([(n, self.read(n)) for _, n in part], data.image_size, data.channels, self.path)

        labels = lambda part: np.asarray([label for label, _ in part], np.int64)  # noqa: E731
        if workers <= 1 or len(self.files) < PARALLEL_FROM:
            for part in parts:
                yield _decode(job(part)), labels(part)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending: list = []
            for part in parts:
                pending.append((pool.submit(_decode, job(part)), part))
                if len(pending) >= 2 * workers:
                    done, part_done = pending.pop(0)
                    yield done.result(), labels(part_done)
            for done, part_done in pending:
                yield done.result(), labels(part_done)


def _decode(args: tuple) -> np.ndarray:
    """Encoded images, resized to (size, size) with `channels`: what a staging worker runs."""
    from PIL import Image, UnidentifiedImageError

    files, size, channels, path = args
    out = np.empty((len(files), size, size, channels), np.uint8)
    for i, (name, raw) in enumerate(files):
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                img = img.resize((size, size), Image.BICUBIC)
                out[i] = np.asarray(img, dtype=np.uint8).reshape(size, size, channels)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: {name} is not a readable image ({exc})") from None
    return out


def _ident(data: DataSpec, sources: _Sources, digest: hashlib._Hash) -> None:
    """Feed `digest` what identifies the images a data spec stages, from its files' bytes
    (read in chunks, nothing decoded): two specs with the same ident stage the same arrays."""
    if data.dataset == "digits":
        import sklearn

        digest.update(f"digits-{sklearn.__version__}".encode())
    elif data.dataset == "folder":
        folder = _Folder(data.path, sources)
        files = hashlib.sha256()
        for _, name in folder.files:  # one file at a time: a folder may not fit in memory
            files.update(name.encode() + hashlib.sha256(folder.read(name)).digest())
        digest.update(files.digest() + f"|{data.image_size}|{data.channels}".encode()
                      + f"|order-{FOLDER_ORDER_SEED}".encode())
    elif data.dataset == "npz":
        sources.hash(data.path, digest)
        digest.update(f"|{data.x_key}|{data.y_key}".encode())
    else:  # idx
        sources.hash(data.path, digest)
        if data.labels:
            sources.hash(data.labels, digest)


def _load(data: DataSpec, sources: _Sources) -> tuple[np.ndarray, np.ndarray | None]:
    """A data set read whole: the digits (small), or a held-out file of its own."""
    if data.dataset == "folder":
        chunks = list(_Folder(data.path, sources).chunks(data, 1))
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    if data.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        return x[..., None], digits.target.astype(np.int64)
    x, y = _arrays(data, sources)
    return np.concatenate([images for images, _ in _images(x, None)]), y


def read_index(storage: Storage, key: str) -> dict:
    """The index of the data staged at `key`."""
    return json.loads(storage.get_bytes(key))


def split_sizes(storage: Storage, key: str) -> dict[str, int | bool]:
    """Images in the training and held-out splits of the data staged at `key`, and whether it
    has labels (reads the index and the held-out arrays' headers only)."""
    index = read_index(storage, key)
    out: dict[str, int | bool] = {"train": index["count"], "labelled": index["labelled"]}
    with zipfile.ZipFile(io.BytesIO(storage.get_bytes(heldout_key(key)))) as archive:
        with archive.open("x.npy") as f:
            out["heldout"] = _npy_header(f)[0][0]
    return out


def heldout_key(data_key: str) -> str:
    """The held-out split beside the training split `data_key`."""
    return data_key.rsplit("/", 1)[0] + "/heldout.npz"


def _heldout_spec(data: DataSpec) -> DataSpec:
    return data.model_copy(update={"path": data.split.heldout,
                                   "labels": data.split.heldout_labels})


def _split_ident(data: DataSpec, sources: _Sources, digest: hashlib._Hash) -> None:
    split = data.split
    if split.heldout:
        digest.update(b"|heldout|")
        _ident(_heldout_spec(data), sources, digest)
    else:
        digest.update(f"|split|{split.fraction}|{split.seed}".encode())


_STAGED = re.compile(r"datasets/[0-9a-f]{64}/index\.json")


def _staged_key(data: DataSpec, storage: Storage | None) -> str | None:
    """The key of data that points at a staged copy in `storage` itself (what `genforge
    submit` hands the cluster): it is that copy, not a new data set."""
    if storage is None or data.dataset != "npz" or data.x_key != "x" or data.y_key not in ("y", None):
        return None
    root = storage.uri().rstrip("/") + "/"
    key = data.path.removeprefix(root) if data.path.startswith(root) else ""
    if not _STAGED.fullmatch(key) or data.split.heldout != storage.uri(heldout_key(key)):
        return None
    return key


def content_key(data: DataSpec, credentials: S3Credentials | None = None,
                base: Path | None = None, storage: Storage | None = None,
                _sources: _Sources | None = None) -> str:
    """The key the data set is staged under (relative to the storage root): the digest of its
    sources' bytes and its split, whatever the paths are called. A job's hash covers it, so
    data regenerated at the same path is a new data set. Nothing is decoded or uploaded; the
    files are read in chunks (an s3:// one downloaded to a temporary file, removed after, unless
    `_sources`, the staging's, keep it)."""
    staged = _staged_key(data, storage)
    if staged is not None:
        return staged
    digest = hashlib.sha256()
    owned = _Sources(credentials, base) if _sources is None else contextlib.nullcontext(_sources)
    with owned as sources:
        _ident(data, sources, digest)
        _split_ident(data, sources, digest)
    return f"datasets/{digest.hexdigest()}/{INDEX}"


class _NpzWriter:
    """An npz file of `count` images (`x`, and `y` if labelled), as np.savez writes it, put at
    `key` on `close`: written to a temporary file as its rows come, its images never held whole
    (its labels are: 8 bytes an image)."""

    def __init__(self, storage: Storage, key: str, count: int):
        self.storage, self.key, self.count = storage, key, count
        self.file: tempfile._TemporaryFileWrapper | None = None
        self.archive: zipfile.ZipFile | None = None
        self.member: BinaryIO | None = None
        self.labels: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        if self.file is None:  # np.savez's layout: a stored zip64 member per array
            self.file = tempfile.NamedTemporaryFile(prefix="genforge-", suffix=".npz")
            self.archive = zipfile.ZipFile(self.file, "w")
            self.member = self.archive.open("x.npy", "w", force_zip64=True)
            np.lib.format.write_array_header_1_0(self.member, {
                "descr": np.lib.format.dtype_to_descr(x.dtype), "fortran_order": False,
                "shape": (self.count, *x.shape[1:])})
        if len(x):
            self.member.write(np.ascontiguousarray(x))
        if y is not None:
            self.labels.append(y)

    def close(self) -> np.ndarray | None:
        """Put the file; returns its labels (None if unlabelled)."""
        labels = np.concatenate(self.labels) if self.labels else None
        with self.file:
            self.member.close()
            if labels is not None:
                with self.archive.open("y.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, labels)
            self.archive.close()
            self.file.flush()
            self.storage.put_file(self.key, self.file.name)
        return labels


class ShardWriter:
    """The training split written as it comes: shards of at most `shard_bytes` of pixels, then
    its labels and, last, its index at `key`. It holds less than a shard and the last part
    added."""

    def __init__(self, storage: Storage, key: str, shard_bytes: int = SHARD_BYTES):
        self.storage, self.key, self.shard_bytes = storage, key, shard_bytes
        self.folder = key.rsplit("/", 1)[0]
        self.shards: list[dict] = []
        self.buffer: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.buffered = 0  # rows in the buffer
        self.labels: list[np.ndarray] = []
        self.shape: tuple[int, ...] | None = None
        self.count = 0

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        if not len(x):
            return
        self.shape = x.shape[1:]
        per = max(1, self.shard_bytes // max(1, x[0].nbytes))
        self.buffer.append((x, y))
        self.buffered += len(x)
        while self.buffered >= per:
            self._flush(per)

    def _take(self, count: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The first `count` buffered rows, out of the buffer (a part split where they end)."""
        parts = []
        self.buffered -= count
        while count:
            x, y = self.buffer.pop(0)
            if len(x) > count:
                self.buffer.insert(0, (x[count:], y[count:] if y is not None else None))
                x, y = x[:count], y[:count] if y is not None else None
            parts.append((x, y))
            count -= len(x)
        return parts

    def _flush(self, count: int) -> None:
        """The first `count` buffered rows written as the next shard."""
        name = f"shards/train-{len(self.shards):06d}.npz"
        shard = _NpzWriter(self.storage, f"{self.folder}/{name}", count)
        for x, y in self._take(count):
            shard.add(x, y)
        labels = shard.close()
        self.shards.append({"key": name, "count": count})
        self.count += count
        if labels is not None:
            self.labels.append(labels)

    def close(self) -> dict:
        if self.buffer:
            self._flush(self.buffered)
        if self.labels:
            buf = io.BytesIO()
            np.save(buf, np.concatenate(self.labels))
            self.storage.put_bytes(f"{self.folder}/labels.npy", buf.getvalue())
        index = {"format": 1, "count": self.count, "shape": list(self.shape or ()),
                 "labelled": bool(self.labels), "shards": self.shards}
        self.storage.put_bytes(self.key, json.dumps(index).encode())
        return index


def write_shards(storage: Storage, key: str, x: np.ndarray, y: np.ndarray | None,
                 shard_bytes: int = SHARD_BYTES) -> dict:
    """A training split held whole, written as shards with its index at `key`."""
    writer = ShardWriter(storage, key, shard_bytes)
    writer.add(x, y)
    return writer.close()


def stage(data: DataSpec, storage: Storage, credentials: S3Credentials | None = None,
          base: Path | None = None, shard_bytes: int = SHARD_BYTES,
          workers: int | None = None) -> str:
    """Put the data set's two splits into storage once; returns the training split's key,
    its index (relative to the storage root; `heldout_key` gives the held-out split). Relative
    local paths are taken from `base` (the spec file's folder). The data is read and written
    a chunk at a time, never held whole (an s3:// file is downloaded to a temporary file first,
    removed after); a folder is decoded by `workers` processes (default: one per CPU). Data
    staged before is not read again; one staged before shards is rewritten as shards."""
    with _Sources(credentials, base) as sources:
        key = content_key(data, storage=storage, _sources=sources)
        if storage.exists(key):
            return key
        legacy = key.rsplit("/", 1)[0] + "/data.npz"
        if storage.exists(legacy):  # staged before shards: the same arrays, rewritten
            arrays = np.load(io.BytesIO(storage.get_bytes(legacy)), allow_pickle=False)
            write_shards(storage, key, arrays["x"], arrays["y"] if "y" in arrays.files else None,
                         shard_bytes)
            return key
        if data.dataset == "folder":
            folder = _Folder(data.path, sources)
            chunks, count = folder.chunks(data, workers or os.cpu_count() or 1), len(folder.files)
        elif data.dataset == "digits":
            x, y = _load(data, sources)
            chunks, count = [(x, y)], len(x)
        else:
            images, y = _arrays(data, sources)
            chunks, count = _images(images, y), images.shape[0]
        _write_splits(data, key, storage, sources, chunks, count, shard_bytes)
    return key


def _held_rows(count: int, split: SplitSpec) -> np.ndarray:
    """The rows of `count` that a seeded fraction holds out, in order (none where the held-out
    split is a file of its own)."""
    if split.heldout:
        return np.zeros(0, np.int64)
    order = np.random.default_rng(split.seed).permutation(count)
    held = max(1, int(round(split.fraction * count)))
    if held >= count:
        raise DataError(f"{count} images are too few to hold out {split.fraction:.0%}")
    return np.sort(order[:held])


def _write_splits(data: DataSpec, key: str, storage: Storage, sources: _Sources,
                  chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], count: int,
                  shard_bytes: int) -> None:
    """A data set staged as it is read (`count` uint8 images in `chunks`, with their labels):
    its training images into shards and its held-out ones (a seeded fraction) into one file,
    both as they come; a held-out file of its own is loaded whole. The index goes last."""
    from tqdm import tqdm

    held = _held_rows(count, data.split)
    writer = ShardWriter(storage, key, shard_bytes)
    heldout = _NpzWriter(storage, heldout_key(key), len(held))
    position, labelled = 0, False
    pick = (lambda a, rows: a[rows] if a is not None else None)  # noqa: E731
    with tqdm(total=count, desc=f"staging {data.path or data.dataset}", unit="image",
              disable=None) as bar:
        for x, y in chunks:
            rows = np.isin(np.arange(position, position + len(x)), held)
            position, labelled = position + len(x), y is not None
            writer.add(x[~rows], pick(y, ~rows))
            if rows.any():
                heldout.add(x[rows], pick(y, rows))
            bar.update(len(x))
    if data.split.heldout:
        hx, hy = _load(_heldout_spec(data), sources)
        if hx.shape[1:] != tuple(writer.shape or ()):
            raise DataError(f"{data.split.heldout}: held-out images are {hx.shape[1:]}, "
                            f"the data's are {tuple(writer.shape or ())}")
        if (hy is not None) != labelled:
            raise DataError(f"{data.split.heldout}: the held-out split and the data must both "
                            "have labels or both have none")
        heldout = _NpzWriter(storage, heldout_key(key), len(hx))
        heldout.add(hx, hy)
    heldout.close()
    writer.close()  # the index last: its presence means the rest is there


# ---- what is staged, and who reads it ------------------------------------------------------

def note_reader(storage: Storage, key: str, job_prefix: str) -> None:
    """Record that the job at `job_prefix` (`<experiment>/<job>/<hash>`) reads the data staged
    at `key`: `genforge data ls` shows it, and `data rm` refuses while it runs."""
    name = job_prefix.replace("/", "--")
    storage.put_bytes(f"{key.rsplit('/', 1)[0]}/readers/{name}", job_prefix.encode())


def staged(storage: Storage) -> list[dict]:
    """Every data set staged in `storage`: its key, digest, index, bytes of training pixels
    and the jobs that read it."""
    out = []
    for key in sorted(k for k in storage.list("datasets/") if k.endswith(f"/{INDEX}")):
        folder = key.rsplit("/", 1)[0]
        readers = [storage.get_bytes(k).decode() for k in storage.list(folder + "/readers/")]
        index = read_index(storage, key)
        out.append({"key": key, "digest": folder.split("/")[-1], "index": index,
                    "pixel_bytes": index["count"] * int(np.prod(index["shape"])),
                    "readers": sorted(readers)})
    return out


def remove(storage: Storage, digest: str, running: Callable[[str], bool]) -> list[str]:
    """Delete the data set `digest` (a prefix of it will do, if it names one data set); refused
    (DataError) while a job that reads it runs (`running(job_prefix)`). Returns what was
    deleted; the index goes first, so a half-deleted data set is never taken for staged."""
    found = [d for d in staged(storage) if d["digest"].startswith(digest)]
    if len(found) != 1:
        raise DataError(f"{'no' if not found else 'more than one'} staged data set "
                        f"{'is' if not found else 'starts with'} '{digest}' (see 'genforge data ls')")
    data = found[0]
    busy = [r for r in data["readers"] if running(r)]
    if busy:
        raise DataError(f"datasets/{data['digest']}: job {busy[0]} is reading it; remove it "
                        "once that job has ended")
    folder = data["key"].rsplit("/", 1)[0]
    storage.delete(data["key"])
    rest = [k for k in storage.list(folder + "/") if k != data["key"]]
    for k in rest:
        storage.delete(k)
    return [data["key"], *rest]
