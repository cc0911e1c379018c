"""`train.eval`: a training job's own evaluations, in-process on tiny models. The metrics reach
the run at their steps and the driver's progress; they track training; the job trains the same
weights with them as without; the classifier is the evaluate jobs' cached one; a resumed job
logs no step twice; the spec's and the worker's one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri
from orchestrator.inprocess import MemoryLogger, run_jobs, tasks
from orchestrator.spec import ClassifierSpec, SpecError, TrainSpec, parse_spec
from orchestrator.storage import open_storage
from orchestrator.task import Task
from workers.base import JobError
from workers.evaluation import features
from workers.evaluation.metrics import score
from workers.registry import worker_class
from workers.stream import staged_images

# The training jobs' classifier, small for these tests (the real default trains 1500 steps):
# an evaluate job that asks for the same configuration shares it.
SMALL = ClassifierSpec(steps=150, batch_size=64, lr=2e-3, width=8, features=32).model_dump(mode="json")
MODELS = {"flow": {"channels": 8, "channel_mult": [1]},
          "ddpm": {"channels": 8, "channel_mult": [1], "timesteps": 40},
          "gan": {"g_width": 8, "d_width": 8}}


DEFAULT_CLASSIFIER = features.default_config  # the real one, before the fixture replaces it


@pytest.fixture(autouse=True)
def small_classifier(monkeypatch):
    monkeypatch.setattr(features, "default_config", lambda: dict(SMALL))


def job(family: str = "flow", steps: int = 7, eval_: dict | None = None, **train) -> dict:
    out = {"name": family, "kind": "train", "family": family, "model": MODELS[family],
           "train": {"steps": steps, "batch_size": 8, "log_every": 1, "sample_images": 2,
                     **train}}
    if eval_ is not None:
        out["train"]["eval"] = eval_
    return out


def spec(*jobs: dict) -> dict:
    return {"experiment": "te", "defaults": {"data": {"dataset": "digits", "image_size": 8}},
            "jobs": list(jobs)}


def load(result: dict):
    prefix = result["checkpoint"].rsplit("/checkpoints/", 1)[0]
    return load_checkpoint(*resolve_checkpoint_uri(prefix))


# ---- through MLflow: the steps, the values, the shared classifier -----------------------------

@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A flow job evaluated at steps 3, 6 and 7 (the last), then an evaluate job of it that
    asks for the classifier the training job used."""
    workdir = tmp_path_factory.mktemp("tracked")
    data = spec(job(eval_={"every": 3, "num_samples": 20}),
                {"name": "score", "kind": "evaluate", "from": ["flow"],
                 "evaluate": {"num_samples": 20, "sample": {"steps": 4}, "classifier": SMALL}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "default_config", lambda: dict(SMALL))
        results = run_jobs(workdir, data)
    return workdir, results


def test_fd_and_kid_are_logged_at_every_and_the_last_step(ran):
    workdir, results = ran
    assert results["flow"]["status"] == "finished"
    assert [step for step, _ in results["flow"]["evals"]] == [3, 6, 7]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = results["_runs"]["flow"]
    histories = {k: client.get_metric_history(run, k) for k in ("fd", "kid", "eval_s")}
    for key, points in histories.items():
        assert sorted(p.step for p in points) == [3, 6, 7], key
        assert all(math.isfinite(p.value) and p.value >= 0 for p in points), key
    seconds = [p.value for p in sorted(histories["eval_s"], key=lambda p: p.step)]
    assert 0 < seconds[0] < seconds[1] < seconds[2]  # cumulative
    tags = client.get_run(run).data.tags
    assert tags["genforge.classifier_cache"] == "miss"  # the training job trained it
    assert 0 < float(tags["genforge.classifier_test_accuracy"]) <= 1
    assert "classifier_loss" in client.get_run(run).data.metrics


def test_an_evaluate_job_reads_the_classifier_a_training_job_cached(ran):
    workdir, results = ran
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    scored = client.get_run(results["_runs"]["score"]).data
    assert scored.tags["genforge.classifier_cache"] == "hit"
    assert "classifier_loss" not in scored.metrics
    root = open_storage(f"file://{workdir / 'store'}")
    assert len({k.rsplit("/", 1)[0] for k in root.list("") if "/classifier/" in k
                and k.endswith("manifest.json")}) == 1


def test_a_training_job_asks_for_the_evaluate_jobs_default_classifier():
    evaluate = parse_spec(spec({"name": "e", "kind": "evaluate", "from": ["x"]})).jobs[0]
    assert DEFAULT_CLASSIFIER() == evaluate.resolved()["evaluate"]["classifier"]
    assert DEFAULT_CLASSIFIER()["steps"] == 1500



def test_a_training_job_may_name_its_own_classifier(tmp_path, monkeypatch):
    """`train.eval.classifier`: that one is trained and cached (under its own key), not the
    default, and an evaluate job that asks for it reads it."""
    def no_default():
        raise AssertionError("the default classifier was asked for")

    monkeypatch.setattr(features, "default_config", no_default)
    own = {**SMALL, "steps": 60}
    results = run_jobs(tmp_path, spec(job(eval_={"every": 7, "num_samples": 20, "classifier": own}),
                                      {"name": "score", "kind": "evaluate", "from": ["flow"],
                                       "evaluate": {"num_samples": 20, "sample": {"steps": 4},
                                                    "classifier": own}}))
    assert [step for step, _ in results["flow"]["evals"]] == [7]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trained = client.get_run(results["_runs"]["flow"]).data
    assert trained.tags["genforge.classifier_cache"] == "miss"
    assert [m.step for m in client.get_metric_history(results["_runs"]["flow"],
                                                       "classifier_loss")][-1] == 60
    assert client.get_run(results["_runs"]["score"]).data.tags["genforge.classifier_cache"] == "hit"

# ---- in-process: progress, determinism, the same weights --------------------------------------

def run_worker(workdir: Path, data: dict, worker_type=None, logger=None, attempt: int = 1):
    task = next(tasks(workdir, data))
    if attempt > 1:
        task = Task(**{**task.__dict__, "attempt": attempt})
    worker = (worker_type or worker_class(task.family))(task)
    worker.log = logger or MemoryLogger()
    return worker, worker.run()


def test_progress_lists_the_evaluations_and_they_repeat_exactly(tmp_path):
    worker, result = run_worker(tmp_path, spec(job(eval_={"every": 3, "num_samples": 20})))
    evals = worker.progress()["evals"]
    assert [step for step, _ in evals] == [3, 6, 7]
    assert result["evals"] == evals  # and in the result (result.json), for a cached job's reader
    assert worker.progress()["phase"] != "evaluating"
    logged = {step: m for _, step, m in worker.log.metrics if "fd" in m}
    for step, metrics in evals:
        assert set(metrics) == {"fd", "kid"}
        assert metrics == {k: logged[step][k] for k in ("fd", "kid")}
    # the same weights at the same step: the same numbers; torch's generator left alone
    torch.manual_seed(123)
    state = torch.get_rng_state()
    worker._evaluation(7)
    assert worker.progress()["evals"][-1] == evals[-1]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training for m in worker.modules.values())


