"""Distillation: the progressive-distillation math, the KD loss, and distill jobs of every
method run in-process (orchestrator/inprocess.py) on file:// storage."""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri
from orchestrator.inprocess import run_jobs
from orchestrator.storage import open_storage
from workers.diffusion.parameterization import PREDICTIONS, alpha_sigma, to_x0_eps, training_target
from workers.diffusion.progressive import (
    END, progressive_loss, student_grid_points, student_step, two_step_target)
from workers.diffusion.samplers import DDIMSampler, sample, timestep_grid
from workers.diffusion.schedules import make_schedule
from workers.nn.distillation import kd_loss
from workers.nn.unet import UNet
from support import ROOT, example_spec


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- diffusion pieces -----------------------------------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_parameterizations_convert_exactly(prediction):
    s = make_schedule("cosine", 100)
    x0, eps = torch.randn(6, 1, 4, 4, generator=gen(0)), torch.randn(6, 1, 4, 4, generator=gen(1))
    t = torch.tensor([0, 10, 50, 90, 98, 99])
    alpha, sigma = alpha_sigma(s, t, x0)
    x_t = alpha * x0 + sigma * eps
    out = training_target(prediction, x0, eps, alpha, sigma)
    x0_back, eps_back = to_x0_eps(prediction, out, x_t, alpha, sigma)
    assert torch.allclose(x0_back, x0, atol=1e-3) and torch.allclose(eps_back, eps, atol=1e-3)


@pytest.mark.parametrize("T, n", [(1000, 64), (1000, 8), (100, 4), (1000, 2)])
def test_trailing_grids_halve_into_each_other(T, n):
    grid = timestep_grid(T, n, "trailing")
    assert grid[0] == T - 1 and len(set(grid)) == n and grid == sorted(grid, reverse=True)
    assert grid[0::2] == timestep_grid(T, n // 2, "trailing")
    # from an unclipped sampler's later start (latents) too
    late = timestep_grid(T, n, "trailing", first=T - 1 - T // 100)
    assert late[0] == T - 1 - T // 100 and len(set(late)) == n
    assert late[0::2] == timestep_grid(T, n // 2, "trailing", first=late[0])


def test_an_unclipped_distillation_trains_on_the_grid_its_student_samples_on():
    s = make_schedule("cosine", 1000)
    student = DDIMSampler(s, clip_x0=False)
    student.set_timesteps(4, "trailing")
    t, t1, t2 = student_grid_points(s, 8, 512, gen(2), torch.device("cpu"), clip=False)
    assert sorted(set(t.tolist()), reverse=True) == student.timesteps
    assert student.timesteps[0] == 955 and set(t2.tolist()) == set(student.timesteps[1:]) | {END}


def test_two_step_target_puts_the_student_on_the_teachers_point():
    """A student whose x_0 prediction is x̃ lands in one DDIM step exactly where the teacher's two
    steps land, at every point of the grid, the last (to the clean image) included."""
    s = make_schedule("cosine", 100)
    teacher = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1,)).eval()
    z = torch.randn(8, 1, 8, 8, generator=gen(0))
    t, t1, t2 = student_grid_points(s, 8, 8, gen(1), torch.device("cpu"))
    t2 = torch.cat([t2[:-1], torch.tensor([END])])
    t[-1], t1[-1] = 24, 12  # trailing grid of 8 over 100 steps: ..., 24, 12 -> end
    target, z2 = two_step_target(teacher, "eps", s, z, t, t1, t2, clip=False)
    oracle = lambda z_t, tt: target  # noqa: E731 - predicts x_0 = x̃
    landed = student_step(oracle, "x", s, z, t, t2, clip=False)
    assert torch.allclose(landed, z2, atol=1e-4)


def test_one_round_lowers_the_students_one_step_error():
    """One progressive-distillation round on a tiny model: the student's single DDIM step gets
    closer to its teacher's two steps than it was when it started as the teacher."""
    torch.manual_seed(0)
    s = make_schedule("cosine", 100)
    teacher = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1,)).eval()
    teacher.requires_grad_(False)
    student = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1,))
    student.load_state_dict(teacher.state_dict())
    from sklearn.datasets import load_digits

    data = torch.from_numpy(load_digits().images[:256]).float()[:, None] / 8.0 - 1.0

    def one_step_error() -> float:
        g = gen(123)
        t, t1, t2 = student_grid_points(s, 8, 256, g, torch.device("cpu"))
        alpha, sigma = alpha_sigma(s, t, data)
        z = alpha * data + sigma * torch.randn(data.shape, generator=g)
        _, z2 = two_step_target(teacher, "v", s, z, t, t1, t2, clip=True)
        with torch.no_grad():
            return float((student_step(student, "v", s, z, t, t2, clip=True) - z2).square().mean())

    before = one_step_error()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = gen(7)
    for _ in range(150):
        batch = data[torch.randint(len(data), (32,), generator=g)]
        loss = progressive_loss(student, "v", teacher, "v", s, batch, 8, clip=True, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = one_step_error()
    assert after < 0.5 * before, (before, after)


def test_sample_takes_the_trailing_grid():
    s = make_schedule("linear", 100)
    seen = []
    sample(lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x), DDIMSampler(s), (2, 1, 4, 4),
           num_steps=4, spacing="trailing")
    assert seen == [99, 74, 49, 24]


