"""Admission: which ready jobs may start now, across every pipeline on the cluster.

Ray starts pending actors in no order of importance, so a driver does not hand it a job whose
resources are not free. Each driver asks one detached, named actor, `genforge:admission`, about
its ready jobs once per loop. The actor grants jobs while Ray's view of the free resources holds
them, highest `resources.priority` first, then the earliest asked; a job that does not fit
stops the grants behind it, so a large important job is not starved by small later ones. A job
that asks for more than the whole cluster has is granted at once (Ray keeps it pending, and an
autoscaler may add the node it needs).

A grant holds its resources in the actor's books until the job has them in Ray's (the driver
says so with `started`), or until it expires; a request no driver has repeated for a while is
dropped, and so is a grant its driver has stopped naming among those it holds, so a driver
that died leaves nothing behind for longer than FORGET_S.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import ray

NAME = "genforge:admission"
FORGET_S = 30.0  # a request not repeated (a grant not named as held) for this long is dropped
GRANT_HOLD_S = 120.0  # a grant whose job never said `started` is released after this
SETTLE_S = 2.0  # after `started`, until Ray's resource view surely shows the job


def request(resources: Any) -> dict[str, float]:
    """The Ray resources a job's `resources` section takes while it runs."""
    if resources.workers > 1:
        return {"CPU": resources.cpus * resources.workers,
                "GPU": resources.gpus_per_worker * resources.workers}
    return {"CPU": resources.cpus, "GPU": resources.gpus}


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items() if v > 0)


def bundles(resources: Any) -> list[dict[str, float]]:
    """What a job's actors take, each on one node: a data-parallel job's workers each."""
    if resources.workers > 1:
        return [{"CPU": resources.cpus, "GPU": resources.gpus_per_worker}] * resources.workers
    return [{"CPU": resources.cpus, "GPU": resources.gpus}]


def packs(need: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether the bundles `need` fit on `nodes` (their total resources) at once: first fit,
    largest bundle first."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(need, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        node = next((f for f in free if _fits(bundle, f)), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return True


def describe(need: list[dict[str, float]]) -> str:
    """'8 GPUs and 1 CPU', or '2 workers of 4 GPUs and 1 CPU each'."""
    b = need[0] if need else {}
    one = " and ".join(f"{b.get(k, 0):g} {k}{'s' if b.get(k, 0) != 1 else ''}"
                       for k in ("GPU", "CPU") if b.get(k, 0) or k == "CPU")
    return one if len(need) == 1 else f"{len(need)} workers of {one} each"


class Admission:
    def __init__(self) -> None:
        self._order = itertools.count()
        # ticket -> [priority, order, resources, last asked]
        self._waiting: dict[str, list[Any]] = {}
        # ticket -> [resources, hold-until, last named by its driver]
        self._granted: dict[str, list[Any]] = {}

    def ask(self, requests: list[tuple[str, int, dict[str, float]]],
            takes: list[tuple[str, int]] = (), holding: list[str] = ()) -> list[str]:
        """(ticket, priority, resources) of a driver's ready jobs, and (ticket, priority) of
        those that would take over an idle actor of the driver, whose resources are held
        already; returns the tickets that may start now. A take-over is refused while a job
        of higher priority waits: the driver frees the actor for it instead. `holding`: the
        driver's granted jobs that have not `started` yet (their grants are kept)."""
        now = time.monotonic()
        for ticket in holding:
            if ticket in self._granted:
                self._granted[ticket][2] = now
        self._expire(now)
        top = max((e[0] for e in self._waiting.values()), default=None)
        taken = [t for t, priority in takes if top is None or priority >= top]
        for ticket in taken:
            self._waiting.pop(ticket, None)
        for ticket, priority, need in requests:
            if ticket in self._granted:
                continue
            entry = self._waiting.setdefault(ticket, [priority, next(self._order), need, now])
            entry[3] = now
        self._grant(now)
        return taken + [ticket for ticket, _, _ in requests if ticket in self._granted]

    def started(self, tickets: list[str]) -> None:
        """The jobs hold their resources in Ray now (or never will: withdrawn)."""
        until = time.monotonic() + SETTLE_S
        for ticket in tickets:
            if ticket in self._granted:
                self._granted[ticket][1] = min(self._granted[ticket][1], until)
            self._waiting.pop(ticket, None)

    def queue(self) -> list[dict[str, Any]]:
        """What waits, in the order it would be granted."""
        return [{"ticket": t, "priority": e[0], "resources": e[2]}
                for t, e in sorted(self._waiting.items(), key=lambda kv: (-kv[1][0], kv[1][1]))]

    def _expire(self, now: float) -> None:
        for ticket in [t for t, e in self._waiting.items() if now - e[3] > FORGET_S]:
            del self._waiting[ticket]
        for ticket in [t for t, g in self._granted.items()
                       if now > g[1] or now - g[2] > FORGET_S]:
            del self._granted[ticket]

    def _grant(self, now: float) -> None:
        if not self._waiting:
            return
        total = ray.cluster_resources()
        free = dict(ray.available_resources())
        for need, *_ in self._granted.values():  # granted, not yet in Ray's view
            for k, v in need.items():
                free[k] = free.get(k, 0.0) - v
        for ticket, (priority, _, need, _) in sorted(self._waiting.items(),
                                                     key=lambda kv: (-kv[1][0], kv[1][1])):
            feasible = _fits(need, total)
            if feasible and not _fits(need, free):
                break  # strict priority: nothing jumps a job that waits for room
            del self._waiting[ticket]
            self._granted[ticket] = [need, now + GRANT_HOLD_S, now]
            if feasible:
                for k, v in need.items():
                    free[k] = free.get(k, 0.0) - v


def connect() -> Any:
    """The cluster's admission actor, created by the first driver that needs it."""
    return ray.remote(Admission).options(
        name=NAME, namespace="genforge", lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1,
    ).remote()
