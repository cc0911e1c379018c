"""Malformed specs of every kind, generated: each one is either a valid spec or refused with
exit-code-2 lines that name the file and the problem, one line each, never a traceback. Most
examples run in-process (thousands); a sample goes through `genforge run` itself, which must
exit 2 before it starts anything."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.plan import build_plan
from orchestrator.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "jobspecs" / "quickstart.yaml").read_text())
EXAMPLES = int(os.environ.get("GENFORGE_FUZZ_EXAMPLES", "2500"))
COUNTS = {"valid": 0, "refused": 0}

# values a field should never accept, and some it should
weird = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63),
    st.integers(max_value=-1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.sampled_from(["../../etc/passwd", "/abs/path", "..", "a/../../b",
                                            "%2e%2e%2f", "s3://other/../x", "file:///etc",
                                            "ünïcødé", "\u202e", "a" * 300, "", " ", "\x00"]),
    st.lists(st.integers(), max_size=4), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


def paths(node, prefix=()):
    """Every (path, parent) in a loaded YAML tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


ALL = list(paths(BASE))[1:]


@st.composite
def mutated(draw):
    spec = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(ALL))
        parent = spec
        try:
            for part in path[:-1]:
                parent = parent[part]
            key = path[-1]
            parent[key]  # noqa: B018  (still there after an earlier mutation?)
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "unknown", "nest"]))
        if action == "replace":
            parent[key] = draw(weird)
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "unknown" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(weird)
        elif action == "nest":
            value = draw(weird)
            for _ in range(draw(st.integers(1, 60))):
                value = {"x": value} if draw(st.booleans()) else [value]
            parent[key] = value
    return yaml.safe_dump(spec, allow_unicode=True).encode()


def bomb(levels: int, width: int) -> bytes:
    lines = ["a0: &a0 [x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return ("\n".join(lines) + f"\nexperiment: e\njobs: *a{levels - 1}\n").encode()


raw = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"", b"[]", b"- 1\n- 2", b"42", b"null", b"experiment: x", b"jobs: 3",
                     b"{a: {b: {c: ", b"\xff\xfe\x00", b"!!python/object:os.system {}",
                     b"? [a, b]\n: c", b"x: !!binary AAAA", b"jobs: [[[[[]]]]]",
                     bomb(9, 9), bomb(30, 2), b"[" * 5000, b"a:\n" + b"  " * 2000 + b"b: 1"]),
)


def check(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text)
    try:
        build_plan(load_spec(path))
        COUNTS["valid"] += 1
    except SpecError as exc:
        COUNTS["refused"] += 1
        assert exc.lines
        for line in exc.lines:
            assert line.startswith(f"{path}:"), line
            assert "\n" not in line and "Traceback" not in line, line
            assert len(line) < 2000, line


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=st.one_of(mutated(), raw))
def test_malformed_specs_are_refused_in_one_line_each(tmp_path, text):
    check(tmp_path, text)


def test_the_fuzz_saw_both_outcomes():
    # runs after the fuzz test in this module: it reached both sides of the line
    if COUNTS["refused"] + COUNTS["valid"] == 0:
        pytest.skip("the fuzz test did not run")
    assert COUNTS["refused"] > COUNTS["valid"] > 0, COUNTS
    print(f"fuzzed specs: {COUNTS['refused']} refused cleanly, {COUNTS['valid']} valid")


@pytest.mark.parametrize("text", [bomb(9, 9), b"\xff\xfe\x00garbage", b"- not a mapping",
                                  yaml.safe_dump({**BASE, "jobs": [{**BASE["jobs"][0], "name": "../up"}]}).encode(),
                                  yaml.safe_dump({**BASE, "experiment": "/abs"}).encode()])
def test_genforge_run_exits_2_before_anything_starts(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    # no stack and nowhere to reach one: a bad spec must be refused before services are asked
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "GENFORGE_"))}
    env["GENFORGE_HOME"] = str(tmp_path / "no-stack")
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines and all(line.startswith(f"genforge: {path}:") or line.startswith(f"{path}:")
                         for line in lines), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "no-stack").exists()  # no stack was started for it
