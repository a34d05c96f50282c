"""In-context logistic-regression prompts (Giannou et al. 2024), batched and sampled on the device.

One task: w* ~ N(0, I_d), x_i ~ N(0, Sigma), labels y_i = sign(x_i.w*) in {-1, +1}; the target is
the regularised solution w_mu = argmin mean log(1 + exp(-y x.w)) + mu/2 ||w||^2 found by damped
Newton from w0 = 0.1 N(0, I) (what the network learns to output). `xt`, `yt` are fresh points of
the same task for the test accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.core.batch import PromptBatch


@dataclass
class LogRegBatch(PromptBatch):
    """B prompts of n labelled examples in d dimensions. `index` (B,): each task's row in its set."""

    xs: Tensor  # (B, n, d)
    ys: Tensor  # (B, n) in {-1, +1}
    w_star: Tensor  # (B, d) the labelling direction
    w_target: Tensor  # (B, d) the regularised logistic solution (damped Newton)
    xt: Tensor  # (B, m, d) test points
    yt: Tensor  # (B, m) their labels
    mu: Tensor  # (B,) the regularisation of the target (the same for every task of a set)
    index: Tensor | None = None

    REQUIRED = ("xs", "ys", "w_star", "w_target", "xt", "yt", "mu")
    KIND = "logistic-regression"

    @property
    def mu_value(self) -> float:
        """The regularisation mu of these tasks (one value per set)."""
        return float(self.mu[0]) if self.B else 0.0

    @classmethod
    def check_shapes(cls, a) -> bool:
        if a["xs"].ndim != 3 or a["xt"].ndim != 3:
            return False
        B, n, d = a["xs"].shape
        return (a["ys"].shape == (B, n) and a["w_star"].shape == (B, d) and a["w_target"].shape == (B, d)
                and a["xt"].shape[::2] == (B, d) and a["yt"].shape == a["xt"].shape[:2] and a["mu"].shape == (B,))


@dataclass
class LogRegEstimate:
    """An answer: the weight vector of every task."""

    w: Tensor  # (B, d)
    applicable: bool = True
    reason: str = ""


def covariance_factor(B: int, d: int, condition: float, g: torch.Generator, device) -> Tensor:
    """T (B, d, d) with x = z T, Cov(x) = U diag(s) U^T (the anchor's spectrum, a rotation per task)."""
    s_max = 1 + 99 * torch.rand(B, 1, generator=g, device=device)
    s_min = s_max / condition
    mid = s_min + (s_max - s_min) * torch.rand(B, max(d - 2, 0), generator=g, device=device)
    s = torch.cat([s_max, mid, s_min], 1)[:, :d]  # (B, d)
    q, r = torch.linalg.qr(torch.randn(B, d, d, generator=g, device=device))
    U = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar rotation per task
    return (U * s.sqrt()[:, None, :]) @ U.transpose(1, 2)  # symmetric square root of Sigma


def sample_logreg(batch_size: int, d: int, n: int, generator: torch.Generator, device="cpu", *, condition: float = 1.0,
                  mu: float = 0.01, target_steps: int = 30, test_points: int = 64) -> LogRegBatch:
    from pipeline.algorithms.logistic import damped_newton_iterates

    B, g = batch_size, generator
    T = covariance_factor(B, d, condition, g, device) if condition != 1.0 else None
    xs = torch.randn(B, n + test_points, d, generator=g, device=device)
    if T is not None:
        xs = xs @ T
    w_star = torch.randn(B, d, generator=g, device=device)
    ys = torch.where(xs @ w_star[..., None] >= 0, 1.0, -1.0)[..., 0]  # (B, n + m)
    w0 = 0.1 * torch.randn(B, d, generator=g, device=device)
    x, y = xs[:, :n], ys[:, :n]
    w_target = damped_newton_iterates(x, y, mu, [target_steps], w0=w0)[0].to(xs.dtype)
    return LogRegBatch(x.contiguous(), y.contiguous(), w_star, w_target, xs[:, n:].contiguous(), ys[:, n:].contiguous(),
                       torch.full((B,), float(mu), device=device))
