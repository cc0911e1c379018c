"""VQGAN (Esser et al. 2021): the autoencoder whose code indices the autoregressive family
models. The worker is `workers.vqgan.worker`."""

from workers.registry import Family
from workers.vqgan.config import VQGANModel

FAMILY = Family("vqgan", VQGANModel, frozenset({"train", "sample"}),
                "workers.vqgan.worker:VQGANWorker")
