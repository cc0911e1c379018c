"""One storage interface over ``s3://bucket/prefix`` and ``file:///abs/path`` roots.

A :class:`Storage` is rooted at a URI; every operation takes a *key*, a
'/'-separated path relative to that root.  Keys that could escape the root
(absolute paths, ``..``/``.`` segments, backslashes, empty segments, NUL or
other control characters, percent-encoded sequences) are rejected with
:class:`StorageError` before any I/O happens.

``S3Storage`` talks to any S3-compatible endpoint (AWS, SeaweedFS, MinIO) with
explicit credentials, path-style addressing and botocore's own retry logic.
``FileStorage`` writes plain files atomically (temp file + ``os.replace``).

All errors raised from here are :class:`StorageError` (or a subclass) with a
one-line message that never contains a secret.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

__all__ = [
    "StorageError",
    "NotFound",
    "S3Credentials",
    "Storage",
    "S3Storage",
    "FileStorage",
    "open_storage",
    "split_uri",
    "join_key",
    "validate_key",
]

MiB = 1024 * 1024


# --------------------------------------------------------------------------- errors


class StorageError(Exception):
    """Any storage failure. The message is a single line without secrets."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class NotFound(StorageError, FileNotFoundError):
    """The key (or checkpoint) does not exist. Also catchable as FileNotFoundError."""

    def __init__(self, message: str) -> None:
        # FileNotFoundError is an OSError: give it exactly one arg so that
        # str(exc) is the plain message and not "[Errno ...]".
        StorageError.__init__(self, message)

    def __str__(self) -> str:  # OSError.__str__ would be fine too; be explicit.
        return self.args[0] if self.args else ""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(message: str) -> str:
    text = _ANSI.sub("", str(message))
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(text.split())


# --------------------------------------------------------------------------- credentials


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


