"""The permutation-invariant training loss: cross-entropy of the per-point label distribution under
the best matching of predicted to true labels.

cost[b, a, c] = -sum_i [true_i = a] log p_i(c) is one (B, K, K) matrix; the matched loss is
min over permutations pi of sum_a cost[a, pi(a)] / N. For K <= 5 the K! sums are gathered from it
(at most 120 per task: no (B, K!, N, K) tensor); above, scipy's Hungarian algorithm finds pi on the
detached costs (an assignment problem, exact), and the loss gathers the costs it picks.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor

ENUMERATE_MAX_K = 5


@lru_cache(maxsize=None)
def _perms(K: int) -> tuple:
    return tuple(itertools.permutations(range(K)))


def cost_matrix(log_probs: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """log p (B, N, K), true labels (B, N) -> (B, K, K) cost[a, c] = -sum over true-a points of log p(c)."""
    K = log_probs.shape[-1]
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), K).to(log_probs.dtype)
    if mask is not None:
        onehot = onehot * mask[..., None].to(log_probs.dtype)
    return -(onehot.transpose(1, 2) @ log_probs)


def matched_assignment(cost: Tensor, method: str = "auto") -> Tensor:
    """(B, K, K) -> (B, K) long: pi with pi[a] the predicted label matched to true label a (min cost)."""
    K = cost.shape[-1]
    if method == "enumerate" or (method == "auto" and K <= ENUMERATE_MAX_K):
        P = torch.tensor(_perms(K), device=cost.device)  # (P, K)
        total = cost.detach()[:, torch.arange(K, device=cost.device)[None, :], P].sum(-1)  # (B, P)
        return P[total.argmin(1)]
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().double().cpu().numpy()
    import numpy as np

    return torch.from_numpy(np.stack([linear_sum_assignment(ci)[1] for ci in c])).to(cost.device)


def matched_cross_entropy(log_probs: Tensor, labels: Tensor, mask: Tensor | None = None,
                          method: str = "auto") -> Tensor:
    """(B,) the per-point cross-entropy under the best label matching."""
    cost = cost_matrix(log_probs, labels, mask)  # (B, K, K)
    pi = matched_assignment(cost, method)
    n = labels.shape[1] if mask is None else mask.sum(1).clamp_min(1)
    return torch.gather(cost, 2, pi[..., None])[..., 0].sum(1) / n
