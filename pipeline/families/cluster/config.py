"""Parameters of the clustering family: params.yaml `task.cluster`, `baselines.cluster`."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f


@dataclass
class ClusterTask:
    d: int = _f(2, "dimension of the points", min=1)
    ks: list[int] = _f([2, 3, 4], "numbers of clusters trained (one shared backbone, one read-out head per K)")
    n_points: int = _f(64, "points per task (one sample size: no padding)", min=2)
    separation: float = _f(2.0, "mean coordinates ~ U(-s, s) with s ~ U[separation, separation_max] per task; a task "
                                "is redrawn while two means have cosine >= max_cosine (the TGMM sampler); "
                                "unit-variance isotropic clusters", gt=0)
    separation_max: float = _f(6.0, "upper end of the per-task separation range (= separation: one value)", gt=0)
    max_cosine: float = _f(0.8, "redraw while two means have cosine >= this", gt=0, max=1)
    k_embd: int = _f(8, "read-in: embedding of K appended to every point", min=1)


@dataclass
class ClusterSolvers:
    lloyd_restarts: int = _f(5, "Lloyd's algorithm: k-means++ restarts (the lowest inertia wins)", min=1)
    lloyd_iters: int = _f(100, "Lloyd's algorithm: iterations per restart", min=1)
    em_max_iter: int = _f(100, "EM (paper protocol and strong): at most this many iterations", min=1)
    em_tol: float = _f(1e-7, "EM: stop when the mean log-likelihood changes by less", gt=0)
    strong_restarts: int = _f(5, "strong EM: k-means++ restarts", min=1)


def validate(t: ClusterTask, model, where: str) -> None:
    if not t.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in t.ks) or len(set(t.ks)) != len(t.ks):
        raise ConfigError(f"{where}.ks: distinct integers >= 2, got {t.ks}")
    if t.separation_max < t.separation:
        raise ConfigError(f"{where}.separation_max: must be >= separation = {t.separation}, got {t.separation_max}")
    if max(t.ks) > t.n_points:
        raise ConfigError(f"{where}.n_points: at least max(ks) = {max(t.ks)} points, got {t.n_points}")
    if model.backbone == "transformer" and model.position != "set":
        raise ConfigError(f"model.position: a sample is a set of points; use set, got {model.position!r}")
