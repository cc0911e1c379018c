"""A trained generator as an MLflow pyfunc model: what `genforge register` puts in the Model
Registry (orchestrator/models.py), and what `mlflow.pyfunc.load_model` and `mlflow models serve`
run.

The packaged model is one genforge checkpoint, its files as the job wrote them (verified against
their manifest when the model loads), and genforge's own code (`workers/`, `orchestrator/`,
shipped as code paths). Sampling is the family's own worker, set up as a sample job of that
checkpoint is, so a served model makes the images a sample job with the same settings and seed
makes, on the same device. A second stage needs nothing beside its checkpoint: its frozen first
stage (a transformer's VQGAN, a latent diffusion's autoencoder) is saved inside it.

A request is one row: a DataFrame (one row a request), a dict of scalars (one request) or of
lists (one request a position). Its columns, every one optional:

    num_images   images to make (default 16, at most MAX_IMAGES)
    seed         the sampler's seed (default 0): the same request and seed, the same images
    steps, sampler, guidance, label, temperature, top_k, top_p, eta, spacing
                 as in a sample job's `sample:` section (default: the model's)
    format       "array" (default): each image a uint8 array (H, W, C), as a sample job's
                 images.npz holds them; "png": each image as PNG bytes (base64 in JSON)

The answer is a list with one dict per image, requests in order: `request` (the row it answers),
`seed`, `label` (the class it was asked for; None for an unconditional model), `sampler` (the
settings it was made with, defaults resolved, as a sample job's result records them) and
`image`.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType
from pydantic import ValidationError

from orchestrator.checkpoints import read_manifest, resolve_checkpoint_uri
from orchestrator.spec import SampleSpec, Upstream, _describe, _loc
from orchestrator.task import Task
from workers import images as imageio
from workers.base import JobError, Worker
from workers.nn.conditioning import class_labels
from workers.registry import family, worker_class

ENTRY = Path(__file__).with_name("served_model.py")  # what MLflow runs to make the model
ARTIFACT = "checkpoint"  # the artifact: a folder `checkpoints/step-NNNNNN/` as the job wrote it
DEFAULT_IMAGES = 16
# One request's images are made in one call, held in memory and sent back in one answer: a
# request for a sample job's million images would hold a serving process for hours.
MAX_IMAGES = 1024
FORMATS = ("array", "png")
# What a request may set, every field optional: its MLflow type. Numbers are of any type to
# MLflow, and validated here as a sample job's settings are: MLflow refuses an int for a
# "double" column, and a float for a "long" one, which an int column with a value missing in
# one row of a DataFrame is.
REQUEST_FIELDS = {"num_images": AnyType(), "seed": AnyType(), "steps": AnyType(),
                  "label": AnyType(), "guidance": AnyType(), "temperature": AnyType(),
                  "top_k": AnyType(), "top_p": AnyType(), "eta": AnyType(),
                  "sampler": "string", "spacing": "string", "format": "string"}
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(kind, name, required=False)
                                          for name, kind in REQUEST_FIELDS.items()]))
INPUT_EXAMPLE = pd.DataFrame([{"num_images": 1, "seed": 0}])


def bad_request(message: str) -> MlflowException:
    """An error of the request, not of the model: the scoring server answers it with 400."""
    return MlflowException.invalid_parameter_value(message)


def requests(model_input: Any) -> list[dict[str, Any]]:
    """The requests of a prediction's input, each a dict of the fields it sets (a missing value
    of a DataFrame's column, NaN or None, is a field left out)."""
    if isinstance(model_input, dict):
        scalars = not any(isinstance(v, (list, tuple, np.ndarray, pd.Series))
                          for v in model_input.values())
        model_input = pd.DataFrame([model_input] if scalars else model_input)
    elif isinstance(model_input, list):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise bad_request(f"a request is a DataFrame or a dict of {', '.join(REQUEST_FIELDS)} "
                          f"(got {type(model_input).__name__})")
    unknown = sorted(set(map(str, model_input.columns)) - set(REQUEST_FIELDS))
    if unknown:
        raise bad_request(f"{unknown[0]}: unknown field (a request may set "
                          f"{', '.join(REQUEST_FIELDS)})")
    return [{k: _plain(v) for k, v in row.items() if not _missing(v)}
            for row in model_input.to_dict(orient="records")]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (pydantic takes those); a whole float as
    an int, for an int column that a missing value made float."""
    value = value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def sampling_task(uri: str, family_name: str) -> Task:
    """A sample job of checkpoint `uri` with no run, as the driver would hand it to the family's
    worker: the worker then loads and samples exactly as in a pipeline. It keeps the process's
    torch threads (a serving process sets its own)."""
    job = {"name": "served", "kind": "sample", "family": family_name,
           "resources": {"cpus": torch.get_num_threads(), "gpus": 0},
           "sample": SampleSpec().model_dump(mode="json")}
    return Task(job=job, job_hash="-", experiment="-", storage_root=uri, prefix="",
                tracking_uri="", run_id=None, code_version="-", sources=(uri,),
                refs={"from": uri})


def load_worker(uri: str) -> tuple[Worker, dict[str, Any]]:
    """The family's worker with checkpoint `uri` loaded for sampling (EMA weights, eval mode),
    and the checkpoint's meta."""
    name = read_manifest(*resolve_checkpoint_uri(uri))["meta"]["family"]
    task = sampling_task(uri, name)
    worker = worker_class(name).for_task(task)(task)
    return worker, worker.load_for_sampling(uri).meta


