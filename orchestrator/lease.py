"""One writer per job, whichever driver or machine runs it: a lease object at the job's prefix.

A driver takes a job's lease (`<prefix>/LEASE`) before it runs the job, with a conditional put
(`If-None-Match: *`: of several drivers exactly one succeeds), renews it while the job runs
(`If-Match` on the ETag it last wrote, so a lease taken over meanwhile is noticed as lost) and
deletes it when the job ends. A driver that finds a job's lease held by another waits: for the
job's result (then it is a cache hit), for the lease to go (then it takes it and runs the job,
resuming from its checkpoints), or for the lease to go stale, which it takes over. A lease is
stale when its holder is known dead (its Ray job has ended, on the same cluster) or when it
has not changed for `TTL_S` by the waiter's own clock (no two machines' clocks are compared).

Storage that ignores preconditions cannot keep two drivers apart: `conditional_writes` tells,
and the driver says so once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from orchestrator.storage import NotFound, Storage, StorageError

LEASE_KEY = "LEASE"
TTL_S = 60.0  # a lease that has not changed for this long is stale
RENEW_S = 10.0  # how often a holder renews its leases


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: what a lease object says."""

    driver: str  # the driver's id, new for every driver process
    host: str
    pid: int
    ray_job: str | None = None  # the driver's Ray job id, on the cluster at `gcs`
    gcs: str | None = None
    renewed: float = 0.0  # the holder's clock: for people, never compared across machines

    def describe(self) -> str:
        where = f"{self.host}, pid {self.pid}"
        return f"{where}, Ray job {self.ray_job}" if self.ray_job else where

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Holder | None:
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            return None


def this_driver(ray_job: str | None = None, gcs: str | None = None) -> Holder:
    return Holder(driver=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                  ray_job=ray_job, gcs=gcs)


@dataclass
class Lease:
    """A lease this driver holds."""

    storage: Storage  # the job's prefix
    etag: str


@dataclass
class Taken:
    """A lease another driver holds, as this driver has seen it."""

    holder: Holder | None  # None: unreadable
    etag: str
    since: float = field(default_factory=time.monotonic)  # when this ETag was first seen


def acquire(storage: Storage, me: Holder) -> Lease | Taken | None:
    """The job's lease: taken now (a Lease), or held by another driver (Taken). None: it
    was released between the two requests; ask again."""
    stamped = _stamped(me)
    etag = storage.put_if_absent(LEASE_KEY, stamped)
    if etag is not None:
        return Lease(storage, etag)
    try:
        raw, etag = storage.get_tagged(LEASE_KEY)
    except NotFound:
        return None
    holder = Holder.decode(raw)
    if holder is not None and holder.driver == me.driver:
        # our own put went through, and its answer was lost (botocore retried it)
        return Lease(storage, etag)
    return Taken(holder, etag)


def take_over(storage: Storage, taken: Taken, me: Holder) -> Lease | None:
    """The stale lease `taken`, if it is still what was seen (else another driver renewed or
    took it first)."""
    etag = storage.put_if_match(LEASE_KEY, _stamped(me), taken.etag)
    return Lease(storage, etag) if etag is not None else None


def look(storage: Storage, taken: Taken) -> Taken | None:
    """The lease now: `taken` itself if it has not changed, a new Taken if it has, None if it
    is gone."""
    try:
        raw, etag = storage.get_tagged(LEASE_KEY)
    except NotFound:
        return None
    return taken if etag == taken.etag else Taken(Holder.decode(raw), etag)


def drop_if_held_by(storage: Storage, ray_job: str, gcs: str) -> bool:
    """Delete the job's lease if Ray job `ray_job` (of the cluster at `gcs`) holds it: for the
    leases of a driver known to have ended, whose jobs may be finished and never looked at
    again."""
    try:
        raw, etag = storage.get_tagged(LEASE_KEY)
    except NotFound:
        return False
    holder = Holder.decode(raw)
    if holder is None or (holder.ray_job, holder.gcs) != (ray_job, gcs):
        return False
    return storage.delete_if_match(LEASE_KEY, etag)


def stale(taken: Taken, dead: Callable[[Holder], bool]) -> bool:
    """Whether a lease another driver holds may be taken over: its holder is known dead, or it
    has not changed for TTL_S."""
    if taken.holder is not None and dead(taken.holder):
        return True
    return time.monotonic() - taken.since >= TTL_S


def _stamped(me: Holder) -> bytes:
    return Holder(**{**asdict(me), "renewed": time.time()}).encode()


def conditional_writes(storage: Storage) -> bool:
    """Whether `storage` honours preconditions: a second put-if-absent of one key must fail."""
    key = f"{LEASE_KEY}-probe-{uuid.uuid4().hex}"
    try:
        storage.put_if_absent(key, b"1")
        return storage.put_if_absent(key, b"2") is None
    finally:
        storage.delete(key)


