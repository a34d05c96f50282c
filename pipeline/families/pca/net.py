"""Read-in and read-out of the PCA family.

Read-in: each task is centred and scaled by its own RMS coordinate s = sqrt(tr(S) / d), so every
sample matrix reaches the network at unit average variance whatever its units (pixels or
synthetic); one token per point [x_i / s, 0_k], then k read-out tokens [0_d, e_j], each
Linear(d + k -> width). Read-out: Linear(width -> d + 1) at read-out token j: a direction (d) and
the eigenvalue in units of s^2 (1). `decode` normalises the direction and rescales the eigenvalue.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def scale2(xs: Tensor) -> Tensor:
    """(B, n, d) -> (B,) s^2 = tr(S) / d, the mean variance per coordinate (floored for constant samples)."""
    xc = xs - xs.mean(1, keepdim=True)
    return xc.pow(2).mean((1, 2)).clamp_min(1e-12)


def tokens(xs: Tensor, k: int) -> Tensor:
    """(B, n, d) -> (B, n + k, d + k): normalised points, then the k read-out tokens."""
    B, n, d = xs.shape
    xc = (xs - xs.mean(1, keepdim=True)) / scale2(xs).sqrt()[:, None, None]
    pts = torch.cat([xc, xs.new_zeros(B, n, k)], -1)
    q = torch.cat([xs.new_zeros(k, d), torch.eye(k, dtype=xs.dtype, device=xs.device)], -1).expand(B, k, d + k)
    return torch.cat([pts, q], 1)


class ReadIn(nn.Module):
    def __init__(self, d: int, k: int, n_embd: int):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(d + k, n_embd)

    def features(self, batch) -> tuple[Tensor, Tensor]:
        tok = tokens(batch.xs, self.k)
        return tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)


def ReadOut(n_embd: int, d: int, k: int):  # noqa: N802 (a module factory)
    """Linear(width -> d + 1) at each of the k read-out tokens: (B, k, d + 1) direction, eigenvalue / s^2."""
    from pipeline.models.heads import LastTokensHead

    return LastTokensHead(n_embd, d + 1, k, squeeze=False)
