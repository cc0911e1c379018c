"""Training and using first-stage autoencoders (VQGAN, and latent diffusion's KL autoencoder).

`AutoencoderWorker` trains one: L1 reconstruction plus the bottleneck's loss (commitment or KL),
and from `disc_start` on a patch discriminator with the hinge loss, its generator term weighted
adaptively (Esser et al. 2021). Reconstruction error is measured at the end on (up to
HOLDOUT_MAX images of) the data set's held-out split, and "sampling" an autoencoder reconstructs
those images.

The stages that build on an autoencoder (the autoregressive transformer, latent diffusion) use
`load_first_stage` and `encode_dataset`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri
from orchestrator.datasets import heldout_key
from orchestrator.storage import NotFound
from workers.base import JobError, Worker
from workers.data import StagedImages, as_float, load_images
from workers.nn.adversarial import discriminator_loss, generator_loss
from workers.nn.autoencoder import Autoencoder, PatchDiscriminator, adaptive_weight
from workers.nn.bottleneck import code_stats

HOLDOUT_MAX = 1000  # held-out images reconstructed for the final metrics and sample jobs
ENCODE_BATCH = 256


def build_autoencoder(family: str, model_cfg: dict[str, Any], image_channels: int) -> Autoencoder:
    """The autoencoder a `vqgan` or `ldm` (stage: autoencoder) model section describes."""
    vq = family == "vqgan"
    extra = dict(codebook_size=model_cfg["codebook_size"], beta=model_cfg["beta"],
                 codebook_decay=model_cfg["codebook_decay"],
                 restart_threshold=model_cfg["restart_threshold"]) if vq else {}
    return Autoencoder(image_channels=image_channels, channels=model_cfg["channels"],
                       channel_mult=tuple(model_cfg["channel_mult"]),
                       num_res_blocks=model_cfg["num_res_blocks"],
                       latent_channels=model_cfg["latent_channels"],
                       bottleneck="vq" if vq else "kl", **extra)


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


class AutoencoderWorker(Worker):
    bottleneck: ClassVar[str]  # "vq" | "kl"

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        self.cfg = model_cfg
        ae = build_autoencoder(self.family, model_cfg, image_shape[0]).to(self.device)
        self.modules = {"ae": ae}
        if model_cfg["disc_weight"] > 0:
            self.modules["disc"] = PatchDiscriminator(
                channels=image_shape[0], width=model_cfg["disc_width"],
                layers=model_cfg["disc_layers"]).to(self.device)
        self.holdout: torch.Tensor | None = None
        self._sampled = 0
        self._sq_err, self._pixels = 0.0, 0

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> None:
        # betas of taming-transformers' VQGAN
        self.optimizers = {name: torch.optim.Adam(m.parameters(), lr=train_cfg["lr"], betas=(0.5, 0.9))
                           for name, m in self.modules.items()}

    def _bottleneck_weight(self) -> float:
        return 1.0 if self.bottleneck == "vq" else self.cfg["kl_weight"]

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
        ae, disc = self.modules["ae"], self.modules.get("disc")
        rec, bottleneck_loss, stats = ae(batch, gen)
        rec_loss = (batch - rec).abs().mean()
        loss = rec_loss + self._bottleneck_weight() * bottleneck_loss
        mse = (batch - rec).pow(2).mean().detach()
        out = {"rec_l1": rec_loss.detach(), "mse": mse, "psnr": 10 * torch.log10(4.0 / mse),
               "bottleneck_loss": bottleneck_loss.detach(),
               **{k: v for k, v in stats.items() if k != "indices"}}
        adversarial = disc is not None and self.step > self.cfg["disc_start"]
        if adversarial:
            g_loss = generator_loss(disc(rec), "hinge")
            weight = adaptive_weight(rec_loss, g_loss, ae.decoder.last_layer) * self.cfg["disc_weight"]
            loss = loss + weight * g_loss
            out.update(g_loss=g_loss.detach(), disc_adaptive_weight=weight)
        self.optimize(loss, "ae")
        if adversarial:
            d_loss = discriminator_loss(disc(batch), disc(rec.detach()), "hinge")
            self.optimize(d_loss, "disc")
            out["d_loss"] = d_loss.detach()
        out["loss"] = loss.detach()
        return out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        ae = self.modules["ae"]
        was_training = ae.training
        ae.eval()
        try:
            return torch.cat([ae(x[i:i + ENCODE_BATCH])[0] for i in range(0, len(x), ENCODE_BATCH)]).clamp(-1, 1)
        finally:
            ae.train(was_training)

    def final_metrics(self) -> dict[str, float]:
        self._ensure_holdout()
        rec = self.reconstruct(self.holdout)
        mse = float((rec - self.holdout).pow(2).mean())
        metrics = {"holdout_mse": mse, "holdout_psnr": psnr(mse),
                   "holdout_l1": float((rec - self.holdout).abs().mean())}
        if self.bottleneck == "vq":
            stats = code_stats(self.modules["ae"].encode(self.holdout), self.cfg["codebook_size"])
            metrics.update({f"holdout_{k}": float(v) for k, v in stats.items()})
        return metrics

    def _ensure_holdout(self) -> None:
        if self.holdout is None:
            self.holdout = heldout_images(self)[0]

    def generate(self, n: int, sample_cfg: dict[str, Any] | None, gen: torch.Generator,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Reconstructions of held-out images: the first n for training previews; for a sampling
        job the next n, cycling through them."""
        self._ensure_holdout()
        start = self._sampled if sample_cfg is not None else 0
        idx = torch.arange(start, start + n, device=self.device) % len(self.holdout)
        originals = self.holdout[idx]
        rec = self.reconstruct(originals)
        if sample_cfg is not None:
            self._sampled += n
            self._sq_err += float((rec - originals).pow(2).sum())
            self._pixels += originals.numel()
        return rec

    def sample_stats(self) -> dict[str, float]:
        mse = self._sq_err / max(self._pixels, 1)
        return {"holdout_mse": mse, "holdout_psnr": psnr(mse)}


