"""Batched power methods for the top-k eigenpairs of symmetric PSD matrices (He et al. 2025's
baseline for transformers that learn PCA), on the device of the input, with a `steps` axis.

    power_deflation_iterates  the power method with deflation: component j runs tau iterations
                              v <- S_j v / |S_j v| from its start, lambda_j = v' S_j v (Rayleigh
                              quotient), then S_{j+1} = S_j - lambda_j v v'. He et al.'s construction
                              emulates exactly this with L = 2 tau + 4k + 1 layers.
    block_power_iterates      subspace (block power) iteration: V <- orth(S V) for tau iterations,
                              then the Rayleigh-Ritz eigenpairs of V' S V (all k components at once)
    top_eigenpairs            the exact reference: torch.linalg.eigh, largest first

Iterates for a list of tau values are computed in one pass (one deflation chain per tau, batched as
an extra axis), so a grid of steps costs max(tau) iterations, not their sum. tau = 0 is the start.
"""
from __future__ import annotations

import torch
from torch import Tensor


def top_eigenpairs(S: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """S (B, d, d) symmetric -> vectors (B, k, d) (rows, unit), values (B, k), largest first."""
    vals, vecs = torch.linalg.eigh(S)  # ascending
    return vecs.flip(-1)[..., :k].transpose(-1, -2), vals.flip(-1)[..., :k]


def _unit(v: Tensor, eps: float = 1e-30) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def power_deflation_iterates(S: Tensor, k: int, steps: list[int], v0: Tensor) -> list[tuple[Tensor, Tensor]]:
    """S (B, d, d), starts v0 (B, k, d) (one per component) -> for each tau in `steps` (ascending
    ints >= 0): (vectors (B, k, d), values (B, k)) after tau iterations per component, with
    deflation by the tau-iterates of the earlier components."""
    steps = list(steps)
    T, B, d = len(steps), S.shape[0], S.shape[-1]
    taus = torch.tensor(steps, device=S.device)  # (T,)
    St = S[:, None].expand(B, T, d, d).clone()  # (B, T, d, d): one deflation chain per tau
    vecs, vals = [], []
    for j in range(k):
        v = _unit(v0[:, j])[:, None].expand(B, T, d).clone()  # (B, T, d)
        for it in range(max(steps) if steps else 0):
            nxt = _unit((St @ v[..., None])[..., 0])
            v = torch.where((it < taus)[None, :, None], nxt, v)  # chain t stops after taus[t] iterations
        lam = (v[..., None, :] @ St @ v[..., None])[..., 0, 0]  # (B, T) Rayleigh quotient
        St = St - lam[..., None, None] * v[..., :, None] * v[..., None, :]
        vecs.append(v)
        vals.append(lam)
    V, L = torch.stack(vecs, 2), torch.stack(vals, 2)  # (B, T, k, d), (B, T, k)
    return [(V[:, t], L[:, t]) for t in range(T)]


def _ritz(S: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis Q (B, d, k) -> Rayleigh-Ritz pairs: vectors (B, k, d), values (B, k), largest first."""
    vals, W = torch.linalg.eigh(Q.transpose(-1, -2) @ S @ Q)  # (B, k), (B, k, k) ascending
    V = (Q @ W).flip(-1).transpose(-1, -2)
    return V, vals.flip(-1)


def block_power_iterates(S: Tensor, k: int, steps: list[int], V0: Tensor) -> list[tuple[Tensor, Tensor]]:
    """S (B, d, d), start V0 (B, k, d) -> for each tau in `steps`: the Ritz pairs of the subspace after
    tau block iterations Q <- qr(S Q)."""
    out, Q = [], torch.linalg.qr(V0.transpose(-1, -2))[0]  # (B, d, k)
    done = 0
    for tau in steps:
        for _ in range(tau - done):
            Q = torch.linalg.qr(S @ Q)[0]
        done = tau
        out.append(_ritz(S, Q))
    return out
