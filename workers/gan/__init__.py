"""GANs: a DCGAN generator and discriminator (workers/gan/nets.py), non-saturating or hinge
loss; distillation regresses a smaller generator onto the teacher's. The worker is
`workers.gan.worker`."""

from workers.gan.config import GANModel
from workers.registry import Family

FAMILY = Family("gan", GANModel, frozenset({"train", "sample", "distill"}),
                "workers.gan.worker:GANWorker")