# ---- knowledge distillation ----------------------------------------------------------------

def test_kd_loss_is_the_closed_form_kl_and_cross_entropy():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])  # teacher, two positions
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])  # student
    targets = torch.tensor([0, 2])
    kl = lambda a, b: float((a * (a / b).log()).sum(-1).mean())  # noqa: E731
    soften = lambda d, T: (d.log() / T).softmax(-1)  # noqa: E731
    ce = float(-(q[[0, 1], targets]).log().mean())

    plain = kd_loss(q.log(), p.log(), targets, temperature=1.0, alpha=0.0)
    assert math.isclose(float(plain["loss"]), kl(p, q), rel_tol=1e-5)
    hot = kd_loss(q.log(), p.log(), targets, temperature=2.0, alpha=0.0)
    assert math.isclose(float(hot["kl"]), kl(soften(p, 2), soften(q, 2)), rel_tol=1e-5)
    assert math.isclose(float(hot["loss"]), 4 * kl(soften(p, 2), soften(q, 2)), rel_tol=1e-5)
    mixed = kd_loss(q.log(), p.log(), targets, temperature=2.0, alpha=0.3)
    assert math.isclose(float(mixed["ce"]), ce, rel_tol=1e-5)
    assert math.isclose(float(mixed["loss"]), 0.3 * ce + 0.7 * 4 * kl(soften(p, 2), soften(q, 2)),
                        rel_tol=1e-5)
    same = kd_loss(p.log(), p.log(), targets, temperature=3.0, alpha=0.0)
    assert float(same["loss"]) == pytest.approx(0.0, abs=1e-6)


# ---- distill jobs in-process ---------------------------------------------------------------

TRAIN = {"batch_size": 16, "log_every": 2, "sample_images": 4, "lr": 1e-3}
AE = {"channels": 8, "channel_mult": [1, 2], "disc_weight": 0}


