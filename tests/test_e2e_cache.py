"""Caching by content hash on the real stack: finished jobs are skipped, a changed job reruns
with everything downstream of it and nothing else, --force reruns on request."""

from __future__ import annotations

import re

import pytest

from support import genforge, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TINY = {"kind": "train", "family": "ddpm",
        "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
        "data": {"dataset": "digits", "image_size": 8},
        "train": {"steps": 3, "batch_size": 8, "log_every": 1},
        "resources": {"cpus": 1}}


def spec(lr: float = 2e-4, seed: int = 1) -> dict:
    return {"experiment": "cache", "jobs": [
        {"name": "a", **TINY, "train": {**TINY["train"], "lr": lr}},
        {"name": "b", **TINY},
        {"name": "s", "kind": "sample", "family": "ddpm", "from": "a",
         "sample": {"num_images": 2, "steps": 5, "seed": seed}},
    ]}


def outcome(stderr: str) -> dict[str, str]:
    return {m[0]: m[1] for m in re.findall(r"job '([a-z]+)': (cached|started)", stderr)}


def test_cache_reruns_exactly_what_changed(tmp_path, stack_env):
    def run(data: dict, *flags: str) -> dict[str, str]:
        out = genforge(["run", str(write_spec(tmp_path / "cache.yaml", data)), *flags], stack_env)
        assert out.returncode == 0, out.stderr[-2000:]
        return outcome(out.stderr)

    assert run(spec()) == {"a": "started", "b": "started", "s": "started"}
    assert run(spec()) == {"a": "cached", "b": "cached", "s": "cached"}
    assert run(spec(seed=2)) == {"a": "cached", "b": "cached", "s": "started"}
    assert run(spec(lr=1e-3, seed=2)) == {"a": "started", "b": "cached", "s": "started"}
    assert run(spec(lr=1e-3, seed=2), "--force", "b") == {"a": "cached", "b": "started", "s": "cached"}
    assert run(spec(lr=1e-3, seed=2), "--force") == {"a": "started", "b": "started", "s": "started"}
    bad = genforge(["run", str(tmp_path / "cache.yaml"), "--force", "zzz"], stack_env)
    assert bad.returncode == 2 and "--force: no job named zzz" in bad.stderr
