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

    em_components_iterates, oracle_components   the same for K >= 3 regressors (softmax
                     responsibilities; weighted least squares or gradient M steps per component)

All take X (B, n, d), y (B, n) and return (B, d) (K components: (B, K, d)); `steps` gives
iterates after each listed count.
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


# ----------------------------------------------------------------------------- K components

def _weighted_ls(X: Tensor, y: Tensor, R: Tensor) -> Tensor:
    """X (B, n, d), y (B, n), weights R (B, K, n) -> (B, K, d): per component the minimum-norm argmin of
    sum_i R_ki (y_i - <b, x_i>)^2 (a component with fewer than d examples is underdetermined: the
    pseudo-inverse gives the least-norm fit instead of an arbitrary huge one)."""
    XR = X[:, None] * R[..., None]  # (B, K, n, d)
    A = XR.transpose(-1, -2) @ X[:, None]  # (B, K, d, d)
    b = XR.transpose(-1, -2) @ y[:, None, :, None]  # (B, K, d, 1)
    return (torch.linalg.pinv(A, hermitian=True) @ b)[..., 0]


def oracle_components(X: Tensor, y: Tensor, comps: Tensor, K: int) -> Tensor:
    """(B, n, d), (B, n), components (B, n) -> (B, K, d): least squares on each component's examples."""
    R = torch.nn.functional.one_hot(comps, K).to(X.dtype).transpose(1, 2)  # (B, K, n)
    return _weighted_ls(X, y, R)


def responsibilities(X: Tensor, y: Tensor, sigma: Tensor, betas: Tensor) -> Tensor:
    """E step of the K-component mixture with equal weights and known sigma: (B, K, n) P(c_i = k | x_i, y_i)."""
    resid = y[:, None] - (betas @ X.transpose(1, 2))  # (B, K, n)
    return torch.softmax(-resid.pow(2) / (2 * sigma[:, None, None].pow(2)), dim=1)


def em_components_iterates(X: Tensor, y: Tensor, sigma: Tensor, betas0: Tensor, steps: list[int],
                           m_step: str = "exact", gd_steps: int = 5, lr: float = 1.0) -> list[Tensor]:
    """EM for K regressors (equal weights, sigma known) from betas0 (B, K, d) -> [betas after k iterations for k
    in steps]. M step exact: weighted least squares per component; gd: `gd_steps` gradient steps per component
    on (1/2n) sum_i R_ki (y_i - <b, x_i>)^2, step lr / lambda_max(X' diag(R_k) X / n)."""
    if m_step not in ("exact", "gd"):
        raise ValueError(f"m_step must be exact or gd, got {m_step!r}")
    betas, out, done = betas0.clone(), [], 0
    n = X.shape[1]
    for k in steps:
        for _ in range(k - done):
            R = responsibilities(X, y, sigma, betas)  # (B, K, n)
            if m_step == "exact":
                betas = _weighted_ls(X, y, R)
            else:
                XR = X[:, None] * R[..., None]  # (B, K, n, d)
                H = XR.transpose(-1, -2) @ X[:, None] / n  # (B, K, d, d)
                step = lr / torch.linalg.eigvalsh(H)[..., -1:].clamp_min(1e-12)  # (B, K, 1)
                for _ in range(gd_steps):
                    grad = (XR.transpose(-1, -2) @ ((betas @ X.transpose(1, 2)) - y[:, None])[..., None])[..., 0] / n
                    betas = betas - step * grad
        done = k
        out.append(betas.clone())
    return out
