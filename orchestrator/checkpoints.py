"""Training checkpoints on any :class:`~orchestrator.storage.Storage`.

Layout, relative to a job prefix::

    checkpoints/step-000500/model.safetensors   # weights (safetensors, CPU, contiguous)
    checkpoints/step-000500/state.pt            # optimizer/RNG/EMA state, weights_only-loadable
    checkpoints/step-000500/manifest.json       # written LAST: sizes + sha256 of the files above
    checkpoints/LATEST                          # "step-000500": newest complete checkpoint
    pins/<reader>                               # {"checkpoint": "step-000500", ...}: a job reads it

A checkpoint is *complete* when its ``manifest.json`` exists and *valid* when every
file listed there has the recorded size and sha256.  Loading only ever uses
``safetensors.torch.load`` and ``torch.load(..., weights_only=True)``, so a forged
``state.pt`` cannot execute code.

Retention (`prune_checkpoints`) never deletes the newest complete checkpoint, LATEST's target,
a checkpoint that may be being written, or a *pinned* one: a job that reads another job's
checkpoint by URI pins it first (`pin_checkpoint`), then reads it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the driver reads manifests without torch
    import torch

from .storage import (
    NotFound,
    S3Credentials,
    Storage,
    StorageError,
    open_storage,
    split_uri,
)

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "CHECKPOINT_DIR",
    "MANIFEST_FORMAT",
    "checkpoint_name",
    "parse_checkpoint_name",
    "save_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "verify_checkpoint",
    "latest_step",
    "prune_checkpoints",
    "pin_checkpoint",
    "pinned_checkpoints",
    "resolve_checkpoint_uri",
]

CHECKPOINT_DIR = "checkpoints"
LATEST_KEY = f"{CHECKPOINT_DIR}/LATEST"
PINS_DIR = "pins"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1

_NAME_RE = re.compile(r"step-(\d{6,})")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_READER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HASH_CHUNK = 4 * 1024 * 1024


def _describe(exc: BaseException, limit: int = 240) -> str:
    """Short one-line description of an exception (torch's weights_only errors are long)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
        text = text.split(". ", 1)[0]
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}"


class CheckpointError(StorageError):
    """A checkpoint exists but cannot be used (corrupt, forged, unloadable)."""


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict
    meta: dict
    uri: str
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return checkpoint_name(self.step)


# --------------------------------------------------------------------------- names


