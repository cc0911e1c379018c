"""The feature network of offline evaluation: a small CNN classifier trained on the data set
itself (no downloadable Inception weights are needed), whose penultimate activations are the
feature space for Fréchet distance, KID and k-NN precision/recall."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Classifier(nn.Module):
    def __init__(self, *, channels: int, image_size: int, num_classes: int, width: int = 32,
                 features: int = 128):
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.body = nn.Sequential(
            *stage(channels, width), nn.MaxPool2d(2),
            *stage(width, 2 * width), nn.MaxPool2d(2),
            *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, features), nn.ReLU(True),
        )
        self.head = nn.Linear(features, num_classes)
        self.num_features = features  # read by torchmetrics' FID/KID
        self.image_size = image_size

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class FeatureExtractor(nn.Module):
    """What torchmetrics' FrechetInceptionDistance / KernelInceptionDistance call: uint8
    (N, C, H, W) images in, penultimate features out."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        images = images.to(next(self.classifier.parameters()).device)  # where the network is
        return self.classifier.features(images.float() / 127.5 - 1.0)


def train_classifier(net: Classifier, batches: Any, cfg: dict[str, Any],
                     on_step: Callable[[int, Tensor], None] | None = None) -> Classifier:
    """`cfg["steps"]` Adam steps of cross-entropy on the batches `batches.batch(step, gen)`
    gives (a data set's `ShardStream`, or one held in memory), with small random shifts so
    that the classifier does not hinge on exact pixel positions. Nothing in a step waits for
    the device: the shifts (Python ints for `torch.roll`) are drawn on the host, and `on_step`
    gets the loss as a device tensor (read it at log steps only)."""
    gen = torch.Generator()
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    net.train()
    for step in range(1, cfg["steps"] + 1):
        gen.manual_seed(cfg["seed"] * 1_000_003 + step)
        x, y = batches.batch(step, gen)
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x  # pixels, as `forward` takes
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        loss = F.cross_entropy(net(torch.roll(x, shifts=shift, dims=(2, 3))), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, loss.detach())
    return net.eval()


@torch.no_grad()
def accuracy(net: Classifier, x: Tensor, y: Tensor) -> float:
    hits = sum((net(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()
               for i in range(0, len(x), 500))
    return int(hits) / len(x)  # one read back from the device
