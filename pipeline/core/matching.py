"""The best matching of K predicted to K true components: what a permutation-invariant loss or
metric needs when the components of an answer have no order (mixture labels, regressors).

cost (B, K, K), cost[b, a, c] = the cost of answering true component a with predicted component
c. For K <= ENUMERATE_MAX_K the K! sums are gathered from the one matrix (at most 120 per task);
above, scipy's Hungarian algorithm (linear_sum_assignment) solves each task's assignment problem
exactly on the detached costs. Either way the result is the permutation; a loss gathers the costs
it picks, so its gradient flows through the matched pairs only.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor

ENUMERATE_MAX_K = 5


@lru_cache(maxsize=None)
def permutations(K: int) -> tuple:
    return tuple(itertools.permutations(range(K)))


def matched_assignment(cost: Tensor, method: str = "auto") -> Tensor:
    """(B, K, K) -> (B, K) long: pi with pi[a] the predicted component matched to true component a (min total cost)."""
    K = cost.shape[-1]
    if method == "enumerate" or (method == "auto" and K <= ENUMERATE_MAX_K):
        P = torch.tensor(permutations(K), device=cost.device)  # (P, K)
        total = cost.detach()[:, torch.arange(K, device=cost.device)[None, :], P].sum(-1)  # (B, P)
        return P[total.argmin(1)]
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().double().cpu().numpy()
    return torch.from_numpy(np.stack([linear_sum_assignment(ci)[1] for ci in c])).to(cost.device)


def matched_costs(cost: Tensor, method: str = "auto") -> Tensor:
    """(B, K, K) -> (B, K): cost[a, pi(a)] under the best matching pi (differentiable through the picked pairs)."""
    pi = matched_assignment(cost, method)
    return torch.gather(cost, 2, pi[..., None])[..., 0]
