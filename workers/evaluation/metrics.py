"""Sample-quality metrics in the feature space of a classifier trained on the data set.

Fréchet distance and KID come from torchmetrics (its FID/KID with our feature module); the rest
is short enough to state here: the classifier score (the Inception Score of Salimans et al. 2016
with our classifier), the class histogram of samples and its KL to the real class distribution
(mode collapse shows as a large KL), and k-NN precision/recall (Kynkäänniemi et al. 2019).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from workers.nn.classifier import FeatureExtractor

BATCH = 500


def _batches(x: Tensor):
    for i in range(0, len(x), BATCH):
        yield x[i:i + BATCH]


class Reference:
    """Real uint8 (N, C, H, W) images as the metrics hold them: FD's and KID's real states (and,
    once asked, the features and class probabilities) computed once, for scoring any number
    of sample sets against them (`score(extractor, reference, fake)`: a training job's
    evaluations). On the images' device, as the metrics' states."""

    def __init__(self, extractor: FeatureExtractor, real: Tensor):
        self.extractor, self.images = extractor, real
        # the metrics' states on the images' device (torchmetrics builds them on the CPU)
        self.fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False
                                            ).to(real.device)
        self.kid = KernelInceptionDistance(feature=extractor, subsets=50, subset_size=2,
                                           reset_real_features=False).to(real.device)
        for metric in (self.fid, self.kid):
            for part in _batches(real):
                metric.update(part, real=True)
        self._features: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def features_and_probs(self) -> tuple[Tensor, Tensor]:
        if self._features is None:
            self._features = _features_and_probs(self.extractor, self.images)
        return self._features


def frechet_and_kid(extractor: FeatureExtractor, real: Tensor | Reference, fake: Tensor
                    ) -> dict[str, float]:
    """FD and KID (mean, std over subsets) between uint8 (N, C, H, W) image sets."""
    ref = real if isinstance(real, Reference) else Reference(extractor, real)
    ref.fid.reset()  # the samples of an earlier scoring; the real side stays
    ref.kid.reset()
    # subsets of half the images (at most 1000) vary, so KID's std means something
    ref.kid.subset_size = max(2, min(len(ref), len(fake), 2000) // 2)
    for metric in (ref.fid, ref.kid):
        for part in _batches(fake):
            metric.update(part, real=False)
    kid_mean, kid_std = ref.kid.compute()
    return {"fd": float(ref.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def classifier_score(probs: Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))): high when each sample is confidently one class and the
    classes are varied."""
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (torch.log(probs + 1e-12) - torch.log(marginal + 1e-12))).sum(1)
    return float(torch.exp(kl.mean()))


def class_histogram(probs: Tensor) -> Tensor:
    """Fraction of samples assigned to each class (argmax of the classifier)."""
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double()
    return counts / counts.sum()


def histogram_kl(samples: Tensor, real: Tensor, eps: float = 1e-6) -> float:
    """KL(samples ‖ real) between two class histograms; 0 when they match, log(1/p) when every
    sample falls in one class of real frequency p."""
    p, q = samples.double() + eps, real.double() + eps
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log()).sum())


def _kth_neighbour_radius(x: Tensor, k: int) -> Tensor:
    radii = []
    for part in _batches(x):
        d = torch.cdist(part, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _inside_any(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    inside = []
    for part in _batches(points):
        inside.append((torch.cdist(part, centres) <= radii[None, :]).any(1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """k-NN precision (fraction of samples inside the real manifold: realism) and recall
    (fraction of real points inside the samples' manifold: coverage)."""
    real, fake = real.double(), fake.double()
    precision = _inside_any(fake, real, _kth_neighbour_radius(real, k)).double().mean()
    recall = _inside_any(real, fake, _kth_neighbour_radius(fake, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


@torch.no_grad()
def _features_and_probs(extractor: FeatureExtractor, images: Tensor) -> tuple[Tensor, Tensor]:
    feats = torch.cat([extractor(p) for p in _batches(images)])
    return feats, extractor.classifier.head(feats).softmax(1)


def score(extractor: FeatureExtractor, real: Tensor | Reference, fake: Tensor, k: int = 3,
          labels: Tensor | None = None) -> dict[str, Any]:
    """Every metric for uint8 (N, C, H, W) `fake` against `real` (the images, or a `Reference`
    of them). The class histogram of the samples is compared with the classifier's histogram
    of the real images, so that the classifier's own mistakes cancel out. With the classes
    `labels` the samples were asked for (a class-conditional model), also the fraction the
    classifier puts in that class."""
    out: dict[str, Any] = frechet_and_kid(extractor, real, fake)
    feats_real, probs_real = (real.features_and_probs() if isinstance(real, Reference)
                              else _features_and_probs(extractor, real))
    feats_fake, probs_fake = _features_and_probs(extractor, fake)
    out.update(precision_recall(feats_real, feats_fake, k))
    out["classifier_score"] = classifier_score(probs_fake)
    hist = class_histogram(probs_fake)
    out["class_kl"] = histogram_kl(hist, class_histogram(probs_real))
    out["class_histogram"] = [round(float(h), 4) for h in hist]
    out["num_samples"] = len(fake)
    if labels is not None:
        out["label_accuracy"] = float((probs_fake.argmax(1) == labels.to(probs_fake.device))
                                      .double().mean())
    return out
