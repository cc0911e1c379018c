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
        self._paired: nn.Module | None = None
        self._pairs_of: tuple[list[torch.Tensor], ...] = ()

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """The shadow's parameters and buffers beside `model`'s, by name; paired once per
        model (training updates its tensors in place), not on every step."""
        if self._paired is not model:
            shadow = dict(self.module.named_parameters())
            shadow_buffers = dict(self.module.named_buffers())
            params = list(model.named_parameters())
            buffers = list(model.named_buffers())
            self._pairs_of = ([shadow[n] for n, _ in params], [p for _, p in params],
                              [shadow_buffers[n] for n, _ in buffers], [b for _, b in buffers])
            self._paired = model
        return self._pairs_of

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
        shadow, params, shadow_buffers, buffers = self._pairs(model)
        # lerp: shadow <- shadow + (1 - d) (param - shadow) = d shadow + (1 - d) param
        torch._foreach_lerp_(shadow, params, 1.0 - d)
        # Buffers (e.g. BatchNorm statistics) are not averaged, just tracked.
        if buffers:
            torch._foreach_copy_(shadow_buffers, buffers)
        self.num_updates += 1

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Start averaging afresh from `model`'s weights, as a new ``EMA(model)`` would, in the
        same shadow (no copy of `model`'s module object: it may be compiled)."""
        self.module.load_state_dict(model.state_dict())
        self.num_updates = 0

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
