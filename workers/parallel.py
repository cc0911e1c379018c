"""Data-parallel training of one job on `resources.workers` Ray Train workers.

The job's actor (see orchestrator/actor.py) becomes a coordinator that holds no resources: it
runs a Ray Train `TorchTrainer`, which reserves the workers as one placement group (a job whose
workers do not fit waits, queued, for all of them), sets up the process group (gloo on CPU,
nccl on GPU) and runs `_train_rank` on every worker.

Each rank runs the family's ordinary `Worker` with a `Collective`: every rank draws the same
global batch of the step and trains on its own slice of it, gradients are averaged before each
optimizer step (the all-reduce DistributedDataParallel does, written out so that a family may
call its modules any number of times per step, as GANs do), and logged losses are averaged
over the ranks. Floating buffers are not kept in step, with one exception: a vector
quantiser's EMA codebook (workers/nn/bottleneck.py) is updated from the global batch's code
statistics, summed over the ranks, so that every rank quantises with the same codebook. Rank 0
alone writes checkpoints, grids, metrics and the result, in the same layout as a single-worker
job; every rank resumes from the same checkpoint.

Rank 0 reports its progress to the coordinator about twice a second and learns from the
answer whether the job was asked to stop; the ranks then agree (one all-reduce per step) to
stop at the same step.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.task import Task, WorkersLost

REPORT_S = 0.5


class Collective:
    """The process group of one data-parallel job, as the training loop uses it."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # nccl reduces only CUDA tensors: the small ones below live where the backend wants them
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend() == "nccl" else torch.device("cpu"))

    def average_gradients(self, module: nn.Module) -> None:
        """All-reduce `module`'s gradients, as one flat buffer, to their mean over the ranks."""
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` on every rank."""
        for t in tensors:
            dist.broadcast(t.data, src=0)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(buf)
        return {k: float(v) / self.world for k, v in zip(keys, buf)}

    def any(self, flag: bool) -> bool:
        buf = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return bool(buf.item())

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def module_state(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Parameters and floating buffers (e.g. BatchNorm statistics) of `modules`."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]


def _train_rank(config: dict[str, Any]) -> None:
    """One Ray Train worker: the family's worker on its rank."""
    import ray

    from workers.registry import worker_class

    task, coordinator = config["task"], config["coordinator"]
    collective = Collective()
    worker = worker_class(task.family).for_task(task)(task, collective=collective)
    nodes = collective.gather(ray.get_runtime_context().get_node_id())
    if collective.rank != 0:
        worker.run()
        return
    worker.log.set_tags({"genforge.workers": str(collective.world),
                         f"genforge.worker_nodes.{task.attempt}": ",".join(nodes)})
    done = threading.Event()

    def report() -> None:
        while not done.wait(REPORT_S):
            try:
                if ray.get(coordinator.report.remote(worker.progress())):
                    worker.request_stop()
            except Exception:  # the coordinator is gone: the job is being torn down
                return

    reporter = threading.Thread(target=report, name="progress-report", daemon=True)
    reporter.start()
    try:
        result = worker.run()
    finally:
        done.set()
        reporter.join()
    ray.get(coordinator.report.remote(worker.progress(), result))


class DataParallelJob:
    """What the job's actor runs for a data-parallel job; the same interface as `Worker`."""

    def __init__(self, task: Task):
        from orchestrator.tracking import RunLogger

        self.task = task
        self.log = RunLogger(task.tracking_uri, task.run_id, artifact_uri=task.artifact_uri)
        self._progress: dict[str, Any] = {"phase": "queued", "step": 0, "total": 0}
        self._result: dict[str, Any] | None = None
        self._stop = False

    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def request_stop(self) -> None:
        self._stop = True

    def report(self, progress: dict[str, Any], result: dict[str, Any] | None = None) -> bool:
        """From rank 0: its progress (and at the end its result); returns whether to stop."""
        self._progress = progress
        if result is not None:
            self._result = result
        return self._stop

    def run(self) -> dict[str, Any]:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from workers.base import JobError

        r, task = self.task.job["resources"], self.task
        gpus = r.get("gpus_per_worker") or 0
        trainer = TorchTrainer(
            _train_rank,
            train_loop_config={"task": task, "coordinator": ray.get_runtime_context().current_actor},
            scaling_config=ScalingConfig(num_workers=r["workers"], use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": r["cpus"],
                                                               **({"GPU": gpus} if gpus else {})}),
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            # Ray Train's own storage holds only its run records: checkpoints are the job's
            run_config=RunConfig(name=f"{task.experiment}-{task.name}-{task.run_id[:8]}-{task.attempt}",
                                 storage_path=os.path.join(tempfile.gettempdir(), "genforge-train"),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            trainer.fit()
        except Exception as exc:
            raise _failure(exc, JobError) from None
        finally:
            self.log.close()
        if self._result is None:
            raise WorkersLost("the data-parallel workers ended without a result")
        return self._result


# What a rank says when another rank's process went away mid-collective.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted",
             "Socket Timeout", "Broken pipe")


def _failure(exc: Exception, job_error: type[Exception]) -> Exception:
    """The job's error from Ray Train's: a rank that died (or whose peer died mid-collective)
    as `WorkersLost`, an error of a rank's own as a job error (its last line)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckTimeoutError

    failures = getattr(exc, "worker_failures", None) or {}
    for rank, cause in sorted(failures.items()):
        # a dead rank reaches here as its actor's error or, when the controller's health check
        # saw it first, wrapped in a failed health check; a hung one as a timed-out check
        seen = getattr(cause, "health_check_failure", None) or cause
        died = isinstance(seen, RayActorError) and not isinstance(seen, RayTaskError)
        hung = isinstance(cause, WorkerHealthCheckTimeoutError)
        if died or hung or any(sign in str(cause) for sign in PEER_LOST):
            return WorkersLost(f"data-parallel worker {rank} lost ({type(cause).__name__})")
    for rank, cause in sorted(failures.items()):
        inner = getattr(cause, "cause", None) or cause
        text = str(inner).strip().splitlines()
        return job_error(f"rank {rank}: {text[-1] if text else type(inner).__name__}"[:500])
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return WorkersLost(f"data-parallel training failed: {first}"[:500])
