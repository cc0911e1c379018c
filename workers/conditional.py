"""What the harness adds for a class-conditional network with classifier-free guidance
(workers/nn/conditioning.py): the diffusion-type families' workers derive from it."""

from __future__ import annotations

from typing import Any, Callable

import torch

from workers.base import JobError, Worker
from workers.config import DEFAULT_GUIDANCE
from workers.nn.conditioning import check_labels, class_labels, conditioned, drop_labels


class ConditionalWorker(Worker):
    num_classes = 0  # 0: unconditional

    def conditioning(self, model_cfg: dict[str, Any]) -> int:
        """Read the model section's conditioning; the classes the network embeds (0: none)."""
        self.num_classes = model_cfg["num_classes"] if model_cfg.get("class_conditional") else 0
        self.label_dropout = model_cfg.get("label_dropout", 0.0)
        self.baked_guidance = model_cfg.get("distilled_guidance")
        self._sampled = 0  # samples made so far: unset labels cycle through the classes
        return self.num_classes

    def checked_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The training labels the network reads (None for an unconditional one)."""
        if not self.num_classes:
            return None
        problem = check_labels(labels, self.num_classes)
        if problem:
            raise JobError(problem)
        return labels

    def conditioned_net(self, labels: torch.Tensor | None, gen: torch.Generator) -> Callable:
        """The training network as (x, t) -> prediction, with this batch's labels, each dropped
        to "no label" with probability `label_dropout` (an unconditional net: itself)."""
        net = self.modules["net"]
        if labels is None or not self.num_classes:
            return net
        return conditioned(net, drop_labels(labels, self.label_dropout, self.num_classes, gen))

    def guidance_settings(self, sample_cfg: dict[str, Any] | None) -> dict[str, Any]:
        """`label` and `guidance` as sampling applies them (none for an unconditional model;
        a student distilled from a guided teacher has its teacher's built in, and samples with
        the conditional prediction)."""
        if not self.num_classes:
            return {}
        cfg = sample_cfg or {}
        if self.baked_guidance is not None:  # the conditional prediction: scale 1
            return {"label": cfg.get("label"), "guidance": 1.0,
                    "distilled_guidance": self.baked_guidance}
        guidance = cfg.get("guidance")
        return {"label": cfg.get("label"),
                "guidance": DEFAULT_GUIDANCE if guidance is None else guidance}

    def sample_labels(self, n: int, sample_cfg: dict[str, Any] | None) -> torch.Tensor | None:
        """The classes of the next `n` samples: `sample.label`, or cycling through them."""
        if not self.num_classes:
            return None
        label = (sample_cfg or {}).get("label")
        if label is not None and label >= self.num_classes:
            raise JobError(f"sample.label: {label} but the model has {self.num_classes} classes")
        labels = class_labels(n, self.num_classes, label, self._sampled, self.device)
        self._sampled += n
        return labels
