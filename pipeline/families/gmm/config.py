"""Parameters of the Gaussian-mixture family: params.yaml `task.gmm` and `baselines.gmm`."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import ConfigError, _f


@dataclass
class GMMTask:
    d: int = _f(2, "data dimension (a study such as tgmm trains one network per d)", min=1)
    ks: list[int] = _f([2, 3, 4, 5], "numbers of components K; one shared backbone, one read-out per K",
                       min=2, max=8, nonempty=True)
    n0: int = _f(128, "training sample size: N ~ U[n0/2, n0]", min=2)
    n0_warmup_steps: int = _f(0, "sample-size warm-up: the first this many training steps draw N ~ U[m/2, m], "
                                 "m = round(n0_warmup_ratio * n0): cheaper steps while the network learns the "
                                 "coarse task (0 = off; docs/speed.md, time to quality)", min=0)
    n0_warmup_ratio: float = _f(0.5, "sample-size warm-up: its N0 as a fraction of n0", gt=0, max=1)
    n0_warmup_shape: str = _f("constant", "sample-size warm-up: constant = N0 = round(n0_warmup_ratio * n0) "
                                          "for every warm-up step; linear = N0 rises linearly from there at "
                                          "step 0 to n0 at step n0_warmup_steps", choices=("constant", "linear"))
    n_per: str = _f("step", "training: step = one N per step shared by all its tasks (no padding: the fast "
                            "unmasked attention, 25 % fewer tokens); task = one N per task, padded to n0 and masked",
                    choices=("step", "task"))
    mean_range: float = _f(5.0, "mean coordinates ~ U(-mean_range, mean_range)", gt=0)
    max_cosine: float = _f(0.8, "redraw a task while two means have cosine >= this", gt=-1, max=1)
    weight_low: float = _f(0.2, "mixing weights ~ U(weight_low, weight_high), then normalised", gt=0)
    weight_high: float = _f(0.8, "", gt=0)
    anisotropic: bool = _f(False, "per-component diagonal std 2*softplus(U(-1,1)) instead of identity")
    k_embd: int = _f(16, "read-in: size of the learned embedding of K appended to each x_i", min=1)


@dataclass
class GMMSolvers:
    em_max_iter: int = _f(100, "EM iteration cap (paper: 100)", min=1)
    em_tol: float = _f(1e-7, "EM stops when the log-likelihood changes less than this (paper: 1e-7)", gt=0)
    strong_restarts: int = _f(5, "k-means++ restarts of the strong EM", min=1)
    spectral_restarts: int = _f(10, "tensor power iteration restarts per component", min=1)
    spectral_iters: int = _f(100, "tensor power iterations per restart", min=1)


def warmup_n0(t: GMMTask) -> int:
    """The N0 of the sample-size warm-up (task.gmm.n0_warmup_steps / n0_warmup_ratio)."""
    return max(1, round(t.n0_warmup_ratio * t.n0))


def n0_at(t: GMMTask, step: int | None) -> int:
    """The training N0 at a step: the warm-up's for steps < n0_warmup_steps (constant, or rising
    linearly to n0), else n0."""
    if step is None or step >= t.n0_warmup_steps:
        return t.n0
    m = warmup_n0(t)
    if t.n0_warmup_shape == "linear":
        return m + (t.n0 - m) * step // t.n0_warmup_steps
    return m


def check_sample_size(n: int, ks: list[int], where: str) -> None:
    """Every task needs >= 2 points per component on average."""
    if n < 2 * max(ks):
        raise ConfigError(f"{where}: must be >= 2*max(task.ks)={2 * max(ks)} so every task has >= 2 points "
                          f"per component on average, got {n}")


def validate(t: GMMTask, model, where: str) -> None:
    kmax = max(t.ks)
    if t.weight_low >= t.weight_high:
        raise ConfigError(f"{where}.weight_low: must be < {where}.weight_high={t.weight_high}, got {t.weight_low}")
    check_sample_size(t.n0, t.ks, f"{where}.n0")
    if t.n0_warmup_steps and warmup_n0(t) < 2 * kmax:
        raise ConfigError(f"{where}.n0_warmup_ratio: the warm-up N0 round({t.n0_warmup_ratio} * n0={t.n0}) = "
                          f"{warmup_n0(t)} must be >= 2*max(task.ks)={2 * kmax}; raise the ratio or set "
                          f"{where}.n0_warmup_steps: 0")
    if t.d == 1 and kmax > 2:
        raise ConfigError(f"{where}.d: d=1 allows at most K=2 (two 1-D means always have cosine +-1); "
                          "use task.ks <= 2 or d >= 2")
    if model.position == "gpt2" and t.n0 > model.max_len:
        raise ConfigError(f"model.max_len: {model.max_len} is shorter than the longest sample {t.n0} "
                          "(raise it to at least that)")
    if t.max_cosine <= -1 / (kmax - 1):
        raise ConfigError(f"{where}.max_cosine: K={kmax} vectors cannot all have pairwise cosine below "
                          f"{t.max_cosine} (must be > {-1 / (kmax - 1):.3g})")
    _check_sampleable(t, where)


_SAMPLEABLE: dict = {}


def _check_sampleable(t: GMMTask, where: str) -> None:
    """Crowded means (large K in small d under the cosine rule) can make rejection sampling hang:
    try a few tasks per K now, in milliseconds, rather than fail after compute has started."""
    import torch

    from pipeline.families.gmm.data import sample_gmm

    for K in t.ks:
        key = (t.d, K, t.mean_range, t.max_cosine)
        if key not in _SAMPLEABLE:
            g = torch.Generator().manual_seed(0)
            try:
                sample_gmm(8, t.d, K, 2 * K, 2 * K, g, mean_range=t.mean_range, max_cosine=t.max_cosine,
                           weight_low=t.weight_low, weight_high=t.weight_high, max_rounds=3000)
                _SAMPLEABLE[key] = True
            except RuntimeError:
                _SAMPLEABLE[key] = False
        if not _SAMPLEABLE[key]:
            raise ConfigError(f"{where}.ks: K={K} means in d={t.d} can (almost) never satisfy pairwise cosine < "
                              f"{where}.max_cosine={t.max_cosine}; lower K or raise max_cosine")