def distill_spec() -> dict:
    return {
        "experiment": "distill", "defaults": {"data": {"dataset": "digits", "image_size": 16,
                                                       "limit": 400}, "train": TRAIN},
        "jobs": [
            {"name": "ddpm", "kind": "train", "family": "ddpm", "train": {"steps": 6},
             "model": {"channels": 8, "channel_mult": [1, 2], "timesteps": 64, "prediction": "v"}},
            {"name": "fast", "kind": "distill", "family": "ddpm", "teacher": "ddpm",
             "distill": {"method": "progressive", "teacher_steps": 8, "student_steps": 2},
             "train": {"steps": 4}},
            {"name": "fast-plain", "kind": "distill", "family": "ddpm", "teacher": "ddpm",
             "distill": {"method": "progressive", "teacher_steps": 8, "student_steps": 2},
             "train": {"steps": 4, "ema_decay": 0}},
            {"name": "fast-grid", "kind": "sample", "family": "ddpm", "from": "fast",
             "sample": {"num_images": 3}},
            {"name": "slow-grid", "kind": "sample", "family": "ddpm", "from": "ddpm",
             "sample": {"num_images": 3}},  # no steps: DDIM's 50 of the teacher's 64
            {"name": "gan", "kind": "train", "family": "gan", "train": {"steps": 4},
             "model": {"z_dim": 16, "g_width": 16, "d_width": 8}},
            {"name": "small-gan", "kind": "distill", "family": "gan", "teacher": "gan",
             "distill": {"method": "regress", "student": {"g_width": 4}, "loss": "l2",
                         "adversarial_weight": 0.1}, "train": {"steps": 30}},
            {"name": "vq", "kind": "train", "family": "vqgan", "train": {"steps": 4},
             "model": {**AE, "latent_channels": 8, "codebook_size": 16}},
            {"name": "ar", "kind": "train", "family": "autoregressive", "train": {"steps": 20},
             "model": {"tokenizer": "vq", "dim": 32, "layers": 2, "heads": 2,
                       "class_conditional": True}},
            {"name": "small-ar", "kind": "distill", "family": "autoregressive", "teacher": "ar",
             "distill": {"method": "kd", "student": {"dim": 16, "layers": 1}, "temperature": 2.0,
                         "alpha": 0.5}, "train": {"steps": 30}},
            {"name": "small-ar-grid", "kind": "sample", "family": "autoregressive",
             "from": "small-ar", "sample": {"num_images": 3}},
        ]}


TEACHERS = {"fast": "ddpm", "small-gan": "gan", "small-ar": "ar"}


def digest(store, prefix: str) -> dict[str, str]:
    return {k: hashlib.sha256(store.get_bytes(k)).hexdigest() for k in store.list(prefix)}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    spec = distill_spec()
    teachers = run_jobs(tmp, spec, only=["ddpm", "gan", "vq", "ar"])
    store = open_storage(f"file://{tmp / 'store'}")
    before = {t: digest(store, f"distill/{t}/") for t in TEACHERS.values()}
    results = run_jobs(tmp, spec, only=["fast", "fast-grid", "slow-grid", "small-gan",
                                        "small-ar", "small-ar-grid"])
    after = {t: digest(store, f"distill/{t}/") for t in TEACHERS.values()}
    return tmp, teachers, results, before, after


def load(result: dict):
    return load_checkpoint(*resolve_checkpoint_uri(result["checkpoint"].rsplit("/checkpoints/", 1)[0]))


@pytest.mark.parametrize("student", list(TEACHERS))
def test_distill_leaves_the_teacher_untouched_and_reports_both(distilled, student):
    tmp, teachers, results, before, after = distilled
    teacher = TEACHERS[student]
    assert before[teacher] == after[teacher] and before[teacher]  # byte for byte
    result = results[student]
    assert result["status"] == "finished" and result["kind"] == "distill"
    m = result["metrics"]
    assert m["teacher_s_per_image"] > 0 and m["student_s_per_image"] > 0
    assert m["speedup"] == pytest.approx(m["teacher_s_per_image"] / m["student_s_per_image"])
    ckpt, teacher_ckpt = load(result), load(teachers[teacher])
    assert ckpt.meta["kind"] == "distill" and ckpt.meta["family"] == teacher_ckpt.meta["family"]
    assert ckpt.meta["teacher"]["uri"] == teacher_ckpt.uri
    run = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(results["_runs"][student])
    assert run.data.tags["genforge.teacher"].startswith("file://")
    assert run.data.metrics["student_params"] == m["student_params"]


def test_smaller_students_have_fewer_parameters(distilled):
    _, _, results, _, _ = distilled
    for student in ("small-gan", "small-ar"):
        m = results[student]["metrics"]
        assert m["student_params"] < m["teacher_params"] / 2
    m = results["fast"]["metrics"]
    assert m["student_params"] == m["teacher_params"]  # same network, fewer steps
    assert (m["teacher_sampling_steps"], m["student_sampling_steps"]) == (8, 2)


