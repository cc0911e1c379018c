"""`train.compile` and `sample.compile`: torch.compile of a job's networks. Small U-Nets at 16-32
px are bound by kernel launches on a GPU; inductor fuses their elementwise work into fewer,
larger kernels.

Networks are compiled in place (`nn.Module.compile`): their identity, parameters and state_dict
keys stay what they were, so optimizers, EMA, checkpoints and resume see the same modules.
Before compiling, one tiny function is compiled and run on the job's device: that exercises the
whole tool chain (Dynamo, inductor and its code generator: a C++ compiler on a CPU, Triton on a
GPU). Where it fails, the job runs eagerly and its run says why, rather than failing the job
over an optional speed-up."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


def _probe(device: torch.device) -> str | None:
    """Why torch.compile cannot be used on `device` here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    try:
        fn = torch.compile(lambda t: torch.sin(t) * 2 + 1, fullgraph=True, dynamic=False)
        out = fn(torch.ones(8, device=device))
        if not torch.allclose(out.cpu(), torch.ones(8).sin() * 2 + 1):
            return "a compiled test function gave wrong numbers"
    except Exception as exc:  # noqa: BLE001 - any failure of the tool chain means: run eagerly
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"torch.compile failed on {device.type}: {type(exc).__name__}: {first}"[:300]
    return None


_probed: dict[str, str | None] = {}  # device type -> why not (once per process: a reused actor)


class Compilation:
    """Whether a job's networks run compiled, and why not where it asked and they do not."""

    def __init__(self, asked: bool, device: torch.device):
        self.asked = asked
        self.why: str | None = None
        if asked:
            if device.type not in _probed:
                _probed[device.type] = _probe(device)
            self.why = _probed[device.type]
            if self.why:
                log.warning("compile: %s; running eagerly", self.why)
        self.used = asked and self.why is None

    def apply(self, modules: Iterable[nn.Module]) -> None:
        """Compile `modules` in place (first call of each compiles it), if compiling is on."""
        if self.used:
            for module in modules:
                module.compile()

    def tags(self, prefix: str = "genforge.compile") -> dict[str, str]:
        out = {prefix: str(self.used).lower()}
        if self.why:
            out[f"{prefix}_fallback"] = self.why
        return out


def compile_failed(section: str, exc: BaseException) -> str:
    """The job's error when a network the tool chain handles in general fails to compile."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return (f"{section}.compile: torch.compile failed on this model ({type(exc).__name__}: "
            f"{first}); set {section}.compile: false")[:500]
