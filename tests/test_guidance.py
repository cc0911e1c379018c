"""Classifier-free guidance (Ho & Salimans 2022) for the diffusion-type families: label
dropout, the guided mix, validation, and a guided class-conditional DDPM whose samples the
evaluation's classifier puts in the asked-for class more often than unguided ones, scored in
one evaluation that sweeps the guidance scale."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator import compare
from orchestrator.inprocess import run_jobs
from orchestrator.spec import SpecError, parse_spec
from orchestrator.storage import open_storage
from workers.nn.conditioning import class_labels, drop_labels, guided
from workers.nn.unet import UNet


def test_label_dropout_drops_at_its_rate_to_the_null_label():
    y = torch.arange(200_000) % 10
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    null = dropped == 10
    assert abs(null.double().mean().item() - 0.1) < 0.003
    assert torch.equal(dropped[~null], y[~null])  # the rest keep their label
    assert torch.equal(drop_labels(y, 0.0, 10, None), y)


def test_guidance_mixes_the_conditional_and_unconditional_predictions():
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1,), num_classes=3).eval()
    for p in net.parameters():  # residual branches start at zero: make the label count
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 10, 50, 99]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 3))
        assert torch.equal(net(x, t), uncond)  # no labels: the null label
        assert not torch.allclose(cond, uncond)
        assert torch.allclose(guided(net, y, 0.0, 3)(x, t), uncond, atol=1e-6)
        assert torch.allclose(guided(net, y, 1.0, 3)(x, t), cond, atol=1e-6)
        assert torch.allclose(guided(net, y, 3.0, 3)(x, t), uncond + 3 * (cond - uncond), atol=1e-5)


def test_unset_labels_cycle_through_the_classes():
    assert class_labels(5, 3, None, 4, torch.device("cpu")).tolist() == [1, 2, 0, 1, 2]
    assert class_labels(3, 3, 2, 0, torch.device("cpu")).tolist() == [2, 2, 2]


def spec(*jobs: dict) -> dict:
    return {"experiment": "g", "defaults": {"data": {"dataset": "digits", "image_size": 16}},
            "jobs": list(jobs)}


def train(**model) -> dict:
    return {"name": "ddpm", "kind": "train", "family": "ddpm", "model": model}


def errors(data: dict) -> list[str]:
    from orchestrator.plan import build_plan

    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(data, "s.yaml"))
    return err.value.lines


@pytest.mark.parametrize("data, expected", [
    (spec(train(), {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm",
                    "sample": {"guidance": 3}}),
     "s.yaml: job 'grid': sample.guidance: job 'ddpm' is not class-conditional (train it with "
     "model.class_conditional: true)"),
    (spec(train(class_conditional=True), {"name": "grid", "kind": "sample", "family": "ddpm",
                                          "from": "ddpm", "sample": {"label": 10}}),
     "s.yaml: job 'grid': sample.label: 10 but job 'ddpm' has 10 classes"),
    (spec(train(class_conditional=True, label_dropout=1.0)),
     "s.yaml: job 'ddpm': model.label_dropout: Input should be less than 1"),
    (spec(train(), {"name": "fast", "kind": "distill", "family": "ddpm", "teacher": "ddpm",
                    "distill": {"method": "progressive", "teacher_steps": 64, "guidance": 2}}),
     "s.yaml: job 'fast': distill.guidance: job 'ddpm' is not class-conditional"),
    (spec(train(class_conditional=True), {"name": "s", "kind": "evaluate", "from": "ddpm",
                                          "evaluate": {"sweep": {"eta": []}}}),
     "s.yaml: job 's': evaluate.sweep.eta: needs at least one value"),
    (spec(train(class_conditional=True), {"name": "s", "kind": "evaluate", "from": "ddpm",
                                          "evaluate": {"sweep": {"seed": [1, 2]}}}),
     "s.yaml: job 's': evaluate.sweep.seed: not a sampler setting"),
    (spec(train(class_conditional=True), {"name": "s", "kind": "evaluate", "from": "ddpm",
                                          "evaluate": {"sweep": {"guidance": [1, -2]}}}),
     "s.yaml: job 's': evaluate.sweep.guidance: Input should be greater than or equal to 0 (got -2)"),
])
def test_guidance_settings_are_checked_before_anything_runs(data, expected):
    lines = errors(data)
    assert any(line.startswith(expected) for line in lines), lines


def test_a_class_conditional_model_needs_labelled_data(tmp_path):
    data = spec(train(class_conditional=True))
    data["defaults"]["data"] = {"dataset": "npz", "path": "x.npz", "y_key": None}
    lines = errors(data)
    assert any("model.class_conditional: the data has no labels" in line for line in lines), lines


def test_guided_samples_are_more_often_of_their_class(tmp_path):
    """A small class-conditional DDPM on the digits, scored at guidance 0 (unconditional),
    1 (conditional) and 3 by one evaluation: the classifier puts far more guided samples in
    their asked-for class; guidance 0 is about chance."""
    data = spec(
        {"name": "ddpm", "kind": "train", "family": "ddpm",
         "model": {"channels": 16, "channel_mult": [1, 2], "timesteps": 200, "schedule": "cosine",
                   "class_conditional": True, "label_dropout": 0.2},
         "train": {"steps": 300, "batch_size": 64, "lr": 2e-3, "ema_decay": 0.99,
                   "log_every": 50, "sample_images": 10}},
        {"name": "score", "kind": "evaluate", "from": "ddpm",
         "evaluate": {"num_samples": 100, "sample": {"steps": 10}, "sweep": {"guidance": [0, 1, 3]},
                      "classifier": {"steps": 200, "width": 16}}})
    out = run_jobs(tmp_path, data)["score"]["metrics"]
    rows = {s["label"]: s for s in out["sources"]}
    assert list(rows) == ["ddpm.guidance-0", "ddpm.guidance-1", "ddpm.guidance-3"]
    acc = {w: rows[f"ddpm.guidance-{w}"]["metrics"]["label_accuracy"] for w in (0, 1, 3)}
    assert rows["ddpm.guidance-3"]["sampler"]["guidance"] == 3
    assert acc[0] < 0.3  # unconditional: the asked-for class by chance (1 in 10) or so
    assert acc[3] > acc[0] + 0.3 and acc[3] >= acc[1]
    # genforge compare: a row per scale, the scale in the model and sampler cells
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows, _ = compare.collect(client, open_storage(f"file://{tmp_path / 'store'}"), "g")
    assert [r["model"] for r in rows] == ["real vs real (held-out)", "ddpm (guidance 0)",
                                          "ddpm (guidance 1)", "ddpm (guidance 3)"]
    assert rows[3]["sampler"] == "ddim 10 steps, guidance 3"
    assert rows[3]["label_accuracy"] == acc[3] and rows[0]["label_accuracy"] is None
    assert "label acc." in compare.render(rows, "table")


def test_a_guided_teachers_student_keeps_its_guidance(tmp_path):
    """Progressive distillation of a class-conditional teacher at guidance 2: the student's
    checkpoint records the scale, samples with it built in (the conditional prediction), and
    a sample job asking it for another scale is refused before anything runs."""
    from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri

    data = spec(
        {"name": "ddpm", "kind": "train", "family": "ddpm", "train": {"steps": 6, "batch_size": 16},
         "model": {"channels": 8, "channel_mult": [1], "timesteps": 40, "class_conditional": True}},
        {"name": "fast", "kind": "distill", "family": "ddpm", "teacher": "ddpm",
         "train": {"steps": 2, "batch_size": 16, "sample_images": 4},
         "distill": {"method": "progressive", "teacher_steps": 8, "student_steps": 2,
                     "guidance": 2}},
        {"name": "grid", "kind": "sample", "family": "ddpm", "from": "fast",
         "sample": {"num_images": 4, "label": 3}})
    results = run_jobs(tmp_path, data)
    assert results["fast"]["status"] == "finished"
    student = load_checkpoint(*resolve_checkpoint_uri(results["fast"]["checkpoint"], None))
    assert student.meta["model"]["distilled_guidance"] == 2 and student.meta["model"]["distilled_steps"] == 2
    assert results["grid"]["sampler"] == {"sampler": "ddim", "steps": 2, "eta": 0.0,
                                          "spacing": "trailing", "use_ema": True, "label": 3,
                                          "guidance": 1.0, "distilled_guidance": 2}
    data["jobs"][2]["sample"]["guidance"] = 3
    lines = errors(data)
    assert lines == ["s.yaml: job 'grid': sample.guidance: job 'fast' was distilled with "
                     "guidance 2, which its samples keep (got 3)"], lines