@dataclass(frozen=True)
class S3Credentials:
    """Endpoint + static credentials for an S3-compatible store.

    ``None`` fields fall back to boto3's default resolution chain.  The secret
    is excluded from ``repr``/``str``.
    """

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "S3Credentials":
        env = os.environ if environ is None else environ
        return cls(
            endpoint_url=_env(env, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
            access_key_id=_env(env, "AWS_ACCESS_KEY_ID"),
            secret_access_key=_env(env, "AWS_SECRET_ACCESS_KEY"),
            region=_env(env, "AWS_DEFAULT_REGION") or "us-east-1",
        )

    def redact(self, text: str) -> str:
        """Remove the secret from ``text`` (defence in depth for error messages)."""
        if self.secret_access_key:
            text = text.replace(self.secret_access_key, "***")
        return text


# --------------------------------------------------------------------------- keys & URIs

_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_key(key: str, *, allow_empty: bool = False, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`StorageError`.

    A trailing '/' is not accepted here; use :func:`_normalize_prefix` for prefixes.
    """
    if not isinstance(key, str):
        raise StorageError(f"{what} must be a str, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise StorageError(f"empty {what}")
    shown = ascii(key) if len(key) <= 200 else ascii(key[:200]) + "..."
    if _CONTROL.search(key):
        raise StorageError(f"{what} {shown} contains NUL or control characters")
    if "\\" in key:
        raise StorageError(f"{what} {shown} contains a backslash")
    if _PERCENT_ESCAPE.search(key):
        raise StorageError(f"{what} {shown} contains a percent-encoded sequence")
    if key.startswith("/"):
        raise StorageError(f"{what} {shown} is absolute; keys are relative to the storage root")
    for segment in key.split("/"):
        if segment == "":
            raise StorageError(f"{what} {shown} has an empty path segment")
        if segment in (".", ".."):
            raise StorageError(f"{what} {shown} contains a '{segment}' segment")
    return key


def _normalize_prefix(prefix: str, *, what: str = "prefix") -> str:
    """Validate a listing/child prefix; '' means the whole root. Keeps a trailing '/'."""
    if prefix in ("", "/") and isinstance(prefix, str):
        return ""
    trailing = prefix.endswith("/") if isinstance(prefix, str) else False
    body = validate_key(prefix[:-1] if trailing else prefix, what=what)
    return body + ("/" if trailing else "")


def join_key(*parts: str) -> str:
    """Join key fragments with '/', ignoring empty ones, and validate the result."""
    joined = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return validate_key(joined, allow_empty=True)


def split_uri(uri: str) -> tuple[str, str, str]:
    """Split a storage URI into ``(scheme, bucket_or_path, key)``.

    * ``s3://bucket/some/prefix`` -> ``("s3", "bucket", "some/prefix")``
    * ``file:///abs/path``        -> ``("file", "/abs/path", "")``
    * ``/abs/path`` (no scheme)   -> ``("file", "/abs/path", "")``
    """
    if not isinstance(uri, str) or not uri:
        raise StorageError("empty storage URI")
    if _CONTROL.search(uri):
        raise StorageError("storage URI contains NUL or control characters")
    if "://" not in uri:
        if uri.startswith("/"):
            return "file", _clean_local_path(uri), ""
        scheme = uri.split(":", 1)[0] if ":" in uri else ""
        if scheme:
            raise StorageError(f"unsupported storage URI scheme {scheme!r} in {uri!r}; use s3:// or file://")
        raise StorageError(f"storage URI {uri!r} is neither s3://bucket/prefix nor file:///absolute/path")
    scheme, rest = uri.split("://", 1)
    scheme_l = scheme.lower()
    if scheme_l in ("s3", "s3a"):
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"storage URI {uri!r} has no bucket")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", bucket):
            raise StorageError(f"invalid bucket name {bucket!r} in {uri!r}")
        key = key.strip("/")
        if key:
            validate_key(key, what="URI prefix")
        return "s3", bucket, key
    if scheme_l == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names host {host!r}; only local file:///abs/path is supported")
        if not slash:
            raise StorageError(f"file URI {uri!r} has no path; use file:///absolute/path")
        return "file", _clean_local_path("/" + path), ""
    raise StorageError(f"unsupported storage URI scheme {scheme!r} in {uri!r}; use s3:// or file://")


def _clean_local_path(path: str) -> str:
    if "\\" in path:
        raise StorageError(f"local path {path!r} contains a backslash")
    if any(seg == ".." for seg in path.split("/")):
        raise StorageError(f"local path {path!r} contains a '..' segment")
    return os.path.normpath(path)


# --------------------------------------------------------------------------- base class


class Storage(abc.ABC):
    """Abstract storage rooted at :attr:`root` (a URI without trailing '/')."""

    root: str

    # -- abstract primitives
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to root) starting with ``prefix``; recursive, sorted."""

    @abc.abstractmethod
    def put_file(self, key: str, local_path: str | os.PathLike) -> None: ...

    @abc.abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike) -> None: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    @abc.abstractmethod
    def child(self, prefix: str) -> "Storage":
        """A storage rooted at ``root/prefix`` that shares this one's client."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageError` if the root is unusable (unreachable, missing, refused)."""

    # -- conditional writes: what a lease is made of (see orchestrator/lease.py). An ETag is
    # an opaque string that changes with the object's content.
    @abc.abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """``key``'s content and ETag; NotFound if it does not exist."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` unless it exists (atomically: of several writers, one wins); its
        ETag, or None when it existed."""

    @abc.abstractmethod
    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace ``key`` only if its ETag is still ``etag``; the new ETag, or None when it
        changed or is gone."""

    @abc.abstractmethod
    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete ``key`` only if its ETag is still ``etag``; whether it was deleted."""

    # -- shared helpers
    def uri(self, key: str = "") -> str:
        key = _normalize_prefix(key, what="key").rstrip("/")
        if not key:
            return self.root
        return self.root + key if self.root.endswith("/") else f"{self.root}/{key}"

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        data = self.get_bytes(key)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StorageError(f"{self.uri(key)} is not valid UTF-8: {e}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.root == self.root  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.root))


# --------------------------------------------------------------------------- local files

_TMP_MARK = ".genforge-tmp-"


class FileStorage(Storage):
    """Plain files under a local directory. Writes are atomic (temp + os.replace)."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = os.fspath(path)
        if p.startswith("file://"):
            _, p, _ = split_uri(p)
        if not os.path.isabs(p):
            raise StorageError(f"FileStorage root must be an absolute path, got {p!r}")
        self.path = Path(_clean_local_path(p))
        self.root = "file://" + str(self.path)  # "file:///" for the filesystem root

    # -- paths
    def _resolve(self, key: str) -> Path:
        validate_key(key)
        target = self.path.joinpath(*key.split("/"))
        root_real = os.path.realpath(self.path)
        real = os.path.realpath(target)
        if real != root_real and not real.startswith(root_real.rstrip("/") + "/"):
            raise StorageError(f"key {key!r} resolves outside the storage root {self.root}")
        return target

    # -- primitives
    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._resolve(key)
        self._atomic_write(target, key, lambda f: f.write(memoryview(data)))

    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        target = self._resolve(key)
        try:
            src = open(local_path, "rb")
        except OSError as e:
            raise StorageError(f"cannot read local file {os.fspath(local_path)!r}: {e.strerror or e}") from None
        with src:
            self._atomic_write(target, key, lambda f: shutil.copyfileobj(src, f, 4 * MiB))

    def _atomic_write(self, target: Path, key: str, write) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent)
        except OSError as e:
            raise StorageError(f"cannot write {self.uri(key)}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644 & ~_umask())
            os.replace(tmp, target)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise StorageError(f"cannot write {self.uri(key)}: {e.strerror or e}") from None
            raise
        _fsync_dir(target.parent)

    def get_bytes(self, key: str) -> bytes:
        target = self._resolve(key)
        try:
            return target.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)} does not exist") from None
        except IsADirectoryError:
            raise NotFound(f"{self.uri(key)} is a directory, not an object") from None
        except OSError as e:
            raise StorageError(f"cannot read {self.uri(key)}: {e.strerror or e}") from None

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        src = self._resolve(key)
        dest = Path(local_path)
        if not src.is_file():
            raise NotFound(f"{self.uri(key)} does not exist")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{_TMP_MARK}", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out, 4 * MiB)
                os.replace(tmp, dest)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot copy {self.uri(key)} to {os.fspath(local_path)!r}: {e.strerror or e}") from None

    def exists(self, key: str) -> bool:
        return self._resolve(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = _normalize_prefix(prefix)
        # S3 semantics: plain string prefix. Walk the deepest directory that
        # contains every possible match, then filter.
        base_key = prefix if prefix.endswith("/") or not prefix else prefix.rpartition("/")[0]
        base_key = base_key.rstrip("/")
        base = self._resolve(base_key) if base_key else self.path
        if not base.is_dir():
            return []
        root_real = os.path.realpath(self.path)
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames.sort()
            for name in filenames:
                if _TMP_MARK in name:
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.path).replace(os.sep, "/")
                if not rel.startswith(prefix):
                    continue
                real = os.path.realpath(full)
                if not real.startswith(root_real.rstrip("/") + "/") or not os.path.isfile(real):
                    continue  # symlink escaping the root, or dangling
                out.append(rel)
        out.sort()
        return out

    def delete(self, key: str) -> None:
        target = self._resolve(key)
        try:
            target.unlink()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise StorageError(f"{self.uri(key)} is a directory, not an object") from None
        except OSError as e:
            raise StorageError(f"cannot delete {self.uri(key)}: {e.strerror or e}") from None
        # prune now-empty parent directories, never the root itself
        parent = target.parent
        while parent != self.path and self.path in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def child(self, prefix: str) -> "FileStorage":
        prefix = _normalize_prefix(prefix).rstrip("/")
        if not prefix:
            return self
        self._resolve(prefix)  # escape check (symlinks included)
        return FileStorage(self.path.joinpath(*prefix.split("/")))

    # -- conditional writes: under an exclusive lock of the key's folder (flock), so that
    # the processes of one machine (or of an NFS that honours locks) see one order.
    def _locked(self, key: str):
        import contextlib
        import fcntl

        target = self._resolve(key)

        @contextlib.contextmanager
        def lock():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target.parent, os.O_RDONLY)
            except OSError as e:
                raise StorageError(f"cannot lock {self.uri(key)}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield target
            finally:
                os.close(fd)

        return lock()

    @staticmethod
    def _etag(data: bytes) -> str:
        import hashlib

        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, self._etag(data)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        with self._locked(key) as target:
            if target.exists():
                return None
            self._atomic_write(target, key, lambda f: f.write(memoryview(data)))
        return self._etag(data)

    def _matches(self, target: Path, etag: str) -> bool:
        try:
            return self._etag(target.read_bytes()) == etag
        except FileNotFoundError:
            return False

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        with self._locked(key) as target:
            if not self._matches(target, etag):
                return None
            self._atomic_write(target, key, lambda f: f.write(memoryview(data)))
        return self._etag(data)

    def delete_if_match(self, key: str, etag: str) -> bool:
        with self._locked(key) as target:
            if not self._matches(target, etag):
                return False
            target.unlink()
        return True

    def check(self) -> None:
        p = self.path
        if p.exists():
            if not p.is_dir():
                raise StorageError(f"storage root {self.root} exists but is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise StorageError(f"storage root {self.root} is not writable")
            return
        ancestor = p.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise StorageError(f"storage root {self.root} cannot be created: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise StorageError(f"storage root {self.root} cannot be created: {ancestor} is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- S3


@dataclass
class _S3Conn:
    """Client settings plus a lazily created boto3 client, shared by a storage and its children.

    Picklable (the client is dropped and recreated), so storages can be shipped to Ray workers.
    """

    credentials: S3Credentials
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 4
    page_size: int | None = None
    _client: Any = field(default=None, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self):
        # A boto3 client takes ~0.2 s to build (it loads the service model): one per
        # endpoint, credentials and settings in a process, shared (clients are thread-safe).
        c = self.credentials
        key = (c.endpoint_url, c.access_key_id, c.secret_access_key, c.region, self.max_attempts,
               self.connect_timeout, self.read_timeout)
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                _CLIENTS[key] = self._new_client()
            return _CLIENTS[key]

    def _new_client(self):
        import boto3
        from botocore.config import Config

        c = self.credentials
        config = Config(
            region_name=c.region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )
        session = boto3.session.Session()
        try:
            return session.client(
                "s3",
                endpoint_url=c.endpoint_url,
                aws_access_key_id=c.access_key_id,
                aws_secret_access_key=c.secret_access_key,
                region_name=c.region,
                config=config,
            )
        except Exception as e:  # e.g. malformed endpoint URL
            raise StorageError(f"cannot create S3 client for endpoint {c.endpoint_url!r}: {c.redact(str(e))}") from None

    @property
    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
        )


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix`` on any S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        credentials: S3Credentials | None = None,
        *,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 4,
        page_size: int | None = None,
        _conn: _S3Conn | None = None,
    ) -> None:
        _, bucket_checked, _ = split_uri(f"s3://{bucket}")
        self.bucket = bucket_checked
        prefix = prefix.strip("/")
        self.prefix = validate_key(prefix, allow_empty=True, what="prefix")
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._conn = _conn or _S3Conn(
            credentials=credentials if credentials is not None else S3Credentials.from_env(),
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            page_size=page_size,
        )

    @property
    def client(self):
        return self._conn.client

    @property
    def credentials(self) -> S3Credentials:
        return self._conn.credentials

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- error mapping
    def _error(self, exc: BaseException, action: str, key: str | None) -> StorageError:
        from botocore import exceptions as bx

        where = self.uri(key) if key else self.root
        endpoint = self.credentials.endpoint_url or "the default AWS endpoint"
        redact = self.credentials.redact
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", "") or "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = redact(str(err.get("Message", "") or ""))
            detail = f"{code}" + (f": {msg}" if msg and msg != code else "")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return StorageError(f"bucket {self.bucket!r} does not exist at {endpoint} ({action} {where})")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return NotFound(f"{where} does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
                        "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed") or status in (401, 403):
                return StorageError(
                    f"access denied by {endpoint} while trying to {action} {where} "
                    f"(credentials refused or insufficient permissions; {detail})"
                )
            return StorageError(f"S3 error while trying to {action} {where}: {detail} (HTTP {status})")
        if isinstance(exc, bx.NoCredentialsError):
            return StorageError(f"no S3 credentials available to {action} {where}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                            bx.ConnectionClosedError)):
            return StorageError(f"cannot reach S3 endpoint {endpoint} to {action} {where}: {type(exc).__name__}")
        if isinstance(exc, bx.BotoCoreError):
            return StorageError(f"S3 client error while trying to {action} {where}: {redact(str(exc))}")
        if isinstance(exc, OSError):
            return StorageError(f"local I/O error while trying to {action} {where}: {exc.strerror or exc}")
        return StorageError(f"unexpected error while trying to {action} {where}: {type(exc).__name__}: {redact(str(exc))}")

    def _call(self, action: str, key: str | None, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, action, key) from None

    # -- primitives
    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._key(key)
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=k, Body=bytes(data))

    def get_bytes(self, key: str) -> bytes:
        k = self._key(key)
        resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=k)
        try:
            with resp["Body"] as body:
                return body.read()
        except Exception as e:
            raise self._error(e, "read", key) from None

    def exists(self, key: str) -> bool:
        k = self._key(key)
        try:
            self._call("stat", key, self.client.head_object, Bucket=self.bucket, Key=k)
        except NotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        prefix = _normalize_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        if self.prefix and not prefix:
            full = self.prefix + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        pagination = {"PageSize": self._conn.page_size} if self._conn.page_size else {}
        out: list[str] = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full, PaginationConfig=pagination):
                for obj in page.get("Contents", ()) or ():
                    k = obj["Key"]
                    if k.endswith("/") or not k.startswith(full):
                        continue  # directory markers
                    out.append(k[strip:])
        except Exception as e:
            raise self._error(e, "list", prefix or None) from None
        out.sort()
        return out

    def put_file(self, key: str, local_path: str | os.PathLike) -> None:
        k = self._key(key)
        if not os.path.isfile(local_path):
            raise StorageError(f"cannot read local file {os.fspath(local_path)!r}: not a file")
        try:
            self.client.upload_file(os.fspath(local_path), self.bucket, k, Config=self._conn.transfer_config)
        except Exception as e:
            raise self._error(_unwrap_transfer(e), "upload", key) from None

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        k = self._key(key)
        dest = os.fspath(local_path)
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        try:
            # s3transfer writes to a temp name and renames on success.
            self.client.download_file(self.bucket, k, dest, Config=self._conn.transfer_config)
        except Exception as e:
            raise self._error(_unwrap_transfer(e), "download", key) from None

    def delete(self, key: str) -> None:
        k = self._key(key)
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=k)

    def child(self, prefix: str) -> "S3Storage":
        prefix = _normalize_prefix(prefix).rstrip("/")
        if not prefix:
            return self
        new_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        return S3Storage(self.bucket, new_prefix, _conn=self._conn)

    # -- conditional writes: S3's If-None-Match / If-Match preconditions (AWS since 2024;
    # SeaweedFS, MinIO). A refused precondition is 412 PreconditionFailed, or 409 when
    # another conditional write to the key is in progress.
    def _conditional(self, action: str, key: str, fn, **kwargs) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(e.response.get("Error", {}).get("Code", ""))
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            error = self._error(e, action, key)
        except BotoCoreError as e:
            error = self._error(e, action, key)
        if isinstance(error, NotFound):
            return None
        raise error

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        try:
            with resp["Body"] as body:
                return body.read(), resp["ETag"]
        except Exception as e:
            raise self._error(e, "read", key) from None

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        resp = self._conditional("write", key, self.client.put_object, Body=bytes(data),
                                 IfNoneMatch="*")
        return resp["ETag"] if resp is not None else None

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        resp = self._conditional("write", key, self.client.put_object, Body=bytes(data),
                                 IfMatch=etag)
        return resp["ETag"] if resp is not None else None

    def delete_if_match(self, key: str, etag: str) -> bool:
        return self._conditional("delete", key, self.client.delete_object, IfMatch=etag) is not None

    def check(self) -> None:
        # Important on SeaweedFS: PutObject to a missing bucket silently creates it
        # (Admin identities), so a mistyped bucket is only caught here.
        self._call("access bucket", None, self.client.head_bucket, Bucket=self.bucket)
        # head_bucket alone may succeed with list-less permissions; make sure we can list the root.
        full = self.prefix + "/" if self.prefix else ""
        self._call("list", None, self.client.list_objects_v2, Bucket=self.bucket, Prefix=full, MaxKeys=1)

    def __reduce__(self):
        return (_rebuild_s3, (self.bucket, self.prefix, self._conn))


def _rebuild_s3(bucket: str, prefix: str, conn: _S3Conn) -> S3Storage:
    return S3Storage(bucket, prefix, _conn=conn)


def _unwrap_transfer(exc: BaseException) -> BaseException:
    """s3transfer sometimes wraps the botocore error; find the underlying one."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(cur, (ClientError, BotoCoreError)):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return exc


# --------------------------------------------------------------------------- factory


def open_storage(uri: str, credentials: S3Credentials | None = None, **s3_options: Any) -> Storage:
    """Open ``s3://bucket/prefix`` or ``file:///abs/path`` (a bare absolute path also works).

    ``credentials`` default to :meth:`S3Credentials.from_env` for S3.  Extra keyword
    arguments (``max_attempts``, ``connect_timeout``, ``read_timeout``,
    ``multipart_threshold``, ``page_size`` ...) go to :class:`S3Storage`.
    """
    scheme, location, key = split_uri(uri)
    if scheme == "s3":
        return S3Storage(location, key, credentials, **s3_options)
    return FileStorage(location)
