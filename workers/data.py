"""Reading a staged data set (see orchestrator/datasets.py): as tensors in [-1, 1], or as uint8
pixels (a quarter of the memory, on the host and on the device) that a training loop converts
batch by batch on its device."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.storage import Storage


def load_images(storage: Storage, key: str, *, image_size: int, channels: int,
                limit: int | None = None, uint8: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, image_size, image_size) float32 in [-1, 1] (with `uint8`: pixels 0-255, resized
    images rounded back to whole pixels as an image pipeline stores them), and int64 labels
    when present."""
    arrays = np.load(io.BytesIO(storage.get_bytes(key)), allow_pickle=False)
    x, y = arrays["x"], arrays["y"] if "y" in arrays.files else None
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    labels = torch.from_numpy(y.astype(np.int64)) if y is not None else None
    resize = images.shape[-1] != image_size or images.shape[-2] != image_size
    if uint8 and not resize and images.shape[1] in (1, channels):
        return images.expand(-1, channels, -1, -1).contiguous(), labels
    images = images.float() / 127.5 - 1
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, 3, -1, -1)
    if resize:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False).clamp(-1, 1)
    if uint8:
        return ((images + 1) * 127.5).round_().to(torch.uint8).contiguous(), labels
    return images.contiguous(), labels


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from uint8 pixels, on the device they are on; anything else as is."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
