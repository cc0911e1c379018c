"""The dependency audit of `.ci/run` (`.ci/audit.py`): what it calls audited, vulnerable or not
audited, from PyPI's JSON answers as they come (here from a stated table of URLs)."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "audit", Path(__file__).resolve().parent.parent / ".ci" / "audit.py")
audit = importlib.util.module_from_spec(spec)
sys.modules["audit"] = audit  # its dataclasses look their module up
spec.loader.exec_module(audit)

ADVISORY = {"id": "PYSEC-2099-1", "aliases": ["CVE-2099-0001"], "fixed_in": ["1.2.1"]}


def pypi(answers: dict[str, dict | None]):
    asked: list[str] = []

    def fetch(url: str):
        asked.append(url)
        return answers.get(url.removeprefix(audit.PYPI + "/"))
    return fetch, asked


def test_release_endpoint_advisories_are_reported():
    fetch, asked = pypi({"lib/1.2.0/json": {"info": {"version": "1.2.0"},
                                            "vulnerabilities": [ADVISORY]}})
    result = audit.audit_one("lib", "1.2.0", fetch)
    assert result.audited and result.vulnerabilities == [ADVISORY]
    assert asked == [f"{audit.PYPI}/lib/1.2.0/json"]
    out = io.StringIO()
    assert audit.report([result], out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == ("VULNERABLE lib 1.2.0: PYSEC-2099-1 (CVE-2099-0001); fixed in 1.2.1")
    assert lines[-1] == "audit: 1 distributions, 1 audited, 1 known vulnerabilities, 0 not audited"


@pytest.mark.parametrize("newest, audited", [("1.2.0", True), ("1.3.0", False)])
def test_project_endpoint_stands_for_the_newest_release_only(newest, audited):
    fetch, _ = pypi({"lib/json": {"info": {"version": newest}, "vulnerabilities": [ADVISORY]}})
    result = audit.audit_one("lib", "1.2.0", fetch)
    assert result.audited is audited
    assert result.vulnerabilities == ([ADVISORY] if audited else [])
    if not audited:  # never reported clean: listed as not audited, with the reason
        out = io.StringIO()
        assert audit.report([result], out) == 0
        assert "not audited: lib 1.2.0: advisories reachable for the newest release only (1.3.0)" \
            in out.getvalue()


def test_local_builds_are_audited_as_their_public_version_and_unknown_ones_are_not():
    fetch, asked = pypi({"torch/2.13.0/json": {"info": {"version": "2.13.0"}, "vulnerabilities": []}})
    local = audit.audit_one("torch", "2.13.0+cpu", fetch)
    assert local.audited and not local.vulnerabilities and "audited as 2.13.0" in local.why_not
    assert asked == [f"{audit.PYPI}/torch/2.13.0/json"]
    missing = audit.audit_one("in-house", "0.1", fetch)
    assert not missing.audited and missing.why_not == "not on PyPI"


def test_an_unreachable_index_is_not_a_clean_result():
    def down(url):
        raise OSError("connection refused")
    result = audit.audit_one("lib", "1.0", down)
    assert not result.audited and "PyPI did not answer: connection refused" in result.why_not


def test_the_installed_set_leaves_out_this_checkout():
    names = dict(audit.installed())
    assert "genforge" not in names  # installed editable
    assert names["mlflow"] and names["ray"] and names["boto3"]
