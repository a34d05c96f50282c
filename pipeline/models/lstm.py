"""Stacked LSTM backbone: the recurrent baseline of the ablations (same width as the transformer).

Reads the sample in the given order (the sampler emits i.i.d. points in random order, so the order
carries no information) and is causal: position t has seen points 0..t. Padding sits after the real
points, so it never reaches them. The read-out heads attend over every position, so the estimate
uses all states, not only the last. `bidirectional=True` adds, per layer, a second LSTM (own
weights) that reads each sample's real points in reverse; the two directions' outputs are summed,
so the width stays n_embd and every token sees the whole sample.
"""
from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.backbone import reverse_within_length


class LSTM(nn.Module):
    def __init__(self, n_layer: int, n_embd: int, dropout: float = 0.0, bidirectional: bool = False):
        super().__init__()
        self.fwd = nn.ModuleList(nn.LSTM(n_embd, n_embd, batch_first=True) for _ in range(n_layer))
        self.bwd = nn.ModuleList(nn.LSTM(n_embd, n_embd, batch_first=True) for _ in range(n_layer)) \
            if bidirectional else None
        self.drop = nn.Dropout(dropout)
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, h: Tensor, mask: Tensor, return_hidden: bool = False) -> tuple[Tensor, list[Tensor]]:
        hidden = [h] if return_hidden else []
        for i, lstm in enumerate(self.fwd):
            out, _ = lstm(h)  # (B, N, C)
            if self.bwd is not None:
                back, _ = self.bwd[i](reverse_within_length(h, mask))
                out = out + reverse_within_length(back, mask)
            h = self.drop(out) if i < len(self.fwd) - 1 else out  # dropout between layers, as nn.LSTM does
            if return_hidden:
                hidden.append(h)
        return self.ln_f(h), hidden
