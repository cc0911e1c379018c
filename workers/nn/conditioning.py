"""Class conditioning and classifier-free guidance (Ho & Salimans 2022), for any network
called as `net(x, t, y)` whose label embedding has one extra row, index `num_classes`, for
"no label".

Training drops each label to that null label with probability p, so one network learns the
conditional and the unconditional model. Sampling mixes the two predictions with scale s:
    pred = pred(x, t, ∅) + s · (pred(x, t, y) − pred(x, t, ∅))
s = 0 is the unconditional model, s = 1 the conditional one, s > 1 guided. The mix is linear,
so it holds for ε, v, x_0 and flow-matching velocity predictions alike.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

Predictor = Callable[[Tensor, Tensor], Tensor]


def check_labels(labels: Tensor | None, num_classes: int) -> str | None:
    """Why `labels` cannot train a model of `num_classes` classes, or None."""
    if labels is None:
        return "model.class_conditional: the data set has no labels"
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        return (f"model.num_classes: labels run from {low} to {high}, outside "
                f"0..{num_classes - 1}")
    return None


def class_labels(n: int, num_classes: int, label: int | None, start: int,
                 device: torch.device) -> Tensor:
    """Labels of `n` samples: all `label`, or (None) cycling through the classes from the
    `start`-th sample on, so that any run of samples covers the classes evenly."""
    if label is not None:
        return torch.full((n,), label, device=device, dtype=torch.long)
    return torch.arange(start, start + n, device=device) % num_classes


def drop_labels(y: Tensor, p: float, num_classes: int, generator: torch.Generator | None
                ) -> Tensor:
    """`y` with each label replaced by the null label (`num_classes`) with probability `p`."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def conditioned(net: nn.Module | Callable, y: Tensor | None) -> Predictor:
    """`net` with its labels bound: called as (x, t). Without labels, `net` itself."""
    if y is None:
        return net
    return lambda x, t: net(x, t, y)


def guided(net: nn.Module | Callable, y: Tensor | None, scale: float, num_classes: int
           ) -> Predictor:
    """The classifier-free-guided prediction of `net` for labels `y` at scale `scale`, as
    (x, t) -> prediction. One batched call per step when both predictions are needed."""
    if y is None or scale == 1:
        return conditioned(net, y)
    null = torch.full_like(y, num_classes)
    if scale == 0:
        return conditioned(net, null)

    def predict(x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(len(x)) if t.ndim == 0 else t
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return predict
