"""The Ray actor that runs one job. It imports the family's worker inside the actor process,
so the driver never imports torch or the models."""

from __future__ import annotations

from typing import Any

from orchestrator.task import Task


class WorkersLost(Exception):
    """A worker of a data-parallel job died (its node left, it ran out of memory): the job
    resumes from its last checkpoint, like a single-worker job whose actor died."""


class JobActor:
    def __init__(self, task: Task):
        if task.job["resources"].get("workers", 1) > 1:
            from workers.parallel import DataParallelJob

            self.worker = DataParallelJob(task)
        else:
            from workers import worker_class

            self.worker = worker_class(task.family or task.kind).for_task(task)(task)
        # Where the job ran, per attempt: a job resumed after its node left shows both nodes.
        import ray

        node = ray.get_runtime_context().get_node_id()
        self.worker.log.set_tags({"genforge.node": node, f"genforge.node.{task.attempt}": node})

    def run(self) -> dict[str, Any]:
        return self.worker.run()

    def progress(self) -> dict[str, Any]:
        return self.worker.progress()

    def stop(self) -> None:
        self.worker.request_stop()

    def report(self, progress: dict[str, Any], result: dict[str, Any] | None = None) -> bool:
        """Rank 0 of a data-parallel job reports here; returns whether to stop."""
        return self.worker.report(progress, result)

    def pid(self) -> int:
        import os

        return os.getpid()
