"""Mixture-of-linear-regressions prompts (Jin, Balasubramanian, Lai 2024), batched on the device.

One prompt: beta uniform on the unit sphere of R^d, x_i ~ N(0, I_d), c_i = +-1 equiprobable,
y_i = c_i <beta, x_i> + sigma eps_i, sigma = 1 / SNR. The two components are beta and -beta (the
symmetric two-component mixture of the paper), so beta is identified up to its sign: every
metric and the loss take the better sign. The answer is beta_hat; for a query whose component c is
known (the oracle's knowledge), the prediction c <beta_hat, x> has excess squared error
E<beta_hat - beta, x>^2 = ||beta_hat - beta||^2 over the oracle's (isotropic x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.core.batch import PromptBatch


@dataclass
class MixRegBatch(PromptBatch):
    xs: Tensor  # (B, n, d)
    ys: Tensor  # (B, n)
    beta: Tensor  # (B, d) unit
    signs: Tensor  # (B, n) the components c_i = +-1 (hidden from every solver but the oracle)
    sigma: Tensor  # (B,) noise standard deviation
    index: Tensor | None = None

    REQUIRED = ("xs", "ys", "beta", "signs", "sigma")
    KIND = "mixture-of-regressions"

    @classmethod
    def check_shapes(cls, a) -> bool:
        xs = a["xs"]
        return (xs.ndim == 3 and a["ys"].shape == xs.shape[:2] and a["signs"].shape == xs.shape[:2]
                and a["beta"].shape == (xs.shape[0], xs.shape[2]) and a["sigma"].shape == (xs.shape[0],))


@dataclass
class MixRegEstimate:
    beta: Tensor  # (B, d), any sign
    applicable: bool = True
    reason: str = ""


def sample_mixreg(batch_size: int, d: int, n: int, generator, device="cpu", *, snr: float = 2.0,
                  snr_max: float | None = None) -> MixRegBatch:
    B, g = batch_size, generator
    beta = torch.randn(B, d, generator=g, device=device)
    beta = beta / beta.norm(dim=-1, keepdim=True)
    hi = snr if snr_max is None else snr_max
    u = torch.rand(B, generator=g, device=device)
    s = torch.exp(math.log(snr) + (math.log(hi) - math.log(snr)) * u)  # (B,) log-uniform SNR
    sigma = 1 / s
    xs = torch.randn(B, n, d, generator=g, device=device)
    signs = torch.where(torch.rand(B, n, generator=g, device=device) < 0.5, -1.0, 1.0)
    ys = signs * (xs @ beta[..., None])[..., 0] + sigma[:, None] * torch.randn(B, n, generator=g, device=device)
    return MixRegBatch(xs, ys, beta, signs, sigma)


def sign_aligned_error(beta_hat: Tensor, beta: Tensor) -> Tensor:
    """(B,) min over s = +-1 of ||s beta_hat - beta||^2."""
    return torch.minimum((beta_hat - beta).pow(2).sum(-1), (beta_hat + beta).pow(2).sum(-1))