def heldout_images(worker: Worker) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first HOLDOUT_MAX images (and labels) of the held-out split of the data set the
    worker's model trains (or, for a sampling job, its checkpoint trained) on, on its device."""
    meta = worker.loading.meta if worker.loading else {"data": worker.job["data"],
                                                       "data_key": worker.task.data_key}
    data = meta["data"]
    x, y = load_images(worker.root, heldout_key(meta["data_key"]), image_size=data["image_size"],
                       channels=data["channels"], limit=HOLDOUT_MAX)
    return x.to(worker.device), None if y is None else y.to(worker.device)


# ---- for the stages built on a first-stage autoencoder ------------------------------------

def load_first_stage(worker: Worker, name: str, field: str, families: tuple[str, ...]) -> Autoencoder:
    """Put the frozen autoencoder `name` into `worker.frozen` and return it.

    Sampling (or any restore of the worker's own checkpoint) takes its configuration from that
    checkpoint, whose tensors then fill it. Training reads the autoencoder from the job or URI in
    the task's `field` (e.g. "model.tokenizer")."""
    if name in worker.frozen:  # already there (a student built beside its teacher)
        return worker.frozen[name]
    if worker.loading is not None:
        meta = worker.loading.meta["frozen"][name]
        ae = build_autoencoder(meta["family"], meta["model"], meta["image_shape"][0])
    else:
        uri = worker.task.refs[field]
        storage, ckpt_name = resolve_checkpoint_uri(uri, worker.task.s3)
        ckpt = load_checkpoint(storage, ckpt_name)
        family = ckpt.meta.get("family")
        if family not in families:
            raise JobError(f"{field}: {ckpt.uri} holds a '{family}' model, not {' or '.join(families)}")
        ae = build_autoencoder(family, ckpt.meta["model"], ckpt.meta["image_shape"][0])
        ae.load_state_dict({k[len("ae/"):]: v for k, v in ckpt.tensors.items() if k.startswith("ae/")})
        meta = {"family": family, "model": ckpt.meta["model"], "uri": ckpt.uri,
                "hash": ckpt.meta.get("hash"), "step": ckpt.step,
                "image_shape": ckpt.meta["image_shape"]}
    ae = ae.to(worker.device).eval().requires_grad_(False)
    worker.frozen[name], worker.frozen_meta[name] = ae, meta
    return ae


def encode_dataset(worker: Worker, name: str, x: StagedImages, what: str) -> torch.Tensor:
    """The whole training set through the frozen autoencoder `name`, once, a shard at a time:
    `what` is "codes" (int indices, VQ) or "latents". The result is cached in storage next to
    the staged data, keyed by the autoencoder checkpoint and the image preprocessing, so every
    later job that reads the same data through the same autoencoder reads no image."""
    ae, meta = worker.frozen[name], worker.frozen_meta[name]
    data = worker.job["data"]
    ident = json.dumps({"ae": [meta.get("hash"), meta.get("step"), meta.get("uri")], "what": what,
                        "data": [data["image_size"], data["channels"], data.get("limit")]},
                       sort_keys=True)
    key = (worker.task.data_key.rsplit("/", 1)[0]
           + f"/encoded/{hashlib.sha256(ident.encode()).hexdigest()[:16]}-{what}.npy")
    try:
        cached = np.load(io.BytesIO(worker.root.get_bytes(key)), allow_pickle=False)
        if len(cached) == len(x):
            worker.log.set_tags({"genforge.encoded_cache": "hit"})
            return torch.from_numpy(cached).to(worker.device)
    except (NotFound, ValueError):
        pass
    worker._progress.update(phase=f"encoding {what}", step=0, total=len(x))
    fn = ae.encode if what == "codes" else ae.encode_latents
    parts = []
    with torch.no_grad():
        for images, _ in x.shards():
            for i in range(0, len(images), ENCODE_BATCH):
                parts.append(fn(as_float(images[i:i + ENCODE_BATCH].to(worker.device))))
                worker._progress["step"] += len(images[i:i + ENCODE_BATCH])
    out = torch.cat(parts)
    out = out.to(torch.int16 if what == "codes" and ae.bottleneck.codebook_size <= 32767
                 else out.dtype)
    buf = io.BytesIO()
    np.save(buf, out.cpu().numpy())
    worker.root.put_bytes(key, buf.getvalue())
    worker.log.set_tags({"genforge.encoded_cache": "miss"})
    return out
