"""Reading a staged data set (see orchestrator/datasets.py) as tensors in [-1, 1]."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.storage import Storage


def load_images(storage: Storage, key: str, *, image_size: int, channels: int,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, image_size, image_size) float32 in [-1, 1], and int64 labels when present."""
    arrays = np.load(io.BytesIO(storage.get_bytes(key)), allow_pickle=False)
    x, y = arrays["x"], arrays["y"] if "y" in arrays.files else None
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, 3, -1, -1)
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False).clamp(-1, 1)
    labels = torch.from_numpy(y.astype(np.int64)) if y is not None else None
    return images.contiguous(), labels
