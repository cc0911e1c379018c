"""The flow family in-process: the path and its velocity target, the Euler and Heun integrators
against the exact velocity field of Gaussian data, a falling loss, training / sampling /
evaluation / distillation through the harness (orchestrator/inprocess.py), bit-identical
resume, classifier-free guidance, and the spec's one-line errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri
from orchestrator.datasets import stage
from orchestrator.inprocess import run_jobs
from orchestrator.plan import build_plan
from orchestrator.spec import SpecError, parse_spec
from orchestrator.storage import open_storage
from orchestrator.task import Task
from workers.config import DEFAULT_GUIDANCE
from workers.flow.config import DEFAULT_STEPS, describe_sampler, nfe
from workers.flow.ode import (flow_loss, halving_target, integrate, interpolate, sample_times,
                              target_velocity, time_grid, timed)
from workers.flow.worker import FlowWorker
from workers.nn.unet import UNet
from workers.registry import FAMILIES, family


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the path, the target, the time grids ---------------------------------------------------

def test_the_path_runs_from_noise_to_data_at_the_target_velocity():
    x0, x1 = torch.randn(5, 1, 4, 4, generator=gen(0)), torch.randn(5, 1, 4, 4, generator=gen(1))
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    x_t = interpolate(x0, x1, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[-1], x1[-1])
    assert torch.allclose(x_t[2], (x0[2] + x1[2]) / 2)
    h = 1e-3  # d x_t / dt, numerically, is the target everywhere on the path
    before = t.clamp(max=1 - h)
    slope = (interpolate(x0, x1, before + h) - interpolate(x0, x1, before)) / h
    assert torch.allclose(slope, target_velocity(x0, x1), atol=1e-2)
    assert torch.equal(target_velocity(x0, x1), x1 - x0)


def test_the_loss_is_the_mse_of_the_velocity_on_the_drawn_path():
    x1 = torch.randn(6, 1, 4, 4, generator=gen(2))
    seen = {}

    def oracle(x, t):  # remembers where it was asked
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    loss = flow_loss(oracle, x1, gen(3), "uniform")
    g = gen(3)  # the same draws: t, then x0
    t = torch.rand(6, generator=g)
    x0 = torch.randn(x1.shape, generator=g)
    assert torch.equal(seen["t"], t) and torch.allclose(seen["x"], interpolate(x0, x1, t))
    assert float(loss) == pytest.approx(float((x1 - x0).square().mean()), rel=1e-6)


def test_training_times_uniform_and_logit_normal():
    u = sample_times(20_000, "uniform", 0.0, 1.0, gen(0), torch.device("cpu"))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    s = sample_times(20_000, "logit_normal", 0.5, 0.8, gen(0), torch.device("cpu"))
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean()) - 0.5) < 0.03 and abs(float(logit.std()) - 0.8) < 0.03


@pytest.mark.parametrize("spacing", ["uniform", "shifted"])
def test_time_grids_run_from_0_to_1_and_halve_into_each_other(spacing):
    for n in (1, 4, 64):
        grid = time_grid(n, spacing)
        assert len(grid) == n + 1 and float(grid[0]) == 0.0 and float(grid[-1]) == 1.0
        assert bool((grid[1:] > grid[:-1]).all())
        assert torch.allclose(time_grid(2 * n, spacing)[::2], grid, atol=1e-7)
    # the shift spends more of the steps at the noise end: its first step is shorter
    assert float(time_grid(8, "shifted")[1]) < float(time_grid(8, "uniform")[1])


# ---- the integrators against an exact velocity field -----------------------------------------

MU, SIGMA = 1.5, 0.5  # data ~ N(μ, σ²), noise ~ N(0, 1), per dimension


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 - x0 | x_t = x] for x1 ~ N(μ, σ²), x0 ~ N(0, 1): (x_t, v) are jointly Gaussian with
    E x_t = tμ, Var x_t = (1-t)² + t²σ², Cov(v, x_t) = tσ² - (1-t), E v = μ, so
    v = μ + Cov / Var (x - tμ) = [(tσ² - (1-t)) x + (1-t) μ] / ((1-t)² + t²σ²)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return ((t * SIGMA**2 - (1 - t)) * x + (1 - t) * MU) / ((1 - t) ** 2 + t**2 * SIGMA**2)


def test_the_gaussian_field_is_the_conditional_mean_of_the_target():
    """Regress x1 - x0 on x_t at a fixed t over many draws: slope and intercept are the field's."""
    n, t = 400_000, 0.6
    x0 = torch.randn(n, dtype=torch.float64, generator=gen(0))
    x1 = MU + SIGMA * torch.randn(n, dtype=torch.float64, generator=gen(1))
    x_t, v = (1 - t) * x0 + t * x1, x1 - x0
    slope = float(((x_t - x_t.mean()) * (v - v.mean())).mean() / x_t.var())
    intercept = float(v.mean()) - slope * float(x_t.mean())
    field = gaussian_velocity(torch.tensor([[0.0], [1.0]], dtype=torch.float64),
                              torch.tensor([t, t], dtype=torch.float64))
    assert intercept == pytest.approx(float(field[0]), abs=0.01)
    assert slope == pytest.approx(float(field[1] - field[0]), abs=0.01)


