"""The permutation-invariant training loss: cross-entropy of the per-point label distribution under
the best matching of predicted to true labels.

cost[b, a, c] = -sum_i [true_i = a] log p_i(c) is one (B, K, K) matrix; the matched loss is
min over permutations pi of sum_a cost[a, pi(a)] / N, matched by core/matching.py (the K! sums
gathered from the one matrix for K <= 5, no (B, K!, N, K) tensor; scipy's Hungarian algorithm
above), and the loss gathers the costs it picks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.core.matching import matched_costs


def cost_matrix(log_probs: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """log p (B, N, K), true labels (B, N) -> (B, K, K) cost[a, c] = -sum over true-a points of log p(c)."""
    K = log_probs.shape[-1]
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), K).to(log_probs.dtype)
    if mask is not None:
        onehot = onehot * mask[..., None].to(log_probs.dtype)
    return -(onehot.transpose(1, 2) @ log_probs)


def matched_cross_entropy(log_probs: Tensor, labels: Tensor, mask: Tensor | None = None,
                          method: str = "auto") -> Tensor:
    """(B,) the per-point cross-entropy under the best label matching."""
    cost = cost_matrix(log_probs, labels, mask)  # (B, K, K)
    n = labels.shape[1] if mask is None else mask.sum(1).clamp_min(1)
    return matched_costs(cost, method).sum(1) / n
