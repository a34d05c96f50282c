"""Read-in and read-out of the clustering family.

Read-in: one token per point [x_i ; embed(K)] -> Linear(d + k_embd -> width) (as TGMM's). Read-out,
one head per K: a per-token Linear(width -> K), the logits of the point's label distribution.
"""
from __future__ import annotations

from torch import Tensor, nn

from pipeline.families.gmm.net import ReadIn  # noqa: F401  (the TGMM read-in: [x_i ; embed(K)]; family `uses` gmm)


class ReadOut(nn.Module):
    def __init__(self, n_embd: int, K: int):
        super().__init__()
        self.head = nn.Linear(n_embd, K)

    def forward(self, h: Tensor, mask: Tensor, batch=None) -> Tensor:
        return self.head(h)  # (B, N, K) label logits
