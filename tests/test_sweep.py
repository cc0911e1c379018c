"""Sweeps (orchestrator/sweep.py): the spec's one-line errors, trials as jobs with their own
hashes, `from:` a sweep or one of its trials in the plan, and the Optuna study behind it: its
samplers and pruners through ask-and-tell, and its journal in storage, from which a study
resumes after its driver's death."""

from __future__ import annotations

import json

import pytest

from orchestrator.plan import build_plan
from orchestrator.spec import SpecError, parse_spec, trial_job
from orchestrator.storage import open_storage
from orchestrator.sweep import Study, grid, objective_of, split_label, trial_count

DDPM = {"channels": 8, "channel_mult": [1, 2], "timesteps": 50}


def swept(sweep: dict, **train) -> dict:
    return {"name": "ddpm", "kind": "train", "family": "ddpm", "model": DDPM,
            "data": {"dataset": "digits", "image_size": 8},
            "train": {"steps": 40, "batch_size": 16, **train}, "sweep": sweep}


def spec(*jobs: dict) -> dict:
    return {"experiment": "sw", "jobs": list(jobs)}


def lines(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(raw, "s.yaml")
    return err.value.lines


SWEEP = {"method": "random", "trials": 6, "params": {"train.lr": {"log_uniform": [1e-4, 3e-3]},
                                                     "train.ema_decay": [0.99, 0.999]},
         "objective": {"metric": "fd", "every": 10, "num_samples": 20}}


def test_a_trial_is_the_job_with_its_params_measuring_the_objective():
    job = parse_spec(spec(swept(SWEEP)), "s.yaml").jobs[0]
    trial = trial_job(job, {"train.lr": 1e-3, "model.channels": 16})
    assert trial.sweep is None and trial.name == "ddpm"
    assert trial.train.lr == 1e-3 and trial.model["channels"] == 16
    assert trial.train.eval.every == 10 and trial.train.eval.num_samples == 20
    assert trial.train.eval.metric == "fd"
    assert trial_count(job.sweep) == 6


@pytest.mark.parametrize("sweep, line", [
    ({**SWEEP, "params": {"train.lrr": [1e-3]}},
     "s.yaml: job 'ddpm': sweep.params.train.lrr: no such setting"),
    ({**SWEEP, "params": {"train.ema_decay": [0.9, 1.5]}},
     "s.yaml: job 'ddpm': sweep.params.train.ema_decay: value 1.5 makes an invalid job: "
     "train.ema_decay: Input should be less than 1 (got 1.5)"),
    ({**SWEEP, "params": {"model.channels": {"int": [2, 64]}}},
     "s.yaml: job 'ddpm': sweep.params.model.channels: value 2 makes an invalid job: "
     "model.channels: Input should be greater than or equal to 4 (got 2)"),
    ({**SWEEP, "params": {"resources.cpus": [1, 2]}},
     "s.yaml: job 'ddpm': sweep.params.resources.cpus: not a setting a trial can change (a path "
     "under train, model, data, e.g. train.lr)"),
    ({"method": "grid", "params": {"train.lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3],
                                   "train.ema_decay": [0.9, 0.99, 0.995, 0.999],
                                   "train.batch_size": [8, 16, 32, 64]}},
     "s.yaml: job 'ddpm': sweep.params: the grid has 80 points, more than 64; set "
     "sweep.allow_large_grid: true to run them all"),
    ({"method": "grid", "params": {"train.lr": {"uniform": [1e-4, 1e-3]}}},
     "s.yaml: job 'ddpm': sweep.params.train.lr: a grid takes a list of values, not a range"),
    ({**SWEEP, "objective": {"metric": "precision"}},
     "s.yaml: job 'ddpm': sweep.objective.metric: family 'ddpm' never logs 'precision' (it can "
     "be: fd, kid, loss, lr, steps_per_s, images_per_s)"),
    ({**SWEEP, "objective": {"metric": "loss", "every": 15}},
     "s.yaml: job 'ddpm': sweep.objective.metric: loss is measured during training, which this "
     "job cannot: train.eval.every: 15 is not a multiple of train.log_every (10): 'loss' is "
     "read at log steps"),
    ({**SWEEP, "params": {"train.lr": {"log_uniform": [0, 1e-3]}}},
     "s.yaml: job 'ddpm': sweep.params: train.lr: log_uniform: a log range must be positive "
     "(got [0.0, 0.001])"),
    ({**SWEEP, "params": {"train.lr": 0.001}},
     "s.yaml: job 'ddpm': sweep.params: train.lr: a list of values or a range such as {uniform: "
     "[low, high]} (or log_uniform, int, log_int) (got 0.001)"),
])
def test_a_bad_sweep_is_one_line(sweep, line):
    assert line in lines(spec(swept(sweep)))


def test_a_first_stage_sweep_scores_what_it_measures_at_the_end(tmp_path):
    vq = {"name": "vq", "kind": "train", "family": "vqgan", "data": {"dataset": "digits", "image_size": 8},
          "model": {"channels": 8, "channel_mult": [1, 2]}, "train": {"steps": 20},
          "sweep": {"method": "grid", "params": {"train.lr": [1e-3, 2e-3]},
                    "objective": {"metric": "holdout_psnr"}}}
    assert lines(spec(vq)) == [
        "s.yaml: job 'vq': sweep.early_stop.method: stopping early needs an objective measured "
        "during training, not 'holdout_psnr' (measured when training ends); use early_stop: "
        "{method: none}"]
    vq["sweep"]["early_stop"] = {"method": "none"}
    job = parse_spec(spec(vq), "s.yaml").jobs[0]
    study = Study(job, open_storage(f"file://{tmp_path}"))
    assert study.mode == "max" and study.total == 2
    fd = dict(vq, sweep={**vq["sweep"], "objective": {"metric": "fd"}})
    assert lines(spec(fd))[0].startswith(
        "s.yaml: job 'vq': sweep.objective.metric: fd is measured during training, which this "
        "job cannot: ")


def test_from_a_sweep_reads_its_best_trial_and_from_a_trial_that_trial():
    sample = {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm"}
    third = {"name": "third", "kind": "sample", "family": "ddpm", "from": "ddpm[3]"}
    plan = build_plan(parse_spec(spec(swept(SWEEP), sample, third), "s.yaml"))
    assert plan.by_name["grid"].deps == ("ddpm",) and plan.by_name["third"].deps == ("ddpm",)
    assert split_label("ddpm[3]") == ("ddpm", 3) and split_label("ddpm") == ("ddpm", None)
    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(spec(swept(SWEEP), dict(third, **{"from": "ddpm[6]"})), "s.yaml"))
    assert err.value.lines == ["s.yaml: job 'third': from: sweep 'ddpm' has 6 trials, numbered "
                               "from 0 (got ddpm[6])"]
    plain = dict(swept(SWEEP), sweep=None)
    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(spec(plain, third), "s.yaml"))
    assert err.value.lines == ["s.yaml: job 'third': from: no job named 'ddpm[3]' in this spec"]


