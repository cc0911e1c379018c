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
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from orchestrator.spec import DataSpec
from orchestrator.storage import S3Credentials, Storage, StorageError, open_storage

# pixels per staged shard: tens of MB, a few in memory at a time (GENFORGE_SHARD_MB sets it
# where a cluster's object store or memory wants other sizes)
SHARD_BYTES = int(float(os.environ.get("GENFORGE_SHARD_MB", "32")) * 2**20)
INDEX = "index.json"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(Exception):
    """Data that cannot be staged; the message names the file and the problem."""


class _Sources:
    """The raw bytes of a data spec's files, each read once: the content key and the loading
    both read them. Relative local paths are taken from `base` (the spec file's folder)."""

    def __init__(self, credentials: S3Credentials | None, base: Path | None):
        self.credentials, self.base = credentials, base
        self._raw: dict[str, bytes] = {}

    def local(self, path: str) -> Path:
        local = Path(path).expanduser()
        return self.base / local if self.base is not None and not local.is_absolute() else local

    def read(self, path: str) -> bytes:
        if path not in self._raw:
            self._raw[path] = self._read(path)
        return self._raw[path]

    def _read(self, path: str) -> bytes:
        if "://" in path:
            parent, _, name = path.rpartition("/")
            try:
                return open_storage(parent, self.credentials).get_bytes(name)
            except StorageError as exc:
                raise DataError(f"{path}: cannot read ({exc})") from None
        try:
            return self.local(path).read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """An IDX array (the MNIST file format), gzip-compressed or not."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{name}: corrupt gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{name}: IDX data is {len(raw) - header} bytes, "
                        f"its header {shape} promises {expected} (truncated?)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _as_images(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{name}: images must be (N, H, W) or (N, H, W, 1|3), got {x.shape}")
    if x.dtype != np.uint8:
        x = np.asarray(x, dtype=np.float64)
        scale = 255.0 if x.max(initial=0) <= 1.0 else 1.0
        x = np.clip(x * scale, 0, 255).round().astype(np.uint8)
    return x


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DECODE_CHUNK = 256  # images a decoding worker takes at a time
PARALLEL_FROM = 2 * DECODE_CHUNK  # folders this small are decoded in the staging process


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
        parts = [self.files[i:i + DECODE_CHUNK] for i in range(0, len(self.files), DECODE_CHUNK)]

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


def _ident(data: DataSpec, sources: _Sources) -> bytes:
    """What identifies the images a data spec stages, from its files' bytes (nothing is
    decoded): two specs with the same ident stage the same arrays."""
    if data.dataset == "digits":
        import sklearn

        return f"digits-{sklearn.__version__}".encode()
    if data.dataset == "folder":
        folder = _Folder(data.path, sources)
        digest = hashlib.sha256()
        for _, name in folder.files:  # one file at a time: a folder may not fit in memory
            digest.update(name.encode() + hashlib.sha256(folder.read(name)).digest())
        return digest.digest() + f"|{data.image_size}|{data.channels}".encode()
    raw = sources.read(data.path)
    if data.dataset == "npz":
        return raw + f"|{data.x_key}|{data.y_key}".encode()
    return raw + (sources.read(data.labels) if data.labels else b"")  # idx


def _load(data: DataSpec, sources: _Sources) -> tuple[np.ndarray, np.ndarray | None]:
    if data.dataset == "folder":
        chunks = list(_Folder(data.path, sources).chunks(data, 1))
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    if data.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        return x[..., None], digits.target.astype(np.int64)
    raw = sources.read(data.path)
    if data.dataset == "npz":
        try:
            arrays = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{data.path}: not a readable npz file ({exc})") from None
        if data.x_key not in arrays.files:
            raise DataError(f"{data.path}: no array '{data.x_key}' (has: {', '.join(arrays.files)})")
        x = _as_images(arrays[data.x_key], data.path)
        y = arrays[data.y_key] if data.y_key and data.y_key in arrays.files else None
    else:  # idx
        x = _as_images(parse_idx(raw, data.path), data.path)
        y = parse_idx(sources.read(data.labels), data.labels) if data.labels else None
    if y is not None:
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if len(y) != len(x):
            raise DataError(f"{data.path}: {len(x)} images but {len(y)} labels")
    return x, y


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
            read_header = (np.lib.format.read_array_header_1_0
                           if np.lib.format.read_magic(f) == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            out["heldout"] = read_header(f)[0][0]
    return out


def heldout_key(data_key: str) -> str:
    """The held-out split beside the training split `data_key`."""
    return data_key.rsplit("/", 1)[0] + "/heldout.npz"


def _heldout_spec(data: DataSpec) -> DataSpec:
    return data.model_copy(update={"path": data.split.heldout,
                                   "labels": data.split.heldout_labels})


def _split_ident(data: DataSpec, sources: _Sources) -> bytes:
    split = data.split
    if split.heldout:
        return b"|heldout|" + _ident(_heldout_spec(data), sources)
    return f"|split|{split.fraction}|{split.seed}".encode()


def _split(data: DataSpec, x: np.ndarray, y: np.ndarray | None, sources: _Sources
           ) -> tuple[tuple[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]:
    split = data.split
    if split.heldout:
        hx, hy = _load(_heldout_spec(data), sources)
        if hx.shape[1:] != x.shape[1:]:
            raise DataError(f"{split.heldout}: held-out images are {hx.shape[1:]}, "
                            f"the data's are {x.shape[1:]}")
        if (hy is None) != (y is None):
            raise DataError(f"{split.heldout}: the held-out split and the data must both have "
                            "labels or both have none")
        return (x, y), (hx, hy)
    order = np.random.default_rng(split.seed).permutation(len(x))
    count = max(1, int(round(split.fraction * len(x))))
    if count >= len(x):
        raise DataError(f"{len(x)} images are too few to hold out {split.fraction:.0%}")
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    pick = (lambda a, i: a[i] if a is not None else None)
    return (x[kept], pick(y, kept)), (x[held], pick(y, held))


def _npz(x: np.ndarray, y: np.ndarray | None) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **({"x": x} if y is None else {"x": x, "y": y}))
    return buf.getvalue()


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
    data regenerated at the same path is a new data set. Nothing is decoded or uploaded."""
    staged = _staged_key(data, storage)
    if staged is not None:
        return staged
    sources = _sources or _Sources(credentials, base)
    ident = _ident(data, sources) + _split_ident(data, sources)
    return f"datasets/{hashlib.sha256(ident).hexdigest()}/{INDEX}"


