"""The Ray actor that runs jobs, one at a time. It imports the family's worker inside the actor
process, so the driver never imports torch or the models.

An actor whose job finished may be handed the driver's next job of the same resources (see
`Driver._admit`): the process, its imports and its CUDA context are reused, which is most of
the cost of a short job."""

from __future__ import annotations

import threading
from typing import Any

from orchestrator.task import Task


class JobActor:
    def __init__(self) -> None:
        self.worker: Any = None
        self._lock = threading.Lock()
        self._stop = False  # asked to stop before the worker existed

    def run(self, task: Task) -> dict[str, Any]:
        import ray

        if task.job["resources"].get("workers", 1) > 1:
            from workers.parallel import DataParallelJob

            worker = DataParallelJob(task)
        else:
            from workers.registry import worker_class

            cls = worker_class(task.family or task.kind).for_task(task)
            _freeze_imports()
            worker = cls(task)
        # Where the job ran, per attempt: a job resumed after its node left shows both nodes.
        # These tags, and the run's params when the driver left them to the worker, go with
        # the worker's first metrics: no request of their own.
        node = ray.get_runtime_context().get_node_id()
        worker.log.set_tags({"genforge.node": node, f"genforge.node.{task.attempt}": node,
                             "genforge.launched": f"{task.launched:.3f}"})
        worker.log.log_params(task.params)
        with self._lock:
            self.worker = worker
            if self._stop:
                worker.request_stop()
        try:
            return worker.run()
        finally:
            with self._lock:
                self.worker, self._stop = None, False
            del worker
            _release_memory()

    def progress(self) -> dict[str, Any]:
        worker = self.worker
        return worker.progress() if worker is not None else {"phase": "starting"}

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            if self.worker is not None:
                self.worker.request_stop()

    def report(self, progress: dict[str, Any], result: dict[str, Any] | None = None) -> bool:
        """Rank 0 of a data-parallel job reports here; returns whether to stop."""
        return self.worker.report(progress, result)

    def pid(self) -> int:
        import os

        return os.getpid()


def _freeze_imports() -> None:
    """The objects the imports made (torch's, MLflow's, the family's modules: about 370,000)
    leave the collector's view before the first job, once a family's worker is imported: a
    collection, automatic or `_release_memory`'s, then walks only what jobs made. Measured at
    the end of a sampling actor's first job, before its next job can start: 0.17 to 0.18 s
    of CPU (0.36 to 0.5 s of wall time on a busy machine) with them, 0.02 s without. Before
    a later job it has next to nothing to move: `_release_memory` froze what was left."""
    import gc

    gc.freeze()


def _release_memory() -> None:
    """What a finished job held goes back before the next job of this actor (but the
    checkpoint it sampled from: see `load_checkpoint(reuse=True)`). What survives the
    collection (caches) is frozen out of later ones, like the imports (`_freeze_imports`), so
    each walks only what the last job left: 0.1 ms after a sampling job."""
    import gc
    import sys

    gc.collect()
    gc.freeze()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
