"""EM for Gaussian mixtures, batched over tasks: the paper's baseline and a strong one.

`em_fit` is the core: B independent tasks advance together, each stops on its own once its mean
log-likelihood per point changes by less than `tol`. One iteration is an E-step then an M-step,
with the same update formulas as sklearn's GaussianMixture (diag / spherical), so that the two
agree from the same initialisation. Padded points (mask False) never enter a sum.

Solvers (the `Solver` protocol of pipeline.core.family):
  * EMPaper  ("em_paper"):  the TGMM paper's protocol: uniform weights, means ~ N(0, I) (seeded),
    identity covariance, <= 100 iterations, tol 1e-7, one run. The N(0, I) start against means in
    U(-5, 5)^d handicaps it on purpose: that is the published baseline.
  * EMStrong ("em_strong"): k-means++ starts, `restarts` runs per task in one batch, keep the run
    with the best final log-likelihood.

Precision: the solvers compute in float64 on every device by default (`dtype=torch.float32` runs
them in single precision, e.g. for speed on a GPU; see em_fit on what that changes) and always
answer in float32 on the batch's device.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.core.rng import SOLVER, per_task_draws
from pipeline.families.gmm.data import LOG_2PI, GMMBatch, GMMEstimate

COVARIANCES = ("identity", "spherical", "diag")


def _check_covariance(covariance: str) -> None:
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")


class EMResult(NamedTuple):
    weights: Tensor  # (B, K)
    means: Tensor  # (B, K, d)
    scales: Tensor | None  # (B, K, d) std per coordinate; None for identity covariance
    log_likelihood: Tensor  # (B,) mean log-likelihood per real point at the returned parameters
    n_iter: Tensor  # (B,) long, EM iterations each task ran (as sklearn's n_iter_)
    iterates: list[tuple[Tensor, Tensor]] | None  # (weights, means) after each iteration, or None


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """Zero the padded positions, so garbage (even inf/NaN) there cannot leak into any sum."""
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _features(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The augmented points [x*x, x, 1] (B, N, 2d+1), zero on padded rows, that both EM steps multiply:
    the E-step's log-joint is one bmm of them with per-component coefficients, and the M-step's
    moments and responsibility totals are one bmm of the responsibilities with them.
    -> (xx, xxT): xx (B, N, 2d+1) for the M-step, xxT (B, 2d+1, N) contiguous for the E-step.
    Written into one buffer slice by slice (a cat with a ones column took 8x longer)."""
    B, N, d = x.shape
    x = _masked(x, mask)
    xx = torch.empty(B, N, 2 * d + 1, dtype=x.dtype, device=x.device)
    torch.mul(x, x, out=xx[..., :d])
    xx[..., d:2 * d] = x
    xx[..., 2 * d] = mask
    return xx, xx.transpose(1, 2).contiguous()


def _log_joint(xxT: Tensor, weights: Tensor, means: Tensor, var: Tensor | None, out: Tensor | None = None) -> Tensor:
    """log w_k + log N(x_i | mu_k, diag(var_k)) -> (B, K, N) as one bmm, with no (B, N, K, d) temporary.

    sklearn's expanded quadratic (_estimate_log_gaussian_prob): with p = 1/var,
    -1/2 sum_j p_j (x_j - mu_j)^2 = sum_j x_j^2 (-p_j/2) + x_j (mu_j p_j) - 1/2 sum_j mu_j^2 p_j, so
    the coefficients [-p/2, mu p, const_k] (B, K, 2d+1) against xx = [x^2, x, 1] give every term; the
    constant carries log w_k, the normaliser and -1/2 sum mu^2 p. var None = the identity.
    Layout: xxT = xx transposed (B, 2d+1, N), contiguous, so the result is (B, K, N) with the points
    innermost: the reductions over K in the E-step then run over whole contiguous rows (measured
    2.3x faster than over a last axis of size K, and the bmm itself 1.5x faster).
    `out`: a (B, K, N) buffer to write into (em_fit reuses one across iterations).
    """
    d = means.shape[-1]
    prec = torch.ones_like(means) if var is None else 1.0 / var
    logdet = 0.0 if var is None else torch.log(var).sum(-1)  # (B, K)
    tiny = 1e-300 if weights.dtype == torch.float64 else 1e-30
    const = torch.log(weights.clamp_min(tiny)) - 0.5 * ((means.pow(2) * prec).sum(-1) + logdet + d * LOG_2PI)
    coef = torch.cat([-0.5 * prec, means * prec, const[..., None]], -1)  # (B, K, 2d+1)
    return torch.bmm(coef, xxT, out=out)