class GeneratorModel(PythonModel):
    """A genforge checkpoint behind MLflow's pyfunc interface (see the module's docstring)."""

    def load_context(self, context: Any) -> None:
        self.worker, meta = load_worker("file://" + context.artifacts[ARTIFACT])
        # the model as a sample job's validation sees what it reads; errors name its job
        self.model = Upstream.of_checkpoint(meta.get("job") or "served", meta)
        # A serving process may answer requests on several threads; a worker samples one
        # request at a time (its class-cycling counter is per request).
        self._lock = threading.Lock()

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The images of every request of `model_input` (as MLflow passes it, a DataFrame; a
        dict or a list of dicts when called directly), one dict each."""
        return [answer for i, request in enumerate(requests(model_input))
                for answer in self.answer(i, request)]

    def settings(self, request: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """A request's sampler settings, validated as a sample job's are, and its format."""
        fmt = request.pop("format", FORMATS[0])
        if fmt not in FORMATS:
            raise bad_request(f"format: must be one of {', '.join(FORMATS)} (got {fmt!r})")
        try:
            spec = SampleSpec.model_validate({"num_images": DEFAULT_IMAGES, **request})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise bad_request(f"{_loc(err['loc'])}: {_describe(err)}") from None
        problem = (family(self.model.family).check_sample(spec) or family(self.model.family)
                   .section(self.model.model).check_sample(spec, self.model))
        if problem:
            raise bad_request(problem.removeprefix("sample."))
        if spec.num_images > MAX_IMAGES:
            raise bad_request(f"num_images: at most {MAX_IMAGES} a request "
                              f"(got {spec.num_images}); make more with more requests or seeds")
        return spec.model_dump(mode="json"), fmt

    def answer(self, index: int, request: dict[str, Any]) -> list[dict[str, Any]]:
        """The images of request `index`, one dict each."""
        cfg, fmt = self.settings(request)
        images = self.sample(cfg)
        classes = getattr(self.worker, "num_classes", 0)
        labels = (class_labels(len(images), classes, cfg["label"], 0, torch.device("cpu")).tolist()
                  if classes else [None] * len(images))
        sampler = self.worker.sampler_settings(cfg)  # as a sample job's result records them
        return [{"request": index, "seed": cfg["seed"], "label": label, "sampler": sampler,
                 "image": imageio.png_bytes(image) if fmt == "png" else image}
                for image, label in zip(images, labels)]

    def sample(self, cfg: dict[str, Any]) -> np.ndarray:
        """(N, H, W, C) uint8 images made as a sample job with settings `cfg` makes them."""
        with self._lock:
            try:
                return sample_images(self.worker, cfg)
            except JobError as exc:  # a setting the model cannot take (a label it lacks)
                raise bad_request(str(exc).removeprefix("sample.")) from None


def sample_images(worker: Worker, cfg: dict[str, Any]) -> np.ndarray:
    """(N, H, W, C) uint8 images from `worker`'s loaded model, made as a sample job with the
    (resolved) settings `cfg` makes them."""
    n, size = cfg["num_images"], cfg["batch_size"]
    with torch.no_grad():
        if hasattr(worker, "_sampled"):  # unset labels cycle from class 0 in every request,
            worker._sampled = 0          # as in a sample job (train.eval does the same)
        gen = worker._generator(cfg["seed"])
        parts = [imageio.to_uint8(worker.generate(min(size, n - start), cfg, gen))
                 for start in range(0, n, size)]
    return np.concatenate(parts)


def grid_png(uri: str, num_images: int = DEFAULT_IMAGES, seed: int = 0) -> bytes:
    """A grid of `num_images` images from checkpoint `uri` at the model's default settings, as
    a PNG: the picture of a model version whose job drew none at that step."""
    worker, _ = load_worker(uri)
    cfg = SampleSpec(num_images=num_images, seed=seed).model_dump(mode="json")
    images = sample_images(worker, cfg)
    return imageio.png_bytes(imageio.grid(images, scale=imageio.display_scale(images.shape[1])))
