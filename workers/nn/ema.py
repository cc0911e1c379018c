"""Exponential moving average of model weights, kept in a frozen shadow copy of the model."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """``ema.module`` is a ready-to-use model for sampling; call ``update(model)`` after each optimizer step.

    With ``warmup`` the decay after n previous updates is min(decay, (1 + n) / (10 + n)), so the
    average is not dominated by the random initialisation early in training.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """Decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step: every parameter in one fused call (a loop of one small kernel
        per parameter costs more than the arithmetic on a GPU), the same numbers as
        ``shadow.lerp_(param, 1 - d)`` one by one."""
        d = self.current_decay()
        shadow = dict(self.module.named_parameters())
        names = [name for name, _ in model.named_parameters()]
        params = [p.detach().to(shadow[name].dtype) for name, p in model.named_parameters()]
        # lerp: shadow <- shadow + (1 - d) (param - shadow) = d shadow + (1 - d) param
        torch._foreach_lerp_([shadow[name] for name in names], params, 1.0 - d)
        # Buffers (e.g. BatchNorm statistics) are not averaged, just tracked.
        shadow_buffers = dict(self.module.named_buffers())
        buffers = list(model.named_buffers())
        if buffers:
            torch._foreach_copy_([shadow_buffers[name] for name, _ in buffers],
                                 [buf for _, buf in buffers])
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the averaged ones."""
        model.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])