@pytest.mark.parametrize("family", ["flow", "ddpm", "gan"])
def test_a_job_trains_the_same_weights_with_evaluations_as_without(tmp_path, family):
    """Its classifier trained on the way (a cache miss), evaluated every other step, with a
    checkpoint and a grid in between: bit for bit the weights, EMA and optimizer state."""
    common = {"checkpoint_every": 2, "sample_every": 3, "warmup_steps": 2}
    torch.manual_seed(0)
    unevaluated, plain = run_worker(tmp_path / "plain", spec(job(family, 6, **common)))
    torch.manual_seed(0)
    evaluated, with_eval = run_worker(tmp_path / "eval", spec(
        job(family, 6, {"every": 2, "num_samples": 12}, **common)))
    assert evaluated.log.tags["genforge.classifier_cache"] == "miss"
    assert [s for s, _ in evaluated.progress()["evals"]] == [2, 4, 6]
    a, b = load(plain), load(with_eval)
    assert a.step == b.step == 6 and set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    for name, opt in a.state["optimizers"].items():
        for x, y in zip(opt["state"].values(), b.state["optimizers"][name]["state"].values()):
            assert all(torch.equal(x[k], y[k]) for k in x), name
    def losses(worker):  # what each step logged, less its timing
        return [(step, {k: v for k, v in m.items() if not k.endswith("_per_s")})
                for _, step, m in worker.log.metrics if "lr" in m]

    assert losses(evaluated) == losses(unevaluated) and len(losses(evaluated)) == 6


