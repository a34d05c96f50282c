"""Gaussian-mixture tasks: the TGMM problem distribution, batched and sampled on the device.

One *task* is a sample X = (x_1..x_N) from a K-component mixture x_i = mu_{y_i} + s_{y_i} * z_i,
z_i ~ N(0, I_d). A *solver* (trained network or classical algorithm) reads X and answers with
mixing weights and means (and scales for the anisotropic variant).

Distribution (Chen, Wu, Fang 2025, "TGMM", and its public code):
  * mean coordinates ~ U(-5, 5); a task is redrawn while any pair of means has cosine >= 0.8;
  * weights pi_k ~ U(0.2, 0.8), normalised (not sorted: the loss and the metric match by
    permutation, so order carries no information);
  * N ~ U[N0/2, N0] per task; shorter samples are zero-padded to N0 and masked;
  * anisotropic variant: per-component diagonal *standard deviation* 2 * softplus(U(-1, 1)),
    used as a standard deviation everywhere (sampling, EM, log-likelihood).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from pipeline.core.rng import make_generator  # noqa: F401  (re-exported for the family's users)

LOG_2PI = math.log(2.0 * math.pi)

@dataclass
class GMMBatch:
    """B tasks that share K and d. Padded positions have x = 0, mask = False, label = -1.

    `index` (B,) is each task's position in its evaluation set (kept by slice()); classical solvers
    seed their random starts by it, so a task's start never depends on how a set is chunked."""

    x: Tensor  # (B, N, d)
    mask: Tensor  # (B, N) bool, True where x is a real sample
    weights: Tensor  # (B, K) true mixing weights, rows sum to 1
    means: Tensor  # (B, K, d)
    labels: Tensor  # (B, N) long component index, -1 at padding
    scales: Tensor | None = None  # (B, K, d) per-component std; None means identity covariance
    index: Tensor | None = None  # (B,) long task index within its set; None = 0..B-1

    @property
    def device(self) -> torch.device:
        return self.x.device

    def task_index(self) -> Tensor:
        return self.index if self.index is not None else torch.arange(self.B, device=self.x.device)

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def N(self) -> int:
        return self.x.shape[1]

    @property
    def d(self) -> int:
        return self.x.shape[2]

    @property
    def K(self) -> int:
        return self.means.shape[1]

    @property
    def n(self) -> Tensor:
        """(B,) number of real samples per task."""
        return self.mask.sum(1)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "GMMBatch":
        def mv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return GMMBatch(**{f.name: (getattr(self, f.name) if f.name == "index" and self.index is None
                                    else mv(getattr(self, f.name))) for f in fields(self)})

    def slice(self, start: int, stop: int) -> "GMMBatch":
        parts = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[start:stop])
                 for f in fields(self) if f.name != "index"}
        return GMMBatch(**parts, index=self.task_index()[start:stop])

    REQUIRED = ("x", "mask", "weights", "means", "labels")

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Plain arrays for np.savez (no pickled objects); the index is implicit (row order)."""
        return {f.name: getattr(self, f.name).cpu().numpy() for f in fields(self)
                if getattr(self, f.name) is not None and f.name != "index"}

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], where: str = "arrays") -> "GMMBatch":
        """Inverse of to_numpy; checks shapes and dtypes (ValueError naming `where`)."""
        x, mask, w, m, y = (np.asarray(arrays[k]) for k in cls.REQUIRED)
        ok = x.ndim == 3 and m.ndim == 3
        if ok:
            B, N, d = x.shape
            K = m.shape[1]
            ok = (mask.shape == (B, N) and y.shape == (B, N) and w.shape == (B, K) and m.shape == (B, K, d)
                  and mask.dtype == np.bool_ and ("scales" not in arrays or arrays["scales"].shape == (B, K, d)))
        if not ok:
            raise ValueError(f"{where}: inconsistent GMM arrays ("
                             + ", ".join(f"{k} {np.asarray(a).dtype}{np.asarray(a).shape}" for k, a in arrays.items())
                             + ")")
        t = {k: torch.from_numpy(np.asarray(arrays[k])) for k in cls.REQUIRED}
        scales = torch.from_numpy(np.asarray(arrays["scales"])) if "scales" in arrays else None
        return cls(**t, scales=scales)


@dataclass
class GMMEstimate:
    """A solver's answer for a GMMBatch. `applicable=False` means the method is not defined for
    this (d, K) (e.g. the spectral method when K > d); the tensors are then NaN placeholders."""

    weights: Tensor  # (B, K), rows sum to 1
    means: Tensor  # (B, K, d)
    scales: Tensor | None = None  # (B, K, d) std, or None for identity covariance
    applicable: bool = True
    reason: str = ""  # why not applicable
    extras: dict | None = None  # solver-specific diagnostics (iterations, per-iteration iterates, ...)

    def detach_cpu(self) -> "GMMEstimate":
        return replace(self, weights=self.weights.detach().float().cpu(), means=self.means.detach().float().cpu(),
                       scales=None if self.scales is None else self.scales.detach().float().cpu())

    @classmethod
    def not_applicable(cls, B: int, K: int, d: int, reason: str, device=None) -> "GMMEstimate":
        nan = float("nan")
        return cls(weights=torch.full((B, K), nan, device=device), means=torch.full((B, K, d), nan, device=device),
                   applicable=False, reason=reason)


def _sample_means(B: int, K: int, d: int, g: torch.Generator, device, mean_range: float, max_cosine: float,
                  max_rounds: int) -> Tensor:
    """Means ~ U(-r, r)^d conditioned on every pair having cosine similarity < max_cosine.

    Rejection sampling with many iid candidate draws per task at once: each task keeps its first
    accepted candidate, which has exactly the law of redrawing one at a time until accepted. Tasks
    with none accepted draw again, twice as many candidates each round (8, 16, 32, ...), so an
    easy setting costs one small round and a hard one a few: K = 5 in d = 2 accepts 5.5 % of
    draws, about 50 one-at-a-time rounds for 16 tasks (14 ms, 18 % of a small train step), 1 ms
    here. max_rounds bounds the draws per task."""
    means = torch.empty(B, K, d, device=device)
    iu = torch.triu_indices(K, K, offset=1, device=device)
    todo = torch.arange(B, device=device)  # tasks still without accepted means
    drawn, m = 0, 8
    while drawn < max_rounds:
        m = min(m, max_rounds - drawn)
        cand = (torch.rand(len(todo), m, K, d, generator=g, device=device) * 2 - 1) * mean_range
        unit = torch.nn.functional.normalize(cand, dim=-1)
        cos = unit @ unit.transpose(-1, -2)  # (b, m, K, K)
        ok = (cos[..., iu[0], iu[1]] < max_cosine).all(-1)  # (b, m): candidate accepted
        first = ok.to(torch.uint8).argmax(1)  # (b,) index of the first accepted (0 if none)
        done = ok.any(1)  # (b,)
        means[todo[done]] = cand[done, first[done]]
        todo = todo[~done]
        if len(todo) == 0:
            return means
        drawn, m = drawn + m, min(2 * m, 1024)
    raise RuntimeError(f"could not draw K={K} means in d={d} with pairwise cosine < {max_cosine} "
                       f"after {max_rounds} draws; lower K or raise max_cosine")


def sample_gmm(batch_size: int, d: int, K: int, n_min: int, n_max: int, generator: torch.Generator,
               device: torch.device | str = "cpu", *, mean_range: float = 5.0, max_cosine: float = 0.8,
               weight_low: float = 0.2, weight_high: float = 0.8, anisotropic: bool = False,
               max_rounds: int = 10_000) -> GMMBatch:
    """Draw `batch_size` GMM tasks from the TGMM distribution; sample sizes N ~ U[n_min, n_max]."""
    B, g = batch_size, generator
    means = _sample_means(B, K, d, g, device, mean_range, max_cosine, max_rounds)
    w = weight_low + (weight_high - weight_low) * torch.rand(B, K, generator=g, device=device)
    weights = w / w.sum(1, keepdim=True)
    n = torch.randint(n_min, n_max + 1, (B,), generator=g, device=device)
    mask = torch.arange(n_max, device=device)[None, :] < n[:, None]  # (B, N)
    labels = torch.multinomial(weights, n_max, replacement=True, generator=g)  # (B, N)
    z = torch.randn(B, n_max, d, generator=g, device=device)
    centre = torch.gather(means, 1, labels[..., None].expand(B, n_max, d))  # (B, N, d)
    scales = None
    if anisotropic:
        u = torch.rand(B, K, d, generator=g, device=device) * 2 - 1
        scales = 2 * torch.nn.functional.softplus(u)  # std per component and coordinate
        z = z * torch.gather(scales, 1, labels[..., None].expand(B, n_max, d))
    x = (centre + z) * mask[..., None]
    labels = torch.where(mask, labels, torch.full_like(labels, -1))
    return GMMBatch(x=x, mask=mask, weights=weights, means=means, labels=labels, scales=scales)


def component_log_density(x: Tensor, means: Tensor, scales: Tensor | None = None) -> Tensor:
    """log N(x_i | mu_k, diag(s_k^2)) for every point and component: (B, N, d), (B, K, d) -> (B, N, K)."""
    d = x.shape[-1]
    if scales is None:
        sq = torch.cdist(x, means).pow(2) if x.dtype != torch.float64 else ((x[:, :, None] - means[:, None]) ** 2).sum(-1)
        return -0.5 * (sq + d * LOG_2PI)
    diff = (x[:, :, None, :] - means[:, None, :, :]) / scales[:, None, :, :]  # (B, N, K, d)
    return -0.5 * (diff.pow(2).sum(-1) + d * LOG_2PI) - torch.log(scales).sum(-1)[:, None, :]


def log_joint(x: Tensor, weights: Tensor, means: Tensor, scales: Tensor | None = None) -> Tensor:
    """log pi_k + log N(x_i | mu_k, Sigma_k): (B, N, K)."""
    return torch.log(weights.clamp_min(1e-30))[:, None, :] + component_log_density(x, means, scales)


def mean_log_likelihood(x: Tensor, mask: Tensor, weights: Tensor, means: Tensor,
                        scales: Tensor | None = None) -> Tensor:
    """Average log-likelihood per real point of each task under (weights, means, scales): (B,)."""
    ll = torch.logsumexp(log_joint(x, weights, means, scales), dim=-1)  # (B, N)
    m = mask.to(ll.dtype)
    return (ll * m).sum(1) / m.sum(1).clamp_min(1)


def posterior_labels(x: Tensor, weights: Tensor, means: Tensor, scales: Tensor | None = None) -> Tensor:
    """Hard assignment of each point to its most probable component: (B, N) long."""
    return log_joint(x, weights, means, scales).argmax(-1)
