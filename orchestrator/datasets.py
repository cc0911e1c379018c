"""Staging: the driver turns a data spec into one canonical, content-addressed object.

Whatever the source (scikit-learn's digits, an npz file, gzip IDX files; local or s3://), the
staged form is `datasets/<sha256>/data.npz` with `x` uint8 of shape (N, H, W, C) and, when the
data has labels, `y` int64 of shape (N,). Workers read only that object, so a job can run on
any node. The key is the digest of the source bytes, so the same data is uploaded once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np

from orchestrator.spec import DataSpec
from orchestrator.storage import S3Credentials, Storage, StorageError, open_storage

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(Exception):
    """Data that cannot be staged; the message names the file and the problem."""


def _read_source(path: str, credentials: S3Credentials | None, base: Path | None) -> bytes:
    if "://" in path:
        parent, _, name = path.rpartition("/")
        try:
            return open_storage(parent, credentials).get_bytes(name)
        except StorageError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
    local = Path(path).expanduser()
    if base is not None and not local.is_absolute():
        local = base / local  # relative to the spec file, wherever genforge runs from
    try:
        return local.read_bytes()
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


def _load(data: DataSpec, credentials: S3Credentials | None,
          base: Path | None = None) -> tuple[np.ndarray, np.ndarray | None, bytes]:
    if data.dataset == "digits":
        import sklearn
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        return x[..., None], digits.target.astype(np.int64), f"digits-{sklearn.__version__}".encode()
    raw = _read_source(data.path, credentials, base)
    if data.dataset == "npz":
        try:
            arrays = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{data.path}: not a readable npz file ({exc})") from None
        if data.x_key not in arrays.files:
            raise DataError(f"{data.path}: no array '{data.x_key}' (has: {', '.join(arrays.files)})")
        x = _as_images(arrays[data.x_key], data.path)
        y = arrays[data.y_key] if data.y_key and data.y_key in arrays.files else None
        ident = raw + f"|{data.x_key}|{data.y_key}".encode()
    else:  # idx
        x = _as_images(parse_idx(raw, data.path), data.path)
        y, ident = None, raw
        if data.labels:
            raw_labels = _read_source(data.labels, credentials, base)
            y, ident = parse_idx(raw_labels, data.labels), raw + raw_labels
    if y is not None:
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if len(y) != len(x):
            raise DataError(f"{data.path}: {len(x)} images but {len(y)} labels")
    return x, y, ident


def has_labels(storage: Storage, key: str) -> bool:
    """Whether the staged data set at `key` has labels (reads only the npz's directory)."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(storage.get_bytes(key))) as archive:
        return "y.npy" in archive.namelist()


def stage(data: DataSpec, storage: Storage, credentials: S3Credentials | None = None,
          base: Path | None = None) -> str:
    """Put the data set into storage once; returns its key (relative to the storage root).
    Relative local paths are taken from `base` (the spec file's folder)."""
    x, y, ident = _load(data, credentials, base)
    key = f"datasets/{hashlib.sha256(ident).hexdigest()}/data.npz"
    if not storage.exists(key):
        buf = io.BytesIO()
        arrays = {"x": x} if y is None else {"x": x, "y": y}
        np.savez(buf, **arrays)
        storage.put_bytes(key, buf.getvalue())
    return key
