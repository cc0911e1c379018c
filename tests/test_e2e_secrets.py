"""Credentials never leave where they belong: after a pipeline (with a failing job) through
`genforge run`, one through `genforge submit`, and a run with wrong credentials, the stack's
S3 secret, a known fake one and the stack's Ray token appear in no MLflow param, tag or metric
name, in no output of the commands, in no Ray log file and in no error message."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import stack
from support import genforge, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FAKE = "FAKE-SECRET-7f3a9c1e55d2"


def spec(experiment: str) -> dict:
    return {"experiment": experiment,
            "defaults": {"data": {"dataset": "digits", "image_size": 8},
                         "resources": {"cpus": 1, "gpus": 0}},
            "jobs": [{"name": "ok", "kind": "train", "family": "ddpm",
                      "model": {"channels": 8, "channel_mult": [1], "timesteps": 10},
                      "train": {"steps": 4, "batch_size": 8, "log_every": 2, "sample_images": 1}},
                     # a job that runs out of time: it fails, with an error on its run
                     {"name": "bad", "kind": "train", "family": "ddpm",
                      "model": {"channels": 8, "channel_mult": [1], "timesteps": 10},
                      "train": {"steps": 1_000_000, "batch_size": 8, "sample_images": 1},
                      "resources": {"timeout_s": 3}}]}


def test_no_secret_in_runs_outputs_logs_or_errors(tmp_path, local_stack, stack_env):
    started = time.time()
    home = Path(local_stack.home)
    secrets = [stack.credentials(home)["secret_key"], FAKE,
               (home / stack.RAY_TOKEN_FILE).read_text()]  # Ray's token travels by its path
    outputs = []
    out = genforge(["run", str(write_spec(tmp_path / "a.yaml", spec("e2e-secrets")))], stack_env)
    assert out.returncode == 1 and "job 'bad' failed" in out.stderr, out.stderr[-2000:]
    outputs += [out.stdout, out.stderr]
    sub = genforge(["submit", str(write_spec(tmp_path / "b.yaml", spec("e2e-secrets-submit"))),
                    "--wait"], stack_env)
    outputs += [sub.stdout, sub.stderr, genforge(["logs", sub.stdout.strip().splitlines()[-1]],
                                                 stack_env).stdout]
    # wrong credentials: refused, and the refusal does not echo them
    wrong = genforge(["run", str(tmp_path / "a.yaml")],
                     {**stack_env, "AWS_ACCESS_KEY_ID": "AKFAKE", "AWS_SECRET_ACCESS_KEY": FAKE,
                      "GENFORGE_STORAGE": f"s3://{local_stack.bucket}/genforge",
                      "AWS_ENDPOINT_URL": local_stack.s3_endpoint,
                      "MLFLOW_TRACKING_URI": local_stack.tracking_uri})
    assert wrong.returncode == 2 and "storage" in wrong.stderr, wrong.stderr[-2000:]
    outputs += [wrong.stdout, wrong.stderr]

    client = MlflowClient(local_stack.tracking_uri)
    recorded, errors = [], []
    for name in ("e2e-secrets", "e2e-secrets-submit"):
        exp = client.get_experiment_by_name(name)
        for run in client.search_runs([exp.experiment_id]):
            recorded += [repr(run.data.params), repr(run.data.tags), repr(list(run.data.metrics))]
            errors += [run.data.tags["genforge.error"]] if "genforge.error" in run.data.tags else []
    assert len(errors) == 2 and all("timed out" in e for e in errors), errors
    text = "\n".join(outputs + recorded)
    logs = [p for p in Path("/tmp/ray").glob("session_*/logs/**/*")
            if p.is_file() and p.stat().st_mtime >= started - 5]
    assert logs  # the Ray processes of these commands wrote logs
    for secret in secrets:
        assert secret not in text
        for path in logs:
            assert secret.encode() not in path.read_bytes(), path