def end_distribution(sampler: str, steps: int, spacing: str = "uniform") -> tuple[float, float]:
    """(mean, std) of the integrated flow's end from N(0, 1): the field is affine in x, so the
    flow maps x0 to a x0 + b, and following x0 = 0 and x0 = 1 gives b and a exactly."""
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    end = integrate(gaussian_velocity, x, time_grid(steps, spacing).double(), sampler)
    return float(end[0]), float(end[1] - end[0])


def test_euler_and_heun_reach_the_data_distribution_heun_far_sooner():
    err = {}
    for sampler in ("euler", "heun"):
        for steps in (4, 8, 16, 400):
            mean, std = end_distribution(sampler, steps)
            err[sampler, steps] = abs(mean - MU) + abs(std - SIGMA)
    assert err["euler", 400] < 5e-3 and err["heun", 400] < 1e-5, err  # both converge
    # Euler is first order, Heun second (its last step, Euler's, costs it no order)
    assert 1.8 < err["euler", 8] / err["euler", 16] < 2.2, err
    assert 3.5 < err["heun", 8] / err["heun", 16] < 4.5, err
    for steps, factor in ((4, 2), (8, 5), (16, 10)):  # far closer at the same steps
        assert err["heun", steps] < err["euler", steps] / factor, err


def test_heun_evaluates_twice_per_step_but_the_last():
    for sampler, steps in (("euler", 5), ("heun", 5), ("heun", 1)):
        calls = []
        integrate(lambda x, t: calls.append(1) or torch.zeros_like(x), torch.zeros(2, 1),
                  time_grid(steps), sampler)
        assert len(calls) == nfe(sampler, steps) == (2 * steps - 1 if sampler == "heun" else steps)
    assert describe_sampler({"sampler": "heun", "steps": 10, "nfe": 19, "spacing": "uniform"}) \
        == "heun 10 steps (19 NFE)"
    assert describe_sampler({"sampler": "euler", "steps": 4, "nfe": 4, "spacing": "shifted",
                             "guidance": 1.0, "distilled_guidance": 2.0, "label": 3}) \
        == "euler 4 steps (4 NFE) shifted, w=2 (distilled), class 3"


def test_the_halving_target_lands_one_step_where_two_teacher_steps_land():
    x = torch.randn(3, 1, 2, 2, generator=gen(0))
    t, t_mid, t_end = torch.tensor([0.0, 0.25, 0.5]), torch.tensor([0.25, 0.5, 0.75]), \
        torch.tensor([0.5, 0.75, 1.0])
    v = halving_target(gaussian_velocity, x, t, t_mid, t_end)
    col = lambda s: s.reshape(-1, 1, 1, 1)  # noqa: E731
    x_mid = x + col(t_mid - t) * gaussian_velocity(x, t)
    two = x_mid + col(t_end - t_mid) * gaussian_velocity(x_mid, t_mid)
    assert torch.allclose(x + col(t_end - t) * v, two, atol=1e-6)


