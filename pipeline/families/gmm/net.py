"""The GMM read-in and read-out around the shared backbone (core/network.py).

Read-in: one token per sample point, [x_i ; embed(K)] -> Linear -> width (the TGMM paper's).
Read-out: one attentive-pooling head per K: K learned queries attend over the sample; each query
becomes one component's (weight logit, mean[, scale]). Extra parameters per K: O(K*D + D*d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ReadIn(nn.Module):
    def __init__(self, d: int, k_max: int, k_embd: int, n_embd: int):
        super().__init__()
        self.k_embed = nn.Embedding(k_max + 1, k_embd)
        self.proj = nn.Linear(d + k_embd, n_embd)

    def features(self, batch) -> tuple[Tensor, Tensor]:
        """[x_i ; embed(K)] per point: (B, N, d + k_embd), mask (B, N)."""
        B, N, _ = batch.x.shape
        k = torch.full((B,), batch.K, dtype=torch.long, device=batch.x.device)
        return torch.cat([batch.x, self.k_embed(k)[:, None, :].expand(B, N, -1)], dim=-1), batch.mask

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)


class PoolingHead(nn.Module):
    """K learned queries attend over the sample; each query becomes one component's
    (weight logit, mean[, log-scale]). Extra parameters per K: O(K*D + D*d)."""

    def __init__(self, K: int, n_embd: int, n_head: int, d: int, scales: bool):
        super().__init__()
        self.K, self.d, self.n_head, self.scales = K, d, n_head, scales
        self.query = nn.Parameter(torch.randn(K, n_embd) * 0.02)
        self.kv = nn.Linear(n_embd, 2 * n_embd)
        self.out = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, n_embd), nn.GELU(),
                                 nn.Linear(n_embd, 1 + d + (d if scales else 0)))

    def forward(self, h: Tensor, mask: Tensor, batch=None) -> tuple[Tensor, Tensor, Tensor | None]:
        B, N, C = h.shape
        hd = C // self.n_head
        k, v = self.kv(h).split(C, dim=2)
        k, v = (t.view(B, N, self.n_head, hd).transpose(1, 2) for t in (k, v))  # (B, h, N, hd)
        q = self.query.view(1, self.K, self.n_head, hd).transpose(1, 2).expand(B, -1, -1, -1)  # (B, h, K, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, h, K, hd)
        y = y.transpose(1, 2).reshape(B, self.K, C) + self.query
        o = self.out(y)  # (B, K, 1 + d [+ d])
        logits, means = o[..., 0], o[..., 1:1 + self.d]
        scales = F.softplus(o[..., 1 + self.d:]) + 1e-3 if self.scales else None
        return logits, means, scales
