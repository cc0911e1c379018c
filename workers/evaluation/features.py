"""The feature network of evaluation: a data set's classifier, a cached artifact of the data set
(`datasets/<sha256>/classifier/<key>/`, keyed by its configuration, the image size and channels
and CLASSIFIER_VERSION), trained on the training split by whichever job needs it first (an
evaluate job, or a training job with `train.eval`) and read by every later one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import torch

from orchestrator.checkpoints import NotFound, load_checkpoint, save_checkpoint
from orchestrator.spec import ClassifierSpec
from workers.data import StagedImages
from workers.nn.classifier import Classifier, accuracy, train_classifier
from workers.stream import ShardStream

CLASSIFIER_VERSION = 2  # bump when the classifier's architecture or training changes


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W), the form the metrics take."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose generator `torch.random.fork_rng` must put back for a job on
    `device`."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def default_config() -> dict[str, Any]:
    """The classifier of a training job's `train.eval`: an evaluate job's default
    `evaluate.classifier`, so that both share one cached classifier."""
    return ClassifierSpec().model_dump(mode="json")


def classifier_prefix(data_key: str, cfg: dict[str, Any], data: dict[str, Any]) -> str:
    """Where the classifier of configuration `cfg` for the data set staged at `data_key`
    (resolved data section `data`) is cached, under the storage root."""
    ident = json.dumps({"classifier": cfg, "size": data["image_size"],
                        "channels": data["channels"], "version": CLASSIFIER_VERSION},
                       sort_keys=True)
    folder = data_key.rsplit("/", 1)[0]
    return f"{folder}/classifier/{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def feature_network(worker: Any, cfg: dict[str, Any], images: StagedImages, y: torch.Tensor,
                    hx: torch.Tensor, hy: torch.Tensor,
                    train: Callable[..., Classifier] | None = None
                    ) -> tuple[Classifier, float, bool]:
    """The data set's classifier for `worker`'s job (a `workers.base.Worker`): (network on the
    job's device, held-out accuracy, whether it came from cache). Trained here if not cached:
    on the training split `images` (labels `y`) streamed from its shards, as a training job
    does, with the progress phase "training the feature network", its loss logged every 100
    steps and the job's stop honoured between two steps (a stopped job caches no classifier).
    Its initial weights are drawn from a generator seeded by `cfg["seed"]`, inside a fork of
    torch's global one, so that the classifier does not depend on which job trains it and the
    job's own draws are left as they were. `train`: the training function (default
    `train_classifier`, looked up when called: a test may replace it)."""
    num_classes = int(max(y.max(), hy.max())) + 1
    channels, size, _ = images.shape
    devices = rng_devices(worker.device)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(cfg["seed"])
        net = Classifier(channels=channels, image_size=size, num_classes=num_classes,
                         width=cfg["width"], features=cfg["features"]).to(worker.device)
    store = worker.root.child(classifier_prefix(worker.task.data_key, cfg, worker.job["data"]))
    try:
        ckpt = load_checkpoint(store)
        net.load_state_dict(ckpt.tensors)
        return net.eval(), float(ckpt.meta["test_accuracy"]), True
    except NotFound:
        pass
    worker._progress.update(phase="training the feature network", step=0, total=cfg["steps"])

    def on_step(step: int, loss: torch.Tensor) -> None:
        worker._progress["step"] = step
        if step % 100 == 0 or step == cfg["steps"]:  # the loss leaves the device here only
            worker.log.log_metrics({"classifier_loss": float(loss)}, step)
        worker.check_stop()  # between two steps: a stopped job caches no classifier

    stream = ShardStream(images, batch_size=cfg["batch_size"], seed=cfg["seed"],
                         device=worker.device)
    try:
        with torch.random.fork_rng(devices=devices):  # nothing of the job's draws is used
            (train or train_classifier)(net, stream, cfg, on_step)
    finally:
        stream.close()
    test_accuracy = accuracy(net, hx, hy)
    save_checkpoint(store, cfg["steps"], tensors=net.state_dict(),
                    meta={"test_accuracy": test_accuracy, "num_classes": num_classes,
                          "trained_by": worker.task.name, "config": cfg})
    return net, test_accuracy, False
