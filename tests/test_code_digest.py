"""The code part of a job's hash: per family, the same from a checkout, an installed package or
a submitted Ray job's separate module folders; a change to one family leaves the others'."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from orchestrator import code

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("ddpm", "gan", "vqgan", "autoregressive", "ldm", "evaluate")


def digests(*paths: Path) -> dict[str, str]:
    """Each family's digest, computed in a fresh process that finds the packages under
    `paths` only (as a Ray worker finds `py_modules`)."""
    script = ("import json, sys; from orchestrator.code import family_digest; "
              f"print(json.dumps({{f: family_digest(f) for f in {FAMILIES!r}}})); "
              "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(map(str, paths)), "PATH": "/usr/bin"},
                         cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "False"  # read, never imported: no torch
    return json.loads(lines[-2])


def copy_packages(dest: Path, layout: str) -> list[Path]:
    ignore = shutil.ignore_patterns("__pycache__")
    if layout == "checkout":
        for pkg in ("orchestrator", "workers"):
            shutil.copytree(ROOT / pkg, dest / pkg, ignore=ignore)
        return [dest]
    # Ray unpacks each of a job's py_modules into a folder of its own
    for pkg in ("orchestrator", "workers"):
        shutil.copytree(ROOT / pkg, dest / f"_ray_pkg_{pkg}" / pkg, ignore=ignore)
    return [dest / "_ray_pkg_orchestrator", dest / "_ray_pkg_workers"]


def test_the_digest_is_the_same_wherever_the_code_is(tmp_path):
    here = {f: code.family_digest(f) for f in FAMILIES}
    checkout = digests(*copy_packages(tmp_path / "a", "checkout"))
    submitted = digests(*copy_packages(tmp_path / "b", "py_modules"))
    assert here == checkout == submitted
    assert len(set(here.values())) == len(FAMILIES)


def test_a_change_to_one_family_leaves_the_others_cached(tmp_path):
    paths = copy_packages(tmp_path, "checkout")
    before = digests(*paths)
    gan = tmp_path / "workers" / "gan" / "nets.py"
    gan.write_text(gan.read_text() + "\n# a change to the GAN\n")
    after = digests(*paths)
    assert after["gan"] != before["gan"]
    assert {f: after[f] for f in FAMILIES if f != "gan"} == {
        f: before[f] for f in FAMILIES if f != "gan"}
    # the shared harness is every family's code
    base = tmp_path / "workers" / "base.py"
    base.write_text(base.read_text() + "\n# a change to the harness\n")
    shared = digests(*paths)
    assert all(shared[f] != after[f] for f in FAMILIES)


def test_an_evaluation_covers_the_families_it_samples():
    ddpm = set().union(*map(code.closure, code.roots("ddpm")))
    assert {"workers.ddpm", "workers.ddpm.config", "workers.ddpm.worker"} <= ddpm
    assert not any(m.startswith("workers.gan") for m in ddpm)
    assert "workers.registry" not in ddpm  # the list of families is no family's code
    ldm = set().union(*map(code.closure, code.roots("ldm")))
    assert "workers.ddpm.worker" in ldm  # a latent diffusion is a DDPM
    assert code.family_digest("evaluate", "gan") != code.family_digest("evaluate", "ddpm")
