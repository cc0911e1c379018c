"""The family registry: each family is one package under workers/, named once in
workers/registry.py; the orchestrator knows families only through it; validation imports no
torch; no worker module reaches into the driver side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.spec import ModelSection, SpecError, parse_spec
from workers.registry import FAMILIES, Family, family, worker_class

ROOT = Path(__file__).resolve().parent.parent
DRIVER_SIDE = ("orchestrator.actor", "orchestrator.driver", "orchestrator.admission",
               "orchestrator.runs", "orchestrator.progress", "orchestrator.lease")


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_is_a_package_with_its_schema_and_worker(name):
    fam = family(name)
    assert isinstance(fam, Family) and fam.name == name
    package = ROOT / "workers" / name
    assert (package / "__init__.py").is_file() and (package / "worker.py").is_file()
    sections = fam.sections.values() if isinstance(fam.sections, dict) else [fam.sections]
    for section in sections:
        assert issubclass(section, ModelSection)
        assert section.__module__.startswith(f"workers.{name}.")
    assert fam.module == f"workers.{name}.worker"
    assert worker_class(name).family == name
    assert fam.kinds <= {"train", "sample", "distill"} and "train" in fam.kinds


def test_a_family_not_in_the_registry_is_one_clear_line():
    with pytest.raises(SpecError) as err:
        parse_spec({"experiment": "x", "jobs": [{"name": "a", "kind": "train", "family": "vae"}]},
                   "s.yaml")
    assert err.value.lines == [f"s.yaml: job 'a': family: must be one of {', '.join(FAMILIES)} "
                               "(got 'vae')"]


def test_validating_every_example_spec_imports_no_torch():
    script = ("import sys, glob\n"
              "from orchestrator.spec import SpecError, load_spec\n"
              "from orchestrator.plan import build_plan\n"
              "from workers.registry import FAMILIES, family\n"
              "[family(f) for f in FAMILIES]\n"
              "for path in sorted(glob.glob('jobspecs/**/*.yaml', recursive=True)):\n"
              "    try:\n"
              "        build_plan(load_spec(path))\n"
              "    except SpecError as exc:  # without the shared data folder beside the checkout\n"
              "        assert all('no such file' in line for line in exc.lines), exc.lines\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_orchestrator_names_no_family():
    for path in sorted((ROOT / "orchestrator").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.Constant) and node.value in FAMILIES), (
                f"{path.name}:{node.lineno} names family {node.value!r}")
        assert not any(m.split(".")[:2] in [["workers", f] for f in FAMILIES]
                       for m in imports(path)), f"{path.name} imports a family's package"


def test_no_worker_imports_the_driver_side_and_no_net_imports_the_schema():
    for path in sorted((ROOT / "workers").rglob("*.py")):
        found = imports(path)
        assert not found & set(DRIVER_SIDE), f"{path} imports {found & set(DRIVER_SIDE)}"
        is_net = path.parent.name == "nn" or path.stem in ("nets", "transformer")
        if is_net:
            assert not any(m.startswith(("pydantic", "orchestrator")) or m.endswith("config")
                           for m in found), f"{path} (a network) imports {found}"
