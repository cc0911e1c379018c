"""Images between tensors in [-1, 1] and uint8 arrays, grids and PNG bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, *, pad: int = 1, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) uint8 image, near-square, upscaled by `scale`."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, "PNG")
    return buf.getvalue()


def display_scale(size: int) -> int:
    """Small images are upscaled in grids so they can be seen in the MLflow UI."""
    return max(1, 64 // size)
