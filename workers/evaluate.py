"""Evaluation jobs: every source (a trained model, or a sample job's outputs) scored the same
way against the data set's held-out split, in the feature space of a classifier trained on the
training split. The classifier is a cached artifact of the data set (workers/evaluation/
features.py): trained by the first evaluation (or training job with `train.eval`) that needs it,
then read by every later one.

Outputs: `outputs/metrics.json` (the real-vs-real baseline, then one entry per source with its
metrics, sampler settings and sampling time per image), and the same numbers on the MLflow run,
prefixed by the source's name; `outputs/shown.npz`, the first SHOWN images of every source (by
its label) and of the held-out split ("real"), uint8 (N, H, W, C): what `genforge compare
--grids` lays side by side.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any

import numpy as np
import torch

from orchestrator.checkpoints import NotFound, read_manifest, resolve_checkpoint_uri
from orchestrator.datasets import heldout_key
from orchestrator.spec import EvaluateSpec
from orchestrator.storage import open_storage
from workers.registry import worker_class
from workers.base import JobError, Worker
from workers.data import StagedImages, load_images
from workers.stream import staged_images
from workers.evaluation import features
from workers.evaluation.features import as_uint8
from workers.evaluation.inception import InceptionUnavailable, inception_fid
from workers.evaluation.metrics import score
from workers.nn.classifier import Classifier, FeatureExtractor, train_classifier
from workers.nn.conditioning import class_labels

CLASSIFIER_VERSION = features.CLASSIFIER_VERSION  # (bump it there)
SHOWN = 16  # images of each source kept to be looked at


def _shown(images: torch.Tensor) -> np.ndarray:
    """The first SHOWN of uint8 (N, C, H, W) images, as (n, H, W, C) on the CPU."""
    return images[:SHOWN].permute(0, 2, 3, 1).cpu().numpy()


class EvaluateWorker(Worker):
    family = "evaluate"

    # ---- the feature network ------------------------------------------------------------
    def feature_network(self, images: StagedImages, y: torch.Tensor, hx: torch.Tensor,
                        hy: torch.Tensor) -> tuple[Classifier, float, bool]:
        """The data set's classifier: (network, held-out accuracy, whether it came from cache),
        shared with training jobs' `train.eval` (workers/evaluation/features.py). It trains on
        the training split streamed from its shards, as a training job does."""
        # `train_classifier` looked up here, when called: a test may replace it
        return features.feature_network(self, self.job["evaluate"]["classifier"], images, y,
                                        hx, hy, train=train_classifier)

    # ---- the images of one source -------------------------------------------------------
    def _sub_worker(self, family: str, uri: str, settings: dict[str, Any]) -> Worker:
        """The source family's own worker, set up as a sampling job of `uri` (its run logger is
        closed at once: everything is logged by this job)."""
        job = {**self.job, "kind": "sample", "family": family, "sample": settings}
        task = dataclasses.replace(self.task, job=job, refs={"from": uri}, sources=(uri,))
        worker = worker_class(family).for_task(task)(task)
        worker.log.close()
        return worker

    def images_of(self, uri: str, n: int, sample_cfg: dict[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """n uint8 images of the source at `uri` sampled with `sample_cfg`, the classes they
        were asked for (a class-conditional model) and what is known of the source."""
        prefix = open_storage(uri, self.task.s3)
        try:
            made = json.loads(prefix.get_bytes("result.json"))
        except NotFound:
            made = {}
        if made.get("kind") == "sample":  # a sample job: its images, as they were made
            arrays = np.load(io.BytesIO(prefix.get_bytes("outputs/images.npz")))
            images = torch.from_numpy(arrays["images"][:n]).permute(0, 3, 1, 2).contiguous()
            images = images.to(self.device)
            meta = read_manifest(*resolve_checkpoint_uri(made["source"], self.task.s3)).get("meta", {})
            return images, None, {"family": meta.get("family"), "source_kind": "sample",
                            "checkpoint": made["source"], "step": meta.get("step"),
                            "s_per_image": made.get("s_per_image"), "sampler": None}
        family = read_manifest(*resolve_checkpoint_uri(uri, self.task.s3))["meta"]["family"]
        worker = self._sub_worker(family, uri, sample_cfg)
        ckpt = worker.load_for_sampling(uri)
        if not sample_cfg["use_ema"]:
            worker.emas = {}
        gen = self._generator(self.job["evaluate"]["seed"])
        parts, t0 = [], time.perf_counter()
        with torch.no_grad():
            for start in range(0, n, sample_cfg["batch_size"]):
                self.check_stop()
                count = min(sample_cfg["batch_size"], n - start)
                parts.append(as_uint8(worker.generate(count, sample_cfg, gen)))
                self._progress["step"] = self._progress.get("step", 0) + count
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for m in worker.modules.values() for p in m.parameters())
        sampler = worker.sampler_settings(sample_cfg)
        # the classes asked for: `sample.label`, or cycling through them from the first sample
        labels = (class_labels(n, worker.num_classes, sample_cfg.get("label"), 0, self.device)
                  if getattr(worker, "num_classes", 0) else None)
        return torch.cat(parts), labels, {"family": family, "source_kind": ckpt.meta.get("kind", "train"),
                                  "checkpoint": ckpt.uri, "step": ckpt.step, "params": params,
                                  "s_per_image": seconds / n, "sampler": sampler}

    def _score(self, extractor: FeatureExtractor, real: torch.Tensor, fake: torch.Tensor,
               labels: torch.Tensor | None = None) -> dict[str, Any]:
        cfg = self.job["evaluate"]
        metrics = score(extractor, real, fake, cfg["knn_k"], labels)
        if cfg.get("inception"):
            try:
                metrics["inception_fid"] = inception_fid(real, fake, self.device)
            except InceptionUnavailable as exc:
                raise JobError(str(exc)) from None
        return metrics

    # ---- the job ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        cfg, data = self.job["evaluate"], self.job["data"]
        n = cfg["num_samples"]
        self._progress.update(phase="loading data")
        images = staged_images(self.root, self.task.data_key, self.job)  # read shard by shard
        y = images.labels()
        hx, hy = load_images(self.root, heldout_key(self.task.data_key),
                             image_size=data["image_size"], channels=data["channels"])
        if y is None or hy is None:
            raise JobError("data: evaluation needs labels (its feature network is a classifier)")
        if len(hx) < n:
            raise JobError(f"evaluate.num_samples: {n} but the held-out split has {len(hx)} images")
        self.check_stop()
        hx, hy = hx.to(self.device), hy.to(self.device)
        net, test_accuracy, cached = self.feature_network(images, y, hx, hy)
        self.log.set_tags({"genforge.classifier_cache": "hit" if cached else "miss"})
        self.log.log_metrics({"classifier_test_accuracy": test_accuracy}, 0)
        extractor = FeatureExtractor(net)

        # everything stays on the job's device: images, features and the metrics' states
        real = as_uint8(hx[:n])
        # real vs real at the same sample count: what a perfect model would score
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["seed"]))[:n]
        self.check_stop()
        baseline = self._score(extractor, real, images.take(pick).to(self.device))
        results: dict[str, Any] = {"num_samples": n, "classifier_test_accuracy": test_accuracy,
                                   "baseline": baseline, "sources": []}
        shown = {"real": _shown(real)}
        self.log.log_metrics({f"baseline.{k}": v for k, v in baseline.items()
                              if isinstance(v, float)}, 0)

        refs = self.job["from"] if isinstance(self.job["from"], list) else [self.job["from"]]
        spec = EvaluateSpec.model_validate(cfg)
        scorings = [(ref, uri, swept, settings.model_dump())
                    for ref, uri in zip(refs, self.task.sources)
                    for swept, settings in spec.variants(ref)]
        self._progress.update(phase="sampling", step=0, total=n * len(scorings))
        for ref, uri, swept, settings in scorings:
            self.check_stop()
            images, labels, info = self.images_of(uri, n, settings)
            if tuple(images.shape[1:]) != tuple(real.shape[1:]):
                raise JobError(f"from: {ref} makes {tuple(images.shape[1:])} images, the "
                               f"evaluation data is {tuple(real.shape[1:])}")
            self.check_stop()
            metrics = self._score(extractor, real, images, labels)
            # a URI (s3://, models:/) is no metric name: its place in `from` is
            label = (ref if ":" not in ref else f"source{refs.index(ref)}") + "".join(
                f".{key}-{value}" for key, value in swept.items())
            self.log.log_metrics({f"{label}.{k}": v for k, v in
                                  {**metrics, "s_per_image": info["s_per_image"]}.items()
                                  if isinstance(v, float)}, 0)
            results["sources"].append({"ref": ref, "label": label, "swept": swept, **info,
                                       "metrics": metrics})
            shown[label] = _shown(images)
        buf = io.BytesIO()
        np.savez_compressed(buf, **shown)
        self.storage.put_bytes("outputs/shown.npz", buf.getvalue())
        self.storage.put_bytes("outputs/metrics.json", json.dumps(results, indent=2).encode())
        return self._finish({"status": "finished", "kind": "evaluate",
                             "outputs": [self.storage.uri("outputs/metrics.json"),
                                         self.storage.uri("outputs/shown.npz")],
                             "metrics": results})
