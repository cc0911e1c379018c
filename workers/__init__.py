"""Workers: one module per model family, each a subclass of workers.base.Worker."""

from __future__ import annotations

import importlib

# family -> "module:Class". A new family is its module plus one line here (and its model
# section in orchestrator/spec.py).
WORKERS = {
    "ddpm": "workers.ddpm:DDPMWorker",
    "gan": "workers.gan:GANWorker",
    "vqgan": "workers.vqgan:VQGANWorker",
    "autoregressive": "workers.autoregressive:ARWorker",
    "ldm": "workers.ldm:LDMWorker",
    "evaluate": "workers.evaluate:EvaluateWorker",  # scores the others; not a model family
}


def worker_class(family: str):
    module, _, cls = WORKERS[family].partition(":")
    return getattr(importlib.import_module(module), cls)
