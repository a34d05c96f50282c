"""Read-in and read-out of in-context logistic regression (Giannou et al. 2024).

Read-in: one token per example, [x_i, y_i, 0], and a last read-out token [0, 0, 1], each
Linear(d + 2 -> width). Read-out: Linear(width -> d) at the read-out token: the network's w. (The
anchor reads w at the last example with its label zeroed, although the target uses that label;
a separate read-out token keeps every example whole.)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def tokens(xs: Tensor, ys: Tensor) -> Tensor:
    """(B, n, d), (B, n) -> (B, n + 1, d + 2): examples [x_i, y_i, 0], then the read-out token [0, 0, 1]."""
    B, n, d = xs.shape
    ex = torch.cat([xs, ys[..., None], torch.zeros_like(ys)[..., None]], -1)
    q = torch.zeros(B, 1, d + 2, dtype=xs.dtype, device=xs.device)
    q[..., -1] = 1
    return torch.cat([ex, q], 1)


class ReadIn(nn.Module):
    def __init__(self, d: int, n_embd: int):
        super().__init__()
        self.proj = nn.Linear(d + 2, n_embd)

    def features(self, batch) -> tuple[Tensor, Tensor]:
        tok = tokens(batch.xs, batch.ys)
        return tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)


class ReadOut(nn.Module):
    def __init__(self, n_embd: int, d: int):
        super().__init__()
        self.head = nn.Linear(n_embd, d)

    def forward(self, h: Tensor, mask: Tensor, batch=None) -> Tensor:
        return self.head(h[:, -1])  # (B, d)
