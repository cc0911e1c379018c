"""Reading a staged data set (see orchestrator/datasets.py) whole: as tensors in [-1, 1], or as
uint8 pixels (a quarter of the memory, on the host and on the device) that a training loop
converts batch by batch on its device. A training job on pixels streams it instead
(workers/stream.py)."""

from __future__ import annotations

import copy
import io
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.datasets import INDEX, read_index
from orchestrator.storage import Storage


def read_arrays(storage: Storage, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The uint8 (N, H, W, C) images and labels of one staged npz (a shard, a held-out split)."""
    arrays = np.load(io.BytesIO(storage.get_bytes(key)), allow_pickle=False)
    return arrays["x"], arrays["y"] if "y" in arrays.files else None


def load_images(storage: Storage, key: str, *, image_size: int, channels: int,
                limit: int | None = None, uint8: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A whole staged split (a training set's index, whose shards are read one after another,
    or a held-out npz) as (N, C, image_size, image_size) float32 in [-1, 1] (with `uint8`:
    pixels 0-255), and int64 labels when present."""
    if not key.endswith(INDEX):
        x, y = read_arrays(storage, key)
        if limit is not None:
            x, y = x[:limit], (y[:limit] if y is not None else None)
        return as_tensors(x, y, image_size=image_size, channels=channels, uint8=uint8)
    staged = StagedImages(storage, key, image_size=image_size, channels=channels, limit=limit)
    parts = list(staged.shards(uint8=uint8))
    return torch.cat([p[0] for p in parts]), staged.labels()


class StagedImages:
    """A staged training split (its index at `key`), read a shard at a time: its size, shape
    and labels from the index, its images (the first `limit`, in staged order) shard by
    shard, so that nothing needs it whole."""

    def __init__(self, storage: Storage, key: str, *, image_size: int, channels: int,
                 limit: int | None = None):
        self.storage, self.folder = storage, key.rsplit("/", 1)[0]
        self.index = read_index(storage, key)
        self.size = (image_size, channels)
        self.keys: list[str] = []
        self.counts: list[int] = []
        left = limit if limit is not None else self.index["count"]
        for shard in self.index["shards"]:
            if left <= 0:
                break
            self.keys.append(shard["key"])
            self.counts.append(min(shard["count"], left))
            left -= self.counts[-1]
        self.shape = (channels, image_size, image_size)
        self.total = sum(self.counts)  # the whole split's, also in a rank's `part`

    def __len__(self) -> int:
        return sum(self.counts)

    def part(self, rank: int, world: int) -> "StagedImages":
        """Rank `rank`'s shards of `world`: every world-th shard from the rank-th, so that the
        ranks of a data-parallel job read disjoint shards."""
        part = copy.copy(self)
        part.keys, part.counts = self.keys[rank::world], self.counts[rank::world]
        return part

    def labels(self) -> torch.Tensor | None:
        """Every label of the split (an object of its own, 8 bytes an image), or None."""
        if not self.index["labelled"]:
            return None
        labels = np.load(io.BytesIO(self.storage.get_bytes(f"{self.folder}/labels.npy")))
        return torch.from_numpy(labels[:self.total].astype(np.int64))

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Shard `i` as stored (to its count under `limit`)."""
        x, y = read_arrays(self.storage, f"{self.folder}/{self.keys[i]}")
        n = self.counts[i]
        return x[:n], (y[:n] if y is not None else None)

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The uint8 images at `positions` (in staged order), in the order given: only the
        shards that hold them are read, one at a time."""
        positions = positions.long()
        out = torch.empty((len(positions), *self.shape), dtype=torch.uint8)
        start = 0
        for i, count in enumerate(self.counts):
            mine = ((positions >= start) & (positions < start + count)).nonzero().flatten()
            if len(mine):
                x, _ = as_tensors(*self.read(i), image_size=self.size[0], channels=self.size[1],
                                  uint8=True)
                out[mine] = x[positions[mine] - start]
            start += count
        return out

    def shards(self, uint8: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each shard's images (and labels), converted, in staged order."""
        for i in range(len(self.keys)):
            yield as_tensors(*self.read(i), image_size=self.size[0], channels=self.size[1],
                             uint8=uint8)


def as_tensors(x: np.ndarray, y: np.ndarray | None, *, image_size: int, channels: int,
               uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Staged uint8 (N, H, W, C) images as (N, C, image_size, image_size) float32 in [-1, 1]
    (with `uint8`: pixels 0-255, resized images rounded back to whole pixels as an image
    pipeline stores them), and int64 labels."""
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


def augment(batch: torch.Tensor, cfg: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """`data.augment` applied to a batch of images, with draws from `gen` (the step's)."""
    if cfg.get("hflip"):
        flip = torch.rand(len(batch), generator=gen, device=batch.device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if cfg.get("crop"):
        batch = random_crop(batch, cfg["crop"], gen)
    return batch


def random_crop(batch: torch.Tensor, min_area: float, gen: torch.Generator) -> torch.Tensor:
    """Each image's random square crop of a uniform fraction in [min_area, 1] of its area, at a
    uniform position, resized back to the image's size: one bilinear resampling of the batch."""
    n = len(batch)
    u = torch.rand(n, 3, generator=gen, device=batch.device)
    side = (min_area + (1 - min_area) * u[:, 0]).sqrt()  # of the image's side
    theta = torch.zeros(n, 2, 3, device=batch.device)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = (1 - side)[:, None] * (2 * u[:, 1:] - 1)  # the centre, crop inside
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from uint8 pixels, on the device they are on; anything else as is."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
