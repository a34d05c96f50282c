"""PCA tasks (He et al. 2025, "Learning spectral methods by transformers"), batched on the device.

One synthetic task: X (n x d) with rows x_i ~ N(0, Sigma), Sigma = U diag(lambda) U^T, U a fresh
Haar rotation per task, lambda_j = gap^-(j-1). One real-data task: n images drawn without
replacement from a dataset, flattened, centred by the dataset mean and projected to d coordinates
by a fixed random orthonormal projection (`real_tasks`). Either way the targets are the top-k
eigenpairs of the task's own sample covariance S = (X - mean)^T (X - mean) / n (torch eigh, float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.core.arrays import DataError
from pipeline.core.batch import PromptBatch


@dataclass
class PCABatch(PromptBatch):
    """B sample matrices of n points in d dimensions with their top-k sample eigenpairs."""

    xs: Tensor  # (B, n, d)
    vecs: Tensor  # (B, k, d) unit eigenvectors of the sample covariance, largest eigenvalue first
    vals: Tensor  # (B, k) their eigenvalues
    index: Tensor | None = None

    REQUIRED = ("xs", "vecs", "vals")
    KIND = "PCA"

    @property
    def k(self) -> int:
        return self.vecs.shape[1]

    @classmethod
    def check_shapes(cls, a) -> bool:
        xs, V, L = a["xs"], a["vecs"], a["vals"]
        return xs.ndim == 3 and V.ndim == 3 and V.shape[::2] == xs.shape[::2] and L.shape == V.shape[:2]


@dataclass
class PCAEstimate:
    """An answer: k directions (any sign; normalised by the metrics) and k eigenvalues per task."""

    vecs: Tensor  # (B, k, d)
    vals: Tensor  # (B, k)
    applicable: bool = True
    reason: str = ""


def covariance(xs: Tensor) -> Tensor:
    """(B, n, d) -> (B, d, d) sample covariance around each task's own mean (divided by n)."""
    xc = xs - xs.mean(1, keepdim=True)
    return xc.transpose(1, 2) @ xc / xs.shape[1]


def with_targets(xs: Tensor, k: int) -> PCABatch:
    from pipeline.algorithms.power import top_eigenpairs

    V, L = top_eigenpairs(covariance(xs.double()), k)
    return PCABatch(xs, V.to(xs.dtype), L.to(xs.dtype))


def sample_pca(batch_size: int, d: int, n: int, k: int, generator: torch.Generator, device="cpu", *,
               gap_min: float = 1.5, gap_max: float = 4.0) -> PCABatch:
    B, g = batch_size, generator
    u = torch.rand(B, 1, generator=g, device=device)
    gap = torch.exp(math.log(gap_min) + (math.log(gap_max) - math.log(gap_min)) * u)  # (B, 1) log-uniform
    lam = gap ** -torch.arange(d, device=device)  # (B, d): 1, 1/gap, 1/gap^2, ...
    q, r = torch.linalg.qr(torch.randn(B, d, d, generator=g, device=device))
    U = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar rotation per task
    xs = torch.randn(B, n, d, generator=g, device=device) @ (U * lam.sqrt()[:, None, :]).transpose(1, 2)
    return with_targets(xs, k)


def projection(p: int, d: int, seed: int) -> np.ndarray:
    """A fixed random orthonormal projection (p, d) from pixel space to d coordinates (seeded)."""
    if d > p:
        raise DataError(f"projection: d = {d} coordinates asked of data with only {p} pixels (set task.pca.d <= {p})")
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.standard_normal((p, d)))
    return q.astype(np.float32)


def real_tasks(images: np.ndarray, n_tasks: int, n: int, k: int, proj: np.ndarray, seed: int,
               where: str = "dataset") -> PCABatch:
    """images (N, p) in [0, 1] -> n_tasks samples of n distinct images, centred by the dataset mean,
    projected (p, d) -> PCABatch (B, n, d), float32. Subsets depend on `seed` only."""
    if images.ndim != 2 or images.shape[1] != proj.shape[0]:
        raise DataError(f"{where}: images of shape {images.shape} do not fit a ({proj.shape[0]}, {proj.shape[1]}) projection")
    if n > images.shape[0]:
        raise DataError(f"{where}: {n} points per task asked of {images.shape[0]} images")
    if not np.isfinite(images).all():
        raise DataError(f"{where}: {int((~np.isfinite(images)).sum())} non-finite pixel values")
    z = (images - images.mean(0)) @ proj  # (N, d)
    g = np.random.default_rng(seed)
    idx = np.stack([g.choice(images.shape[0], n, replace=False) for _ in range(n_tasks)])  # (B, n)
    return with_targets(torch.from_numpy(z[idx].astype(np.float32)), k)
