"""Training batches streamed from a staged data set's shards, in an order that is a function of
(seed, epoch, step) alone, with memory bounded by a few shards whatever the data set's size.

The order: epoch e visits the shards in a seeded permutation, `window` shards at a time, and
the samples of each window in a seeded permutation of their own (a shuffle buffer of `window`
shards). Every sample is seen once per epoch. The global batch of step s is positions
[(s - 1) B, s B) of the endless sequence of epochs (B: the batch size, at most the data set).
A job resumed at step s computes the same positions, hence exactly the batches it would have
seen.

Rank r of a data-parallel job of W ranks reads only shards r, r + W, r + 2W, ... (the ranks read
disjoint shards, and so see disjoint samples) and draws its part of each global batch, the r-th
of B split W ways, from its own sequence of epochs over them, ordered by (seed, r, W, epoch).
The order thus depends on the number of ranks, as with any sampler that splits data across
ranks; a data set with fewer shards than ranks is read whole by every rank, which takes the
r-th part of each global batch.

The next window's shards are read on a background thread while the current one trains, so in
steady state a step does not wait on storage; a window is resized and moved to the device when
its first batch needs it. At most three windows are held: the one or two a batch spans, and the one
being read ahead.
"""

from __future__ import annotations

import bisect
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from workers.data import StagedImages, as_tensors

WINDOW = 4  # shards shuffled together (of SHARD_BYTES each: ~128 MB of pixels per window)


