"""The numeric precision of training steps: `train.precision` fp32, bf16 (autocast: matrix
products and convolutions in bfloat16, the rest and the weights in float32) or fp16 (the same
in float16, with a gradient scaler so that small gradients do not underflow). bf16 needs no
scaler: it has float32's range. A device that cannot run the asked precision trains in fp32,
and the run says why: a GPU without bfloat16, a device torch has no autocast for, and a CPU
without native bfloat16 / float16 arithmetic (oneDNN's AVX512 or AMX kernels), where autocast's
convolutions fall back to a generic kernel: on an AVX2-only CPU a bf16 forward pass of
jobspecs/gpu/ddpm.yaml's U-Net takes 65x as long as in fp32."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU runs `precision`'s (bf16, fp16) convolutions and matrix products in
    oneDNN's native kernels."""
    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    return bool(getattr(torch.ops.mkldnn, probe)())


class Precision:
    def __init__(self, asked: str, device: torch.device):
        self.device = device
        self.used, self.why = asked, None
        if asked == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self.used, self.why = "fp32", "this GPU has no bfloat16"
        if self.used != "fp32" and not torch.amp.autocast_mode.is_autocast_available(device.type):
            self.used, self.why = "fp32", f"torch has no autocast on {device.type}"
        if self.used != "fp32" and device.type == "cpu" and not cpu_has_native(self.used):
            self.used, self.why = "fp32", f"this CPU has no native {NAMES[asked]} arithmetic"
        self.scalers: dict[str, torch.amp.GradScaler] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        """Where the forward pass runs: autocast to the precision, or nothing for fp32."""
        if self.used == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.used])

    def outside_autocast(self) -> contextlib.AbstractContextManager:
        """Where backward and the optimizer step run: autocast is for the forward pass."""
        if self.used == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def scaler(self, name: str) -> torch.amp.GradScaler | None:
        """The gradient scaler of optimizer `name` (fp16 only)."""
        if self.used != "fp16":
            return None
        if name not in self.scalers:
            self.scalers[name] = torch.amp.GradScaler(self.device.type)
        return self.scalers[name]

    def tags(self) -> dict[str, str]:
        out = {"genforge.precision": self.used}
        if self.why:
            out["genforge.precision_fallback"] = self.why
        if self.device.type == "cuda":
            out["genforge.tf32"] = str(torch.backends.cuda.matmul.allow_tf32)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.scalers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.items():
            scaler = self.scaler(name)
            if scaler is not None:
                scaler.load_state_dict(saved)