def test_progressive_rounds_are_checkpointed_and_the_student_samples_in_its_steps(distilled):
    tmp, _, results, _, _ = distilled
    result = results["fast"]
    assert result["step"] == 8  # 8 -> 4 -> 2: two rounds of 4 steps
    store = open_storage(result["checkpoint"].rsplit("/checkpoints/", 1)[0])
    steps = sorted({k.split("/")[1] for k in store.list("checkpoints/step-")})
    assert steps == ["step-000004", "step-000008"]
    ckpt = load(result)
    assert ckpt.meta["model"]["prediction"] == "v" and ckpt.meta["model"]["distilled_steps"] == 2
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    rounds = client.get_metric_history(results["_runs"]["fast"], "round_student_steps")
    assert sorted((m.step, m.value) for m in rounds) == [(1, 4.0), (2, 2.0)]
    assert len(client.get_metric_history(results["_runs"]["fast"], "round_loss")) == 2
    assert results["fast-grid"]["num_images"] == 3
    # sampling without `steps` takes the student's 2 steps on its grid, and the teacher's 64
    assert results["fast-grid"]["sampler"] == {"sampler": "ddim", "steps": 2, "eta": 0.0,
                                               "spacing": "trailing", "use_ema": True}
    assert results["slow-grid"]["sampler"]["steps"] == 50
    assert results["slow-grid"]["sampler"]["spacing"] == "linspace"


def test_a_progressive_student_without_an_average_hands_on_its_own_weights(distilled):
    """`train.ema_decay: 0`: each round's student, as trained, is the next round's teacher."""
    tmp = distilled[0]
    result = run_jobs(tmp, distill_spec(), only=["fast-plain"])["fast-plain"]
    assert result["status"] == "finished" and result["step"] == 8
    store = open_storage(result["checkpoint"].rsplit("/checkpoints/", 1)[0])
    first, last = load_checkpoint(store, "step-000004"), load(result)
    assert not any(k.startswith("ema.") for k in (*first.tensors, *last.tensors))
    keys = [k for k in first.tensors if k.startswith("net/")]
    assert keys and all(torch.equal(first.tensors[k], last.tensors[f"frozen.round_teacher/{k[4:]}"])
                        for k in keys)
    assert not all(torch.equal(first.tensors[k], last.tensors[k]) for k in keys)  # round 2 trained


def test_students_learn_their_teachers(distilled):
    tmp, _, results, _, _ = distilled
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    for student, key in (("small-gan", "regress"), ("small-ar", "kl")):
        history = sorted(client.get_metric_history(results["_runs"][student], key),
                         key=lambda m: m.step)
        first, last = history[0].value, sum(m.value for m in history[-3:]) / 3
        assert last < 0.7 * first, (student, [m.value for m in history])
    assert results["small-ar-grid"]["metrics"]["tokens_per_s"] > 0


