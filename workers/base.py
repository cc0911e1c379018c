"""The harness every family shares: the training loop, checkpoints, resume, sampling jobs,
progress and logging. A family subclasses `Worker` and fills in four hooks:

    build(model_cfg, image_shape)       create self.modules (and self.emas for sampling)
    configure_optimizers(train_cfg)     create self.optimizers
    train_step(batch, labels, gen)      one update (use self.optimize); returns loss tensors
    generate(n, sample_cfg, gen, ...)   images in [-1, 1] from the (EMA) modules

and may override `prepare_data` (what the training batches are drawn from: e.g. token
sequences instead of images). Modules another job trained and this one only uses (a tokenizer,
a first-stage autoencoder) go in `self.frozen`: they are saved with every checkpoint, so a
checkpoint is all a sampling job needs, and never trained.

A family that can distil (`kind: distill`) also fills in

    distill_step(batch, labels, gen)    one update of the student against `self.teacher`
    teacher_generate(n, gen)            images from the teacher, for the side-by-side timing

and may override `begin_distillation` (by default the student is the family's model with the
`distill.student` changes, built fresh). Distillation runs the same loop, checkpoints and resume
as training.

A job asked to stop (`request_stop`) stops at the next step boundary of the training loop, with
a checkpoint; outside the loop (data loading, final metrics, sampling and evaluation jobs) at the
next `check_stop()`, with nothing saved: a long phase calls it at its natural boundaries.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from orchestrator.checkpoints import (
    Checkpoint,
    EncodedCheckpoint,
    NotFound,
    encode_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint_uri,
    write_checkpoint,
)
from orchestrator.spec import EVAL_METRICS, SampleSpec
from orchestrator.storage import open_storage
from orchestrator.task import Task
from workers import images as imageio
from workers.compile import Compilation, compile_failed
from workers.data import as_float, augment
from workers.nn.ema import EMA
from workers.parallel import Collective, module_state
from workers.precision import Precision
from workers.registry import family
from workers.stream import InMemory, ShardStream, staged_images

RESULT = "result.json"  # written last: the job's output is complete
DELIVER_S = 60.0  # how long a finished job waits for the tracking server to take its metrics
log = logging.getLogger(__name__)


class JobError(Exception):
    """An error in the job itself (bad data, NaN loss): not retried as an infrastructure fault."""


class Stopped(Exception):
    """Raised by `Worker.check_stop` when the job was asked to stop outside the training loop;
    `Worker.run` turns it into the job's result. It never leaves the worker."""


