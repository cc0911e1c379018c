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