def test_the_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1,))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    patterns = torch.randn(2, 1, 8, 8, generator=gen(1)).sign() * 0.8
    x1 = patterns.repeat(4, 1, 1, 1)  # a batch of two images: little to learn, quickly
    losses = []
    for step in range(80):
        loss = flow_loss(timed(net), x1, gen(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


# ---- jobs in-process ------------------------------------------------------------------------

MODEL = {"channels": 8, "channel_mult": [1, 2], "class_conditional": True, "num_classes": 10,
         "label_dropout": 0.2}


def flow_spec() -> dict:
    return copy.deepcopy({
        "experiment": "flow",
        "defaults": {"data": {"dataset": "digits", "image_size": 8, "limit": 400},
                     "train": {"batch_size": 16, "log_every": 2, "sample_images": 4, "lr": 1e-3}},
        "jobs": [
            {"name": "flow", "kind": "train", "family": "flow", "model": MODEL,
             "train": {"steps": 6, "checkpoint_every": 3}},
            {"name": "grid", "kind": "sample", "family": "flow", "from": "flow",
             "sample": {"num_images": 5, "sampler": "heun", "steps": 3, "spacing": "shifted",
                        "label": 7, "guidance": 2.0}},
            {"name": "plain", "kind": "sample", "family": "flow", "from": "flow",
             "sample": {"num_images": 2, "steps": 2}},
            {"name": "fast", "kind": "distill", "family": "flow", "teacher": "flow",
             "distill": {"method": "progressive", "teacher_steps": 8, "student_steps": 2,
                         "guidance": 3.0},
             "train": {"steps": 3}},
            {"name": "fast-grid", "kind": "sample", "family": "flow", "from": "fast",
             "sample": {"num_images": 3}},
            {"name": "score", "kind": "evaluate", "from": ["flow", "fast"],
             "evaluate": {"num_samples": 20, "per_source": {"flow": {"sampler": "heun",
                                                                     "steps": 2}},
                          "classifier": {"steps": 10, "width": 8}}},
        ]})


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    return tmp, run_jobs(tmp, flow_spec())


def load(result: dict):
    prefix = result["checkpoint"].rsplit("/checkpoints/", 1)[0]
    return load_checkpoint(*resolve_checkpoint_uri(prefix))


def test_the_family_is_registered_with_its_samplers():
    assert "flow" in FAMILIES
    fam = family("flow")
    assert fam.samplers == ("euler", "heun") and fam.spacings == ("uniform", "shifted")
    assert fam.kinds == {"train", "sample", "distill"}


def test_train_sample_and_evaluate_record_the_sampler(ran):
    tmp, results = ran
    assert results["flow"]["status"] == "finished" and results["flow"]["step"] == 6
    ckpt = load(results["flow"])
    assert ckpt.meta["family"] == "flow" and ckpt.meta["model"]["time_sampling"] == "logit_normal"
    assert results["grid"]["sampler"] == {"sampler": "heun", "steps": 3, "nfe": 5,
                                          "spacing": "shifted", "label": 7, "guidance": 2.0,
                                          "use_ema": True}
    plain = results["plain"]["sampler"]  # the defaults: Euler, uniform, the default guidance
    assert (plain["sampler"], plain["steps"], plain["nfe"], plain["spacing"]) == \
        ("euler", 2, 2, "uniform")
    assert plain["label"] is None and plain["guidance"] == DEFAULT_GUIDANCE
    by_ref = {s["ref"]: s for s in results["score"]["metrics"]["sources"]}
    assert by_ref["flow"]["family"] == "flow" and by_ref["flow"]["sampler"]["nfe"] == 3
    assert by_ref["fast"]["sampler"]["steps"] == 2 and by_ref["fast"]["source_kind"] == "distill"
    assert math.isfinite(by_ref["flow"]["metrics"]["fd"]) and by_ref["flow"]["s_per_image"] > 0


def test_the_default_steps_are_the_same_budget():
    assert nfe("euler", DEFAULT_STEPS["euler"]) == 50 and nfe("heun", DEFAULT_STEPS["heun"]) == 49


def test_distillation_halves_the_steps_and_keeps_the_guidance(ran):
    tmp, results = ran
    fast = results["fast"]
    assert fast["status"] == "finished" and fast["step"] == 6  # 8 -> 4 -> 2: two rounds of 3
    store = open_storage(fast["checkpoint"].rsplit("/checkpoints/", 1)[0])
    assert sorted({k.split("/")[1] for k in store.list("checkpoints/step-")}) == \
        ["step-000003", "step-000006"]
    model = load(fast).meta["model"]
    assert (model["distilled_steps"], model["distilled_spacing"], model["distilled_guidance"]) \
        == (2, "uniform", 3.0)
    m = fast["metrics"]
    assert (m["teacher_sampling_steps"], m["student_sampling_steps"]) == (8, 2)
    assert m["student_params"] == m["teacher_params"] and m["speedup"] > 0
    # the student samples in its 2 Euler steps, its guidance built in (applied at 1)
    assert results["fast-grid"]["sampler"] == {
        "sampler": "euler", "steps": 2, "nfe": 2, "spacing": "uniform", "label": None,
        "guidance": 1.0, "distilled_guidance": 3.0, "use_ema": True}


def test_a_resumed_distillation_ends_with_the_uninterrupted_weights(tmp_path, ran):
    src, results = ran
    p = build_plan(parse_spec(flow_spec(), source=str(src / "spec.yaml"))).by_name["fast"]
    root = f"file://{tmp_path / 'store'}"
    key = stage(p.job.data, open_storage(root))

    def task(attempt: int) -> Task:
        return Task(job=p.job.resolved(), job_hash="x", experiment="r", storage_root=root,
                    prefix="r/fast/x", tracking_uri="", run_id=None, code_version="test",
                    data_key=key, refs={"teacher": results["flow"]["checkpoint"]},
                    attempt=attempt)

    class StopAfterRoundOne(FlowWorker):
        def end_step(self, step):
            super().end_step(step)
            if step == 3:
                self.request_stop()

    assert StopAfterRoundOne(task(1)).run()["status"] == "stopped"
    resumed = FlowWorker(task(2)).run()
    assert resumed["status"] == "finished" and resumed["timing"]["steps_run"] == 3
    a, b = load(resumed), load(results["fast"])
    assert a.meta["model"]["distilled_steps"] == 2
    for k in [k for k in a.tensors if k.startswith(("net/", "ema.net/"))]:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def train_task(tmp_path, steps: int, prefix: str, attempt: int = 1, augment: dict | None = None) -> Task:
    spec = parse_spec({"experiment": "h", "jobs": [{
        "name": "flow", "kind": "train", "family": "flow",
        "model": {"channels": 8, "channel_mult": [1], "time_sampling": "uniform"},
        "data": {"dataset": "digits", "image_size": 8, "augment": augment or {}},
        "train": {"steps": steps, "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
                  "sample_images": 2, "warmup_steps": 3}}]})
    root = f"file://{tmp_path / 'store'}"
    key = stage(spec.jobs[0].data, open_storage(root))
    return Task(job=spec.jobs[0].resolved(), job_hash="0" * 16, experiment="h",
                storage_root=root, prefix=prefix, tracking_uri="", run_id=None,
                code_version="test", data_key=key, attempt=attempt)


@pytest.mark.parametrize("augment", [None, {"hflip": True, "crop": 0.7}])
def test_a_resumed_training_continues_bit_for_bit(tmp_path, augment):
    """Stopped at step 4 (its checkpoint) and resumed, a job ends with exactly the weights,
    EMA and optimizer state of the uninterrupted run (from the same initial weights: the
    harness leaves initialisation to torch's global generator), augmented or not."""
    torch.manual_seed(0)
    straight = FlowWorker(train_task(tmp_path, 6, "h/straight", augment=augment)).run()
    torch.manual_seed(0)
    assert FlowWorker(train_task(tmp_path, 4, "h/resumed", augment=augment)).run()["step"] == 4
    resumed = FlowWorker(train_task(tmp_path, 6, "h/resumed", attempt=2, augment=augment)).run()
    assert resumed["timing"]["steps_run"] == 2
    a, b = load(straight), load(resumed)
    assert a.step == b.step == 6 and set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    for x, y in zip(a.state["optimizers"]["net"]["state"].values(),
                    b.state["optimizers"]["net"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    if augment:  # the flips and crops reached the batches: the same job plain ends elsewhere
        torch.manual_seed(0)
        plain = load(FlowWorker(train_task(tmp_path, 6, "h/plain")).run())
        assert not torch.equal(plain.tensors["net/conv_in.weight"], a.tensors["net/conv_in.weight"])


# ---- classifier-free guidance ---------------------------------------------------------------

def sampling_worker(tmp_path, ran) -> FlowWorker:
    src, results = ran
    spec = parse_spec({"experiment": "flow", "jobs": [{
        "name": "g", "kind": "sample", "family": "flow", "from": "x", "sample": {}}]})
    uri = results["flow"]["checkpoint"]
    task = Task(job=spec.jobs[0].resolved(), job_hash="2" * 16, experiment="flow",
                storage_root=f"file://{tmp_path}", prefix="g", tracking_uri="", run_id=None,
                code_version="test", refs={"from": uri}, sources=(uri,))
    worker = FlowWorker(task)
    worker.load_for_sampling(uri)
    return worker


def test_guidance_0_samples_the_unconditional_model(tmp_path, ran):
    worker = sampling_worker(tmp_path, ran)
    net = worker.sampling_module("net")
    labels = torch.tensor([0, 3, 7])
    null = torch.full_like(labels, worker.num_classes)
    unguided = worker.flow(net, 3, "heun", 3, "uniform", gen(5), labels, 0.0)
    unconditional = worker.flow(net, 3, "heun", 3, "uniform", gen(5), null, 1.0)
    assert torch.allclose(unguided, unconditional, atol=1e-6)
    conditional = worker.flow(net, 3, "heun", 3, "uniform", gen(5), labels, 1.0)
    assert not torch.allclose(conditional, unconditional, atol=1e-4)  # the label counts
    with_label = worker.generate(3, {"steps": 2, "label": 4, "guidance": 0.0}, gen(6))
    assert with_label.shape == (3, 1, 8, 8)


def test_training_drops_labels_at_the_rate_asked(tmp_path, ran):
    worker = sampling_worker(tmp_path, ran)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append(y)
            return torch.zeros_like(x)

    worker.modules["net"] = Spy()
    labels = torch.arange(20_000) % 10
    worker.conditioned_net(labels, gen(0))(torch.zeros(1), torch.zeros(1))
    dropped = float((seen[0] == 10).float().mean())
    assert dropped == pytest.approx(MODEL["label_dropout"], abs=0.01)
    assert torch.equal(seen[0][seen[0] != 10], labels[seen[0] != 10])


# ---- the spec's errors ----------------------------------------------------------------------

def errors(**changes) -> list[str]:
    spec = flow_spec()
    jobs = {j["name"]: j for j in spec["jobs"]}
    for where, value in changes.items():
        name, section, field = where.split("__")
        jobs[name].setdefault(section, {})[field] = value
    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(spec, "s.yaml"))
    return err.value.lines


@pytest.mark.parametrize("change, message", [
    ({"flow__model__time_sampling": "cosine"},
     "job 'flow': model.time_sampling: Input should be 'uniform' or 'logit_normal' (got 'cosine')"),
    ({"flow__model__channel_mult": [1, 2, 2, 2, 2]},
     "data.image_size: 8 is not divisible by 16, which the U-Net's 5 levels"),
    ({"flow__model__logit_std": 0}, "job 'flow': model.logit_std:"),
    ({"grid__sample__sampler": "ddim"},
     "job 'grid': sample.sampler: must be one of 'euler', 'heun' for family 'flow'"),
    ({"grid__sample__spacing": "trailing"},
     "job 'grid': sample.spacing: must be one of 'uniform', 'shifted' for family 'flow'"),
    ({"grid__sample__label": 10}, "sample.label: 10 but"),
    ({"fast__distill__student_steps": 3},
     "distill.teacher_steps: 3 steps cannot be reached by halving the 8 Euler steps"),
    ({"fast__distill__teacher_steps": 2}, "distill.teacher_steps: 2 steps are not fewer than"),
    ({"fast__distill__spacing": "linear"}, "job 'fast': distill.spacing:"),
    ({"fast__distill__method": "reflow"},
     "job 'fast': distill.method: family 'flow' distils with 'progressive', not 'reflow'"),
    ({"fast-grid__sample__sampler": "heun"},
     "sample.sampler: job 'fast' is distilled for 2 Euler steps; sample it with sampler: euler"),
    ({"fast-grid__sample__guidance": 1.0},
     "sample.guidance: job 'fast' was distilled with guidance 3"),
])
def test_spec_errors_are_one_line_naming_the_field(change, message):
    lines = errors(**change)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert message in lines[0], lines


def test_an_unconditional_teacher_takes_no_guidance():
    spec = flow_spec()
    spec["jobs"][0]["model"] = {"channels": 8, "channel_mult": [1, 2]}
    spec["jobs"] = [j for j in spec["jobs"] if j["name"] in ("flow", "fast")]
    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(spec, "s.yaml"))
    assert len(err.value.lines) == 1 and "distill.guidance: job 'flow' is not class-conditional" \
        in err.value.lines[0], err.value.lines
