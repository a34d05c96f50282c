"""Read-in of the mixture-of-regressions family: one token per example [x_i, y_i, y_i x_i, 0] and
read-out tokens [0, 0, 0, e_j] (one for the symmetric mixture's beta, K for K regressors), each
Linear(2d + 1 + n_out -> width); the read-out is a Linear(width -> d) at each read-out token
(models/heads.py): the network's beta (any sign) or its K regressors (any order).

Why y_i x_i: beta is the top eigenvector of E[y^2 x x'] = (1 + sigma^2) I + 2 beta beta', a
covariance of the products y_i x_i, and EM's M step is a least squares on E[c_i] y_i x_i. With
tokens [x_i, y_i] only, the 4 x 64 network did not learn in 1000 steps (validation error 0.87 ->
0.82, the trivial beta_hat ~ 0 scores 1); with the product in the token it does (docs/studies/mixreg.md).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def tokens(xs: Tensor, ys: Tensor, n_out: int = 1) -> Tensor:
    """(B, n, d), (B, n) -> (B, n + n_out, 2d + 1 + n_out): examples [x_i, y_i, y_i x_i, 0], then n_out read-out
    tokens [0, 0, 0, e_j] (one per answer: distinct, so a permutation-equivariant network can give K
    different regressors)."""
    B, n, d = xs.shape
    ex = torch.cat([xs, ys[..., None], ys[..., None] * xs, xs.new_zeros(B, n, n_out)], -1)
    q = xs.new_zeros(B, n_out, 2 * d + 1 + n_out)
    q[..., 2 * d + 1:] = torch.eye(n_out, dtype=xs.dtype, device=xs.device)
    return torch.cat([ex, q], 1)


class ReadIn(nn.Module):
    def __init__(self, d: int, n_embd: int, n_out: int = 1):
        super().__init__()
        self.n_out = n_out
        self.proj = nn.Linear(2 * d + 1 + n_out, n_embd)

    def features(self, batch) -> tuple[Tensor, Tensor]:
        tok = tokens(batch.xs, batch.ys, self.n_out)
        return tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)
