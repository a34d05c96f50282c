"""In-context linear-regression prompts (Garg et al. 2022), batched and sampled on the device.

One task: w ~ N(0, I_d), x_i ~ N(0, Sigma) (Sigma = I by default; `condition` > 1 gives the
ill-conditioned setting of Fu et al. 2024 with a fresh random rotation per task), y_i = w.x_i
(+ noise). Under a curriculum the coordinates of x beyond the active dimensions are 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.core.batch import PromptBatch


@dataclass
class LinRegBatch(PromptBatch):
    """B prompts of n examples in d dimensions. `index` (B,): each task's row in its set."""

    xs: Tensor  # (B, n, d)
    ys: Tensor  # (B, n)
    w: Tensor  # (B, d) the true weights
    index: Tensor | None = None

    REQUIRED = ("xs", "ys", "w")
    KIND = "regression"

    @classmethod
    def check_shapes(cls, a) -> bool:
        xs, ys, w = a["xs"], a["ys"], a["w"]
        return xs.ndim == 3 and ys.shape == xs.shape[:2] and w.shape == (xs.shape[0], xs.shape[2])


@dataclass
class RegEstimate:
    """An answer for every prefix: preds[:, k] predicts y_k from the first k examples and x_k."""

    preds: Tensor  # (B, n)
    applicable: bool = True
    reason: str = ""


def _covariance_factor(B: int, d: int, condition: float, g: torch.Generator, device) -> Tensor:
    """T (B, d, d) with x = z T, Cov(x) = T^T T = U diag(lam) U^T, condition number `condition`, trace d."""
    lam = torch.ones(d, device=device)
    lam[: d // 2] = condition
    lam = lam * d / lam.sum()
    q, r = torch.linalg.qr(torch.randn(B, d, d, generator=g, device=device))
    U = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-random rotation per task
    return (U * lam.sqrt()[None, None, :]) @ U.transpose(1, 2)  # symmetric square root of Sigma


def sample_linreg(batch_size: int, d: int, n: int, generator: torch.Generator, device="cpu", *,
                  active_dims: int | None = None, noise_std: float = 0.0, condition: float = 1.0) -> LinRegBatch:
    B, g = batch_size, generator
    xs = torch.randn(B, n, d, generator=g, device=device)
    if condition != 1.0:
        xs = xs @ _covariance_factor(B, d, condition, g, device)
    if active_dims is not None and active_dims < d:
        xs[..., active_dims:] = 0
    w = torch.randn(B, d, generator=g, device=device)
    ys = (xs @ w[..., None])[..., 0]
    if noise_std > 0:
        ys = ys + noise_std * torch.randn(B, n, generator=g, device=device)
    return LinRegBatch(xs, ys, w)


def interleave(xs: Tensor, ys: Tensor) -> Tensor:
    """Tokens x_1, (y_1, 0..0), x_2, (y_2, 0..0), ...: (B, n, d), (B, n) -> (B, 2n, d)."""
    B, n, d = xs.shape
    ytok = torch.zeros_like(xs)
    ytok[..., 0] = ys
    return torch.stack([xs, ytok], dim=2).reshape(B, 2 * n, d)


LOG_2PI = math.log(2 * math.pi)