def test_a_resumed_distillation_continues_from_the_last_finished_round(tmp_path, distilled):
    """Stopped at the end of round 1, a second attempt resumes there and ends with exactly the
    weights of the uninterrupted run."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec
    from orchestrator.task import Task
    from workers.ddpm.worker import DDPMWorker

    src, teachers, results, _, _ = distilled
    spec = distill_spec()
    plan = build_plan(parse_spec(spec, source=str(src / "spec.yaml")))
    p = plan.by_name["fast"]
    teacher_uri = teachers["ddpm"]["checkpoint"]
    root = f"file://{tmp_path / 'store'}"
    from orchestrator.datasets import stage

    key = stage(p.job.data, open_storage(root))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("resume")
    run_id = client.create_run(exp).info.run_id

    def task(attempt: int) -> Task:
        return Task(job=p.job.resolved(), job_hash="x", experiment="resume", storage_root=root,
                    prefix="resume/fast/x", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    run_id=run_id, code_version="test", data_key=key,
                    refs={"teacher": teacher_uri}, attempt=attempt)

    class StopAfterRoundOne(DDPMWorker):
        def end_step(self, step):
            super().end_step(step)
            if step == 4:
                self.request_stop()

    stopped = StopAfterRoundOne(task(1)).run()
    assert stopped["status"] == "stopped" and stopped["step"] == 4
    resumed = DDPMWorker(task(2)).run()
    assert resumed["status"] == "finished" and resumed["timing"]["steps_run"] == 4
    tags = client.get_run(run_id).data.tags
    assert tags["genforge.resumed_at_step"] == "5"
    a, b = load(resumed), load(results["fast"])
    for name in ("net/", "ema.net/"):
        keys = [k for k in a.tensors if k.startswith(name)]
        assert keys and all(torch.allclose(a.tensors[k], b.tensors[k], atol=1e-6) for k in keys)


def test_a_distillation_resumed_after_its_final_checkpoint_keeps_the_students_model(
        tmp_path, monkeypatch):
    """The driver died between the final checkpoint and result.json: the job runs again,
    trains no step, leaves the final checkpoint as it is and compares the student that it
    holds (v, 2 steps), not the teacher's model section. Stopped during that comparison, it
    stops there, and the next run finishes it."""
    from workers.ddpm.worker import DDPMWorker

    spec = distill_spec()
    first = run_jobs(tmp_path, spec, only=["ddpm", "fast"])["fast"]
    prefix = first["checkpoint"].rsplit("/checkpoints/", 1)[0]
    store = open_storage(prefix)
    manifest = tmp_path / "store" / prefix.split("/store/", 1)[1] / "checkpoints" / \
        "step-000008" / "manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    store.delete("result.json")

    teacher_runs, generate = [], DDPMWorker.generate

    def generate_then_stop(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        self.request_stop()  # during the student's timing
        return out

    monkeypatch.setattr(DDPMWorker, "generate", generate_then_stop)
    monkeypatch.setattr(DDPMWorker, "teacher_generate", lambda *a: teacher_runs.append(a))
    stopped = run_jobs(tmp_path, spec, only=["fast"])["fast"]
    assert stopped == {"status": "stopped", "step": 8, "phase": "sampling"}
    assert teacher_runs == [] and not store.exists("result.json")
    monkeypatch.undo()

    again = run_jobs(tmp_path, spec, only=["fast"])["fast"]
    assert again["status"] == "finished" and again["timing"]["steps_run"] == 0
    assert again["checkpoint"] == first["checkpoint"]
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    model = load(again).meta["model"]
    assert model["prediction"] == "v" and model["distilled_steps"] == 2
    m = again["metrics"]
    assert (m["teacher_sampling_steps"], m["student_sampling_steps"]) == (8, 2)
    assert m["student_params"] == first["metrics"]["student_params"]
    assert store.exists("result.json")


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").exists(), reason="no ../shared/data")
def test_the_knowledge_distillation_example_runs_tiny(tmp_path):
    """jobspecs/distill-ar.yaml with tiny step counts: VQGAN, teacher, a student of half the
    width and depth learning its next-token distributions, samples of both, their evaluation
    (the end-to-end path of distillation: tests/test_e2e_distill.py)."""
    spec = example_spec("distill-ar", "distill-ar-tiny", limit=400)
    for job in spec["jobs"]:
        if "train" in job:
            job["train"].update(steps=4, batch_size=8, checkpoint_every=None, log_every=2,
                                sample_images=4, warmup_steps=0)
        if job["kind"] == "sample":
            job["sample"]["num_images"] = 5
        if job["kind"] == "evaluate":
            job["evaluate"].update(num_samples=20, classifier={"steps": 20, "width": 8})
    results = run_jobs(tmp_path, spec)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {name: client.get_run(run_id).data for name, run_id in results["_runs"].items()}
    assert {r["status"] for n, r in results.items() if n != "_runs"} == {"finished"}
    student = runs["student"]
    assert student.metrics["student_params"] < student.metrics["teacher_params"] / 3
    assert student.metrics["kl"] >= 0 and student.metrics["ce"] > 0
    assert [m.step for m in client.get_metric_history(results["_runs"]["student"], "kl")] == [2, 4]
    # the student reads the tokens the teacher's training cached
    assert student.tags["genforge.encoded_cache"] == "hit"
    assert student.tags["genforge.teacher"] == runs["teacher"].tags["genforge.checkpoint"]
    for name in ("teacher-samples", "student-samples"):
        parent, _, file = results[name]["outputs"][0].rpartition("/")
        images = np.load(io.BytesIO(open_storage(parent).get_bytes(file)))["images"]
        assert images.shape == (5, 28, 28, 1) and images.std() > 1.0, name
    assert {"teacher.fd", "student.fd"} <= set(runs["score"].metrics)
