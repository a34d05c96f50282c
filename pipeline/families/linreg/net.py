"""Read-in and read-out of in-context linear regression (Garg et al. 2022).

Read-in: the prompt's interleaved tokens x_i and (y_i, 0, ..., 0), each Linear(d -> width).
Read-out: Linear(width -> 1) at every x_i position: a causal backbone there has seen
(x_1, y_1, ..., x_i), so its output predicts y_i from i - 1 examples.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.families.linreg.data import interleave


class ReadIn(nn.Module):
    def __init__(self, d: int, n_embd: int):
        super().__init__()
        self.proj = nn.Linear(d, n_embd)

    def features(self, batch) -> tuple[Tensor, Tensor]:
        tok = interleave(batch.xs, batch.ys)  # (B, 2n, d)
        return tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)


class ReadOut(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.head = nn.Linear(n_embd, 1)

    def forward(self, h: Tensor, mask: Tensor, batch=None) -> Tensor:
        return self.head(h[:, 0::2, :])[..., 0]  # (B, n): the prediction at every x_i