class CheckpointWriter:
    """Checkpoints in two halves: `submit` serialises on the calling (training) thread, between
    two steps, so the weights are free to change right after; the upload runs on a background
    thread, at most one in flight, so the loop waits only if checkpoints are asked for faster
    than they upload."""

    def __init__(self, encode: Callable[[int], EncodedCheckpoint],
                 upload: Callable[[EncodedCheckpoint], str]):
        self._encode, self._upload = encode, upload
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def submit(self, step: int) -> None:
        self.wait()
        self._pending = self._pool.submit(self._upload, self._encode(step))

    def wait(self) -> str | None:
        if self._pending is None:
            return None
        uri, self._pending = self._pending.result(), None
        return uri

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class NullLogger:
    """A `RunLogger` (orchestrator/tracking.py) that logs nothing: the ranks of a data-parallel
    job other than rank 0, and a task without a run (a benchmark's), which so needs no MLflow."""

    dropped: list[str] = []

    def last_logged_step(self, key: str) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image, key: str, step: int) -> None:
        pass

    def log_file(self, data: bytes, path: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def flush_metrics(self) -> bool:
        return True

    def deliver(self, timeout: float) -> bool:
        return True

    def log_points(self, points: list[list]) -> None:
        pass

    def unsent(self) -> list:
        return []

    def lost(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class Worker:
    family: ClassVar[str]
    # whether training streams the data set's pixels (else `prepare_data` gets it whole, to
    # turn into what the family trains on: codes, latents)
    streams: ClassVar[bool] = True

    def __init__(self, task: Task, collective: Collective | None = None):
        self.task = task
        # data-parallel training: this worker is one rank of the job; rank 0 writes everything
        self.collective = collective
        self.rank0 = collective is None or collective.rank == 0
        self.job = task.job
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":  # TF32 matrix products: float32's range, 10-bit mantissa
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_num_threads(max(1, int(self.job["resources"]["cpus"])))
        self.memory_share = self._cap_device_memory()
        self.root = open_storage(task.storage_root, task.s3)
        self.storage = self.root.child(task.prefix)
        # a task without a run (a benchmark's plain Ray task) and ranks but 0 log nothing
        self.log = self._logger(task)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.precision = Precision("fp32", self.device)  # a training job's: see `_fit`
        self.emas: dict[str, EMA] = {}
        self.frozen: dict[str, nn.Module] = {}
        self.frozen_meta: dict[str, dict[str, Any]] = {}  # name -> the checkpoint meta it came from
        self.loading: Checkpoint | None = None  # the checkpoint being restored for sampling
        self.model_cfg: dict[str, Any] = self.job.get("model", {})  # what the checkpoints hold
        self.teacher: dict[str, nn.Module] = {}  # distillation: the teacher's sampling modules
        self.teacher_meta: dict[str, Any] = {}  # ...and where it came from
        self.total_steps = 0  # training (or distillation) steps of the whole job
        self.image_shape: tuple[int, int, int] = (1, 16, 16)
        self.step = 0  # the training step being run
        self.tokens_per_item = 0  # set by token models: training then logs tokens/s
        self._progress: dict[str, Any] = {"phase": "starting", "step": 0, "total": 0}
        self._stop = threading.Event()

    def _logger(self, task: Task) -> Any:
        if not (self.rank0 and task.run_id):
            return NullLogger()
        from orchestrator.tracking import RunLogger  # MLflow's client: only a run's job needs it

        return RunLogger(task.tracking_uri, task.run_id, artifact_uri=task.artifact_uri)

    def _cap_device_memory(self) -> float:
        """A job given a fraction of a GPU (`resources.gpus: 0.25`: Ray packs four such jobs on
        one device) may allocate that fraction of the device's memory and no more, so that one
        job's growth cannot starve the others: past it, this job fails (`JobError`, with the
        numbers), not its neighbours. A whole GPU or more: the whole device."""
        if self.device.type != "cuda":
            return 1.0
        r = self.job["resources"]
        asked = (r.get("gpus_per_worker") if r.get("workers", 1) > 1 else None) or r.get("gpus") or 1
        share = min(1.0, float(asked))
        torch.cuda.set_per_process_memory_fraction(share, torch.cuda.current_device())
        return share

    def _run_kind(self) -> dict[str, Any]:
        try:
            return getattr(self, self.task.kind)()
        except torch.cuda.OutOfMemoryError:
            pass  # leaving the handler frees the failed call's frames, and with them its tensors
        torch.cuda.empty_cache()  # a reused actor starts its next job with the memory free
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        share = (f"its share, resources.gpus {self.memory_share:g} of the {total:.1f} GiB GPU "
                 f"({self.memory_share * total:.1f} GiB)" if self.memory_share < 1 else
                 f"the {total:.1f} GiB GPU")
        raise JobError(f"ran out of GPU memory: it may use {share}; lower train.batch_size or "
                       "sample.batch_size, or ask for more of the GPU")

    def synchronize(self) -> None:
        """Wait for the work queued on the job's device: CUDA runs kernels asynchronously, so
        a timing without this measures their launch, not the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- the family's hooks -------------------------------------------------------------
    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        raise NotImplementedError

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> None:
        raise NotImplementedError

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def generate(self, n: int, sample_cfg: dict[str, Any] | None, gen: torch.Generator,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def distill_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"family '{self.family}' cannot distil")

    def teacher_generate(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def begin_distillation(self, teacher: Checkpoint) -> None:
        """Called with the teacher restored as this worker's own model (`load_for_sampling`):
        keep its sampling modules as `self.teacher` and build the student in their place."""
        self.teacher = {name: self.sampling_module(name) for name in self.modules}
        self.model_cfg = family(self.family).distill_section().student_model(
            teacher.meta["model"], self.job["distill"])
        self.build(self.model_cfg, self.image_shape)

    def distill_metrics(self) -> dict[str, float]:
        """Metrics of a finished distillation beyond the side-by-side comparison."""
        return {}

    def on_resume(self, ckpt: Checkpoint) -> None:
        """Called when a training or distill job resumes from `ckpt`, after its weights are
        restored and `self.model_cfg` is the model section it was written with: restore what
        the family derives from that section (e.g. how a distilled model samples)."""

    def learning_rate(self, step: int, cfg: dict[str, Any]) -> float:
        """The learning rate of `step`: linear warm-up, then constant."""
        return cfg["lr"] * min(1.0, step / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]

    def end_step(self, step: int) -> None:
        """Called after each step's EMA update, before the step's checkpoint and grid."""

    def checkpoint_due(self, step: int, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("checkpoint_every")) and step % cfg["checkpoint_every"] == 0

    def prepare_data(self, x: Any, labels: torch.Tensor | None) -> tuple[Any, torch.Tensor | None]:
        """What training batches are drawn from; called once after `build`, with the stream
        of the images (a `ShardStream`) or, for a family that does not stream (`streams`),
        the staged images to read shard by shard (`workers.data.StagedImages`)."""
        return x, labels

    def final_metrics(self) -> dict[str, float]:
        """Metrics measured once when training ends (e.g. on held-out data)."""
        return {}

    def sample_stats(self) -> dict[str, float]:
        """Metrics of a sampling job beyond its time per image (e.g. tokens/s)."""
        return {}

    def sampler_settings(self, sample_cfg: dict[str, Any]) -> dict[str, Any]:
        """The sampler settings that matter for this family, as `generate` applies them."""
        return {k: sample_cfg[k] for k in ("sampler", "steps", "eta", "temperature", "top_k",
                                           "top_p", "use_ema") if k in sample_cfg}

    @classmethod
    def for_task(cls, task: Task) -> type[Worker]:
        """The class that runs `task` (a family with stages picks one here)."""
        return cls

    # ---- what the actor calls -------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def request_stop(self) -> None:
        self._stop.set()

    def check_stop(self) -> None:
        """Raise `Stopped` if the job was asked to stop: called at the natural boundaries of
        every phase outside the training loop (which checks at each step boundary)."""
        if self._stop.is_set():
            raise Stopped

    def _check_stop_agreed(self) -> None:
        """`check_stop` where every rank of a data-parallel job runs the same code (before
        the training loop): the ranks agree, so that none is left waiting in a collective."""
        if self.collective is None:
            self.check_stop()
        elif self.collective.any(self._stop.is_set()):
            raise Stopped

    def run(self) -> dict[str, Any]:
        """The job, its run given MLflow's sampling of the machine (CPU, memory, GPUs) while
        it runs: see `orchestrator.tracking.system_metrics` (GENFORGE_SYSTEM_METRICS_INTERVAL).
        Rank 0 of a data-parallel job samples its own node."""
        monitor = None
        if self.rank0 and self.task.run_id and self.task.system_metrics_s:
            from orchestrator.tracking import system_metrics

            monitor = system_metrics(self.task.tracking_uri, self.task.run_id,
                                     self.task.system_metrics_s, resume=self.task.attempt > 1)
        try:
            return self._run_and_close_log()
        finally:
            if monitor is not None:
                monitor.finish()

    def _run_and_close_log(self) -> dict[str, Any]:
        try:
            result = self._run_kind()
        except Stopped:  # stopped outside training: nothing saved, no result.json
            result = {"status": "stopped", "step": self._progress.get("step", 0),
                      "phase": self._progress.get("phase")}
        except BaseException as exc:
            # The job's own error is what the job failed of; a logger that cannot deliver
            # its last metrics is only context to it.
            try:
                self.log.close()
            except Exception as problem:  # noqa: BLE001
                note = f"and the run's logger could not close: {type(problem).__name__}: {problem}"
                if hasattr(exc, "add_note"):
                    exc.add_note(note[:500])
            raise
        try:
            self.log.close()
        except Exception:  # noqa: BLE001 - what it could not send is in lost()
            pass
        lost = self.log.lost()
        if lost:  # the result stands (result.json is written); the driver reports the loss
            result = {**result, "tracking_lost": lost}
        return result

    # ---- shared pieces --------------------------------------------------------------------
    def optimize(self, loss: torch.Tensor, name: str, grad_clip: float | None = None) -> None:
        """Zero, backward, clip and step the optimizer of module `name`."""
        opt, scaler = self.optimizers[name], self.precision.scaler(name)
        opt.zero_grad(set_to_none=True)
        with self.precision.outside_autocast():
            (scaler.scale(loss) if scaler else loss).backward()
            if self.collective is not None:
                self.collective.average_gradients(self.modules[name])
            if scaler:
                scaler.unscale_(opt)  # clip the true gradients
            clip = grad_clip if grad_clip is not None else self.job.get("train", {}).get("grad_clip")
            if clip:
                nn.utils.clip_grad_norm_(self.modules[name].parameters(), clip)
            if scaler:
                scaler.step(opt)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
                opt.step()

    def averaged(self, **modules: nn.Module) -> dict[str, EMA]:
        """EMAs of `modules` at `train.ema_decay`, or none at 0 (sampling then uses the weights
        as trained). A job with no train section (sampling) builds them all: its checkpoint
        says which it holds (`_restore`)."""
        decay = self.job.get("train", {}).get("ema_decay")
        if decay == 0:
            return {}
        return {name: EMA(m, decay=0.999 if decay is None else decay) for name, m in modules.items()}

    def sampling_module(self, name: str) -> nn.Module:
        """The EMA weights of `name` when it has them, else the raw module."""
        return self.emas[name].module if name in self.emas else self.modules[name]

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "family": self.family, "kind": self.task.kind, "job": self.task.name,
            "hash": self.task.job_hash, "code_version": self.task.code_version, "step": step,
            "model": self.model_cfg, "image_shape": list(self.image_shape),
            "data": self.job.get("data"), "data_key": self.task.data_key,
            "frozen": self.frozen_meta, **({"teacher": self.teacher_meta} if self.teacher_meta else {}),
        }

    def _encode_checkpoint(self, step: int) -> EncodedCheckpoint:
        tensors = {f"{name}/{k}": v for name, m in self.modules.items()
                   for k, v in m.state_dict().items()}
        tensors.update({f"ema.{name}/{k}": v for name, e in self.emas.items()
                        for k, v in e.module.state_dict().items()})
        tensors.update({f"frozen.{name}/{k}": v for name, m in self.frozen.items()
                        for k, v in m.state_dict().items()})
        state = {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "ema_updates": {name: e.num_updates for name, e in self.emas.items()},
            "grad_scalers": self.precision.state_dict(),  # fp16 only
            # Metric points the tracking server has not acknowledged yet (buffered or in a
            # request): should the upload's flush fail and the worker die, the attempt that
            # resumes from this checkpoint logs them (see `_fit`), so the history has no gap.
            "unsent_metrics": [[m.key, float(m.value), int(m.timestamp), int(m.step)]
                               for m in self.log.unsent()],
        }
        if self._progress.get("evals"):  # `train.eval`'s so far: a resumed job's result has all
            state["evals"] = self._progress["evals"]
        return encode_checkpoint(step, tensors=tensors, state=state, meta=self._meta(step))

    def _restore(self, ckpt: Checkpoint, *, weights_only: bool = False) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}

        def load(module: nn.Module, prefix: str) -> None:
            try:
                module.load_state_dict(part(prefix))
            except RuntimeError as exc:  # torch lists every mismatch over many lines
                lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
                raise JobError(f"{ckpt.uri}: its weights do not fit the model its manifest "
                               f"describes ({lines[0] if lines else exc})"[:500]) from None

        for name, module in self.modules.items():
            load(module, f"{name}/")
        for name, module in self.frozen.items():
            load(module, f"frozen.{name}/")
        if weights_only:  # a model trained without an average samples with its own weights
            self.emas = {name: ema for name, ema in self.emas.items()
                         if any(k.startswith(f"ema.{name}/") for k in ckpt.tensors)}
        for name, ema in self.emas.items():
            load(ema.module, f"ema.{name}/")
            ema.num_updates = int(ckpt.state.get("ema_updates", {}).get(name, 0))
        if not weights_only:
            for name, opt in self.optimizers.items():
                opt.load_state_dict(ckpt.state["optimizers"][name])
            self.precision.load_state_dict(ckpt.state.get("grad_scalers", {}))

    def _upload_checkpoint(self, encoded: EncodedCheckpoint) -> str:
        # Metrics up to this step reach MLflow before the checkpoint exists, so an attempt that
        # resumes from it finds no gap in the run's history.
        self.log.flush_metrics()
        uri = write_checkpoint(self.storage, encoded)
        self.log.set_tags({"genforge.checkpoint": uri})
        keep = self.job["train"].get("keep_checkpoints")
        if keep:  # retention, here on the upload thread; a failed prune is retried next time
            try:
                prune_checkpoints(self.storage, keep)
            except Exception as exc:  # noqa: BLE001 - old checkpoints left over fail nothing
                log.warning(
                    "could not prune the checkpoints of %s to %d: %s", self.storage.uri(), keep, exc)
        return uri

    def _log_grid(self, step: int, n: int) -> None:
        steps = self.job["train"].get("sample_steps")
        settings = None if steps is None else {**SampleSpec().model_dump(mode="json"),
                                               "steps": steps}
        with torch.no_grad():
            samples = self.generate(n, settings, self._generator(self.job["train"]["seed"]))
        picture = imageio.grid(imageio.to_uint8(samples), scale=imageio.display_scale(samples.shape[-1]))
        png = imageio.png_bytes(picture)
        self.storage.put_bytes(f"samples/step-{step:06d}.png", png)
        self.log.log_image(picture, key="samples", step=step)

    def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
        # The job's metrics reach its run before the job is complete: once result.json exists
        # the job is a cache hit and never runs again, so points still buffered here would be
        # lost with this process (its driver killed, say). A tracking server that stays away
        # longer does not hold the result back; what it missed is reported (`tracking_lost`).
        self.log.deliver(DELIVER_S)
        result = {**result, "job": self.task.name, "hash": self.task.job_hash,
                  "finished": datetime.now(timezone.utc).isoformat()}
        self.storage.put_bytes(RESULT, json.dumps(result, indent=2).encode())
        return result

    # ---- training and distillation --------------------------------------------------------
    def train(self) -> dict[str, Any]:
        return self._fit(self._build_seeded, self.train_step, self.final_metrics)

    def _build_seeded(self) -> None:
        """The model, its initial weights drawn from `train.seed`: the same in every process
        that builds it (a sweep's trials start alike), whatever the process drew before."""
        from workers.evaluation.features import rng_devices

        with torch.random.fork_rng(devices=rng_devices(self.device)):
            torch.manual_seed(self.job["train"]["seed"])
            self.build(self.model_cfg, self.image_shape)

    def distill(self) -> dict[str, Any]:
        return self._fit(self._load_teacher, self.distill_step, self._compare_with_teacher)

    def _load_teacher(self) -> None:
        shape = self.image_shape
        ckpt = self.load_for_sampling(self.task.refs["teacher"])
        if tuple(ckpt.meta["image_shape"]) != shape:
            raise JobError(f"teacher: {ckpt.uri} works on {ckpt.meta['image_shape']} images, the "
                           f"data is {list(shape)}")
        self.teacher_meta = {"uri": ckpt.uri, "job": ckpt.meta.get("job"),
                             "hash": ckpt.meta.get("hash"), "step": ckpt.step}
        self.begin_distillation(ckpt)
        self.loading = None
        for module in self.teacher.values():
            module.eval().requires_grad_(False)
        self.log.set_tags({"genforge.teacher": ckpt.uri})

    def _compare_with_teacher(self) -> dict[str, float]:
        """Parameters and sampling time per image of teacher and student, side by side on the
        same device, batch and seed."""
        n = self.job["train"]["sample_images"]

        def seconds_per_image(generate: Callable[[int, torch.Generator], torch.Tensor]) -> float:
            with torch.no_grad():
                self.check_stop()
                generate(n, self._generator(0))  # warm-up: one-time allocations
                self.check_stop()
                self.synchronize()
                t0 = time.perf_counter()
                generate(n, self._generator(0))
                self.synchronize()
            return (time.perf_counter() - t0) / n

        student_s = seconds_per_image(lambda k, g: self.generate(k, None, g))
        teacher_s = seconds_per_image(self.teacher_generate)
        count = lambda modules: sum(p.numel() for m in modules.values() for p in m.parameters())  # noqa: E731
        return {"teacher_params": count(self.teacher), "student_params": count(self.modules),
                "teacher_s_per_image": teacher_s, "student_s_per_image": student_s,
                "speedup": teacher_s / student_s, **self.distill_metrics()}

    def _fit(self, build: Callable[[], None], step_fn: Callable[..., dict[str, torch.Tensor]],
             final_metrics: Callable[[], dict[str, float]]) -> dict[str, Any]:
        cfg = self.job["train"]
        self.total_steps = cfg["steps"]
        self._progress.update(phase="loading data", total=cfg["steps"])
        rank, world = (self.collective.rank, self.collective.world) if self.collective else (0, 1)
        images = staged_images(self.root, self.task.data_key, self.job)
        self.image_shape = images.shape
        labels = images.labels()
        self._evaluation = None  # `train.eval`: rank 0's, its classifier and real features ready
        if cfg.get("eval") and self.rank0 and cfg["eval"]["metric"] not in EVAL_METRICS:
            from workers.evaluation.training import LoggedMean

            self._evaluation = LoggedMean(self, cfg["eval"])
        elif cfg.get("eval") and self.rank0:
            from workers.evaluation.training import TrainingEval  # torchmetrics: a second to import

            try:
                self._evaluation = TrainingEval.prepare(self, images)
                self._progress.update(phase="loading data", step=0, total=cfg["steps"])
            except Stopped:  # while training its classifier
                if self.collective is None:
                    raise
                # the other ranks wait in `_fit_on`'s first check: they stop there with it
        x: Any = images  # shard by shard, for prepare_data to turn into codes or latents
        if self.streams:  # pixels: streamed from the shards, a few in memory at a time
            x = ShardStream(images, batch_size=cfg["batch_size"], seed=cfg["seed"],
                            device=self.device, rank=rank, world=world)
        elif labels is not None:
            labels = labels.to(self.device)
        try:
            return self._fit_on(x, labels, build, step_fn, final_metrics)
        finally:
            if isinstance(x, ShardStream):
                x.close()

    def _fit_on(self, x: Any, labels: torch.Tensor | None, build: Callable[[], None],
                step_fn: Callable[..., dict[str, torch.Tensor]],
                final_metrics: Callable[[], dict[str, float]]) -> dict[str, Any]:
        cfg, data = self.job["train"], self.job["data"]
        self._check_stop_agreed()
        build()
        for module in self.frozen.values():
            module.eval().requires_grad_(False)
        x, labels = self.prepare_data(x, labels)
        if any(data.get("augment", {}).values()) and getattr(x, "dtype", torch.uint8) != torch.uint8:
            raise JobError(f"data.augment: this {self.task.kind} job trains on {x.dtype} "
                           "tensors (codes or latents), not on images")
        batches = (x if isinstance(x, ShardStream) else
                   InMemory(x, labels, cfg["batch_size"], *((self.collective.rank,
                            self.collective.world) if self.collective else (0, 1))))
        use_labels = labels is not None
        self.configure_optimizers(cfg)
        self.precision = Precision(cfg.get("precision", "fp32"), self.device)
        compilation = Compilation(cfg.get("compile", False), self.device)
        compilation.apply(self.modules.values())
        self.log.set_tags({**self.precision.tags(), **compilation.tags()})
        self._check_stop_agreed()

        start, resumed = 0, None
        try:
            resumed = load_checkpoint(self.storage)
            self._restore(resumed)
            start = resumed.step
            # The model section the checkpoint was written with (a distillation's student
            # changes it as it trains), and what the family derives from it.
            self.model_cfg = resumed.meta.get("model", self.model_cfg)
            self.on_resume(resumed)
            if resumed.state.get("evals"):  # `train.eval`'s up to the checkpoint
                self._progress["evals"] = [e for e in resumed.state["evals"] if e[0] <= start]
            self.log.set_tags({"genforge.resumed_from": resumed.uri,
                               "genforge.resumed_at_step": str(start + 1)})
        except NotFound:
            pass
        if self.collective is not None:  # fresh weights are random: every rank starts from rank 0's
            self.collective.broadcast(module_state([*self.modules.values(),
                                                    *(e.module for e in self.emas.values())]))
        # Steps between the checkpoint and the death of an earlier attempt were logged then;
        # they are trained again (same per-step seeds) but not logged twice.
        self._logged_until = self.log.last_logged_step("steps_per_s") if self.task.attempt > 1 else 0
        if resumed is not None:  # what had not reached the tracking server when it was saved
            self.log.log_points([p for p in resumed.state.get("unsent_metrics", [])
                                 if p[3] > self._logged_until])

        writer = CheckpointWriter(self._encode_checkpoint, self._upload_checkpoint)
        if self.device.type == "cuda":  # the peak of this job, not of the actor's earlier ones
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.time()
        try:
            step = self._train_loop(batches, use_labels, start, cfg, writer, step_fn)
            loop_s = time.time() - started
            if self.rank0 and (resumed is None or step > start):
                writer.submit(step)
            # a resume that trained no step: its checkpoint is the job's, as it was written
            uri = writer.wait() or (resumed.uri if resumed is not None else None)
        finally:
            writer.close()
        timing = {"started_unix": started, "loop_s": loop_s, "steps_run": step - start}
        if self._evaluation is not None:  # `train.eval`'s share of loop_s
            timing["eval_s"] = self._evaluation.seconds
        if not self.rank0:
            return {"status": "finished" if step == self.total_steps else "stopped", "step": step}
        # `train.eval`'s [step, {"fd": ..., "kid": ...}], for whoever reads the result
        evals = {"evals": self._progress["evals"]} if "evals" in self._progress else {}
        if step < self.total_steps:  # asked to stop: the checkpoint is saved, the job is not done
            return {"status": "stopped", "step": step, "checkpoint": uri, **evals}
        if resumed is not None and step == start:
            self.log.set_tags({"genforge.checkpoint": uri})
        self._progress.update(phase="sampling")
        self.check_stop()
        final = final_metrics()
        if self.device.type == "cuda":
            final["peak_device_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.check_stop()  # before they are logged: the job that resumes logs them
        if final:
            self.log.log_metrics(final, step)
        self._log_grid(step, cfg["sample_images"])
        return self._finish({"status": "finished", "kind": self.task.kind, "step": step,
                             "checkpoint": uri, "timing": timing, "metrics": final, **evals})

    def _train_loop(self, batches: ShardStream | InMemory, use_labels: bool, start: int,
                    cfg: dict[str, Any], writer: CheckpointWriter,
                    step_fn: Callable[..., dict[str, torch.Tensor]]) -> int:
        steps = self.total_steps
        augmentation = self.job["data"].get("augment", {})
        rank, world = (self.collective.rank, self.collective.world) if self.collective else (0, 1)
        self._progress["total"] = steps
        gen = torch.Generator(device=self.device)
        for module in self.modules.values():
            module.train()
        self._progress.update(phase="train", step=start)
        evaluation = getattr(self, "_evaluation", None)  # `train.eval` (see `_fit`)
        window_start, window_steps = time.perf_counter(), 0
        step = start
        for step in range(start + 1, steps + 1):
            # Seeded per step: a resumed job draws exactly the batches it would have drawn.
            gen.manual_seed(cfg["seed"] * 1_000_003 + step)
            batch, labels = batches.batch(step, gen)  # this rank's slice of the global batch
            if world > 1:  # ...and its own noise
                gen.manual_seed((cfg["seed"] * 1_000_003 + step) * 1024 + rank)
            lr = self.learning_rate(step, cfg)
            for opt in self.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr
            self.step = step
            # Floating buffers (BatchNorm's running statistics) are not kept in step across the
            # ranks of a data-parallel job: training uses batch statistics, and only rank 0's
            # buffers are ever read (its grids, metrics and checkpoints; every rank resumes
            # from those), so a broadcast per buffer per step would buy nothing.
            try:
                with self.precision.autocast():
                    losses = step_fn(augment(as_float(batch), augmentation, gen),
                                     labels if use_labels else None, gen)
            except torch._dynamo.exc.TorchDynamoException as exc:
                raise JobError(compile_failed("train", exc)) from None
            for name, ema in self.emas.items():
                ema.update(self.modules[name])
            self.end_step(step)
            window_steps += 1
            self._progress["step"] = step

            if step % cfg["log_every"] == 0 or step == steps:
                values = {k: float(v) for k, v in losses.items()}
                if self.collective is not None:  # the loss of the global batch
                    values = self.collective.mean(values)
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise JobError(f"{', '.join(bad)} is not finite ({values[bad[0]]}) at step {step}")
                elapsed = time.perf_counter() - window_start
                values.update(lr=lr, steps_per_s=window_steps / elapsed,
                              images_per_s=window_steps * len(batch) * world / elapsed)
                if self.tokens_per_item:
                    values["tokens_per_s"] = values["images_per_s"] * self.tokens_per_item
                if step > self._logged_until:
                    self.log.log_metrics(values, step)
                if evaluation is not None:
                    evaluation.observe(values)
                self._progress["loss"] = values.get("loss", next(iter(values.values())))
                window_start, window_steps = time.perf_counter(), 0
            # before the stop and the step's checkpoint: its metrics, still unsent, go in it
            if evaluation is not None and evaluation.due(step, steps):
                window_start += evaluation(step)  # not the training's throughput
            if self._stop_agreed(step, cfg):
                return step
            if not self.rank0:
                continue
            if step < steps and self.checkpoint_due(step, cfg):
                writer.submit(step)
            if cfg.get("sample_every") and step % cfg["sample_every"] == 0 and step < steps:
                self._log_grid(step, cfg["sample_images"])
                for module in self.modules.values():
                    module.train()
        return step

    def _stop_agreed(self, step: int, cfg: dict[str, Any]) -> bool:
        """Whether to stop after this step. The ranks of a data-parallel job agree at log steps
        only: agreeing is an all-reduce and a device sync, not for every step."""
        stop = self._stop.is_set()
        if self.collective is None:
            return stop
        return step % cfg["log_every"] == 0 and self.collective.any(stop)

    # ---- sampling jobs --------------------------------------------------------------------
    def load_for_sampling(self, uri: str) -> Checkpoint:
        storage, name = resolve_checkpoint_uri(uri, self.task.s3)
        # weights are only copied into the modules: a reused actor keeps the last checkpoint
        ckpt = load_checkpoint(storage, name, reuse=True)
        family = ckpt.meta.get("family")
        if family != self.family:
            raise JobError(f"{ckpt.uri} holds a '{family}' model, not '{self.family}'")
        self.image_shape = tuple(ckpt.meta["image_shape"])
        self.loading = ckpt
        self.model_cfg = ckpt.meta["model"]
        self.build(self.model_cfg, self.image_shape)
        self._restore(ckpt, weights_only=True)
        for module in [*self.modules.values(), *(e.module for e in self.emas.values()),
                       *self.frozen.values()]:
            module.eval()
        return ckpt

    def sample(self) -> dict[str, Any]:
        cfg = self.job["sample"]
        self._progress.update(phase="loading checkpoint")
        ckpt = self.load_for_sampling(self.task.refs["from"])
        if not cfg["use_ema"]:
            self.emas = {}
        compilation = Compilation(cfg.get("compile", False), self.device)
        compilation.apply(self.sampling_module(name) for name in self.modules)
        self.log.set_tags({"genforge.source_checkpoint": ckpt.uri, **compilation.tags()})

        n, bs = cfg["num_images"], cfg["batch_size"]
        self._progress.update(phase="sample", step=0, total=n)
        gen = self._generator(cfg["seed"])
        batches: list[np.ndarray] = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, n, bs):
                self.check_stop()
                count = min(bs, n - start)
                try:
                    batches.append(imageio.to_uint8(self.generate(count, cfg, gen)))
                except torch._dynamo.exc.TorchDynamoException as exc:
                    raise JobError(compile_failed("sample", exc)) from None
                self._progress["step"] = start + count
        seconds = time.perf_counter() - t0
        images = np.concatenate(batches)

        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, images=images)
        self.storage.put_bytes("outputs/images.npz", buf.getvalue())
        picture = imageio.grid(images[:64], scale=imageio.display_scale(images.shape[1]))
        png = imageio.png_bytes(picture)
        self.storage.put_bytes("outputs/grid.png", png)
        # The job's grid is one picture, not a series over steps: logged as the file it is, it
        # costs the tracking server 6 ms of CPU where `log_image` (a second, compressed copy,
        # a tag and a run lookup) costs 44, and the worker no second encoding.
        self.log.log_file(png, "outputs/grid.png")
        stats = self.sample_stats()
        self.log.log_metrics({"sample_s_per_image": seconds / n, "num_images": n, **stats}, 0)
        return self._finish({"status": "finished", "kind": "sample", "num_images": n,
                             "outputs": [self.storage.uri("outputs/images.npz"),
                                         self.storage.uri("outputs/grid.png")],
                             "source": ckpt.uri, "s_per_image": seconds / n, "metrics": stats,
                             "sampler": self.sampler_settings(cfg)})