def test_a_grid_runs_each_point_once_in_order(tmp_path):
    sweep = {"method": "grid", "params": {"train.lr": [1e-3, 2e-3], "model.channels": [8, 16]},
             "objective": {"metric": "fd", "every": 10}, "parallel": 4}
    job = parse_spec(spec(swept(sweep)), "s.yaml").jobs[0]
    study = Study(job, open_storage(f"file://{tmp_path}"))
    asked = [study.ask().params for _ in range(study.total)]
    assert asked == grid(job.sweep) == [
        {"train.lr": 1e-3, "model.channels": 8}, {"train.lr": 1e-3, "model.channels": 16},
        {"train.lr": 2e-3, "model.channels": 8}, {"train.lr": 2e-3, "model.channels": 16}]
    assert not study.can_ask()


def fd_of(params: dict) -> float:
    """A made-up objective: best near lr 1e-3, ema 0.999."""
    import math

    return 10 + 30 * abs(math.log10(params["train.lr"]) + 3) + 100 * abs(params["train.ema_decay"] - 0.999)


def test_the_median_pruner_stops_trials_worse_than_the_others_at_the_same_step(tmp_path):
    sweep = {**SWEEP, "trials": 12, "parallel": 1, "early_stop": {"method": "median"}}
    job = parse_spec(spec(swept(sweep)), "s.yaml").jobs[0]
    study = Study(job, open_storage(f"file://{tmp_path}"))
    stopped = []
    while study.can_ask():
        rec = study.ask()
        for step in range(10, 41, 10):  # a curve that falls towards the trial's final fd
            value = fd_of(rec.params) * (1 + 1.0 / step)
            reason = study.report(rec, step, value)
            if reason:
                study.tell(rec, "pruned", reason=reason)
                stopped.append(rec.index)
                break
        else:
            study.tell(rec, "complete", fd_of(rec.params) * (1 + 1 / 40))
    assert study.done() and stopped  # some stopped early...
    assert 0 not in stopped and 1 not in stopped  # ...none of the first two (its startup)
    best = study.best()
    assert best.state == "complete"
    assert best.value == min(r.value for r in study.records if r.state == "complete")
    assert all(r.value >= best.value for r in study.records if r.state == "pruned")
    ranked = study.ranked()
    assert ranked[0] is best and [r.state for r in ranked][-len(stopped):] == ["pruned"] * len(stopped)


