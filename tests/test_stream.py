"""Streaming training batches from a staged data set's shards (workers/stream.py): every sample
once per epoch in an order fixed by (seed, epoch, step), at most three windows of shards held,
data-parallel ranks on disjoint shards, exactly the same batches after a
resume; a data set staged before shards is rewritten as shards."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from orchestrator.datasets import heldout_key, read_index, stage
from orchestrator.spec import DataSpec, parse_spec
from orchestrator.storage import open_storage
from orchestrator.task import Task
from workers.data import StagedImages, load_images
from workers.ddpm.worker import DDPMWorker
from workers.stream import EpochOrder, ShardStream

N = 1000  # images whose first two pixels spell their index


@pytest.fixture()
def staged(tmp_path):
    x = np.zeros((N, 8, 8, 1), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = np.arange(N) // 256, np.arange(N) % 256
    np.savez(tmp_path / "ids.npz", x=x, y=np.arange(N) % 10)
    storage = open_storage(f"file://{tmp_path / 'store'}")
    # 64 bytes an image, 40 images a shard: 25 shards in the training split of 900
    key = stage(DataSpec(dataset="npz", path=str(tmp_path / "ids.npz"), image_size=8), storage,
                shard_bytes=64 * 40)
    return storage, key


def ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def stream(staged, limit: int | None = None, **over) -> ShardStream:
    storage, key = staged
    images = StagedImages(storage, key, image_size=8, channels=1, limit=limit)
    kw = {"batch_size": 64, "seed": 3, "device": torch.device("cpu"), "window": 4, **over}
    return ShardStream(images, **kw)


def test_staged_as_bounded_shards_with_an_index(staged):
    storage, key = staged
    index = read_index(storage, key)
    assert index["count"] == 900 and index["shape"] == [8, 8, 1] and index["labelled"]
    assert [s["count"] for s in index["shards"]] == [40] * 22 + [20]
    x, y = load_images(storage, key, image_size=8, channels=1, uint8=True)
    hx, _ = load_images(storage, heldout_key(key), image_size=8, channels=1, uint8=True)
    assert sorted(ids(x) + ids(hx)) == list(range(N))  # split, whole, nothing twice
    assert torch.equal(y, torch.tensor([i % 10 for i in ids(x)]))


def test_each_epoch_visits_every_sample_once_in_its_own_order():
    order = EpochOrder([40] * 22 + [20], seed=3, window=4)
    epochs = [[order.locate(e * 900 + q) for q in range(900)] for e in range(2)]
    for located in epochs:
        pairs = {(tuple(order.windows(e)[w]), i) for e, w, i in located}
        assert len(pairs) == 900
    assert epochs[0] != [(0, w, i) for _, w, i in epochs[1]]
    again = EpochOrder([40] * 22 + [20], seed=3, window=4)
    assert [again.locate(q) for q in range(900)] == epochs[0]


def test_a_batch_is_located_at_once_as_one_position_at_a_time():
    order = EpochOrder([40] * 22 + [20], seed=3, window=4)
    for first in (0, 150, 880, 1790):  # inside a window, across windows, across epochs
        positions = np.arange(first, first + 64)
        one_by_one: dict[tuple[int, int], list[int]] = {}
        for e, w, i in (order.locate(int(p)) for p in positions):
            one_by_one.setdefault((e, w), []).append(i)
        at_once = order.locate_many(positions)
        assert {k: v.tolist() for k, v in at_once.items()} == one_by_one
        assert list(at_once) == sorted(at_once)


def test_batches_cover_an_epoch_with_three_windows_at_most(staged):
    s = stream(staged)
    seen, labels = [], []
    for step in range(1, 900 // 64 + 1):  # 14 whole batches: 896 of the epoch's 900
        x, y = s.batch(step)
        assert x.dtype == torch.uint8 and x.shape == (64, 1, 8, 8)
        seen += ids(x)
        labels += y.tolist()
    s.close()
    assert len(set(seen)) == len(seen) == 896
    assert labels == [i % 10 for i in seen]
    assert s.peak_windows <= 3 and s.loaded_shards <= 23 + 4  # about one pass, one window ahead
    # shuffled across shards, not read in staged order
    assert seen[:64] != sorted(seen[:64]) and len({i // 40 for i in seen[:64]}) > 1


def test_ranks_read_disjoint_shards_and_together_see_the_epoch(staged):
    r0, r1 = stream(staged, rank=0, world=2), stream(staged, rank=1, world=2)
    seen: list[set[int]] = [set(), set()]
    for step in range(1, 15):  # 14 global batches of 64: about one epoch of 900
        for r, s in enumerate((r0, r1)):
            x, y = s.batch(step)
            assert x.shape == (32, 1, 8, 8) and y.tolist() == [i % 10 for i in ids(x)]
            seen[r] |= set(ids(x))
    assert not seen[0] & seen[1]  # disjoint samples...
    assert len(seen[0] | seen[1]) >= 850  # ...that together cover nearly the epoch
    images = StagedImages(*staged, image_size=8, channels=1)  # which shard holds each sample
    shard = {i: k for k, (x, _) in enumerate(images.shards()) for i in ids(x)}
    assert {shard[i] % 2 for i in seen[0]} == {0} and {shard[i] % 2 for i in seen[1]} == {1}
    # each rank reads only its own shards: half of the 23
    assert r0.shards == images.keys[0::2] and r1.shards == images.keys[1::2]
    assert r1.loaded_shards <= 11 + 4 + 4  # an epoch of its 420, the next one's first window, one ahead
    again = stream(staged, rank=1, world=2)  # a resumed rank draws the same batches
    assert [ids(again.batch(step)[0]) for step in (9, 10)] == [ids(r1.batch(step)[0]) for step in (9, 10)]
    for s in (r0, r1, again):
        s.close()


def test_fewer_shards_than_ranks_split_each_global_batch(tmp_path):
    x = np.zeros((100, 8, 8, 1), np.uint8)
    x[:, 0, 1, 0] = np.arange(100)
    np.savez(tmp_path / "few.npz", x=x)
    storage = open_storage(f"file://{tmp_path / 'store'}")
    key = stage(DataSpec(dataset="npz", path=str(tmp_path / "few.npz"), image_size=8), storage)
    images = StagedImages(storage, key, image_size=8, channels=1)
    assert len(images.keys) == 1
    kw = {"batch_size": 30, "seed": 0, "device": torch.device("cpu")}
    whole, r0, r1 = (ShardStream(images, **kw), ShardStream(images, rank=0, world=2, **kw),
                     ShardStream(images, rank=1, world=2, **kw))
    for step in (1, 4):  # 4: across the epoch's end
        a, b, both = ids(r0.batch(step)[0]), ids(r1.batch(step)[0]), ids(whole.batch(step)[0])
        assert len(a) == len(b) == 15 and not set(a) & set(b) and sorted(a + b) == sorted(both)


def test_a_resumed_stream_draws_the_same_batches(staged):
    straight = stream(staged)
    batches = [ids(straight.batch(step)[0]) for step in range(1, 31)]
    resumed = stream(staged)
    assert [ids(resumed.batch(step)[0]) for step in range(17, 31)] == batches[16:]
    assert stream(staged, seed=4).batch(1)[0].tolist() != straight.batch(1)[0].tolist()
    straight.close()
    resumed.close()


def test_a_limit_takes_the_first_images_in_staged_order(staged):
    storage, key = staged
    s = stream(staged, limit=100)
    x, _ = load_images(storage, key, image_size=8, channels=1, uint8=True, limit=100)
    assert len(s) == 100
    seen = [i for step in range(1, 5) for i in ids(s.batch(step)[0])]  # 2.56 epochs of 100
    assert set(seen) == set(ids(x)) and len(seen) == 256
    s.close()


def test_a_data_set_staged_before_shards_is_rewritten_as_shards(tmp_path):
    storage = open_storage(f"file://{tmp_path / 'store'}")
    data = DataSpec(dataset="digits", image_size=8)
    key = stage(data, storage)
    folder = key.rsplit("/", 1)[0]
    x, y = load_images(storage, key, image_size=8, channels=1, uint8=True)
    for name in storage.list(folder + "/"):  # as an earlier release staged it
        if name != heldout_key(key):
            storage.delete(name)
    buf = io.BytesIO()
    np.savez(buf, x=x.permute(0, 2, 3, 1).numpy(), y=y.numpy())
    storage.put_bytes(f"{folder}/data.npz", buf.getvalue())
    assert stage(data, storage) == key
    again, labels = load_images(storage, key, image_size=8, channels=1, uint8=True)
    assert torch.equal(again, x) and torch.equal(labels, y)


def train_task(tmp_path, steps: int, prefix: str, attempt: int = 1) -> Task:
    spec = parse_spec({"experiment": "s", "jobs": [{
        "name": "ddpm", "kind": "train", "family": "ddpm",
        "model": {"channels": 8, "channel_mult": [1], "timesteps": 50},
        "data": {"dataset": "digits", "image_size": 8, "augment": {"hflip": True}},
        "train": {"steps": steps, "batch_size": 256, "log_every": 1, "checkpoint_every": 2,
                  "sample_images": 2}}]})
    root = f"file://{tmp_path / 'store'}"
    # 64 bytes an image, 100 a shard: 17 shards, 5 windows, an epoch every 6.3 steps
    key = stage(spec.jobs[0].data, open_storage(root), shard_bytes=6400)
    return Task(job=spec.jobs[0].resolved(), job_hash="0" * 16, experiment="s",
                storage_root=root, prefix=prefix, tracking_uri="", run_id=None,
                code_version="test", data_key=key, attempt=attempt)


def test_a_resumed_streaming_job_ends_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    from orchestrator.checkpoints import load_checkpoint

    torch.manual_seed(0)
    assert DDPMWorker(train_task(tmp_path, 10, "s/straight")).run()["step"] == 10
    torch.manual_seed(0)
    assert DDPMWorker(train_task(tmp_path, 6, "s/resumed")).run()["step"] == 6
    resumed = DDPMWorker(train_task(tmp_path, 10, "s/resumed", attempt=2)).run()
    assert resumed["timing"]["steps_run"] == 4
    root = open_storage(f"file://{tmp_path / 'store'}")
    a, b = (load_checkpoint(root.child(p)) for p in ("s/straight", "s/resumed"))
    assert a.step == b.step == 10
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def test_take_reads_only_the_shards_that_hold_the_positions(staged, monkeypatch):
    storage, key = staged
    images = StagedImages(storage, key, image_size=8, channels=1)
    whole, _ = load_images(storage, key, image_size=8, channels=1, uint8=True)
    read, reads = StagedImages.read, []
    monkeypatch.setattr(StagedImages, "read", lambda self, i: reads.append(i) or read(self, i))
    positions = torch.tensor([899, 3, 41, 40, 5])  # shards 22, 0, 1, 1, 0: in the order given
    assert torch.equal(images.take(positions), whole[positions])
    assert reads == [0, 1, 22]  # each once, in staged order