class Keeper:
    """The leases of one driver, renewed every RENEW_S on a thread of their own; `lost()` names
    the jobs whose lease another driver took meanwhile."""

    def __init__(self, me: Holder, on_error: Callable[[str], None] = lambda _: None):
        self.me = me
        self._held: dict[str, Lease] = {}
        self._lost: set[str] = set()
        self._releasing: list[Lease] = []  # released while storage was away: tried again
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._loop, name="leases", daemon=True)
        self._thread.start()

    def hold(self, name: str, lease: Lease) -> None:
        with self._lock:
            self._held[name] = lease

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._held

    def lost(self) -> set[str]:
        with self._lock:
            lost, self._lost = self._lost, set()
        return lost

    def release(self, name: str) -> None:
        """Give the job's lease back (its result, if any, is written: a waiting driver then
        finds it). Storage away: tried again at each renewal and when the keeper closes."""
        with self._lock:
            lease = self._held.pop(name, None)
        if lease is not None:
            self._release(lease)

    def _release(self, lease: Lease) -> None:
        try:
            lease.storage.delete_if_match(LEASE_KEY, lease.etag)
        except StorageError as exc:
            with self._lock:
                first = lease not in self._releasing
                if first:
                    self._releasing.append(lease)
            if first:
                self._on_error(f"could not release {lease.storage.uri(LEASE_KEY)} yet: {exc}")
        else:
            with self._lock:
                if lease in self._releasing:
                    self._releasing.remove(lease)

    def close(self, patience: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for name in list(self._held):
            self.release(name)
        deadline = time.monotonic() + patience
        while self._releasing and time.monotonic() < deadline:
            time.sleep(1.0)
            for lease in list(self._releasing):
                self._release(lease)
        for lease in self._releasing:  # it goes stale: taken over by the next driver
            self._on_error(f"left {lease.storage.uri(LEASE_KEY)} behind: storage stayed away")

    def renew(self) -> None:
        with self._lock:
            held, releasing = list(self._held.items()), list(self._releasing)
        for lease in releasing:
            self._release(lease)
        for name, lease in held:
            try:
                etag = lease.storage.put_if_match(LEASE_KEY, _stamped(self.me), lease.etag)
            except StorageError as exc:  # storage away: tried again at the next renewal
                self._on_error(f"could not renew {lease.storage.uri(LEASE_KEY)}: {exc}")
                continue
            with self._lock:
                if self._held.get(name) is not lease:
                    continue  # released meanwhile
                if etag is None:
                    del self._held[name]
                    self._lost.add(name)
                else:
                    lease.etag = etag

    def _loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            self.renew()


class RayJobs:
    """Whether the Ray job of a lease's holder has ended, on this driver's cluster (from Ray's
    state API at `dashboard`, asked at most once per `every` seconds). The dashboard is named:
    without it, Ray's state API asks "the latest" of the clusters running on the host."""

    def __init__(self, gcs: str | None, dashboard: str | None = None, every: float = 2.0):
        self.gcs, self.dashboard, self.every = gcs, dashboard, every
        self._ended: set[str] = set()
        self._asked = -every

    def dead(self, holder: Holder) -> bool:
        return self.ended(holder.ray_job, holder.gcs)

    def ended(self, ray_job: str | None, gcs: str | None) -> bool:
        """Whether Ray job `ray_job` of the cluster at `gcs` has ended (False: alive, or of
        another cluster, which this driver cannot ask)."""
        if not ray_job or not self.gcs or gcs != self.gcs:
            return False
        if time.monotonic() - self._asked >= self.every:
            self._asked = time.monotonic()
            self._ended = self._ask()
        return ray_job in self._ended

    def _ask(self) -> set[str]:
        try:
            from ray.util.state import list_jobs

            return {j.job_id for j in list_jobs(address=self.dashboard, limit=10_000,
                                                raise_on_missing_output=False)
                    if j.job_id and str(getattr(j.status, "value", j.status)) in
                    ("SUCCEEDED", "FAILED", "STOPPED")}
        except Exception:  # noqa: BLE001 - no dashboard: staleness by TTL_S alone
            return set()


def describe(taken: Taken) -> str:
    return taken.holder.describe() if taken.holder else "a driver whose lease is unreadable"


__all__ = ["Holder", "Keeper", "Lease", "Taken", "RayJobs", "acquire", "take_over", "look",
           "stale", "drop_if_held_by", "this_driver", "conditional_writes", "describe", "LEASE_KEY", "TTL_S",
           "RENEW_S"]