def test_asha_lets_only_the_best_third_at_each_rung_go_on(tmp_path):
    """Successive halving at min_steps 10: rungs at 10 and 30; a trial goes past a rung only if
    it is among the best third of the trials measured there so far (the first always is)."""
    sweep = {**SWEEP, "trials": 12, "parallel": 1}  # asha: the default
    job = parse_spec(spec(swept(sweep)), "s.yaml").jobs[0]
    study = Study(job, open_storage(f"file://{tmp_path}"))
    at_rung: list[float] = []
    while study.can_ask():
        rec = study.ask()
        for step in range(10, 41, 10):
            value = fd_of(rec.params) * (1 + 1.0 / step)
            reason = study.report(rec, step, value)
            if step == 10:
                at_rung.append(value)
                best_third = sorted(at_rung)[:max(1, len(at_rung) // 3)]
                assert (reason is None) == (value <= best_third[-1]), (rec.index, at_rung)
            if reason:
                assert step in (10, 30) and reason.startswith("stopped early (asha) at step")
                study.tell(rec, "pruned", reason=reason, steps=step)
                break
        else:
            study.tell(rec, "complete", value, steps=40)
    assert study.records[0].state == "complete"
    stopped = [r for r in study.records if r.state == "pruned"]
    assert len(stopped) >= 6 and all(r.steps == max(r.intermediate) for r in stopped)


def test_with_no_every_a_pruner_with_rungs_is_measured_at_them_alone(tmp_path):
    """asha and hyperband read the objective at min_steps, 3x, 9x...: a trial measures it there
    and at the end, unless `every` is asked for; median reads every measurement."""
    def trial_eval(early_stop: dict, every: int | None = None, steps: int = 400):
        objective = {"metric": "fd", "num_samples": 20, **({"every": every} if every else {})}
        sweep = {**SWEEP, "objective": objective, "early_stop": early_stop}
        return trial_job(parse_spec(spec(swept(sweep, steps=steps)), "s.yaml").jobs[0], {}).train.eval

    for method in ("asha", "hyperband"):
        got = trial_eval({"method": method, "min_steps": 10})
        assert (got.every, got.at) == (None, [10, 30, 90, 270])
    got = trial_eval({"method": "asha"})  # min_steps: an eighth of the steps
    assert (got.every, got.at) == (None, [50, 150])
    assert (trial_eval({"method": "asha"}, every=40).every, trial_eval({}, every=40).at) == (40, None)
    assert (trial_eval({"method": "median"}).every, trial_eval({"method": "median"}).at) == (50, None)


def test_asha_decides_the_same_measured_at_its_rungs_alone(tmp_path):
    """The same search, measured every 10 steps or at the rungs (10, 30) and the end alone:
    the same trials stop at the same rungs."""
    def run(steps: list[int], root: str) -> list[tuple[str, int]]:
        job = parse_spec(spec(swept({**SWEEP, "trials": 12, "parallel": 1})), "s.yaml").jobs[0]
        study, ended = Study(job, open_storage(f"file://{tmp_path}/{root}")), []
        while study.can_ask():
            rec = study.ask()
            for step in steps:
                reason = study.report(rec, step, fd_of(rec.params) * (1 + 1.0 / step))
                if reason:
                    study.tell(rec, "pruned", reason=reason, steps=step)
                    ended.append(("pruned", step))
                    break
            else:
                study.tell(rec, "complete", fd_of(rec.params) * 1.025, steps=40)
                ended.append(("complete", 40))
        return ended

    every = run([10, 20, 30, 40], "every")
    assert every == run([10, 30, 40], "rungs")
    assert {step for state, step in every if state == "pruned"} == {10, 30}


def test_a_study_resumes_from_its_journal_after_its_driver_died(tmp_path):
    storage = open_storage(f"file://{tmp_path}")
    job = parse_spec(spec(swept({**SWEEP, "method": "tpe", "trials": 8, "parallel": 2})),
                     "s.yaml").jobs[0]
    first = Study(job, storage)
    recs = [first.ask() for _ in range(3)]
    first.report(recs[0], 10, 40.0)
    first.tell(recs[0], "complete", 30.0, checkpoint="file:///c0")
    first.report(recs[1], 10, 80.0)
    first.tell(recs[1], "pruned", reason="stopped early")
    first.report(recs[2], 10, 50.0)  # still running when the driver dies
    first.save()
    journal = json.loads(storage.get_bytes("study.json"))
    assert [t["state"] for t in journal["trials"]] == ["complete", "pruned", "running"]

    again = Study(job, storage)  # a new driver
    assert [r.state for r in again.records] == ["complete", "pruned", "running"]
    assert again.records[2].params == recs[2].params and again.records[2].intermediate == {10: 50.0}
    assert len(again.study.trials) == 3  # Optuna knows all three: two told, one asked again
    assert [r.index for r in again.running()] == [2]
    more = [again.ask() for _ in range(5)]
    assert [r.index for r in more] == [3, 4, 5, 6, 7] and not again.can_ask()
    again.tell(again.records[2], "complete", 20.0)
    for rec in more:
        again.tell(rec, "complete", fd_of(rec.params))
    assert again.done() and again.best().value == min(r.value for r in again.records
                                                      if r.state == "complete")


def test_a_logged_metric_is_an_objective_read_at_log_steps(tmp_path):
    """Any metric the training logs: the trial measures its mean every `every` steps (a
    multiple of log_every; by default an eighth of the steps rounded down to one), and it
    grows or shrinks as its name says."""
    sweep = {**SWEEP, "objective": {"metric": "loss"}}
    job = parse_spec(spec(swept(sweep, steps=400)), "s.yaml").jobs[0]
    trial = trial_job(job, {"train.lr": 1e-3})
    assert trial.train.eval.metric == "loss" and trial.train.eval.every == 50
    assert Study(job, open_storage(f"file://{tmp_path}/a")).first_measured == 50
    fast = {**SWEEP, "objective": {"metric": "images_per_s"}}
    job = parse_spec(spec(swept(fast, steps=100, log_every=4)), "s.yaml").jobs[0]
    assert trial_job(job, {}).train.eval.every == 12
    assert Study(job, open_storage(f"file://{tmp_path}/b")).mode == "max"
    gan = {"name": "gan", "kind": "train", "family": "gan", "data": {"dataset": "digits", "image_size": 8},
           "train": {"steps": 20}, "sweep": {**SWEEP, "objective": {"metric": "loss"}}}
    assert lines(spec(gan)) == [
        "s.yaml: job 'gan': sweep.objective.metric: family 'gan' never logs 'loss' (it can be: "
        "fd, kid, loss_d, loss_g, d_real, d_fake, lr, steps_per_s, images_per_s)"]
    vq = {"name": "vq", "kind": "train", "family": "vqgan", "data": {"dataset": "digits", "image_size": 8},
          "model": {"channels": 8, "channel_mult": [1, 2]}, "train": {"steps": 40},
          "sweep": {**SWEEP, "objective": {"metric": "psnr"}, "early_stop": {"method": "asha"}}}
    job = parse_spec(spec(vq), "s.yaml").jobs[0]  # a first stage may stop early on what it logs
    assert trial_job(job, {}).train.eval.metric == "psnr"
    assert Study(job, open_storage(f"file://{tmp_path}/c")).mode == "max"


def test_a_trials_objective_comes_from_its_result():
    result = {"evals": [[10, {"fd": 40.0, "kid": 0.1}], [20, {"fd": 25.0, "kid": 0.05}]],
              "metrics": {"holdout_psnr": 21.5}}
    assert objective_of(result, "fd") == 25.0 and objective_of(result, "kid") == 0.05
    assert objective_of(result, "holdout_psnr") == 21.5 and objective_of({}, "fd") is None
    assert objective_of({"evals": [[50, {"loss": 0.25}]]}, "loss") == 0.25


def test_a_trial_has_the_hash_of_the_same_job_run_without_a_sweep():
    from orchestrator.plan import job_hash

    job = parse_spec(spec(swept(SWEEP)), "s.yaml").jobs[0]
    trial = trial_job(job, {"train.lr": 1e-3, "train.ema_decay": 0.99})
    plain = parse_spec(spec(dict(swept(SWEEP), sweep=None,
                                 train={"steps": 40, "batch_size": 16, "lr": 1e-3,
                                        "ema_decay": 0.99})), "s.yaml").jobs[0]
    assert plain.train.eval is None and trial.train.eval is not None
    digest = lambda j: job_hash(j, {}, "code", "datasets/x/index.json")  # noqa: E731
    assert digest(trial) == digest(plain)  # measuring during training changes no weight
    assert digest(trial_job(job, {"train.lr": 2e-3, "train.ema_decay": 0.99})) != digest(plain)
    assert digest(job) != digest(plain)  # the sweep itself is a job of its own


def test_the_trials_ranked_and_drawn(tmp_path):
    from orchestrator.sweep import plot, render

    job = parse_spec(spec(swept({**SWEEP, "trials": 4})), "s.yaml").jobs[0]
    study = Study(job, open_storage(f"file://{tmp_path}"))
    values = [30.0, 20.0, 50.0]
    for value in values:
        rec = study.ask()
        study.report(rec, 10, value * 2)
        study.tell(rec, "complete", value, steps=40)
    rec = study.ask()
    study.report(rec, 10, 200.0)
    study.tell(rec, "pruned", reason="stopped early", steps=12)
    table = render(study).splitlines()
    assert table[0] == "sweep 'ddpm': random, 4 of 4 trials, fd (minimised)"
    assert table[1].split() == ["rank", "trial", "train.lr", "train.ema_decay", "fd", "steps", "state"]
    assert [row.split()[1] for row in table[2:6]] == ["ddpm[1]", "ddpm[0]", "ddpm[2]", "ddpm[3]"]
    assert table[2].split()[-3:] == ["20", "40", "complete"] and table[5].split()[-3:] == [
        "200", "12", "pruned"]
    assert table[6] == "steps trained: 132 of 160 (82%) for trials to full length"
    plot(study, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
