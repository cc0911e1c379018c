"""A sweep on the real stack: jobspecs/sweep.yaml in tiny form (digits at 16 px, so that it runs
anywhere). Its trials run as jobs, two at a time, each measuring FD during training; the
driver is killed once two trials have finished; the next run resumes the study from its journal
(the finished trials are cache hits, the rest resume or start), ends with every trial told,
the best one's checkpoint sampled by the job downstream, the study in MLflow (a sweep run
over its trials' runs) and `genforge sweep` printing the trials ranked."""

from __future__ import annotations

import json
import signal
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import ROOT, genforge, genforge_background, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def tiny_sweep_spec() -> dict:
    """The example on digits at 16 px, as a grid whose last two points cannot learn (lr 1e-6
    and 1e-7): once the first two have finished (the median pruner's startup), those are
    stopped early, at step 40 (min_steps) or soon after."""
    example = yaml.safe_load((ROOT / "jobspecs" / "sweep.yaml").read_text())
    ddpm, grid = example["jobs"]
    example.update(experiment="e2e-sweep",
                   defaults={"data": {"dataset": "digits", "image_size": 16},
                             "resources": {"cpus": 1}})
    ddpm["model"].update(channels=8, timesteps=50)
    # long enough after the pruner's first chance (step 40, once two trials have finished)
    # that a stop lands before the job ends: the driver hears of a measurement within ~2 s
    ddpm["train"].update(steps=200, batch_size=32, warmup_steps=0, checkpoint_every=40,
                         log_every=10)
    ddpm["train"]["ema_decay"] = 0.9
    # a small feature network: the default one trains for minutes on a CPU, in both trials
    ddpm["train"]["eval"] = {"classifier": {"steps": 200, "batch_size": 64, "width": 8,
                                            "features": 32}}
    ddpm["sweep"] = {**ddpm["sweep"], "method": "grid", "trials": None,
                     "params": {"train.lr": [3e-3, 2e-3, 1e-6, 1e-7]},
                     "objective": {"metric": "fd", "every": 20, "num_samples": 32},
                     "early_stop": {"method": "median", "min_steps": 40}}
    del ddpm["sweep"]["trials"]
    grid["sample"].update(num_images=4, steps=5)
    return example


def journal(s3_client, bucket: str) -> dict | None:
    found = [k for k in keys(s3_client, bucket, "genforge/e2e-sweep/ddpm/") if k.endswith("/study.json")]
    if not found:
        return None
    return json.loads(s3_client.get_object(Bucket=bucket, Key=found[0])["Body"].read())


def test_a_sweep_survives_its_driver_and_hands_its_best_trial_on(tmp_path, local_stack,
                                                                 stack_env, s3_client):
    spec = write_spec(tmp_path / "sweep.yaml", tiny_sweep_spec())
    driver = genforge_background(["run", str(spec)], stack_env, tmp_path / "run1.log")
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            study = journal(s3_client, local_stack.bucket)
            if study and sum(t["state"] == "complete" for t in study["trials"]) >= 2:
                break
            assert driver.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("no trial finished")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    before = journal(s3_client, local_stack.bucket)["trials"]
    done_before = [t for t in before if t["state"] == "complete"]

    again = genforge(["run", str(spec)], stack_env, timeout=800)
    assert again.returncode == 0, again.stderr[-4000:]
    for t in done_before:  # a finished trial is told to the study again, not run again
        assert f"job 'ddpm[{t['index']}]': started" not in again.stderr
    assert f"sweep of 4 trials (grid), {len(before)} from before" in again.stderr
    study = journal(s3_client, local_stack.bucket)
    trials = study["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete", "pruned", "pruned"], trials
    assert [t["params"] for t in trials[:len(before)]] == [t["params"] for t in before]
    for t in trials:  # the objective was measured every 20 steps, until the trial ended
        steps = sorted(int(s) for s in t["intermediate"])
        assert steps[:2] == [20, 40] and all(b - a == 20 for a, b in zip(steps, steps[1:]))
        assert (steps[-1] < 200) == (t["state"] == "pruned")
    assert all(t["value"] > max(u["value"] for u in trials[:2]) for t in trials[2:])

    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name("e2e-sweep")
    runs = client.search_runs([exp.experiment_id])
    (sweep_run,) = [r for r in runs if r.data.tags.get("genforge.job") == "ddpm"
                    and r.info.status == "FINISHED"]
    best = min((t for t in trials if t["state"] == "complete"), key=lambda t: t["value"])
    assert sweep_run.data.tags["genforge.best_trial"] == f"ddpm[{best['index']}]"
    assert sweep_run.data.metrics["best_fd"] == pytest.approx(best["value"])
    assert sweep_run.data.params["sweep.method"] == "grid"  # the search space is its params
    assert float(sweep_run.data.params["best.train.lr"]) == pytest.approx(best["params"]["train.lr"])
    assert sweep_run.data.metrics["trials_pruned"] == 2
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert {r.data.tags["genforge.job"] for r in children} >= {
        f"ddpm[{t['index']}]" for t in trials if t["index"] >= len(done_before)}
    for r in children:
        fd = client.get_metric_history(r.info.run_id, "fd")
        assert fd and all(m.value > 0 for m in fd)
    pruned = [r for r in children if r.info.status == "KILLED"]
    assert sorted(r.data.tags["genforge.job"] for r in pruned) == ["ddpm[2]", "ddpm[3]"]
    for r in pruned:  # stopped, with why, and their checkpoint kept
        assert r.data.tags["genforge.pruned"].startswith("stopped early (median) at step")
    grid_run = next(r for r in runs if r.data.tags.get("genforge.job") == "grid")
    assert grid_run.info.status == "FINISHED"
    assert grid_run.data.tags["genforge.source_checkpoint"].endswith(
        f"e2e-sweep/ddpm/{best['hash']}/checkpoints/step-000200")

    ranked = genforge(["sweep", str(spec), "ddpm"], stack_env)
    assert ranked.returncode == 0, ranked.stderr
    table = ranked.stdout.splitlines()
    assert table[0].startswith("sweep 'ddpm': grid, 4 of 4 trials, fd (minimised)")
    assert table[1].split()[:2] == ["rank", "trial"]
    assert table[2].split()[:2] == ["1", f"ddpm[{best['index']}]"]
