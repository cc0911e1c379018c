"""The progress display: a bar a job on a terminal (logs get the driver's one-line events
instead), fed by polling each running job's actor (its `progress()` method, never its output),
and a one-line summary of the pipeline, its run's `genforge.progress` tag.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection

import ray
from tqdm import tqdm

from orchestrator.tracking import Tracker

if TYPE_CHECKING:
    from orchestrator.driver import JobState

PUBLISH_S = 2.0  # the pipeline's progress tag changes at most this often while it runs


@dataclass
class JobProgress:
    bar: tqdm | None = None
    report: Any = None  # a report asked of its actor, not read yet
    asked: float = 0.0  # when its actor was last asked for one (monotonic)


def summary(states: Collection[JobState]) -> str:
    """One line: how many jobs are done, running, queued for resources and waiting."""
    counts: dict[str, int] = {}
    for state in states:
        # queued: waiting for admission, or launched and waiting for Ray's resources
        status = "queued" if state.status == "running" and not state.alive else state.status
        counts[status] = counts.get(status, 0) + 1
    done = counts.get("finished", 0) + counts.get("cached", 0)
    parts = [f"{done}/{len(states)} done"]
    parts += [f"{counts[k]} {k}" for k in ("running", "restarting", "queued", "elsewhere",
                                           "sweeping", "pending", "failed", "skipped", "killed",
                                           "pruned")
              if counts.get(k)]
    return ", ".join(parts)


class Progress:
    """The bars of a pipeline's jobs, and its published summary."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self._jobs: defaultdict[str, JobProgress] = defaultdict(JobProgress)
        self._positions: list[int] = []
        self._tag, self._published = "", 0.0

    def launched(self, state: JobState, jobs: int) -> None:
        """A job's attempt has started: its actor is asked for a report at once, or, if it
        already holds its resources (`state.alive`), once the job has run for a poll's
        interval. Its bar, at its first launch (one line of `jobs`)."""
        job = self._jobs[state.name]
        job.report, job.asked = None, state.started if state.alive else 0.0
        if job.bar is None:
            position = next(i for i in range(jobs + 1) if i not in self._positions)
            self._positions.append(position)
            # Bars only on a terminal; logs get the one-line events instead.
            job.bar = tqdm(total=1, desc=f"{state.name:<14.14}", position=position, leave=True,
                           dynamic_ncols=True, file=sys.stderr, unit="step",
                           disable=not sys.stderr.isatty())

    def show(self, name: str, text: str) -> None:
        self._jobs[name].bar.set_postfix_str(text)

    def ended(self, name: str, text: str) -> None:
        bar = self._jobs[name].bar
        if bar is not None:
            bar.set_postfix_str(text)
            bar.close()

    def poll(self, running: list[JobState], every: float) -> list[tuple[JobState, dict]]:
        """Update the bars from each actor's last report, never blocking: a report is asked
        for, at most `every` s (the loop turns once per finished job), and read on a later
        pass once it has arrived. Returns the reports read ({} from an actor that is gone)."""
        now, read = time.monotonic(), []
        for state in running:
            job = self._jobs[state.name]
            if job.report is None:
                if now - job.asked >= every:
                    job.report, job.asked = state.actor.progress.remote(), now
                continue
            ready, _ = ray.wait([job.report], timeout=0)
            if not ready:
                continue
            try:
                prog = ray.get(job.report)
            except Exception:  # the actor is gone; its run() ref says why
                prog = {}
            job.report = None
            read.append((state, prog))
            if prog.get("total"):
                job.bar.total = prog["total"]
                job.bar.n = prog.get("step", 0)
            post = prog.get("phase", "")
            if "loss" in prog:
                post += f" loss={prog['loss']:.4f}"
            job.bar.set_postfix_str(post, refresh=False)
            job.bar.refresh()
        return read

    def publish(self, states: Collection[JobState], run_id: str, now: bool = True) -> None:
        """The summary as the pipeline run's `genforge.progress` tag, when it changes (in the
        loop at most every PUBLISH_S: each is a request to the tracking server)."""
        line = summary(states)
        due = now or time.monotonic() - self._published >= PUBLISH_S
        if line != self._tag and due:
            self._tag, self._published = line, time.monotonic()
            self.tracker.set_tags(run_id, {"genforge.progress": line})
            for state in states:
                bar = self._jobs[state.name].bar
                if bar is not None and state.status == "running" and not state.alive:
                    bar.set_postfix_str("queued for resources")
