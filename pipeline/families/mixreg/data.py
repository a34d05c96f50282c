"""Mixture-of-linear-regressions prompts (Jin, Balasubramanian, Lai 2024), batched on the device.

K = task.components regressors; example i has a hidden component c_i uniform over them and label
y_i = <beta_{c_i}, x_i> + sigma eps_i, x_i ~ N(0, I_d), sigma = 1 / SNR.
- K = 2 (the default) is the paper's symmetric mixture: beta uniform on the unit sphere and the
  components beta and -beta, so beta is identified up to its sign. The answer is one beta_hat and
  every metric and the loss take the better sign; for a query whose component is known (the
  oracle's knowledge), c <beta_hat, x> has excess squared error ||beta_hat - beta||^2 over the
  oracle's (isotropic x).
- K >= 3 (the paper's K-component mixture, at high SNR): K independent regressors, each uniform on
  the unit sphere. The answer is K regressors in any order; metrics and the loss match them to the
  true ones first (core/matching.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.core.batch import PromptBatch
from pipeline.core.matching import matched_costs


@dataclass
class MixRegBatch(PromptBatch):
    xs: Tensor  # (B, n, d)
    ys: Tensor  # (B, n)
    betas: Tensor  # (B, K, d) unit regressors; K = 2: (beta, -beta)
    comps: Tensor  # (B, n) long: each example's component (hidden from every solver but the oracle)
    sigma: Tensor  # (B,) noise standard deviation
    index: Tensor | None = None

    REQUIRED = ("xs", "ys", "betas", "comps", "sigma")
    KIND = "mixture-of-regressions"

    @property
    def K(self) -> int:
        return self.betas.shape[1]

    @property
    def symmetric(self) -> bool:
        """The two-component mixture beta, -beta (K = 2 always is: the sampler draws no other)."""
        return self.K == 2

    @property
    def beta(self) -> Tensor:
        """(B, d) the symmetric mixture's beta (component 0)."""
        return self.betas[:, 0]

    @property
    def signs(self) -> Tensor:
        """(B, n) the symmetric mixture's c_i = +-1 (component 0 -> +1, 1 -> -1)."""
        return 1.0 - 2.0 * self.comps.to(self.ys.dtype)

    @classmethod
    def check_shapes(cls, a) -> bool:
        xs, b = a["xs"], a["betas"]
        return (xs.ndim == 3 and a["ys"].shape == xs.shape[:2] and a["comps"].shape == xs.shape[:2]
                and b.ndim == 3 and b.shape[0] == xs.shape[0] and b.shape[2] == xs.shape[2] and b.shape[1] >= 2
                and a["sigma"].shape == (xs.shape[0],))


@dataclass
class MixRegEstimate:
    beta: Tensor  # (B, d) any sign (symmetric mixture) | (B, K, d) any order (K >= 3)
    applicable: bool = True
    reason: str = ""


def sample_mixreg(batch_size: int, d: int, n: int, generator, device="cpu", *, snr: float = 2.0,
                  snr_max: float | None = None, components: int = 2) -> MixRegBatch:
    B, g, K = batch_size, generator, components
    if K == 2:
        beta = torch.randn(B, d, generator=g, device=device)
        betas = torch.stack([beta, -beta], 1)
    else:
        betas = torch.randn(B, K, d, generator=g, device=device)
    betas = betas / betas.norm(dim=-1, keepdim=True)
    hi = snr if snr_max is None else snr_max
    u = torch.rand(B, generator=g, device=device)
    s = torch.exp(math.log(snr) + (math.log(hi) - math.log(snr)) * u)  # (B,) log-uniform SNR
    sigma = 1 / s
    xs = torch.randn(B, n, d, generator=g, device=device)
    if K == 2:
        comps = (torch.rand(B, n, generator=g, device=device) < 0.5).long()
    else:
        comps = torch.randint(0, K, (B, n), generator=g, device=device)
    chosen = torch.gather(betas, 1, comps[..., None].expand(B, n, d))  # (B, n, d) beta_{c_i}
    ys = (xs * chosen).sum(-1) + sigma[:, None] * torch.randn(B, n, generator=g, device=device)
    return MixRegBatch(xs, ys, betas, comps, sigma)


def sign_aligned_error(beta_hat: Tensor, beta: Tensor) -> Tensor:
    """(B,) min over s = +-1 of ||s beta_hat - beta||^2."""
    return torch.minimum((beta_hat - beta).pow(2).sum(-1), (beta_hat + beta).pow(2).sum(-1))


def pairwise_sq(beta_hat: Tensor, betas: Tensor) -> Tensor:
    """(B, K', d) answers, (B, K, d) truth -> (B, K, K') ||beta_k - beta_hat_j||^2."""
    return (betas[:, :, None] - beta_hat[:, None]).pow(2).sum(-1)


def matched_error(beta_hat: Tensor, betas: Tensor) -> Tensor:
    """(B,) the mean over components of ||beta_hat_pi(k) - beta_k||^2 under the best matching pi."""
    return matched_costs(pairwise_sq(beta_hat, betas)).mean(1)


def estimate_error(beta_hat: Tensor, batch: MixRegBatch) -> Tensor:
    """(B,) the error of an answer: sign-aligned (symmetric mixture) or matched (K >= 3); an answer of
    one regressor for K >= 3 (OLS) stands for every component."""
    if batch.symmetric:
        return sign_aligned_error(beta_hat, batch.beta.to(beta_hat.dtype))
    if beta_hat.ndim == 2:
        beta_hat = beta_hat[:, None].expand(-1, batch.K, -1)
    return matched_error(beta_hat, batch.betas.to(beta_hat.dtype))
