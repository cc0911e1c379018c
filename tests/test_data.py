"""Staging real data (MNIST IDX, Fashion-MNIST npz, digits) and reading it back as tensors."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.datasets import DataError, heldout_key, parse_idx, read_index, stage
from orchestrator.spec import DataSpec
from orchestrator.storage import FileStorage
from workers.data import StagedImages, as_float, load_images

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MNIST = DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = DATA / "mnist" / "t10k-labels-idx1-ubyte.gz"
FASHION = DATA / "fashion-mnist" / "test.npz"
needs_data = pytest.mark.skipif(not MNIST.exists(), reason="../shared/data is not present")


@pytest.fixture()
def storage(tmp_path) -> FileStorage:
    return FileStorage(tmp_path / "store")


def test_digits_staged_once_and_scaled(storage):
    spec = DataSpec(dataset="digits", image_size=16)
    key = stage(spec, storage)
    assert key.startswith("datasets/") and key.endswith("/index.json")
    assert stage(spec, storage) == key
    folder = key.rsplit("/", 1)[0]
    assert sorted(storage.list("datasets/")) == sorted(
        [key, heldout_key(key), f"{folder}/labels.npy", f"{folder}/shards/train-000000.npz"])
    x, y = load_images(storage, key, image_size=16, channels=1)
    # a seeded 10% is held out: 180 of 1797
    assert x.shape == (1617, 1, 16, 16) and y.shape == (1617,)
    hx, hy = load_images(storage, heldout_key(key), image_size=16, channels=1)
    assert hx.shape == (180, 1, 16, 16)
    assert np.bincount(torch.cat([y, hy]).numpy()).sum() == 1797
    # the split is part of the key: another seed is another staged data set
    other = stage(DataSpec(dataset="digits", image_size=16, split={"seed": 1}), storage)
    assert other != key
    assert not torch.equal(load_images(storage, heldout_key(other), image_size=16, channels=1)[0], hx)
    assert float(x.min()) == pytest.approx(-1.0) and float(x.max()) == pytest.approx(1.0, abs=0.05)
    assert sorted(set(y.tolist())) == list(range(10))


@needs_data
def test_mnist_idx_with_labels(storage):
    # an explicit held-out file: the data itself stays whole and in order
    key = stage(DataSpec(dataset="idx", path=str(MNIST), labels=str(MNIST_LABELS),
                         split={"heldout": str(MNIST), "heldout_labels": str(MNIST_LABELS)}), storage)
    assert load_images(storage, heldout_key(key), image_size=28, channels=1)[0].shape[0] == 10000
    x, y = load_images(storage, key, image_size=28, channels=1, limit=500)
    assert x.shape == (500, 1, 28, 28) and y.shape == (500,)
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the MNIST test set's first labels
    assert (x.amin(dim=(1, 2, 3)) == -1).all()  # black backgrounds
    small, _ = load_images(storage, key, image_size=16, channels=3, limit=4)
    assert small.shape == (4, 3, 16, 16) and small.abs().max() <= 1


@needs_data
def test_fashion_npz(storage):
    key = stage(DataSpec(dataset="npz", path=str(FASHION)), storage)
    x, y = load_images(storage, key, image_size=28, channels=1)
    hx, hy = load_images(storage, heldout_key(key), image_size=28, channels=1)
    assert x.shape == (9000, 1, 28, 28) and hx.shape == (1000, 1, 28, 28)
    assert (np.bincount(y.numpy()) + np.bincount(hy.numpy())).tolist() == [1000] * 10


def test_npz_without_the_named_key(tmp_path, storage):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"no array 'x' \(has: images\)"):
        stage(DataSpec(dataset="npz", path=str(path)), storage)
    key = stage(DataSpec(dataset="npz", path=str(path), x_key="images", y_key=None), storage)
    x, y = load_images(storage, key, image_size=8, channels=1)
    assert x.shape == (2, 1, 8, 8) and y is None  # one of three held out


@needs_data
def test_truncated_idx_is_refused(tmp_path):
    raw = gzip.decompress(MNIST.read_bytes())
    with pytest.raises(DataError, match="truncated"):
        parse_idx(raw[:5000], "cut.idx")
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x02\x03\x04" + raw[4:100], "junk.idx")
    with pytest.raises(DataError, match="corrupt gzip"):
        parse_idx(gzip.compress(raw)[:1000], "cut.gz")


def test_missing_file_names_it(storage):
    with pytest.raises(DataError, match="nope.npz: cannot read"):
        stage(DataSpec(dataset="npz", path="nope.npz"), storage)


def test_labels_must_match_images(tmp_path, storage):
    path = tmp_path / "d.npz"
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((3, 8, 8), np.uint8), y=np.zeros(2, np.int64))
    path.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="3 images but 2 labels"):
        stage(DataSpec(dataset="npz", path=str(path)), storage)


def test_class_conditional_model_on_unlabelled_data_is_refused_at_staging(tmp_path):
    """An npz whose label key is absent stages fine, but a class-conditional transformer over
    it is a spec error (exit 2) before anything runs; labelled data passes."""
    from orchestrator.driver import Driver
    from orchestrator.plan import build_plan
    from orchestrator.settings import Settings
    from orchestrator.spec import SpecError, parse_spec
    from orchestrator.storage import S3Credentials

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "plain.npz", x=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8))
    np.savez(tmp_path / "labelled.npz", x=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8),
             y=np.arange(20) % 2)

    def driver(path: str) -> Driver:
        spec = parse_spec({"experiment": "t", "defaults": {"data": {
            "dataset": "npz", "path": path, "image_size": 8}}, "jobs": [
            {"name": "vq", "kind": "train", "family": "vqgan", "model": {"channel_mult": [1, 2]}},
            {"name": "ar", "kind": "train", "family": "autoregressive",
             "model": {"tokenizer": "vq", "class_conditional": True}}]},
            source=str(tmp_path / "s.yaml"))
        settings = Settings(ray_address="", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                            storage=f"file://{tmp_path / 'store'}", s3=S3Credentials(None, None, None))
        return Driver(build_plan(spec), settings)

    with pytest.raises(SpecError) as info:
        driver("plain.npz").prepare()
    assert info.value.lines == [f"{tmp_path / 's.yaml'}: job 'ar': data: plain.npz has no labels "
                                "('y'), which the model.class_conditional needs"]
    driver("labelled.npz").prepare()


def write_png(path, array) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_of_images_one_class_per_subfolder(tmp_path, storage):
    rng = np.random.default_rng(0)
    for cls, count in (("boots", 6), ("shirts", 4)):
        for i in range(count):  # sizes differ: staging resizes
            write_png(tmp_path / "imgs" / cls / f"{i}.png",
                      rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8))
    spec = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), image_size=8, channels=1,
                    split={"fraction": 0.2})
    key = stage(spec, storage)
    x, y = load_images(storage, key, image_size=8, channels=1)
    hx, hy = load_images(storage, heldout_key(key), image_size=8, channels=1)
    assert x.shape == (8, 1, 8, 8) and hx.shape == (2, 1, 8, 8)
    assert sorted(torch.cat([y, hy]).tolist()) == [0] * 6 + [1] * 4  # boots=0, shirts=1

    (tmp_path / "imgs" / "shirts" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"shirts/notes.txt is not a PNG or JPEG file"):
        stage(spec, storage)
    (tmp_path / "imgs" / "shirts" / "notes.txt").unlink()
    (tmp_path / "imgs" / "shirts" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"shirts/broken.png is not a readable image"):
        stage(spec, storage)
    with pytest.raises(DataError, match=r"no class subfolders"):
        stage(DataSpec(dataset="folder", path=str(tmp_path / "imgs" / "boots")), storage)


def test_evaluation_needs_enough_held_out_images_and_labels(tmp_path):
    """num_samples above the held-out split, or unlabelled data (the feature network is a
    classifier): one line each at staging, before anything runs."""
    from orchestrator.driver import Driver
    from orchestrator.plan import build_plan
    from orchestrator.settings import Settings
    from orchestrator.spec import SpecError, parse_spec
    from orchestrator.storage import S3Credentials

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "plain.npz", x=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8))

    def staged(data: dict, num_samples: int) -> None:
        spec = parse_spec({"experiment": "t", "defaults": {"data": {"image_size": 8, **data}},
                           "jobs": [{"name": "gan", "kind": "train", "family": "gan"},
                                    {"name": "score", "kind": "evaluate", "from": ["gan"],
                                     "evaluate": {"num_samples": num_samples}}]},
                          source=str(tmp_path / "s.yaml"))
        settings = Settings(ray_address="", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                            storage=f"file://{tmp_path / 'store'}", s3=S3Credentials(None, None, None))
        Driver(build_plan(spec), settings).prepare()

    staged({"dataset": "digits"}, 180)  # 10% of 1797 digits are held out
    with pytest.raises(SpecError) as info:
        staged({"dataset": "digits"}, 500)
    assert info.value.lines == [f"{tmp_path / 's.yaml'}: job 'score': evaluate.num_samples: 500 "
                                "but the held-out split has 180 images to compare with"]
    with pytest.raises(SpecError) as info:
        staged({"dataset": "npz", "path": "plain.npz"}, 10)
    assert info.value.lines == [f"{tmp_path / 's.yaml'}: job 'score': data: plain.npz has no "
                                "labels ('y'), which the evaluation's feature classifier needs"]


def test_uint8_pixels_are_the_float_images_rounded(storage):
    """What a training job keeps on its device: uint8, a quarter of float32's memory, which
    `as_float` turns into the [-1, 1] images batch by batch, to within half a grey level."""
    key = stage(DataSpec(dataset="digits", image_size=8), storage)
    for size, channels in ((8, 1), (16, 1), (8, 3)):  # as stored, resized, made RGB
        x, y = load_images(storage, key, image_size=size, channels=channels)
        pixels, labels = load_images(storage, key, image_size=size, channels=channels, uint8=True)
        assert pixels.dtype == torch.uint8 and pixels.shape == x.shape
        assert torch.equal(labels, y)
        assert (as_float(pixels) - x).abs().max() <= 0.5 / 127.5 + 1e-6
    assert as_float(x) is x  # anything but uint8 passes through (token codes, latents)


def test_hflip_mirrors_the_images_its_draws_pick():
    from workers.data import augment

    batch = torch.arange(64 * 2 * 3, dtype=torch.float32).reshape(64, 1, 2, 3)
    out = augment(batch, {"hflip": True}, torch.Generator().manual_seed(5))
    flipped = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5
    assert torch.equal(out[flipped], batch[flipped].flip(-1))
    assert torch.equal(out[~flipped], batch[~flipped])
    assert 20 < int(flipped.sum()) < 44  # about half
    assert augment(batch, {"hflip": False}, torch.Generator()) is batch
    assert augment(batch, {}, torch.Generator()) is batch


def test_a_random_crop_zooms_into_each_image_by_its_own_draw():
    from workers.data import augment

    # a horizontal ramp: a crop keeps it increasing left to right, with a smaller range
    ramp = torch.linspace(-1, 1, 16).expand(256, 1, 16, 16).contiguous()
    out = augment(ramp, {"crop": 0.5}, torch.Generator().manual_seed(0))
    again = augment(ramp, {"crop": 0.5}, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == ramp.shape
    rows = out[:, 0, 8]  # each image's middle row
    assert (rows.diff(dim=1) > 0).all()  # the ramp is not mirrored or scrambled
    span = rows[:, -1] - rows[:, 0]  # 2 * the side kept: in [sqrt(0.5), 1] less a pixel
    whole = ramp[0, 0, 8, -1] - ramp[0, 0, 8, 0]
    assert (span <= whole + 1e-5).all() and (span >= 0.70 * whole * 15 / 16 - 0.05).all()
    assert span.std() > 0.02  # drawn per image
    assert (rows[:, 0] + 1).abs().max() > 0.1  # and not always from the left edge
    assert torch.allclose(augment(ramp, {"crop": None}, torch.Generator()), ramp)


def test_hflip_is_refused_where_a_family_trains_on_codes_or_latents():
    from orchestrator.spec import SpecError, parse_spec

    def job(family: str, model: dict) -> dict:
        return {"name": "a", "kind": "train", "family": family, "model": model,
                "data": {"dataset": "digits", "image_size": 16, "augment": {"hflip": True}}}

    for family, model, what in (("autoregressive", {"tokenizer": "vq"}, "its tokenizer's codes"),
                                ("ldm", {"autoencoder": "ae"}, "its autoencoder's latents")):
        vq = {"name": "vq" if family == "autoregressive" else "ae", "kind": "train",
              "family": "vqgan" if family == "autoregressive" else "ldm",
              "model": {} if family == "autoregressive" else {"stage": "autoencoder"},
              "data": {"dataset": "digits", "image_size": 16}}
        with pytest.raises(SpecError) as err:
            parse_spec({"experiment": "x", "jobs": [vq, job(family, model)]}, "s.yaml")
        assert err.value.lines == [f"s.yaml: job 'a': data.augment.hflip: family '{family}' "
                                   f"trains on {what}, not on pixels (augment the images of "
                                   "the job that trains those)"]
    for family in ("ddpm", "flow", "gan", "vqgan"):  # pixels
        parse_spec({"experiment": "x", "jobs": [job(family, {})]}, "s.yaml")
    cropped = job("ldm", {"autoencoder": "ae"})
    cropped["data"]["augment"] = {"crop": 0.8}
    ae = {"name": "ae", "kind": "train", "family": "ldm", "model": {"stage": "autoencoder"},
          "data": {"dataset": "digits", "image_size": 16}}
    with pytest.raises(SpecError) as err:
        parse_spec({"experiment": "x", "jobs": [ae, cropped]}, "s.yaml")
    assert err.value.lines[0].startswith("s.yaml: job 'a': data.augment.crop: family 'ldm' trains on")


def test_a_large_folder_is_decoded_in_parallel_and_written_shard_by_shard(tmp_path, storage):
    """600 images (more than the staging process decodes alone): two worker processes give
    the very arrays one process does, in shards of the size asked; the same folder under a
    URI prefix (file:// here, s3:// alike) stages the same data set."""
    rng = np.random.default_rng(1)
    for i in range(600):
        write_png(tmp_path / "imgs" / f"c{i % 3}" / f"{i:04d}.png",
                  rng.integers(0, 255, (9, 9, 3), dtype=np.uint8))
    spec = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), image_size=8, channels=3)
    one = FileStorage(tmp_path / "one")
    keys = [stage(spec, one, workers=1, shard_bytes=192 * 50),
            stage(spec, storage, workers=2, shard_bytes=192 * 50)]
    assert keys[0] == keys[1]
    (a, ya), (b, yb) = (load_images(s, keys[0], image_size=8, channels=3, uint8=True)
                        for s in (one, storage))
    assert a.shape == (540, 3, 8, 8) and torch.equal(a, b) and torch.equal(ya, yb)
    assert [s["count"] for s in read_index(storage, keys[0])["shards"]] == [50] * 10 + [40]
    # staged in a seeded order, not class by class: every shard holds all three classes
    staged = StagedImages(storage, keys[0], image_size=8, channels=3)
    assert all(len(set(y.tolist())) == 3 for _, y in staged.shards())
    (ha, _), (hb, _) = (load_images(s, heldout_key(keys[0]), image_size=8, channels=3)
                        for s in (one, storage))
    assert ha.shape == (60, 3, 8, 8) and torch.equal(ha, hb)
    by_uri = DataSpec(dataset="folder", path=f"file://{tmp_path / 'imgs'}", image_size=8,
                      channels=3)
    assert stage(by_uri, FileStorage(tmp_path / "uri"), workers=2) == keys[0]