class ShardWriter:
    """The training split written as it comes: shards of at most `shard_bytes` of pixels, then
    its labels and, last, its index at `key`."""

    def __init__(self, storage: Storage, key: str, shard_bytes: int = SHARD_BYTES):
        self.storage, self.key, self.shard_bytes = storage, key, shard_bytes
        self.folder = key.rsplit("/", 1)[0]
        self.shards: list[dict] = []
        self.buffer: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.labels: list[np.ndarray] = []
        self.shape: tuple[int, ...] | None = None
        self.count = 0

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        if not len(x):
            return
        self.shape = x.shape[1:]
        per = max(1, self.shard_bytes // max(1, x[0].nbytes))
        self.buffer.append((x, y))
        while sum(len(b[0]) for b in self.buffer) >= per:
            self._flush(per)

    def _flush(self, per: int) -> None:
        x = np.concatenate([b[0] for b in self.buffer])
        y = np.concatenate([b[1] for b in self.buffer]) if self.buffer[0][1] is not None else None
        name = f"shards/train-{len(self.shards):06d}.npz"
        self.storage.put_bytes(f"{self.folder}/{name}",
                               _npz(x[:per], y[:per] if y is not None else None))
        self.shards.append({"key": name, "count": len(x[:per])})
        self.count += len(x[:per])
        if y is not None:
            self.labels.append(y[:per])
        self.buffer = [(x[per:], y[per:] if y is not None else None)] if len(x) > per else []

    def close(self) -> dict:
        if self.buffer:
            self._flush(sum(len(b[0]) for b in self.buffer))
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
    local paths are taken from `base` (the spec file's folder). A folder is decoded by
    `workers` processes (default: one per CPU) and written shard by shard as it is decoded,
    never held whole. Data staged before is not decoded again; one staged before shards is
    rewritten as shards."""
    sources = _Sources(credentials, base)
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
        _stage_folder(data, key, storage, sources, shard_bytes, workers or os.cpu_count() or 1)
        return key
    x, y = _load(data, sources)
    train, held = _split(data, x, y, sources)
    storage.put_bytes(heldout_key(key), _npz(*held))
    write_shards(storage, key, *train, shard_bytes=shard_bytes)
    return key


def _stage_folder(data: DataSpec, key: str, storage: Storage, sources: _Sources,
                  shard_bytes: int, workers: int) -> None:
    """A folder staged as it is decoded: training images into shards, the held-out ones (a
    seeded fraction, the smaller part) gathered and written as one file."""
    from tqdm import tqdm

    folder = _Folder(data.path, sources)
    n = len(folder.files)
    held_out: np.ndarray = np.zeros(0, np.int64)
    if not data.split.heldout:
        order = np.random.default_rng(data.split.seed).permutation(n)
        count = max(1, int(round(data.split.fraction * n)))
        if count >= n:
            raise DataError(f"{n} images are too few to hold out {data.split.fraction:.0%}")
        held_out = np.sort(order[:count])
    writer = ShardWriter(storage, key, shard_bytes)
    held: list[tuple[np.ndarray, np.ndarray]] = []
    position = 0
    with tqdm(total=n, desc=f"staging {data.path}", unit="image", disable=None) as bar:
        for x, y in folder.chunks(data, workers):
            rows = np.isin(np.arange(position, position + len(x)), held_out)
            position += len(x)
            held.append((x[rows], y[rows]))
            writer.add(x[~rows], y[~rows])
            bar.update(len(x))
    if data.split.heldout:
        hx, hy = _load(_heldout_spec(data), sources)
        if hx.shape[1:] != tuple(writer.shape or ()):
            raise DataError(f"{data.split.heldout}: held-out images are {hx.shape[1:]}, "
                            f"the data's are {tuple(writer.shape or ())}")
        if hy is None:
            raise DataError(f"{data.split.heldout}: the held-out split and the data must both "
                            "have labels or both have none")
    else:
        hx, hy = np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held])
    storage.put_bytes(heldout_key(key), _npz(hx, hy))
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
