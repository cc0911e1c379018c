"""`train.eval`: a training job's own evaluations, as it trains.

At steps `every`, 2 `every`, ..., those of `at`, and the last, rank 0 samples `num_samples` images from its EMA
model (the family's `generate`, with the family's default sampler settings but at most
`orchestrator.spec.TRAIN_EVAL_STEPS` sampler steps, unless `steps` says otherwise) and scores
them against the first `num_samples` held-out images in the feature space of the data set's
cached classifier (workers/evaluation/features.py: shared with evaluate jobs). It logs `fd`,
`kid` and `eval_s` (the seconds spent evaluating so far, in this attempt) at that step, and
appends `[step, {"fd": ..., "kid": ...}]` to the job's progress (`evals`), which the driver
polls.

An evaluation leaves the training as it was: it samples with a generator of its own, seeded by
`train.seed` and the step (so that two evaluations of the same weights at the same step agree),
and draws everything else (KID's subsets) from torch's global generator inside a fork of it,
so that a job trains the same weights with `train.eval` as without; the family's sampling
counters are put back and the modules back in train mode. The real images' features are
computed once per job; everything stays on the job's device.

With `metric` a metric the training logs (`LoggedMean`), nothing is sampled: the measurement at
those steps is the mean of the values logged since the last one, in `evals` the same way.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.datasets import heldout_key
from orchestrator.spec import TRAIN_EVAL_STEPS, SampleSpec
from workers.data import StagedImages, load_images
from workers.evaluation import features
from workers.evaluation.metrics import Reference, score
from workers.nn.classifier import FeatureExtractor

EVAL_SEED = 0x7E57_0000_0000  # keeps the evaluation's seeds apart from the training's per-step ones
COUNTERS = ("_sampled", "_tokens", "_token_s")  # what families' `generate` counts (sample jobs)


class TrainingEval:
    """The evaluations of one training job; made by `prepare`, called at the steps it is `due`."""

    def __init__(self, worker: Any, cfg: dict[str, Any], extractor: FeatureExtractor,
                 reference: Reference, logged_until: int):
        self.worker, self.cfg = worker, cfg
        self.extractor, self.reference = extractor, reference
        self.logged_until = logged_until  # steps an earlier attempt logged: not logged again
        self.seconds = 0.0  # spent evaluating, in this attempt
        train = worker.job["train"]
        world = worker.collective.world if worker.collective is not None else 1
        self.batch_size = max(1, train["batch_size"] // world)  # what a training step holds
        self.seed = train["seed"]

    @classmethod
    def prepare(cls, worker: Any, images: StagedImages) -> TrainingEval:
        """The classifier (trained here if the data set has none cached yet) and the real
        images' features, for `worker`'s job (a `workers.base.Worker`) on the training split
        `images`."""
        from workers.base import JobError  # (workers.base imports this module)

        cfg, data = worker.job["train"]["eval"], worker.job["data"]
        n = cfg["num_samples"]
        y = images.labels()
        hx, hy = load_images(worker.root, heldout_key(worker.task.data_key),
                             image_size=data["image_size"], channels=data["channels"])
        if y is None or hy is None:
            raise JobError("train.eval: needs a labelled data set (its feature network is a "
                           "classifier)")
        if len(hx) < n:
            raise JobError(f"train.eval.num_samples: {n} but the held-out split has {len(hx)} "
                           "images")
        worker.check_stop()
        hx, hy = hx.to(worker.device), hy.to(worker.device)
        net, test_accuracy, cached = features.feature_network(
            worker, cfg.get("classifier") or features.default_config(), images, y, hx, hy)
        worker.log.set_tags({"genforge.classifier_cache": "hit" if cached else "miss",
                             "genforge.classifier_test_accuracy": f"{test_accuracy:.4f}",
                             "genforge.eval_objective": cfg["metric"]})
        extractor = FeatureExtractor(net)
        reference = Reference(extractor, features.as_uint8(hx[:n]))
        logged_until = worker.log.last_logged_step("eval_s") if worker.task.attempt > 1 else 0
        return cls(worker, cfg, extractor, reference, logged_until)

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.get("every")
        return bool(every and step % every == 0) or step in (self.cfg.get("at") or ()) \
            or step == total

    def observe(self, values: dict[str, float]) -> None:
        """A log step's values: sample quality needs none of them."""

    def sample_settings(self) -> dict[str, Any]:
        """The sampler settings of this evaluation: the family's defaults for a sampling job,
        with at most TRAIN_EVAL_STEPS steps unless `train.eval.steps` says (resolved each time:
        a distillation's student changes its own steps as it trains)."""
        settings = {**SampleSpec().model_dump(mode="json"), "num_images": self.cfg["num_samples"],
                    "batch_size": self.batch_size}
        if self.cfg.get("steps"):
            settings["steps"] = self.cfg["steps"]
        else:
            default = self.worker.sampler_settings(settings).get("steps")
            if default:
                settings["steps"] = min(default, TRAIN_EVAL_STEPS)
        return settings

    def __call__(self, step: int) -> float:
        """Evaluate the model of `step`; returns the seconds it took."""
        worker, n = self.worker, self.cfg["num_samples"]
        worker.synchronize()
        t0 = time.perf_counter()
        phase = worker._progress.get("phase")
        worker._progress["phase"] = "evaluating"
        counters = {k: getattr(worker, k) for k in COUNTERS if hasattr(worker, k)}
        seed = EVAL_SEED + self.seed * 1_000_003 + step
        devices = features.rng_devices(worker.device)
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.random.default_generator.manual_seed(seed)  # KID's subsets
                if worker.device.type == "cuda":
                    torch.cuda.manual_seed(seed)
                if "_sampled" in counters:  # class-conditional: the classes in turn, from 0
                    worker._sampled = 0
                gen, settings, parts = worker._generator(seed), self.sample_settings(), []
                for start in range(0, n, self.batch_size):
                    images = worker.generate(min(self.batch_size, n - start), settings, gen)
                    parts.append(features.as_uint8(images))
                # every metric of an evaluate job (FD and KID alone would save ~0.15 s of the
                # ~6 s a quickstart DDPM's evaluation takes); fd and kid are logged
                metrics = score(self.extractor, self.reference, torch.cat(parts))
        finally:
            for key, value in counters.items():
                setattr(worker, key, value)
            for module in worker.modules.values():
                module.train()
            worker._progress["phase"] = phase
        worker.synchronize()
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        values = {"fd": metrics["fd"], "kid": metrics["kid"]}
        # a new list each time: the driver's poll may be reading the last one
        worker._progress["evals"] = [*worker._progress.get("evals", []), [step, values]]
        if step > self.logged_until:
            worker.log.log_metrics({**values, "eval_s": self.seconds}, step)
        return seconds


class LoggedMean:
    """`train.eval` of a metric the training logs: at its steps, the mean of the values logged
    since the last one, appended to the job's `evals` as sample quality is. It costs nothing:
    the values are the ones logged anyway."""

    def __init__(self, worker: Any, cfg: dict[str, Any]):
        self.worker, self.cfg, self.metric = worker, cfg, cfg["metric"]
        self.seconds = 0.0
        self.window: list[float] = []
        self.logged: set[str] = set()

    due = TrainingEval.due  # the same steps

    def observe(self, values: dict[str, float]) -> None:
        self.logged.update(values)
        if self.metric in values:
            self.window.append(values[self.metric])

    def __call__(self, step: int) -> float:
        from workers.base import JobError  # (workers.base imports this module)

        if not self.window:
            if self.metric not in self.logged:  # a family's metric that this model has not
                raise JobError(f"train.eval.metric: this job logs no '{self.metric}' (it "
                               f"logs: {', '.join(sorted(self.logged))})")
            return 0.0
        values = {self.metric: sum(self.window) / len(self.window)}
        self.window = []
        worker = self.worker
        worker._progress["evals"] = [*worker._progress.get("evals", []), [step, values]]
        return 0.0
