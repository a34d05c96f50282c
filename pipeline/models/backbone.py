"""The backbone registry: one params key (`model.backbone`) picks the sequence model.

Every backbone has the same contract, so the read-in, the read-out heads and the training function
never change with it:

    backbone(h (B, N, C), mask (B, N) bool, return_hidden) -> (final states (B, N, C), hidden)

`h` is the read-in token sequence (one token per sample point, real points first, padding last),
`mask` marks the real points, and `hidden` is [] or the n_layer + 1 per-layer states
[input of layer 1, after layer 1, ..., after layer L] used for probing (the gpt2 transformer's
layer-1 input includes its position embedding).

    transformer : pre-LN GPT-2 blocks; position set (permutation-equivariant) or gpt2 (causal);
                  attention softmax | relu | linear                      (models/transformer.py)
    mamba2      : Mamba2 blocks with the chunked SSD scan in plain PyTorch, mamba-ssm kernels on
                  CUDA when installed; causal, optionally bidirectional    (models/mamba2.py)
    lstm        : stacked LSTM of the same width; causal, optionally bidirectional (models/lstm.py)
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from pipeline.core.config import BACKBONES, ModelConfig


class Backbone(Protocol):
    def __call__(self, h: Tensor, mask: Tensor, return_hidden: bool = False) -> tuple[Tensor, list[Tensor]]: ...


def _transformer(m: ModelConfig) -> nn.Module:
    from pipeline.models.transformer import Transformer

    return Transformer(m.n_layer, m.n_embd, m.n_head, m.mlp_ratio, m.dropout, m.position, m.max_len, m.attention,
                       m.mlp)


def _mamba2(m: ModelConfig) -> nn.Module:
    from pipeline.models.mamba2 import Mamba2

    return Mamba2(m.n_layer, m.n_embd, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim,
                  chunk_size=m.chunk_size, bidirectional=m.bidirectional)


def _lstm(m: ModelConfig) -> nn.Module:
    from pipeline.models.lstm import LSTM

    return LSTM(m.n_layer, m.n_embd, dropout=m.dropout, bidirectional=m.bidirectional)


REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {"transformer": _transformer, "mamba2": _mamba2,
                                                          "lstm": _lstm}
assert tuple(REGISTRY) == BACKBONES, "config.BACKBONES and the registry must list the same backbones"


def build_backbone(m: ModelConfig) -> nn.Module:
    if m.backbone not in REGISTRY:
        raise ValueError(f"model.backbone: {m.backbone!r} is not registered (known: {', '.join(REGISTRY)})")
    return REGISTRY[m.backbone](m)


def is_causal(m: ModelConfig) -> bool:
    """Whether position t's output depends on positions <= t only."""
    if m.backbone == "transformer":
        return m.position == "gpt2"
    return not m.bidirectional


def describe(m: ModelConfig) -> str:
    """A short human label, e.g. 'transformer(set, relu) L4 D64' or 'mamba2(causal) L4 D96'."""
    if m.backbone == "transformer":
        kind = f"transformer({m.position}, {m.attention}" + (f", {m.mlp} MLP)" if m.mlp != "gelu" else ")")
    else:
        kind = f"{m.backbone}({'bidirectional' if m.bidirectional else 'causal'})"
    return f"{kind} L{m.n_layer} D{m.n_embd}"


def reverse_within_length(h: Tensor, mask: Tensor) -> Tensor:
    """Reverse each row's real samples in place, padding stays at the end: row b with n_b real points
    maps position t < n_b to n_b - 1 - t. Its own inverse. h (B, N, ...), mask (B, N)."""
    N = h.shape[1]
    n = mask.sum(1, keepdim=True)  # (B, 1)
    t = torch.arange(N, device=h.device)[None]  # (1, N)
    idx = torch.where(t < n, n - 1 - t, t)  # (B, N)
    return torch.gather(h, 1, idx.view(*idx.shape, *([1] * (h.dim() - 2))).expand_as(h))
