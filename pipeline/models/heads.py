"""Read-ins and read-outs that several families share.

    LabelledReadIn   in-context examples with a read-out token: one token per example
                     [x_i, y_i, 0] and a last token [0, 0, 1], each Linear(d + 2 -> width)
                     (logistic regression, the mixture of regressions: answers that are one vector
                     per prompt, read at a token that carries no example)
    LastTokensHead   Linear(width -> out) at the last k tokens: (B, k, out), or (B, out) with squeeze
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def labelled_tokens(xs: Tensor, ys: Tensor) -> Tensor:
    """(B, n, d), (B, n) -> (B, n + 1, d + 2): examples [x_i, y_i, 0], then the read-out token [0, 0, 1]."""
    B, n, d = xs.shape
    ex = torch.cat([xs, ys[..., None], torch.zeros_like(ys)[..., None]], -1)
    q = torch.zeros(B, 1, d + 2, dtype=xs.dtype, device=xs.device)
    q[..., -1] = 1
    return torch.cat([ex, q], 1)


class LabelledReadIn(nn.Module):
    """Reads batch.xs (B, n, d) and batch.ys (B, n)."""

    def __init__(self, d: int, n_embd: int):
        super().__init__()
        self.proj = nn.Linear(d + 2, n_embd)

    def features(self, batch) -> tuple[Tensor, Tensor]:
        tok = labelled_tokens(batch.xs, batch.ys)
        return tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)


class LastTokensHead(nn.Module):
    def __init__(self, n_embd: int, out: int, k: int = 1, squeeze: bool = True):
        super().__init__()
        self.k, self.squeeze = k, squeeze and k == 1
        self.head = nn.Linear(n_embd, out)

    def forward(self, h: Tensor, mask: Tensor, batch=None) -> Tensor:
        y = self.head(h[:, -self.k:])  # (B, k, out)
        return y[:, 0] if self.squeeze else y
