"""Known vulnerabilities in the installed distributions, from PyPI's advisory data.

PyPI's JSON API lists, with every release, the advisories that affect it (the OSV data
`pip-audit` reads by default). The release endpoint (/pypi/NAME/VERSION/json) is asked first;
where only the project endpoint (/pypi/NAME/json) answers, as behind a mirror that serves the
newest metadata only, its advisories are those of the newest release, and so they stand for
the installed one only when that is the newest. Anything else is listed as not audited, never
as clean.

A report, not a gate: it prints its findings and exits 0; a person weighs them.

    python .ci/audit.py [--timeout 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

PYPI = "https://pypi.org/pypi"
CHECKOUT = Path(__file__).resolve().parents[1]

Fetch = Callable[[str], "dict | None"]  # URL -> parsed JSON, None when it is not there


@dataclass
class Audit:
    name: str
    version: str
    audited: bool = False
    vulnerabilities: list[dict] = field(default_factory=list)
    why_not: str = ""


def fetcher(timeout: float) -> Fetch:
    def fetch(url: str) -> dict | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
    return fetch


def audit_one(name: str, version: str, fetch: Fetch) -> Audit:
    result = Audit(name, version)
    local = "+" in version  # a local build (torch's +cpu wheel): PyPI knows the public part
    public = version.split("+", 1)[0]
    try:
        release = fetch(f"{PYPI}/{name}/{public}/json")
        if release is None:
            project = fetch(f"{PYPI}/{name}/json")
            if project is None:
                result.why_not = "not on PyPI"
                return result
            newest = project.get("info", {}).get("version")
            if newest != public:
                result.why_not = (f"advisories reachable for the newest release only "
                                  f"({newest}), not for {public}")
                return result
            release = project
    except (OSError, ValueError) as exc:
        result.why_not = f"PyPI did not answer: {str(exc)[:120]}"
        return result
    result.audited = True
    result.vulnerabilities = list(release.get("vulnerabilities") or [])
    if local:
        result.why_not = f"local build of {public}: audited as {public}"
    return result


def installed() -> list[tuple[str, str]]:
    """(name, version) of every distribution but those installed editable (this checkout):
    a project of the same name on PyPI is another project."""
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        here = Path(str(dist.locate_file(""))).resolve() == CHECKOUT  # its egg-info, from the cwd
        if name and name.lower() not in seen and not direct.get("dir_info", {}).get("editable") \
                and not here:
            seen[name.lower()] = dist.version
    return sorted(seen.items())


def report(audits: list[Audit], out=sys.stdout) -> int:
    """Prints the findings; returns the number of vulnerabilities found."""
    found = [(a, v) for a in audits for v in a.vulnerabilities]
    for a, v in found:
        aliases = ", ".join(v.get("aliases") or [])
        fixed = ", ".join(v.get("fixed_in") or []) or "no fix listed"
        print(f"VULNERABLE {a.name} {a.version}: {v.get('id')} ({aliases}); fixed in {fixed}",
              file=out)
    skipped = [a for a in audits if not a.audited]
    for a in skipped:
        print(f"not audited: {a.name} {a.version}: {a.why_not}", file=out)
    audited = len(audits) - len(skipped)
    print(f"audit: {len(audits)} distributions, {audited} audited, {len(found)} known "
          f"vulnerabilities, {len(skipped)} not audited", file=out)
    return len(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    fetch = fetcher(args.timeout)
    with ThreadPoolExecutor(8) as pool:
        audits = list(pool.map(lambda nv: audit_one(*nv, fetch), installed()))
    report(audits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