class EpochOrder:
    """Which sample (shard, row) is at each position of epoch `e`, window by window."""

    def __init__(self, counts: list[int], seed: int | tuple[int, ...], window: int = WINDOW):
        self.counts, self.window = counts, window
        self.seed = list(seed) if isinstance(seed, tuple) else [seed]
        self.total = sum(counts)
        self._epoch: tuple[int, list[list[int]], list[int]] | None = None
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None

    def windows(self, epoch: int) -> list[list[int]]:
        """The shards of each window of `epoch`, in order."""
        return self._layout(epoch)[1]

    def starts(self, epoch: int) -> list[int]:
        """The position in `epoch` where each window begins."""
        return self._layout(epoch)[2]

    def _layout(self, epoch: int) -> tuple[int, list[list[int]], list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:  # one epoch at a time is asked
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.counts))
            windows = [order[i:i + self.window].tolist() for i in range(0, len(order), self.window)]
            sizes = [sum(self.counts[s] for s in w) for w in windows]
            self._epoch = (epoch, windows, np.cumsum([0] + sizes[:-1]).tolist())
        return self._epoch

    def permutation(self, epoch: int, w: int) -> np.ndarray:
        """The order of window `w`'s samples (indices into its shards' samples, concatenated)."""
        if self._perm is None or self._perm[0] != (epoch, w):
            size = sum(self.counts[s] for s in self.windows(epoch)[w])
            self._perm = ((epoch, w), np.random.default_rng([*self.seed, epoch, w]).permutation(size))
        return self._perm[1]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, window, index among the window's samples) of a position of the stream."""
        epoch, q = divmod(position, self.total)
        starts = self.starts(epoch)
        w = bisect.bisect_right(starts, q) - 1
        return epoch, w, int(self.permutation(epoch, w)[q - starts[w]])

    def locate_many(self, positions: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        """`locate` of many positions at once, grouped: (epoch, window) -> the indices among
        that window's samples, in the positions' order (a batch's: one or two windows)."""
        epochs, q = np.divmod(positions, self.total)
        found: dict[tuple[int, int], np.ndarray] = {}
        for epoch in np.unique(epochs).tolist():
            in_epoch = q[epochs == epoch]
            starts = np.asarray(self.starts(epoch))
            windows = np.searchsorted(starts, in_epoch, side="right") - 1
            for w in np.unique(windows).tolist():
                at = in_epoch[windows == w] - starts[w]
                found[(epoch, w)] = self.permutation(epoch, w)[at]
        return found


class ShardStream:
    """What the training loop draws its batches from when it trains on a staged data set's
    pixels: `batch(step)` is this rank's uint8 images (and labels) of the step, on `device`."""

    def __init__(self, images: StagedImages, *, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world: int = 1, window: int = WINDOW):
        batch_size = min(batch_size, len(images))
        order_seed: int | tuple[int, ...] = seed
        if world > 1 and len(images.keys) >= world:  # this rank's shards, its part of a batch
            images, order_seed = images.part(rank, world), (seed, rank, world)
            batch_size = len(np.array_split(np.arange(batch_size), world)[rank])
            rank, world = 0, 1
        self.images = images
        self.shards = images.keys
        self.order = EpochOrder(images.counts, order_seed, window)
        self.size = images.size
        self.device, self.rank, self.world = device, rank, world
        self.batch_size = min(batch_size, self.order.total)
        self._held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._ahead: dict[tuple[int, int], Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shards")
        self.shape = images.shape
        self.loaded_shards = 0  # shards read so far (a measure of the reads, for tests)
        self.peak_windows = 0  # the most windows held at once

    def __len__(self) -> int:
        return self.order.total

    def labels(self) -> torch.Tensor | None:
        """Every training label, for checks before training."""
        return self.images.labels()

    def _read(self, epoch: int, w: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The window's shards as stored: only I/O and numpy, so that reading ahead on the
        background thread starts no second team of torch's compute threads beside the
        training step's (on a few cores they would fight over them)."""
        parts = []
        for s in self.order.windows(epoch)[w]:
            parts.append(self.images.read(s))
            self.loaded_shards += 1
        return parts

    def _window(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(self.shards) <= self.order.window:  # one window holds it all: read it once
            key = (0, 0)
        if key not in self._held:
            ahead = self._ahead.pop(key, None)
            parts = ahead.result() if ahead is not None else self._read(*key)
            x, y = as_tensors(np.concatenate([p[0] for p in parts]),
                              None if parts[0][1] is None else np.concatenate([p[1] for p in parts]),
                              image_size=self.size[0], channels=self.size[1], uint8=True)
            self._held[key] = (x.to(self.device, non_blocking=True),
                               y.to(self.device, non_blocking=True) if y is not None else None)
            self.peak_windows = max(self.peak_windows, len(self._held) + len(self._ahead))
        return self._held[key]

    def _next(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, w = key
        return (epoch, w + 1) if w + 1 < len(self.order.windows(epoch)) else (epoch + 1, 0)

    def batch(self, step: int, gen: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`gen` is unused: the order is the seed's, epoch's and step's alone.)"""
        first = (step - 1) * self.batch_size
        positions = np.array_split(np.arange(first, first + self.batch_size), self.world)[self.rank]
        located = self.order.locate_many(positions)
        needed = sorted(located)
        for key in list(self._held):  # windows behind this batch are done with
            if key < needed[0] and len(self.shards) > self.order.window:
                del self._held[key]
        xs, ys = [], []
        for key in needed:
            x, y = self._window(key)
            rows = torch.from_numpy(located[key]).to(self.device)
            xs.append(x[rows])
            ys.append(y[rows] if y is not None else None)
        ahead = self._next(needed[-1])
        if len(self.shards) > self.order.window and ahead not in self._held and ahead not in self._ahead:
            self._ahead[ahead] = self._pool.submit(self._read, *ahead)
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        y = None if ys[0] is None else (torch.cat(ys) if len(ys) > 1 else ys[0])
        return x, y

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def staged_images(storage, key: str, job: dict[str, Any]) -> StagedImages:
    """The training split a resolved job reads, as its data section sizes it."""
    data = job["data"]
    return StagedImages(storage, key, image_size=data["image_size"], channels=data["channels"],
                        limit=data.get("limit"))


class InMemory:
    """Batches of a data set held whole on the device (a family's codes or latents): each
    step's batch drawn with replacement by the step's seeded generator."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 rank: int = 0, world: int = 1):
        self.x, self.labels, self.rank, self.world = x, labels, rank, world
        self.batch_size = min(batch_size, len(x))

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(len(self.x), (self.batch_size,), generator=gen, device=self.x.device)
        if self.world > 1:
            idx = idx.chunk(self.world)[self.rank]
        return self.x[idx], self.labels[idx] if self.labels is not None else None
