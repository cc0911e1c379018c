"""Autoregressive image model over VQGAN tokens (the second stage of taming-transformers): a
decoder-only transformer learns p(t_i | t_<i [, class]) over the raster-ordered code indices of a
frozen VQGAN, which tokenizes the data set once (cached in storage) and decodes sampled tokens
back to images. Sampling: temperature, top-k, top-p, with a KV cache."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from workers.autoencoder import ENCODE_BATCH, encode_dataset, heldout_images, load_first_stage
from workers.base import JobError, Worker
from workers.nn.conditioning import check_labels, class_labels
from workers.nn.distillation import kd_loss
from workers.autoregressive.transformer import Transformer


class ARWorker(Worker):
    streams = False  # trains on the data set encoded whole (`prepare_data`)
    family = "autoregressive"

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        self.cfg = model_cfg
        self.vq = load_first_stage(self, "tokenizer", "model.tokenizer", ("vqgan",))
        _, h, w = self.vq.latent_shape(image_shape)
        self.token_shape = (h, w)
        self.tokens_per_item = h * w
        self.num_classes = model_cfg["num_classes"] if model_cfg["class_conditional"] else 0
        net = Transformer(vocab_size=self.vq.bottleneck.codebook_size, seq_len=h * w,
                          num_classes=self.num_classes, dim=model_cfg["dim"],
                          layers=model_cfg["layers"], heads=model_cfg["heads"],
                          dropout=model_cfg["dropout"]).to(self.device)
        self.modules = {"net": net}
        self.emas = self.averaged(net=net)
        self._sampled, self._tokens, self._token_s = 0, 0, 0.0

    def prepare_data(self, x: torch.Tensor, labels: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        codes = encode_dataset(self, "tokenizer", x, "codes").long().reshape(len(x), -1)
        problem = check_labels(labels, self.num_classes) if self.num_classes else None
        if problem:
            raise JobError(problem)
        return codes, labels

    @torch.no_grad()
    def final_metrics(self) -> dict[str, float]:
        """The model's fit to images it never trained on: nats per token (and perplexity) of
        the sampling weights over the tokenizer's codes of the held-out split's first
        HOLDOUT_MAX images, the figure to compare transformers on one tokenizer by; with an
        EMA, the raw weights' too, which fit better early in a run, while the average lags
        (`sample.use_ema: false` samples from them; `train.ema_decay: 0` keeps no average)."""
        x, y = heldout_images(self)
        codes = [(self.vq.encode(x[i:i + ENCODE_BATCH]).long().reshape(-1, self.tokens_per_item),
                  y[i:i + ENCODE_BATCH] if self.num_classes else None)
                 for i in range(0, len(x), ENCODE_BATCH)]
        nats = self._nats_per_token(self.sampling_module("net"), codes)
        out = {"holdout_nats_per_token": nats, "holdout_perplexity": math.exp(nats)}
        if "net" in self.emas:
            out["holdout_nats_per_token_raw"] = self._nats_per_token(self.modules["net"], codes)
        return out

    @staticmethod
    def _nats_per_token(net: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor | None]]
                        ) -> float:
        was_training, total, count = net.training, 0.0, 0
        net.eval()
        try:
            for codes, labels in batches:
                total += float(net.loss(codes, labels)) * codes.numel()  # its mean, summed
                count += codes.numel()
        finally:
            net.train(was_training)
        return total / count

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> None:
        self.optimizers = {"net": torch.optim.AdamW(self.modules["net"].parameters(),
                                                    lr=train_cfg["lr"], betas=(0.9, 0.95),
                                                    weight_decay=0.01)}

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
        loss = self.modules["net"].loss(batch, labels if self.num_classes else None)
        self.optimize(loss, "net")
        return {"loss": loss.detach(), "perplexity": loss.detach().exp()}

    def distill_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg, cond = self.job["distill"], labels if self.num_classes else None
        with torch.no_grad():
            teacher_logits = self.teacher["net"].logits(batch, cond)
        losses = kd_loss(self.modules["net"].logits(batch, cond), teacher_logits, batch,
                         temperature=cfg["temperature"], alpha=cfg["alpha"])
        self.optimize(losses["loss"], "net")
        return {k: v.detach() for k, v in losses.items()}

    def teacher_generate(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.generate(n, None, gen, net=self.teacher["net"])

    def generate(self, n: int, sample_cfg: dict[str, Any] | None, gen: torch.Generator,
                 progress: Callable[[int, int], None] | None = None,
                 net: torch.nn.Module | None = None) -> torch.Tensor:
        """Images from `net` (default: the weights this worker samples with)."""
        cfg = sample_cfg or {}
        labels = None
        if self.num_classes:
            label = cfg.get("label")
            if label is not None and label >= self.num_classes:
                raise JobError(f"sample.label: {label} but the model has {self.num_classes} classes")
            labels = class_labels(n, self.num_classes, label, self._sampled, self.device)
        net = net or self.sampling_module("net")
        was_training = net.training
        net.eval()
        self.synchronize()
        t0 = time.perf_counter()
        try:
            tokens = net.generate(n, labels=labels, temperature=cfg.get("temperature", 1.0),
                                  top_k=cfg.get("top_k"), top_p=cfg.get("top_p"),
                                  use_cache=cfg.get("use_cache", True), generator=gen,
                                  progress=progress)
        finally:
            net.train(was_training)
        if sample_cfg is not None:
            self.synchronize()
            self._sampled += n
            self._tokens += tokens.numel()
            self._token_s += time.perf_counter() - t0
        return self.vq.decode(tokens.view(n, *self.token_shape)).clamp(-1, 1)

    def sample_stats(self) -> dict[str, float]:
        return {"tokens_per_s": self._tokens / max(self._token_s, 1e-9)}
