"""VQGAN (Esser et al. 2021): a convolutional autoencoder whose latents are quantised to a
learned codebook, trained with L1 reconstruction, the commitment loss and, from `disc_start`,
an adaptively weighted patch discriminator. The codebook follows EMA updates with dead-code
restart (workers/nn/bottleneck.py). Its `encode`/`decode` between images and code indices
(workers/nn/autoencoder.py) are what the autoregressive family models."""

from __future__ import annotations

from workers.autoencoder import AutoencoderWorker


class VQGANWorker(AutoencoderWorker):
    family = "vqgan"
    bottleneck = "vq"
