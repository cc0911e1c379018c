"""The model families genforge runs: one line each.

A family is a package `workers/<name>/` whose `__init__.py` defines `FAMILY` (a `Family`): its
torch-free configuration (the pydantic `model:` section, the job kinds it runs, its samplers)
and where its worker is. The package's `worker` module, which imports torch, is loaded only
inside the job's actor. Nothing else in genforge names a family; docs/families.md says how to
add one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

FAMILIES = (
    "ddpm",
    "gan",
    "vqgan",
    "autoregressive",
    "ldm",
    "flow",
)

EVALUATE = "workers.evaluate:EvaluateWorker"  # scores the families' models; not a family


@dataclass(frozen=True)
class Family:
    name: str
    # the `model:` section (a ModelSection subclass), or {model.stage: section} for a family
    # trained in stages (the first is the default stage)
    sections: Any
    kinds: frozenset[str]  # the job kinds it runs
    worker: str  # "module:Class" of its worker
    samplers: tuple[str, ...] = ()  # `sample.sampler` values; the first is the default
    spacings: tuple[str, ...] = ()  # `sample.spacing` values
    # one line for a table: the sampler settings a sampling recorded (`Worker.sampler_settings`)
    describe: Callable[[dict[str, Any]], str] = field(default=lambda settings: "-")

    def section(self, model: dict[str, Any]) -> Any:
        """The model section class for a model dict (for staged families, by `model.stage`)."""
        if not isinstance(self.sections, dict):
            return self.sections
        from orchestrator.spec import _shown

        stage = model.get("stage", next(iter(self.sections)))
        if stage not in self.sections:
            raise ValueError(f"model.stage: must be one of {', '.join(map(repr, self.sections))} "
                             f"(got {_shown(stage)})")
        return self.sections[stage]

    def distill_section(self) -> Any:
        """The model section whose `DISTILL` method distils this family (ldm: its diffusion
        stage), or None."""
        sections = self.sections.values() if isinstance(self.sections, dict) else [self.sections]
        return next((s for s in sections if s.DISTILL is not None), None)

    def check_sample(self, sample: Any) -> str | None:
        """A problem of sampler settings (`SampleSpec`) with this family, or None."""
        from orchestrator.spec import _shown

        for name, allowed in (("sampler", self.samplers), ("spacing", self.spacings)):
            value = getattr(sample, name)
            if value is not None and value not in allowed:
                if not allowed:
                    return (f"sample.{name}: family '{self.name}' has no {name} to choose; "
                            f"leave it out (got {_shown(value)})")
                return (f"sample.{name}: must be one of {', '.join(map(repr, allowed))} for "
                        f"family '{self.name}' (got {_shown(value)})")
        return None

    @property
    def module(self) -> str:
        """The worker's module (the root of the family's code digest)."""
        return self.worker.partition(":")[0]


@lru_cache(maxsize=None)
def family(name: str) -> Family:
    """The family `name` (one of FAMILIES); KeyError for any other name."""
    if name not in FAMILIES:
        raise KeyError(name)
    return importlib.import_module(f"workers.{name}").FAMILY


def worker_class(name: str):
    """The worker class of family `name`, or of "evaluate"; imports torch."""
    target = EVALUATE if name == "evaluate" else family(name).worker
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