class _Buffers:
    """em_fit's per-iteration (B, K, N) and (B, 1, N) work arrays, allocated once and sliced to the
    working set. Fresh multi-megabyte temporaries every iteration cost page faults: allocating them
    each time made the whole fit 1.4-1.7x slower (glibc returns large blocks to the OS on free)."""

    def __init__(self, B: int, K: int, N: int, dtype: torch.dtype, device: torch.device):
        self.lj = torch.empty(B, K, N, dtype=dtype, device=device)
        self.top = torch.empty(B, 1, N, dtype=dtype, device=device)
        self.tot = torch.empty(B, 1, N, dtype=dtype, device=device)
        self.scale = torch.empty(B, 1, N, dtype=dtype, device=device)

    def take(self, b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.lj[:b], self.top[:b], self.tot[:b], self.scale[:b]


def _e_step(xxT, maskf, n, weights, means, var, buffers: _Buffers | None = None):
    """-> responsibilities (B, K, N), zero on padded points, and the mean log-likelihood per real
    point (B,). One exp: resp = e / sum(e), e = exp(lj - max_k lj); log p(x_i) = max + log sum(e).
    With `buffers` every (B, K, N) / (B, 1, N) array is written in place into them (the returned
    responsibilities are a view of buffers.lj, valid until the next call)."""
    B, N = maskf.shape
    lj, top, tot, scale = buffers.take(B) if buffers is not None else (None,) * 4
    lj = _log_joint(xxT, weights, means, var, out=lj)  # (B, K, N)
    top = torch.amax(lj, 1, keepdim=True, out=top)  # (B, 1, N)
    e = lj.sub_(top).exp_()
    tot = torch.sum(e, 1, keepdim=True, out=tot)  # (B, 1, N)
    e.mul_(torch.div(maskf[:, None, :], tot, out=scale))
    ll = tot.log_().add_(top)[:, 0].mul_(maskf).sum(1) / n
    return e, ll


def _m_step(xx, resp, means_old, var_old, covariance, reg_covar):
    """sklearn's _estimate_gaussian_parameters per task; empty components keep their mean/var.
    xx (B, N, 2d+1); resp (B, K, N), already zero on padded points."""
    d = means_old.shape[-1]
    eps = torch.finfo(xx.dtype).eps
    sums = resp @ xx  # (B, K, 2d+1): sum r x^2, sum r x, sum r per component
    nk_raw = sums[..., -1]  # (B, K)
    nk = nk_raw + 10 * eps  # as sklearn: keeps the division finite
    weights = nk / nk.sum(-1, keepdim=True)
    moments = sums[..., :-1] / nk[..., None]  # (B, K, 2d): E[x^2], E[x] per component
    means = moments[..., d:]
    empty = (nk_raw < 100 * eps)[..., None]  # (B, K, 1): no responsibility left to estimate from
    means = torch.where(empty, means_old, means)
    if covariance == "identity":
        return weights, means, None
    var = (moments[..., :d] - means.pow(2)).clamp_min(0) + reg_covar  # (B, K, d)
    if covariance == "spherical":
        var = var.mean(-1, keepdim=True).expand_as(var)
    var = torch.where(empty, var_old, var)
    return weights, means, var


def em_fit(x: Tensor, mask: Tensor, weights0: Tensor, means0: Tensor, scales0: Tensor | None = None, *,
           covariance: str = "identity", max_iter: int = 100, tol: float = 1e-7, reg_covar: float = 1e-6,
           return_iterates: bool = False) -> EMResult:
    """Batched EM from a given start, in x's dtype and device.

    x: (B, N, d), mask: (B, N) bool, weights0: (B, K), means0: (B, K, d), scales0: std, (B, K, d)
    or (B, K) (spherical), None = 1. `covariance`: "identity" (fixed unit covariance, only weights
    and means move: the paper protocol), "spherical" (one variance per component) or "diag".
    A task converges when |Δ mean log-likelihood| < tol (sklearn's rule, checked on the E-step's
    log-likelihood, after which that iteration's M-step still applies); converged tasks freeze.
    In float32 a tol of 1e-7 lies below the resolution of a mean log-likelihood of size ~10 (one
    ulp ~ 1e-6), so a task stops when the change rounds to zero: on slowly converging tasks the
    float32 and float64 answers can differ. `iterates[t]` is (weights, means) after iteration t+1
    (frozen tasks repeat their last values); its length is the number of loop iterations run.
    Empty components (responsibility ~ 0) keep their mean and variance; their weight goes to ~0.
    """
    _check_covariance(covariance)
    B, N, d = x.shape
    dt, dev = x.dtype, x.device
    maskf = mask.to(dt)
    xx, xxT = _features(x, mask)  # (B, N, 2d+1), (B, 2d+1, N): see _log_joint on the layout
    n = maskf.sum(1).clamp_min(1)  # (B,)
    weights = weights0.to(device=dev, dtype=dt).expand(B, -1).clone()
    means = means0.to(device=dev, dtype=dt).expand(B, -1, -1).clone()
    K = means.shape[1]
    var = None
    if covariance != "identity":
        if scales0 is None:
            var = torch.ones(B, K, d, dtype=dt, device=dev)
        else:
            s = scales0.to(device=dev, dtype=dt)
            var = (s.pow(2)[..., None] if s.dim() == 2 else s.pow(2)).expand(B, K, d).clone()
        if covariance == "spherical":
            var = var.mean(-1, keepdim=True).expand(B, K, d).clone()

    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    ll_prev = torch.full((B,), -math.inf, dtype=dt, device=dev)
    iterates = [] if return_iterates else None
    # Converged tasks freeze, so the loop runs on a working set of the tasks still active, shrunk
    # whenever half of it has converged (a few slow tasks then cost little). Tasks do not interact.
    work = torch.arange(B, device=dev)
    xw, xwT, mw, nw = xx, xxT, maskf, n
    W, M, V, LLp, IT = weights, means, var, ll_prev, n_iter
    act = torch.ones(B, dtype=torch.bool, device=dev)

    def write_back():
        weights[work], means[work], ll_prev[work], n_iter[work] = W, M, LLp, IT
        if var is not None:
            var[work] = V

    buffers = _Buffers(B, K, N, dt, dev)
    all_active = True  # every task of the working set still iterating (host-side, known from n_act)
    for _ in range(max_iter):
        resp, ll = _e_step(xwT, mw, nw, W, M, V, buffers)
        w_new, m_new, v_new = _m_step(xw, resp, M, V, covariance, reg_covar)
        done = (ll - LLp).abs() < tol  # first iteration: |ll - (-inf)| = inf, never done
        if all_active:  # nothing frozen in the working set: take the update as is
            W, M, V, IT, LLp, act = w_new, m_new, v_new, IT + 1, ll, ~done
        else:
            a1, a2 = act[:, None], act[:, None, None]
            W, M = torch.where(a1, w_new, W), torch.where(a2, m_new, M)
            if V is not None:
                V = torch.where(a2, v_new, V)
            IT = IT + act.long()
            LLp = torch.where(act, ll, LLp)
            act = act & ~done
        if iterates is not None:
            write_back()
            iterates.append((weights.clone(), means.clone()))
        n_act = int(act.sum())
        if n_act == 0:
            break
        all_active = n_act == act.numel()
        if n_act <= act.numel() // 2:  # shrink the working set to the active tasks
            write_back()
            keep = act.nonzero()[:, 0]
            work = work[keep]
            # index_select copies whole rows (measured 1.3x faster here than advanced indexing)
            xw, xwT, mw, nw, W, M, LLp, IT = (t.index_select(0, work) for t in (xx, xxT, maskf, n, weights, means,
                                                                                 ll_prev, n_iter))
            V = None if var is None else var.index_select(0, work)
            act = torch.ones(n_act, dtype=torch.bool, device=dev)
            all_active = True
    write_back()
    _, ll_final = _e_step(xxT, maskf, n, weights, means, var, buffers)
    scales = None if var is None else var.sqrt()
    return EMResult(weights, means, scales, ll_final, n_iter, iterates)


def _sqdist(x: Tensor, x2sum: Tensor, c: Tensor) -> Tensor:
    """Squared distances (B, N, L) between points x (B, N, d) (x2sum = |x|^2, (B, N)) and c (B, L, d)."""
    return (x2sum[..., None] - 2 * x @ c.transpose(1, 2) + c.pow(2).sum(-1)[:, None, :]).clamp_min(0)


def kmeans_uniforms(K: int, n_local_trials: int | None = None) -> int:
    """How many U[0, 1) draws k-means++ uses per task: 1 + (K - 1) * L."""
    L = 2 + int(math.log(K)) if n_local_trials is None else int(n_local_trials)
    return 1 + (K - 1) * L


def _inverse_cdf(p: Tensor, u: Tensor) -> Tensor:
    """Indices drawn with probability proportional to p (B, N) >= 0, from uniforms u (B, L) -> (B, L)."""
    c = p.cumsum(1)
    return torch.searchsorted(c, (u * c[:, -1:]).contiguous(), right=True).clamp_max(p.shape[1] - 1)


def kmeans_plusplus(x: Tensor, mask: Tensor, K: int, generator: torch.Generator | None = None,
                    n_local_trials: int | None = None, uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Batched k-means++ seeding by D² sampling over the real points.

    x: (B, N, d), mask: (B, N) -> centers (B, K, d), indices (B, K) into N. The first center is
    uniform over the task's real points; each next one is drawn with probability proportional to
    the squared distance to the nearest chosen center. With n_local_trials = L > 1 ("greedy
    k-means++", as sklearn), L candidates are drawn and the one that lowers the total D² most is
    kept; None means sklearn's default 2 + floor(ln K), 1 the plain algorithm. Greedy matters in
    high d, where the noise part of D² (~2d) makes plain D² sampling often put two centers in one
    cluster. Padded points have probability 0; if D² is 0 on all real points, the draw is uniform.

    The draws are inverse-CDF lookups of `uniforms` (B, 1 + (K-1)L) in [0, 1): pass per-task
    uniforms (rng.per_task_draws) to make each task's seeding independent of its batch; without
    them they are drawn from `generator`.
    """
    B, N, d = x.shape
    L = 2 + int(math.log(K)) if n_local_trials is None else int(n_local_trials)
    if uniforms is None:
        uniforms = torch.rand(B, kmeans_uniforms(K, L), generator=generator, device=x.device)
    if uniforms.shape != (B, kmeans_uniforms(K, L)):
        raise ValueError(f"uniforms: expected shape {(B, kmeans_uniforms(K, L))}, got {tuple(uniforms.shape)}")
    uniforms = uniforms.to(x.dtype)
    x = _masked(x, mask)
    x2sum = x.pow(2).sum(-1)  # (B, N)
    maskf = mask.to(x.dtype)
    uniform = torch.where(mask.any(1, keepdim=True), maskf, torch.ones_like(maskf))  # an empty task: any index
    rows = torch.arange(B, device=x.device)
    idx = _inverse_cdf(uniform, uniforms[:, :1])[:, 0]  # (B,)
    indices, centers = [idx], [x[rows, idx]]
    d2 = _sqdist(x, x2sum, centers[0][:, None])[..., 0]  # (B, N)
    for j in range(1, K):
        p = d2 * maskf
        p = torch.where(p.sum(1, keepdim=True) > 0, p, uniform)
        cand = _inverse_cdf(p, uniforms[:, 1 + (j - 1) * L: 1 + j * L])  # (B, L)
        c = torch.gather(x, 1, cand[..., None].expand(-1, -1, d))  # (B, L, d)
        new_d2 = torch.minimum(d2[..., None], _sqdist(x, x2sum, c))  # (B, N, L)
        best = (new_d2 * maskf[..., None]).sum(1).argmin(1)  # (B,) candidate with the lowest potential
        idx = cand[rows, best]
        indices.append(idx)
        centers.append(x[rows, idx])
        d2 = new_d2[rows, :, best]
    return torch.stack(centers, 1), torch.stack(indices, 1)


def _index(batch) -> Tensor:
    """Each task's index in its evaluation set (0..B-1 for a batch that is not a slice)."""
    return batch.task_index() if hasattr(batch, "task_index") else torch.arange(batch.B, device=batch.x.device)


def _to_estimate(res: EMResult, extras: dict) -> GMMEstimate:
    f = lambda t: None if t is None else t.float()  # noqa: E731
    if res.iterates is not None:
        extras["iterates"] = [(w.float(), m.float()) for w, m in res.iterates]
    return GMMEstimate(weights=f(res.weights), means=f(res.means), scales=f(res.scales), extras=extras)


class EMPaper:
    """The TGMM paper's EM: uniform weights, means ~ N(0, I_d), identity covariance, one run.

    On anisotropic tasks (covariance "diag" or "spherical") the same start with unit scales, and
    the scales are fitted too.

    Task i's start is drawn in float32 from make_generator(seed, SOLVER, i) (i = its index in the
    evaluation set), so it depends neither on `dtype` nor on how the set is chunked (CPU and CUDA
    generators give different streams).
    """

    def __init__(self, max_iter: int = 100, tol: float = 1e-7, seed: int = 0, name: str = "em_paper", *,
                 covariance: str = "identity", reg_covar: float = 1e-6, dtype: torch.dtype = torch.float64,
                 return_iterates: bool = False):
        _check_covariance(covariance)
        self.max_iter, self.tol, self.seed, self.name = max_iter, tol, seed, name
        self.covariance, self.reg_covar = covariance, reg_covar
        self.dtype, self.return_iterates = dtype, return_iterates

    def __call__(self, batch: GMMBatch) -> GMMEstimate:
        dev = batch.x.device
        dt = self.dtype
        B, K, d = batch.B, batch.K, batch.d
        means0 = per_task_draws(self.seed, _index(batch), lambda g: torch.randn(K, d, generator=g, device=dev),
                                SOLVER, device=dev).to(dt)  # (B, K, d)
        weights0 = torch.full((B, K), 1.0 / K, dtype=dt, device=dev)
        scales0 = None if self.covariance == "identity" else torch.ones(B, K, d, dtype=dt, device=dev)
        res = em_fit(batch.x.to(dt), batch.mask, weights0, means0, scales0, covariance=self.covariance,
                     max_iter=self.max_iter, tol=self.tol, reg_covar=self.reg_covar,
                     return_iterates=self.return_iterates)
        return _to_estimate(res, {"iterations": res.n_iter, "log_likelihood": res.log_likelihood.float()})


class EMStrong:
    """EM from k-means++ starts, `restarts` runs per task in one batch, best final log-likelihood wins.

    Starts: greedy k-means++ centers (sklearn's 2 + ln K candidates per draw) and uniform weights.

    covariance "identity" (default: the TGMM model is isotropic with unit variance), "spherical" or
    "diag" (anisotropic studies; scales start at the pooled within-cluster spread of the k-means++
    assignment). Beware that with free covariances the likelihood is unbounded (a component can
    collapse on one point, floored by reg_covar), so "best log-likelihood" can pick such a run.
    """

    def __init__(self, restarts: int = 5, max_iter: int = 100, tol: float = 1e-7, covariance: str = "identity",
                 seed: int = 0, name: str = "em_strong", *, reg_covar: float = 1e-6,
                 dtype: torch.dtype = torch.float64, return_iterates: bool = False):
        _check_covariance(covariance)
        if restarts < 1:
            raise ValueError("restarts must be >= 1")
        self.restarts, self.max_iter, self.tol, self.covariance = restarts, max_iter, tol, covariance
        self.seed, self.name, self.reg_covar = seed, name, reg_covar
        self.dtype, self.return_iterates = dtype, return_iterates

    def __call__(self, batch: GMMBatch) -> GMMEstimate:
        dev = batch.x.device
        dt = self.dtype
        B, K, d, R = batch.B, batch.K, batch.d, self.restarts
        # replicate: row r*B + b is restart r of task b; task b's uniforms come from its own generator
        x = _masked(batch.x.to(dt), batch.mask).repeat(R, 1, 1)  # (R*B, N, d)
        mask = batch.mask.repeat(R, 1)
        u = per_task_draws(self.seed, _index(batch), lambda g: torch.rand(R, kmeans_uniforms(K), generator=g,
                                                                          device=dev), SOLVER, device=dev)
        centers, _ = kmeans_plusplus(x, mask, K, uniforms=u.transpose(0, 1).reshape(R * B, -1))
        weights0 = torch.full((R * B, K), 1.0 / K, dtype=dt, device=dev)
        scales0 = None
        if self.covariance != "identity":
            # pooled per-coordinate spread around the nearest center, shared by all components
            nearest = _sqdist(x, x.pow(2).sum(-1), centers).argmin(-1)  # (RB, N)
            resid2 = (x - torch.gather(centers, 1, nearest[..., None].expand(-1, -1, d))).pow(2)  # (RB, N, d)
            maskf = mask.to(dt)
            var = (resid2 * maskf[..., None]).sum(1) / maskf.sum(1, keepdim=True).clamp_min(1)  # (RB, d)
            if self.covariance == "spherical":
                var = var.mean(-1, keepdim=True).expand(-1, d)
            scales0 = var.clamp_min(self.reg_covar).sqrt()[:, None, :].expand(R * B, K, d)
        res = em_fit(x, mask, weights0, centers, scales0, covariance=self.covariance, max_iter=self.max_iter,
                     tol=self.tol, reg_covar=self.reg_covar, return_iterates=self.return_iterates)

        ll = res.log_likelihood.view(R, B)
        best = ll.argmax(0)  # (B,)
        cols = torch.arange(B, device=dev)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.view(R, B, *t.shape[1:])[best, cols]

        out = EMResult(pick(res.weights), pick(res.means), pick(res.scales), pick(res.log_likelihood),
                       pick(res.n_iter),
                       None if res.iterates is None else [(pick(w), pick(m)) for w, m in res.iterates])
        extras = {"iterations": out.n_iter, "log_likelihood": out.log_likelihood.float(), "best_restart": best,
                  "restart_log_likelihood": ll.T.float()}
        return _to_estimate(out, extras)
