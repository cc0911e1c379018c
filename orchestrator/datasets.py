"""Staging: the driver turns a data spec into one canonical, content-addressed object.

Whatever the source (scikit-learn's digits, an npz file, gzip IDX files, a folder of images
with one subfolder per class; local or s3://), the staged form is two objects under
`datasets/<sha256>/`: `data.npz`, the training split, and `heldout.npz`, the held-out split (a
file of its own, or a seeded fraction of the data), each with `x` uint8 of shape (N, H, W, C)
and, when the data has labels, `y` int64 of shape (N,). Workers read only those objects, so a
job can run on any node. The key is the digest of the source bytes and the split, so the same
data is uploaded once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np

from orchestrator.spec import DataSpec
from orchestrator.storage import S3Credentials, Storage, StorageError, open_storage

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


def _folder_files(path: str, sources: _Sources) -> list[tuple[int, str, Path]]:
    """(label, "class/file", path) of the image files of a folder data set: one subfolder per
    class, classes in sorted order."""
    root = sources.local(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{path}: no class subfolders (expected <class>/<image>.png)")
    files = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if not file.is_file() or file.name.startswith("."):
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: {name}/{file.name} is not a PNG or JPEG file")
            files.append((label, f"{name}/{file.name}", file))
    if not files:
        raise DataError(f"{path}: no images in its class subfolders")
    return files


def _load_folder(data: DataSpec, path: str, sources: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """The folder's images, resized to data.image_size and converted to data.channels at
    staging: a folder's images need not share a size."""
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for label, name, file in _folder_files(path, sources):
        try:
            with Image.open(io.BytesIO(sources.read(str(file)))) as img:
                img = img.convert("L" if data.channels == 1 else "RGB")
                img = img.resize((data.image_size, data.image_size), Image.BICUBIC)
                images.append(np.asarray(img, dtype=np.uint8).reshape(
                    data.image_size, data.image_size, data.channels))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: {name} is not a readable image ({exc})") from None
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _ident(data: DataSpec, sources: _Sources) -> bytes:
    """What identifies the images a data spec stages, from its files' bytes (nothing is
    decoded): two specs with the same ident stage the same arrays."""
    if data.dataset == "digits":
        import sklearn

        return f"digits-{sklearn.__version__}".encode()
    if data.dataset == "folder":
        digest = hashlib.sha256()
        for _, name, file in _folder_files(data.path, sources):
            digest.update(name.encode() + hashlib.sha256(sources.read(str(file))).digest())
        return digest.digest() + f"|{data.image_size}|{data.channels}".encode()
    raw = sources.read(data.path)
    if data.dataset == "npz":
        return raw + f"|{data.x_key}|{data.y_key}".encode()
    return raw + (sources.read(data.labels) if data.labels else b"")  # idx


def _load(data: DataSpec, sources: _Sources) -> tuple[np.ndarray, np.ndarray | None]:
    if data.dataset == "folder":
        return _load_folder(data, data.path, sources)
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


def split_sizes(storage: Storage, key: str) -> dict[str, int | bool]:
    """Images in the training and held-out splits of the data staged at `key`, and whether it
    has labels (reads only the arrays' headers)."""
    out: dict[str, int | bool] = {}
    for name, split_key in (("train", key), ("heldout", heldout_key(key))):
        with zipfile.ZipFile(io.BytesIO(storage.get_bytes(split_key))) as archive:
            out["labelled"] = "y.npy" in archive.namelist()
            with archive.open("x.npy") as f:
                read_header = (np.lib.format.read_array_header_1_0
                               if np.lib.format.read_magic(f) == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                out[name] = read_header(f)[0][0]
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


_STAGED = re.compile(r"datasets/[0-9a-f]{64}/data\.npz")


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
    return f"datasets/{hashlib.sha256(ident).hexdigest()}/data.npz"


def stage(data: DataSpec, storage: Storage, credentials: S3Credentials | None = None,
          base: Path | None = None) -> str:
    """Put the data set's two splits into storage once; returns the training split's key
    (relative to the storage root; `heldout_key` gives the other). Relative local paths are
    taken from `base` (the spec file's folder). Data staged before is not decoded again."""
    sources = _Sources(credentials, base)
    key = content_key(data, storage=storage, _sources=sources)
    if not storage.exists(key):  # written last: its presence means both splits are there
        x, y = _load(data, sources)
        train, held = _split(data, x, y, sources)
        storage.put_bytes(heldout_key(key), _npz(*held))
        storage.put_bytes(key, _npz(*train))
    return key
