"""Clustering tasks: a sample of n points from a K-class isotropic Gaussian mixture (the TGMM
sampler, families/gmm, with one sample size and unit covariances), answered by a label per point.

The batch is the GMM batch (points, mask, weights, means, true labels); the estimate is a
distribution over K labels for every point (hard labels = argmax). Labels are defined up to a
permutation: every metric and the training loss are permutation-invariant.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.families.gmm.data import GMMBatch, sample_gmm

ClusterBatch = GMMBatch  # (B, N, d) points, mask, weights (B, K), means (B, K, d), labels (B, N)


@dataclass
class ClusterEstimate:
    labels: Tensor  # (B, N) long in 0..K-1
    probs: Tensor | None = None  # (B, N, K) where the solver has them
    applicable: bool = True
    reason: str = ""


def sample_clusters(batch_size: int, d: int, K: int, n: int, generator, device="cpu", *, separation: float = 2.0,
                    separation_max: float | None = None, max_cosine: float = 0.8) -> ClusterBatch:
    """Weights U(0.2, 0.8) normalised (as TGMM), unit-variance clusters, n points per task; the mean
    coordinates ~ U(-s, s), s ~ U[separation, separation_max] per task (drawn at scale 1 and scaled:
    the cosine rejection does not depend on the scale)."""
    from dataclasses import replace

    import torch

    b = sample_gmm(batch_size, d, K, n, n, generator, device, mean_range=1.0, max_cosine=max_cosine)
    hi = separation if separation_max is None else separation_max
    s = separation + (hi - separation) * torch.rand(batch_size, 1, 1, generator=generator, device=device)
    centre = torch.gather(b.means, 1, b.labels.clamp_min(0)[..., None].expand(-1, -1, d))  # (B, N, d)
    return replace(b, x=(b.x + (s - 1) * centre) * b.mask[..., None], means=s * b.means)