@pytest.mark.parametrize("family", ["ddpm", "gan"])
def test_initial_weights_come_from_the_train_seed_not_the_process(tmp_path, family):
    """Two trials of a sweep start alike in whatever processes they run; another seed differs."""
    def weights(name: str, seed: int, draws: int):
        torch.rand(draws)  # what the process drew before the job
        _, result = run_worker(tmp_path / name, spec(job(family, 1, lr=1e-12, seed=seed)))
        return load(result).tensors

    a, b, c = weights("a", 3, 1), weights("b", 3, 1000), weights("c", 4, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_at_names_the_steps_to_evaluate_at_besides_the_last(tmp_path):
    worker, result = run_worker(tmp_path, spec(job(eval_={"at": [2, 5], "num_samples": 20})))
    assert [step for step, _ in result["evals"]] == [2, 5, 7]
    assert sorted(step for _, step, m in worker.log.metrics if "fd" in m) == [2, 5, 7]
    # `every` with it: both; and `at` alone round-trips through the job's data
    both = parse_spec(spec(job(eval_={"every": 3, "at": [5]}))).jobs[0]
    assert (both.train.eval.every, both.train.eval.at) == (3, [5])
    alone = parse_spec(spec(job(eval_={"at": [5]}))).jobs[0]
    assert alone.train.eval.every is None
    assert parse_spec({**spec(), "jobs": [alone.resolved()]}).jobs[0].train.eval == alone.train.eval


def test_a_logged_metric_is_measured_as_its_mean_since_the_last_measurement(tmp_path):
    worker, result = run_worker(tmp_path, spec(job("ddpm", 7, {"every": 2, "metric": "loss"})))
    logged = {step: m["loss"] for _, step, m in worker.log.metrics if "loss" in m}
    assert sorted(logged) == list(range(1, 8))
    windows = {2: [1, 2], 4: [3, 4], 6: [5, 6], 7: [7]}
    assert result["evals"] == worker.progress()["evals"]
    assert [step for step, _ in result["evals"]] == [2, 4, 6, 7]
    for step, values in result["evals"]:
        want = sum(logged[s] for s in windows[step]) / len(windows[step])
        assert values == {"loss": pytest.approx(want)}
    assert not any("fd" in m for _, _, m in worker.log.metrics)  # nothing was sampled
    assert "genforge.classifier_cache" not in worker.log.tags


def test_a_logged_metric_the_model_never_logs_is_one_line(tmp_path):
    vq = {"name": "vq", "kind": "train", "family": "vqgan", "model": {"channels": 8, "channel_mult": [1]},
          "train": {"steps": 4, "batch_size": 8, "log_every": 1, "eval": {"every": 2, "metric": "d_loss"}}}
    with pytest.raises(JobError, match=r"^train.eval.metric: this job logs no 'd_loss' \(it logs: "
                                       r"bottleneck_loss, codebook_usage, images_per_s, loss, lr, "):
        run_worker(tmp_path, spec(vq))  # its discriminator joins at step 1000
    bad = dict(vq, train={**vq["train"], "eval": {"every": 2, "metric": "fid"}})
    with pytest.raises(SpecError) as err:
        parse_spec(spec(bad), "s.yaml")
    assert err.value.lines == [
        "s.yaml: job 'vq': train.eval.metric: family 'vqgan' never logs 'fid' during training (it "
        "can be: fd, kid, loss, rec_l1, mse, psnr, bottleneck_loss, perplexity, codebook_usage, kl, "
        "latent_std, g_loss, d_loss, lr, steps_per_s, images_per_s)"]


class Resumable(MemoryLogger):
    """A run's metrics across attempts, answering `last_logged_step` as MLflow would."""

    def last_logged_step(self, key: str) -> int:
        return max((step for _, step, m in self.metrics if key in m), default=0)


def test_a_resumed_job_evaluates_again_but_logs_no_step_twice(tmp_path):
    """Attempt 1 dies at step 7, its newest checkpoint at 4 and evaluations logged at 3 and 6;
    attempt 2 trains 5-7 again: its evaluation at 6 repeats attempt 1's exactly and is not
    logged again, the one at 7 is."""
    data = spec(job(steps=8, eval_={"every": 3, "num_samples": 20}, checkpoint_every=4))
    flow = worker_class("flow")

    class DiesAtSeven(flow):
        def end_step(self, step):
            super().end_step(step)
            if step == 7:
                raise RuntimeError("the node went away")

    log = Resumable()
    with pytest.raises(RuntimeError):
        run_worker(tmp_path, data, DiesAtSeven, log)
    first = {step: m for _, step, m in log.metrics if "fd" in m}
    assert sorted(first) == [3, 6]
    worker, result = run_worker(tmp_path, data, logger=log, attempt=2)
    assert result["status"] == "finished" and result["timing"]["steps_run"] == 4
    # the evaluation at 3 from the checkpoint at 4, the one at 6 again, then the last
    evals = worker.progress()["evals"]
    assert [s for s, _ in evals] == [3, 6, 8] and result["evals"] == evals
    for step in (3, 6):
        assert dict(evals)[step] == {k: first[step][k] for k in ("fd", "kid")}
    steps = sorted(step for _, step, m in log.metrics if "fd" in m)
    assert steps == [3, 6, 8]


def test_a_job_stops_while_training_its_classifier(tmp_path, monkeypatch):
    """Asked to stop while it trains the data set's classifier (before its first step), a
    training job stops there, as an evaluate job does: nothing cached, no checkpoint."""
    steps, workers, train = [], [], features.train_classifier

    def spy(net, batches, cfg, on_step=None):
        def step(i, loss):
            steps.append(i)
            assert workers[0].progress()["phase"] == "training the feature network"
            if i == 3:
                workers[0].request_stop()
            on_step(i, loss)

        return train(net, batches, cfg, step)

    flow = worker_class("flow")

    class Remembered(flow):
        def __init__(self, task):
            super().__init__(task)
            workers.append(self)

    monkeypatch.setattr(features, "train_classifier", spy)
    _, result = run_worker(tmp_path, spec(job(eval_={"every": 3, "num_samples": 20})),
                           Remembered)
    assert result == {"status": "stopped", "step": 3, "phase": "training the feature network"}
    assert steps == [1, 2, 3]
    root = open_storage(f"file://{tmp_path / 'store'}")
    assert not [k for k in root.list("") if "/classifier/" in k or "/checkpoints/" in k]


# ---- the metrics track training ---------------------------------------------------------------

def test_fd_falls_as_a_model_trains(tmp_path):
    """A small GAN at steps 50 and 200: its samples come much closer to the held-out images."""
    data = spec(job("gan", 200, {"every": 50, "num_samples": 100}, batch_size=32, lr=2e-3,
                    ema_decay=0.99, log_every=50))
    data["jobs"][0]["model"] = {"g_width": 16, "d_width": 16}
    worker, _ = run_worker(tmp_path, data)
    fd = dict((step, m["fd"]) for step, m in worker.progress()["evals"])
    assert sorted(fd) == [50, 100, 150, 200]
    assert fd[200] < 0.5 * fd[50], fd
    # and the scale: training images score far below either against the same held-out ones
    evaluation = worker._evaluation
    real = staged_images(worker.root, worker.task.data_key, worker.job).take(torch.arange(100))
    baseline = score(evaluation.extractor, evaluation.reference, real)
    assert baseline["fd"] < 0.5 * fd[200], (baseline, fd)


# ---- one-line errors --------------------------------------------------------------------------

def errors(data: dict) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(data, "s.yaml")
    return err.value.lines


@pytest.mark.parametrize("eval_, field", [
    ({"every": 0}, "train.eval.every"),
    ({"num_samples": 9}, "train.eval.num_samples"),
    ({"metric": "is"}, "train.eval.metric"),
    ({"steps": 0}, "train.eval.steps"),
    ({"every": 10, "often": True}, "train.eval.often"),
    ({"at": [0]}, "train.eval.at[0]"),
])
def test_bad_settings_are_one_line_each(eval_, field):
    lines = errors(spec(job(eval_=eval_)))
    assert len(lines) == 1 and lines[0].startswith(f"s.yaml: job 'flow': {field}: "), lines


def test_a_logged_metric_is_read_at_log_steps_only():
    assert errors(spec(job("ddpm", eval_={"at": [4, 5], "metric": "loss"}, log_every=2))) == [
        "s.yaml: job 'ddpm': train.eval.at: 5 is not a multiple of train.log_every (2): "
        "'loss' is read at log steps"]


@pytest.mark.parametrize("first_stage, named", [
    ({"name": "vq", "kind": "train", "family": "vqgan", "model": {}}, "family 'vqgan'"),
    ({"name": "ae", "kind": "train", "family": "ldm", "model": {"stage": "autoencoder"}},
     "family 'ldm' with model.stage 'autoencoder'"),
])
def test_a_first_stage_cannot_be_evaluated_while_it_trains(first_stage, named):
    first_stage["train"] = {"eval": {}}
    lines = errors(spec(first_stage))
    assert lines == [f"s.yaml: job '{first_stage['name']}': train.eval: {named} trains a "
                     "first-stage autoencoder, which reconstructs images instead of generating "
                     "them; evaluate the model trained on it"]


def test_every_family_that_samples_takes_it_with_defaults():
    parsed = parse_spec(spec(
        job("ddpm", eval_={}), job("gan", eval_={"metric": "kid"}),
        {"name": "vq", "kind": "train", "family": "vqgan", "model": {}},
        {"name": "ar", "kind": "train", "family": "autoregressive",
         "model": {"tokenizer": "vq"}, "train": {"eval": {"every": 100}}},
        {"name": "ae", "kind": "train", "family": "ldm", "model": {"stage": "autoencoder"}},
        {"name": "ldm", "kind": "train", "family": "ldm",
         "model": {"autoencoder": "ae", "channel_mult": [1]}, "train": {"eval": {}}}))
    assert parsed.job("ddpm").train.eval.model_dump() == {
        "every": 500, "at": None, "num_samples": 500, "metric": "fd", "steps": None,
        "classifier": None}
    assert parsed.job("gan").train.eval.metric == "kid"
    assert parsed.job("vq").train.eval is None and TrainSpec().eval is None


def test_the_held_out_split_must_hold_num_samples(tmp_path):
    # digits: 1797 images, a tenth of them held out
    with pytest.raises(JobError, match=r"^train\.eval\.num_samples: 500 but the held-out split "
                                       r"has 1\d\d images$"):
        run_worker(tmp_path, spec(job(eval_={"num_samples": 500})))


def test_evaluations_change_no_hash():
    from orchestrator.plan import build_plan, resolve_inputs

    def hashes(data):
        parsed = parse_spec(data)
        plan = build_plan(parsed, resolve_inputs(parsed, lambda j: "datasets/k/data.npz",
                                                 lambda uri: None))
        return {p.name: p.hash for p in plan.jobs}

    assert hashes(spec(job())) == hashes(spec(job(eval_={"every": 2, "metric": "kid"})))
