"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): a U-Net learns the
velocity of straight paths from noise to data; Euler or Heun integration of its ODE;
progressive halving of Euler steps. The worker is `workers.flow.worker`."""

from workers.flow.config import SAMPLERS, SPACINGS, FlowModel, describe_sampler
from workers.registry import Family

FAMILY = Family("flow", FlowModel, frozenset({"train", "sample", "distill"}),
                "workers.flow.worker:FlowWorker", SAMPLERS, SPACINGS, describe_sampler)
