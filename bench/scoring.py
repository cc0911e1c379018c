"""Scoring images outside a job as genforge's evaluate job scores its sources: the same staged
held-out images (the first `n`), the same cached feature network (the one the evaluate jobs
train and cache for the data set, read here from storage) and `workers.evaluation.metrics.score`.
`bench/peers.py` scores its reference implementations' samples with it."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.checkpoints import load_checkpoint
from orchestrator.datasets import heldout_key, stage
from orchestrator.spec import ClassifierSpec, DataSpec
from orchestrator.storage import S3Credentials, Storage
from workers.data import load_images
from workers.evaluation.features import as_uint8, classifier_prefix
from workers.evaluation.metrics import Reference, score
from workers.nn.classifier import Classifier, FeatureExtractor


class Scorer:
    """The evaluation of data set `data` (a spec's data section) in `root`: call it with
    (N, C, H, W) images in [-1, 1] for every metric an evaluate job reports. The data set
    must be staged and its default classifier cached (an evaluate job has run on it)."""

    def __init__(self, root: Storage, data: dict[str, Any], num_samples: int,
                 credentials: S3Credentials | None = None):
        spec = DataSpec.model_validate(data)
        self.data_key = stage(spec, root, credentials)  # staged already: only its key
        resolved = spec.model_dump(mode="json")
        size, channels = resolved["image_size"], resolved["channels"]
        self.train, _ = load_images(root, self.data_key, image_size=size, channels=channels)
        hx, hy = load_images(root, heldout_key(self.data_key), image_size=size, channels=channels)
        cfg = ClassifierSpec().model_dump(mode="json")
        ckpt = load_checkpoint(root.child(classifier_prefix(self.data_key, cfg, resolved)))
        net = Classifier(channels=channels, image_size=size, num_classes=ckpt.meta["num_classes"],
                         width=cfg["width"], features=cfg["features"])
        net.load_state_dict(ckpt.tensors)
        self.extractor = FeatureExtractor(net)
        self.reference = Reference(self.extractor, as_uint8(hx[:num_samples]))
        self.num_samples = num_samples

    def __call__(self, images: torch.Tensor) -> dict[str, Any]:
        if len(images) != self.num_samples:
            raise ValueError(f"{len(images)} images, not {self.num_samples}")
        return score(self.extractor, self.reference, as_uint8(images))
