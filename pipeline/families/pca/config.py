"""Parameters of the PCA family: params.yaml `task.pca`, `baselines.pca`."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f


@dataclass
class PCATask:
    d: int = _f(8, "dimension of the points (real images are projected to d coordinates)", min=2)
    n_points: int = _f(32, "points per sample matrix X (n x d)", min=2)
    k: int = _f(3, "top eigenpairs the network outputs (He et al.: k components)", min=1)
    gap_min: float = _f(1.5, "population spectrum lambda_j = 1 / gap^(j-1) (j = 1..d), a fresh random rotation per "
                             "task; gap ~ log-uniform on [gap_min, gap_max] per training task", gt=1)
    gap_max: float = _f(4.0, "upper end of the training gap range (= gap_min: one gap)", gt=1)


@dataclass
class PCASolvers:
    power_steps: int = _f(8, "power method with deflation: iterations per component", min=0)
    block_steps: int = _f(8, "block power (subspace) iteration: iterations", min=0)


def validate(t: PCATask, model, where: str) -> None:
    if t.k > t.d:
        raise ConfigError(f"{where}.k: at most d = {t.d} eigenpairs exist, got {t.k}")
    if t.gap_max < t.gap_min:
        raise ConfigError(f"{where}.gap_max: must be >= gap_min = {t.gap_min}, got {t.gap_max}")
    if model.backbone == "transformer" and model.position != "set":
        raise ConfigError(f"model.position: a sample matrix is a set of points (PCA does not depend on their order); "
                          f"use set, got {model.position!r}")
    if model.backbone != "transformer" and model.bidirectional:
        raise ConfigError("model.bidirectional: the read-out tokens are last, so a causal scan sees the whole sample "
                          "(set it false)")
