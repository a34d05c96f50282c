"""Batched estimators for the symmetric two-component mixture of linear regressions
y_i = c_i <beta, x_i> + sigma eps_i, c_i = +-1 equiprobable (Jin, Balasubramanian, Lai 2024).

    em_iterates      EM with the noise level known: E step E[c_i] = tanh(y_i <beta, x_i> / sigma^2)
                     (the posterior mean of the component sign); M step either exact, the weighted
                     least squares beta = (X'X)^-1 X'(E[c] * y), or `gd_steps` gradient steps on
                     (1/2n)||X beta - E[c] * y||^2 from the current beta (the construction's M step),
                     step lr / lambda_max(X'X / n) per task (stable for lr < 2; a fixed step
                     diverged on 8-example prompts, where lambda_max often exceeds 4)
    spectral_start   the top eigenvector of (1/n) sum y_i^2 x_i x_i' (E = (1 + sigma^2) I + 2 beta beta'),
                     scaled to the estimated norm: the standard initialisation that makes EM local
    oracle_ls        least squares knowing every c_i: beta = (X'X)^-1 X'(c * y)
    ols              least squares ignoring the mixture (for a symmetric mixture, beta ~ 0)

All take X (B, n, d), y (B, n) and return (B, d); `steps` gives iterates after each listed count.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _solve(X: Tensor, t: Tensor) -> Tensor:
    """(B, n, d), (B, n) -> (B, d) least squares (min-norm via lstsq where X'X is singular)."""
    return torch.linalg.lstsq(X, t[..., None], driver="gelsd" if X.device.type == "cpu" else None).solution[..., 0]


def spectral_start(X: Tensor, y: Tensor) -> Tensor:
    """(B, n, d), (B, n) -> (B, d): top eigenvector v of M = X' diag(y^2) X / n, times sqrt(max(lambda_1 - mean of
    the other eigenvalues, 0) / 2) (the norm E[M] implies)."""
    M = X.transpose(1, 2) @ (X * y[..., None].pow(2)) / X.shape[1]
    vals, vecs = torch.linalg.eigh(M)
    rest = vals[:, :-1].mean(-1) if vals.shape[-1] > 1 else torch.zeros_like(vals[:, 0])
    return vecs[..., -1] * ((vals[:, -1] - rest).clamp_min(0) / 2).sqrt()[:, None]


def oracle_ls(X: Tensor, y: Tensor, signs: Tensor) -> Tensor:
    return _solve(X, signs * y)


def ols(X: Tensor, y: Tensor) -> Tensor:
    return _solve(X, y)


def em_iterates(X: Tensor, y: Tensor, sigma: Tensor, beta0: Tensor, steps: list[int], m_step: str = "exact",
                gd_steps: int = 5, lr: float = 1.0) -> list[Tensor]:
    """sigma (B,), start beta0 (B, d) -> [beta after k EM iterations for k in steps] (ascending, >= 0)."""
    if m_step not in ("exact", "gd"):
        raise ValueError(f"m_step must be exact or gd, got {m_step!r}")
    beta, out, done = beta0.clone(), [], 0
    n = X.shape[1]
    step = lr / torch.linalg.eigvalsh(X.transpose(1, 2) @ X / n)[:, -1:].clamp_min(1e-12) if m_step == "gd" else None
    # X is the same at every iteration: one pseudo-inverse (SVD, min-norm like lstsq's gelsd) serves
    # every exact M step (20 batched lstsq calls took 4 s of the mixreg evaluation)
    pinv = torch.linalg.pinv(X) if m_step == "exact" else None  # (B, d, n)
    for k in steps:
        for _ in range(k - done):
            w = torch.tanh(y * (X @ beta[..., None])[..., 0] / sigma[:, None].pow(2))  # (B, n) E[c_i]
            if m_step == "exact":
                beta = (pinv @ (w * y)[..., None])[..., 0]
            else:
                for _ in range(gd_steps):
                    beta = beta - step * (X.transpose(1, 2) @ ((X @ beta[..., None])[..., 0] - w * y)[..., None])[..., 0] / n
        done = k
        out.append(beta.clone())
    return out
