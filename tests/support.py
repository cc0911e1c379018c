"""Helpers for the end-to-end tests: run the CLI, list the bucket, write small specs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def genforge(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def genforge_background(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT)


def keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def example_spec(name: str, experiment: str, limit: int) -> dict:
    """jobspecs/<name>.yaml under another experiment name, its data paths made absolute and the
    data limited to `limit` images."""
    path = ROOT / "jobspecs" / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["experiment"] = experiment
    data = spec["defaults"]["data"]
    data["path"] = str((path.parent / data["path"]).resolve())
    if data.get("split", {}).get("heldout"):
        data["split"]["heldout"] = str((path.parent / data["split"]["heldout"]).resolve())
    data["limit"] = limit
    return spec


def offline_driver(tmp_path: Path, jobs: list[dict]):
    """A Driver for experiment "t" on file:// storage and a sqlite tracking store, set up as
    `Driver.run` sets it up before its loop (data staged, the experiment, the pipeline's run,
    its leases), without Ray: for tests that drive its methods themselves. Checkpoint URIs
    resolve to a made-up checkpoint of that URI."""
    from orchestrator.datasets import stage
    from orchestrator.driver import Driver
    from orchestrator.plan import ResolvedCheckpoint, build_plan, resolve_inputs
    from orchestrator.settings import Settings
    from orchestrator.spec import parse_spec
    from orchestrator.storage import S3Credentials, open_storage

    spec = parse_spec({"experiment": "t", "jobs": jobs}, source=str(tmp_path / "s.yaml"))
    settings = Settings(ray_address="", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                        storage=f"file://{tmp_path / 'store'}", s3=S3Credentials(None, None, None))
    inputs = resolve_inputs(spec, lambda job: stage(job.data, open_storage(settings.storage)),
                            lambda uri: ResolvedCheckpoint(f"{uri}/checkpoints/step-000001", "d", {}))
    driver = Driver(build_plan(spec, inputs), settings, echo=lambda m: None)
    driver.runs.experiment_id = driver.tracker.experiment_id("t")
    driver.runs.parent = driver.tracker.start_run(driver.runs.experiment_id, "pipeline", {}).run_id
    driver.open_leases()
    return driver