def checkpoint_name(step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step-{step:06d}"


def parse_checkpoint_name(name: str) -> int | None:
    """``"step-000500"`` -> 500; anything else -> None."""
    if not isinstance(name, str):
        return None
    m = _NAME_RE.fullmatch(name.strip())
    return int(m.group(1)) if m else None


def _ckpt_key(name: str, filename: str | None = None) -> str:
    return f"{CHECKPOINT_DIR}/{name}" + (f"/{filename}" if filename else "")


# --------------------------------------------------------------------------- save


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU, make contiguous, and un-share storages (safetensors refuses aliasing)."""
    import torch

    if not isinstance(tensors, dict):
        raise CheckpointError(f"tensors must be a dict[str, Tensor], got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"tensors[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        whole = storage.nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0
        if ptr in seen or not whole or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_latest(storage: Storage) -> str | None:
    try:
        raw = storage.get_bytes(LATEST_KEY)
    except NotFound:
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text if parse_checkpoint_name(text) is not None else None


@dataclass
class EncodedCheckpoint:
    """A checkpoint serialised to local files, ready to upload (see `encode_checkpoint`)."""

    name: str
    step: int
    folder: tempfile.TemporaryDirectory
    manifest: bytes

    def path(self, filename: str) -> str:
        return os.path.join(self.folder.name, filename)


def encode_checkpoint(
    step: int,
    *,
    tensors: dict[str, torch.Tensor],
    state: dict | None = None,
    meta: dict | None = None,
) -> EncodedCheckpoint:
    """Serialise a checkpoint to local temporary files: model.safetensors, state.pt and the
    manifest with their sha256. All the CPU work of a checkpoint is here, so a trainer can do it
    between two steps (the tensors are then free to change) and upload in the background.
    ``state`` must be loadable with ``torch.load(weights_only=True)`` (tensors, dicts, lists,
    tuples, numbers, strings, None); this is checked here, before anything is uploaded."""
    import torch
    from safetensors.torch import save_file

    name = checkpoint_name(step)
    state = {} if state is None else state
    meta = {} if meta is None else meta
    if not isinstance(state, dict):
        raise CheckpointError(f"state must be a dict, got {type(state).__name__}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"meta must be a dict, got {type(meta).__name__}")
    prepared = _prepare_tensors(tensors)
    folder = tempfile.TemporaryDirectory(prefix="genforge-ckpt-")
    model_path = os.path.join(folder.name, MODEL_FILE)
    state_path = os.path.join(folder.name, STATE_FILE)
    try:
        try:
            save_file(prepared, model_path, metadata={"format": "pt", "step": str(step)})
        except Exception as e:
            raise CheckpointError(f"cannot serialize tensors of {name}: {_describe(e)}") from None
        try:
            torch.save(state, state_path)
        except Exception as e:
            raise CheckpointError(f"cannot serialize state of {name}: {_describe(e)}") from None
        # Refuse state that could not be resumed from: round-trip it the way load does.
        try:
            torch.load(state_path, weights_only=True, map_location="cpu", mmap=True)
        except Exception as e:
            raise CheckpointError(
                f"state of {name} is not loadable with torch.load(weights_only=True) "
                f"(use only tensors/dicts/lists/numbers/strings): {_describe(e)}"
            ) from None
        files = {
            fname: {"sha256": _sha256_file(path), "size": os.path.getsize(path)}
            for fname, path in ((MODEL_FILE, model_path), (STATE_FILE, state_path))
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "step": step,
            "files": files,
            "meta": meta,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"meta of {name} is not JSON-serializable: {e}") from None
    except BaseException:
        folder.cleanup()
        raise
    return EncodedCheckpoint(name=name, step=step, folder=folder, manifest=manifest_bytes)


def write_checkpoint(storage: Storage, encoded: EncodedCheckpoint) -> str:
    """Upload an encoded checkpoint under ``storage`` (rooted at the job prefix) and advance
    ``LATEST``. Order: model.safetensors, state.pt, manifest.json (last: it marks the checkpoint
    complete), then LATEST (only moved forward). Returns the checkpoint URI."""
    name, step = encoded.name, encoded.step
    uri = storage.uri(_ckpt_key(name))
    try:
        # Overwriting an existing checkpoint: make it incomplete first so no reader
        # ever sees the old manifest next to new files.
        manifest_key = _ckpt_key(name, MANIFEST_FILE)
        if storage.exists(manifest_key):
            storage.delete(manifest_key)
        storage.put_file(_ckpt_key(name, MODEL_FILE), encoded.path(MODEL_FILE))
        storage.put_file(_ckpt_key(name, STATE_FILE), encoded.path(STATE_FILE))
        storage.put_bytes(manifest_key, encoded.manifest)
    finally:
        encoded.folder.cleanup()

    current = _read_latest(storage)
    current_step = parse_checkpoint_name(current) if current else None
    if current_step is None or step >= current_step:
        storage.put_bytes(LATEST_KEY, name.encode("utf-8"))
    else:
        log.info("checkpoint %s saved; LATEST stays at newer %s", name, current)
    log.info("saved checkpoint %s", uri)
    return uri


def save_checkpoint(
    storage: Storage,
    step: int,
    *,
    tensors: dict[str, torch.Tensor],
    state: dict | None = None,
    meta: dict | None = None,
) -> str:
    """Encode and write a checkpoint (`encode_checkpoint` then `write_checkpoint`)."""
    return write_checkpoint(storage, encode_checkpoint(step, tensors=tensors, state=state, meta=meta))


# --------------------------------------------------------------------------- list / verify / load


def list_checkpoints(storage: Storage) -> list[str]:
    """Names of complete checkpoints (manifest present, not verified), sorted by step."""
    found: dict[int, str] = {}
    for key in storage.list(f"{CHECKPOINT_DIR}/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST_FILE:
            step = parse_checkpoint_name(parts[1])
            if step is not None and parts[1] == checkpoint_name(step):
                found[step] = parts[1]
    return [found[s] for s in sorted(found)]


def _read_verified(storage: Storage, name: str, *, want: tuple[str, ...] | None = None,
                   check_files: bool = True) -> tuple[dict, dict[str, bytes]]:
    """Read and verify checkpoint ``name``. Returns (manifest, {filename: bytes}) for ``want``
    (default: every file). Raises NotFound if the manifest is missing, CheckpointError if invalid.
    Without ``check_files`` only the manifest is read and checked."""
    uri = storage.uri(_ckpt_key(name))
    step = parse_checkpoint_name(name)
    if step is None:
        raise CheckpointError(f"invalid checkpoint name {name!r} at {storage.uri(CHECKPOINT_DIR)}")
    try:
        raw = storage.get_bytes(_ckpt_key(name, MANIFEST_FILE))
    except NotFound:
        raise NotFound(f"checkpoint {uri} is missing or incomplete (no {MANIFEST_FILE})") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {uri}: {MANIFEST_FILE} does not parse: {e}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {uri}: {MANIFEST_FILE} is not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"checkpoint {uri}: unsupported manifest format {manifest.get('format')!r}")
    if manifest.get("step") != step:
        raise CheckpointError(f"checkpoint {uri}: manifest step {manifest.get('step')!r} does not match its name")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files or STATE_FILE not in files:
        raise CheckpointError(f"checkpoint {uri}: manifest must list {MODEL_FILE} and {STATE_FILE}")
    if not isinstance(manifest.get("meta", {}), dict):
        raise CheckpointError(f"checkpoint {uri}: manifest meta is not an object")

    blobs: dict[str, bytes] = {}
    for fname, info in files.items() if check_files else ():
        if not isinstance(fname, str) or not _FILE_NAME_RE.fullmatch(fname) or fname == MANIFEST_FILE:
            raise CheckpointError(f"checkpoint {uri}: manifest lists invalid file name {fname!r}")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("size"), int)
            or not isinstance(info.get("sha256"), str)
        ):
            raise CheckpointError(f"checkpoint {uri}: manifest entry for {fname} is malformed")
        try:
            data = storage.get_bytes(_ckpt_key(name, fname))
        except NotFound:
            raise CheckpointError(f"checkpoint {uri}: {fname} is missing") from None
        if len(data) != info["size"]:
            raise CheckpointError(
                f"checkpoint {uri}: {fname} has size {len(data)}, manifest says {info['size']} (truncated or replaced)"
            )
        if hashlib.sha256(data).hexdigest() != info["sha256"].lower():
            raise CheckpointError(f"checkpoint {uri}: {fname} sha256 does not match the manifest (corrupt)")
        if want is None or fname in want:
            blobs[fname] = data
    return manifest, blobs


def _deserialize(storage: Storage, name: str, manifest: dict, blobs: dict[str, bytes], map_location) -> Checkpoint:
    import torch
    from safetensors.torch import load as st_load

    uri = storage.uri(_ckpt_key(name))
    try:
        tensors = st_load(blobs[MODEL_FILE])
    except Exception as e:
        raise CheckpointError(f"checkpoint {uri}: {MODEL_FILE} does not load: {_describe(e)}") from None
    try:
        state = torch.load(io.BytesIO(blobs[STATE_FILE]), weights_only=True, map_location=map_location)
    except Exception as e:
        # includes pickle.UnpicklingError raised for anything weights_only refuses
        raise CheckpointError(
            f"checkpoint {uri}: {STATE_FILE} refused by torch.load(weights_only=True): {_describe(e)}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {uri}: {STATE_FILE} holds a {type(state).__name__}, not a dict")
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type != "cpu":
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return Checkpoint(
        step=int(manifest["step"]),
        tensors=tensors,
        state=state,
        meta=manifest.get("meta") or {},
        uri=uri,
        manifest=manifest,
    )


def verify_checkpoint(storage: Storage, name: str) -> dict:
    """Verify sizes and hashes of checkpoint ``name``; return its manifest.

    Raises NotFound if it is incomplete/missing, CheckpointError if it is corrupt."""
    manifest, _ = _read_verified(storage, name, want=())
    return manifest


def _candidates(storage: Storage) -> list[str]:
    """LATEST's target first (if it names something), then complete checkpoints newest first."""
    order: list[str] = []
    latest = _read_latest(storage)
    if latest is not None:
        order.append(latest)
    for name in reversed(list_checkpoints(storage)):
        if name not in order:
            order.append(name)
    return order


def _walk(storage: Storage, attempt):
    """Try ``attempt(name)`` over the candidates; return the first success.

    NotFound if there is no complete checkpoint at all; CheckpointError if
    complete ones exist but none is valid."""
    where = storage.uri(CHECKPOINT_DIR)
    failures: list[str] = []
    any_complete = False
    latest = _read_latest(storage)
    for name in _candidates(storage):
        try:
            result = attempt(name)
        except NotFound as e:
            if name == latest:
                log.warning("LATEST names %s but it is incomplete; falling back (%s)", name, e)
            failures.append(f"{name}: incomplete")
            continue
        except CheckpointError as e:
            any_complete = True
            log.warning("skipping checkpoint: %s", e)
            failures.append(f"{name}: {_reason(str(e))}")
            continue
        if failures:
            log.warning("using checkpoint %s after skipping: %s", name, "; ".join(failures))
        return result
    if not any_complete:
        raise NotFound(f"no complete checkpoint under {where}")
    summary = "; ".join(failures)
    if len(summary) > 600:
        summary = summary[:600] + "..."
    raise CheckpointError(f"no valid checkpoint under {where}: {summary}")


def _reason(message: str) -> str:
    # "checkpoint s3://.../step-000500: model.safetensors sha256 ..." -> "model.safetensors sha256 ..."
    head, sep, tail = message.partition(": ")
    return tail if sep and head.startswith("checkpoint ") else message


# The checkpoint this process loaded last with `reuse=True`: an actor that samples one
# checkpoint job after job reads and verifies its files once. The key is its URI (and device)
# and the sha256 of every file its manifest lists, as verified when it was loaded: a
# checkpoint rewritten in place is read again.
_last_loaded: tuple[tuple[str, str], Checkpoint] | None = None


def _files_key(manifest: dict) -> str:
    return json.dumps(manifest["files"], sort_keys=True)


def _shared(ckpt: Checkpoint) -> Checkpoint:
    """The same tensors, weights and optimizer state alike (a reused load only reads them: a
    deep copy of Adam's moments would cost twice the model's size on every job); the small
    meta and manifest dicts of its own, which a job may change."""
    return Checkpoint(ckpt.step, dict(ckpt.tensors), dict(ckpt.state),
                      copy.deepcopy(ckpt.meta), ckpt.uri, copy.deepcopy(ckpt.manifest))


def load_checkpoint(storage: Storage, name: str | None = None, *, map_location: Any = "cpu",
                    reuse: bool = False) -> Checkpoint:
    """Load checkpoint ``name`` (e.g. ``"step-000500"``) or, if None, the newest valid one.

    With ``name=None``: LATEST's target is tried first; if LATEST is missing or
    garbage, or its target is incomplete/corrupt, the complete checkpoints are tried
    newest first.  Raises NotFound when there is no complete checkpoint at all and
    CheckpointError when none verifies and loads.

    ``reuse``: if the manifest lists the same files as the checkpoint this process loaded last
    with ``reuse``, that one is returned (its tensors shared, its dicts copied) after reading
    the manifest alone; for loads whose tensors are only copied from (weights for sampling),
    never for a resume, whose optimizer state is stepped in place.
    """

    def attempt(n: str) -> Checkpoint:
        global _last_loaded
        uri = f"{storage.uri(_ckpt_key(n))} on {map_location}"
        if reuse and _last_loaded is not None and _last_loaded[0][0] == uri:
            if _last_loaded[0][1] == _files_key(_read_verified(storage, n, check_files=False)[0]):
                return _shared(_last_loaded[1])
        manifest, blobs = _read_verified(storage, n, want=(MODEL_FILE, STATE_FILE))
        ckpt = _deserialize(storage, n, manifest, blobs, map_location)
        if not reuse:
            return ckpt
        _last_loaded = None  # the one before is let go first
        _last_loaded = ((uri, _files_key(manifest)), ckpt)
        return _shared(ckpt)

    if name is not None:
        if parse_checkpoint_name(name) is None:
            raise CheckpointError(f"invalid checkpoint name {name!r}; expected e.g. 'step-000500'")
        return attempt(name.strip())
    return _walk(storage, attempt)


def read_manifest(storage: Storage, name: str | None = None) -> dict:
    """The manifest (with its `meta`) of checkpoint ``name`` or of the newest complete one: only
    manifest.json is read, so this is cheap; loading verifies the files."""
    def attempt(n: str) -> dict:
        return _read_verified(storage, n, want=(), check_files=False)[0]

    return attempt(name) if name is not None else _walk(storage, attempt)


def latest_step(storage: Storage) -> int | None:
    """Step of the newest *verified* checkpoint (hashes checked, nothing deserialized).

    None if there is no complete checkpoint; CheckpointError if all are corrupt."""
    try:
        return _walk(storage, lambda n: int(verify_checkpoint(storage, n)["step"]))
    except NotFound:
        return None


# --------------------------------------------------------------------------- housekeeping


def pin_checkpoint(storage: Storage, name: str, reader: str) -> None:
    """Record that job ``reader`` (its hash, or another short identifier) reads checkpoint
    ``name`` of the job ``storage`` is rooted at: ``pins/<reader>``, one pin per reader (a
    second pin by the same reader replaces its first). `prune_checkpoints` never deletes a
    pinned checkpoint. A reader pins *before* it reads, and treats a checkpoint found
    incomplete after pinning as gone (a prune that began before the pin may have taken it)."""
    if not isinstance(reader, str) or not _READER_RE.fullmatch(reader):
        raise CheckpointError(
            f"invalid pin reader {reader!r}: 1-128 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    step = parse_checkpoint_name(name)
    if step is None or name != checkpoint_name(step):
        raise CheckpointError(f"invalid checkpoint name {name!r}; expected e.g. 'step-000500'")
    pin = {"checkpoint": name,
           "pinned_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    storage.put_bytes(f"{PINS_DIR}/{reader}", json.dumps(pin, sort_keys=True).encode("utf-8"))


def pinned_checkpoints(storage: Storage) -> set[str]:
    """Names of the checkpoints pinned under ``storage`` (malformed pins are ignored)."""
    pinned: set[str] = set()
    for key in storage.list(f"{PINS_DIR}/"):
        parts = key.split("/")
        if len(parts) != 2 or not _READER_RE.fullmatch(parts[1]):
            continue
        try:
            pin = json.loads(storage.get_bytes(key).decode("utf-8"))
        except NotFound:
            continue  # removed since the listing
        except (UnicodeDecodeError, ValueError):
            log.warning("ignoring malformed pin %s", storage.uri(key))
            continue
        name = pin.get("checkpoint") if isinstance(pin, dict) else None
        step = parse_checkpoint_name(name) if isinstance(name, str) else None
        if step is None or name != checkpoint_name(step):
            log.warning("ignoring malformed pin %s", storage.uri(key))
            continue
        pinned.add(name)
    return pinned


def prune_checkpoints(storage: Storage, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints, plus incomplete leftovers
    older than the newest complete one. Returns the deleted names, oldest first.

    Never deleted: the newest complete checkpoint, LATEST's target, a pinned checkpoint
    (`pin_checkpoint`), and an incomplete checkpoint newer than the newest complete one (it
    may be being written). A checkpoint is made incomplete (its manifest deleted) before its
    files are, so a concurrent reader sees it complete and whole, or not at all."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise CheckpointError(f"keep_last must be an int >= 1, got {keep_last!r}")
    complete = list_checkpoints(storage)
    keep = set(complete[-keep_last:]) | pinned_checkpoints(storage)
    latest = _read_latest(storage)
    if latest:
        keep.add(latest)
    newest = parse_checkpoint_name(complete[-1]) if complete else None
    by_name: dict[str, list[str]] = {}
    for key in storage.list(f"{CHECKPOINT_DIR}/"):
        parts = key.split("/")
        if len(parts) >= 3 and parse_checkpoint_name(parts[1]) is not None:
            by_name.setdefault(parts[1], []).append(key)
    deleted = []
    for name, keys in sorted(by_name.items(), key=lambda kv: parse_checkpoint_name(kv[0])):
        if name in keep:
            continue
        is_complete = name in complete
        step = parse_checkpoint_name(name)
        if not is_complete and (newest is None or step >= newest):
            continue  # possibly being written right now
        manifest_key = _ckpt_key(name, MANIFEST_FILE)
        if manifest_key in keys:  # un-complete it first
            try:
                manifest = storage.get_bytes(manifest_key)
            except NotFound:
                manifest = None
            storage.delete(manifest_key)
            # A reader may have pinned it since the pins were read: it pins before it reads,
            # so if its pin is not here now, it will find the checkpoint incomplete.
            if manifest is not None and name in pinned_checkpoints(storage):
                storage.put_bytes(manifest_key, manifest)
                continue
        for key in keys:
            if key != manifest_key:
                storage.delete(key)
        deleted.append(name)
    return deleted


# --------------------------------------------------------------------------- URIs


def resolve_checkpoint_uri(
    uri: str, credentials: S3Credentials | None = None
) -> tuple[Storage, str | None]:
    """Interpret a user-given checkpoint URI.

    Accepts a job prefix (``s3://b/jobs/x``), its checkpoint dir
    (``.../checkpoints``), a specific checkpoint (``.../checkpoints/step-000500``,
    optionally followed by one of its file names) or ``.../checkpoints/LATEST``.
    Returns ``(storage rooted at the job prefix, checkpoint name or None for latest)``.
    """
    scheme, location, key = split_uri(uri)  # validates; StorageError names the problem
    if scheme == "s3":
        path = key

        def rebuild(p: str) -> str:
            return f"s3://{location}/{p}" if p else f"s3://{location}"
    else:
        path = location.strip("/")

        def rebuild(p: str) -> str:
            return "file:///" + p

    parts = path.split("/") if path else []
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] != CHECKPOINT_DIR:
            continue
        rest = parts[i + 1 :]
        if not rest:
            name = None
        elif rest == ["LATEST"]:
            name = None
        elif len(rest) <= 2 and parse_checkpoint_name(rest[0]) is not None:
            name = rest[0]
        else:
            continue
        return open_storage(rebuild("/".join(parts[:i])), credentials), name
    return open_storage(rebuild(path), credentials), None
