"""Transformer backbone (pre-LN GPT-2 blocks) with two position modes.

  set  : no positional embedding, full attention over the real samples -> the backbone is
         permutation-equivariant over the sample (the natural model for a set of points).
  gpt2 : learned absolute positions and causal attention, as in the TGMM anchor code.

Three attention maps, each with either mode (`attention`):
  softmax : softmax(q.k / sqrt(hd)) through torch's scaled_dot_product_attention (flash /
            memory-efficient kernels where the device has them);
  relu    : ReLU(q.k / sqrt(hd)) / n, n = the number of keys the query may see (real samples, and
            only earlier ones under gpt2): the ReLU attention of the spectral-methods paper;
  linear  : (q.k / sqrt(hd)) / n, no nonlinearity: the linear attention of the in-context Newton
            analyses.
Dividing by the number of visible keys (not by N) keeps padded and unpadded tasks on one scale and
keeps the set mode permutation-equivariant.

The backbone returns every layer's hidden states so that later studies can probe layer l against
step l of a classical algorithm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


ATTENTIONS = ("softmax", "relu", "linear")


def normalised_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, kind: str,
                         dropout_p: float = 0.0) -> Tensor:
    """ReLU or linear attention: scores (relu'd or not) divided by the number of allowed keys.
    q, k, v (B, h, N, hd); allowed (B or 1, 1, N, N) bool or None (all keys)."""
    att = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, N, N)
    if kind == "relu":
        att = F.relu(att)
    if allowed is None:
        att = att / k.shape[-2]
    else:
        att = att.masked_fill(~allowed, 0.0) / allowed.sum(-1, keepdim=True).clamp_min(1).to(att.dtype)
    if dropout_p:
        att = F.dropout(att, dropout_p)
    return att @ v


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, causal: bool, attention: str = "softmax"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.n_head, self.causal, self.dropout, self.attention = n_head, causal, dropout, attention
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        B, N, C = x.shape  # batch, sample size, width
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, N, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, h, N, hd)
        p = self.dropout if self.training else 0.0
        if self.attention != "softmax":
            allowed = None if key_mask is None else key_mask[:, None, None, :]
            if self.causal:
                tril = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
                allowed = tril[None, None] if allowed is None else allowed & tril
            y = normalised_attention(q, k, v, allowed, self.attention, p)
        elif key_mask is None:  # no padding: let SDPA pick its fastest kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            mask = key_mask[:, None, None, :]  # (B, 1, 1, N): attend to real samples only
            if self.causal:
                mask = mask & torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int, dropout: float, causal: bool,
                 attention: str = "softmax", mlp: str = "gelu"):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal, attention)
        self.ln2 = nn.LayerNorm(n_embd)
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[mlp]
        self.mlp = nn.Sequential(nn.Linear(n_embd, mlp_ratio * n_embd), act(),
                                 nn.Linear(mlp_ratio * n_embd, n_embd), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_mask))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token sequence (B, N, C) + mask (B, N) -> final states (B, N, C) and per-layer states."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 position: str = "set", max_len: int = 1024, attention: str = "softmax", mlp: str = "gelu"):
        super().__init__()
        if position not in ("set", "gpt2"):
            raise ValueError(f"position must be 'set' or 'gpt2', got {position!r}")
        self.position = position
        causal = position == "gpt2"
        self.wpe = nn.Embedding(max_len, n_embd) if causal else None
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio, dropout, causal, attention, mlp)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, h: Tensor, mask: Tensor, return_hidden: bool = False) -> tuple[Tensor, list[Tensor]]:
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(h.shape[1], device=h.device))[None]
        key_mask = None if bool(mask.all()) else mask
        hidden = [h] if return_hidden else []
        for block in self.blocks:
            h = block(h, key_mask)
            if return_hidden:
                hidden.append(h)
        return self.ln_f(h), hidden
