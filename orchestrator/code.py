"""The code a job's result depends on, as a digest: part of every job's hash.

A job's result is computed by its family's package (`workers/<family>/`: its configuration,
worker and networks) and the modules of the `workers` package that those import, directly or
through others (the harness, the shared networks and samplers): its family's *closure*. The
digest covers the source of exactly those modules, by module name, so

- changing the GAN leaves every cached DDPM job cached (the DDPM's closure does not hold
  `workers/gan/`), while changing `workers/base.py` or the U-Net invalidates every family
  that uses them;
- it is the same wherever the code sits: a checkout, an installed package, or a submitted Ray
  job whose `py_modules` Ray unpacks into folders of its own (modules are found through the
  import system's search path and named by their module name, never by their location).

The `orchestrator` package is not part of it: it schedules, stores and tracks jobs, and a
change to how it does that does not change what a job computes. The sources are read and
parsed, never imported: validation stays free of torch.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PACKAGE = "workers"
REGISTRY = "workers.registry"


@lru_cache(maxsize=None)
def _package_dirs() -> tuple[Path, ...]:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the '{PACKAGE}' package cannot be found")
    return tuple(Path(p) for p in spec.submodule_search_locations)


@lru_cache(maxsize=None)
def module_file(name: str) -> Path | None:
    """The source file of module `name` of the package (a module or a package's
    __init__.py), or None if there is no such module."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    for base in _package_dirs():
        folder = base.joinpath(*parts[1:])
        for candidate in (folder.with_suffix(".py") if len(parts) > 1 else None,
                          folder / "__init__.py"):
            if candidate is not None and candidate.is_file():
                return candidate
    return None


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its source (imports
    inside functions count: they run when the job does)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            # `from workers.diffusion import samplers` imports a module, not a name
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    # The registry lists the families: each family's package is the root of its closure, so
    # adding a family to the list changes no other family's digest.
    return {m for m in found if m.split(".")[0] == PACKAGE and m not in (PACKAGE, REGISTRY)
            and module_file(m) is not None}


@lru_cache(maxsize=None)
def closure(root: str) -> tuple[str, ...]:
    """Module `root` and every module of the package it imports, transitively; sorted."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            raise RuntimeError(f"module {name} cannot be found")
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return tuple(sorted(seen))


@lru_cache(maxsize=None)
def digest(*roots: str) -> str:
    """sha256 (12 hex digits) of the sources of the closure of `roots`, by module name."""
    modules = sorted(set().union(*(closure(r) for r in roots)))
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + hashlib.sha256(module_file(name).read_bytes()).digest())
    return h.hexdigest()[:12]


def roots(family: str) -> tuple[str, ...]:
    """The modules of `family`'s package (or the evaluation's worker module, for "evaluate")."""
    from workers.registry import EVALUATE, FAMILIES

    if family not in FAMILIES:
        return (EVALUATE.partition(":")[0],) if family == "evaluate" else ()
    package = f"{PACKAGE}.{family}"
    return tuple(sorted(
        package + ("" if path.stem == "__init__" else f".{path.stem}")
        for base in _package_dirs() for path in (base / family).glob("*.py")))


def family_digest(*families: str) -> str:
    """The digest of the code that computes the results of jobs of these families (an
    evaluation: its own worker and the families it samples)."""
    return digest(*sorted({m for f in families for m in roots(f)}))
