"""An autoregressive transformer over a VQGAN's code indices (Esser et al. 2021), optionally
class-conditional; knowledge distillation to a smaller transformer. The worker is
`workers.autoregressive.worker`."""

from workers.autoregressive.config import ARModel, describe_sampler
from workers.registry import Family

FAMILY = Family("autoregressive", ARModel, frozenset({"train", "sample", "distill"}),
                "workers.autoregressive.worker:ARWorker", describe=describe_sampler)
