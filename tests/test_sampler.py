"""The TGMM task sampler: shapes and padding, the distribution of N, means, weights, labels and
noise (isotropic and anisotropic), reproducibility of the seeded streams, rejection sampling."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.core import family as F
from pipeline.core import rng
from pipeline.families.gmm.data import GMMBatch, make_generator, sample_gmm
from tests.conftest import make_run

B, D, K, N0 = 4000, 3, 3, 64
SP = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
SCALE_LO, SCALE_HI = 2 * SP(-1.0), 2 * SP(1.0)


@pytest.fixture(scope="module")
def batch() -> GMMBatch:
    """Training-style tasks: N ~ U[n0/2, n0], padded to n0."""
    return sample_gmm(B, D, K, N0 // 2, N0, make_generator(0, 0, 0))


@pytest.fixture(scope="module")
def big_n() -> GMMBatch:
    """Tasks with many points each, for per-task statistics."""
    return sample_gmm(400, D, K, 1024, 1024, make_generator(1, 0, 0))


@pytest.fixture(scope="module")
def aniso() -> GMMBatch:
    return sample_gmm(400, D, K, 1024, 1024, make_generator(2, 0, 0), anisotropic=True)


def _pairwise_cos(means: torch.Tensor) -> torch.Tensor:
    u = torch.nn.functional.normalize(means, dim=-1)
    cos = u @ u.transpose(1, 2)
    iu = torch.triu_indices(means.shape[1], means.shape[1], offset=1)
    return cos[:, iu[0], iu[1]]


def _assert_same(a: GMMBatch, b: GMMBatch):
    for name in ("x", "mask", "weights", "means", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.scales is None) == (b.scales is None)
    if a.scales is not None:
        assert torch.equal(a.scales, b.scales)


# ------------------------------------------------------------------------------ shapes and padding

def test_shapes_and_dtypes(batch):
    assert batch.x.shape == (B, N0, D) and batch.x.dtype == torch.float32
    assert batch.mask.shape == (B, N0) and batch.mask.dtype == torch.bool
    assert batch.weights.shape == (B, K)
    assert batch.means.shape == (B, K, D)
    assert batch.labels.shape == (B, N0) and batch.labels.dtype == torch.long
    assert batch.scales is None
    assert (batch.B, batch.N, batch.d, batch.K) == (B, N0, D, K)
    assert torch.isfinite(batch.x).all()


def test_padding_consistent(batch):
    m = batch.mask
    # Real samples form a prefix of each row.
    assert (m[:, :-1].int() >= m[:, 1:].int()).all()
    assert (batch.x[~m] == 0).all()
    assert ((batch.labels == -1) == ~m).all()  # -1 exactly on padding
    real = batch.labels[m]
    assert real.min() >= 0 and real.max() < K
    assert (batch.x[m].abs().sum(-1) > 0).all()  # a real point is (almost surely) not exactly 0
    assert torch.equal(batch.n, m.sum(1))


def test_sample_size_uniform(batch):
    n = batch.n.numpy()
    lo, hi = N0 // 2, N0
    assert n.min() >= lo and n.max() <= hi
    values, counts = np.unique(n, return_counts=True)
    assert values.tolist() == list(range(lo, hi + 1))  # every size occurs
    expected = B / (hi - lo + 1)
    assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected
    assert abs(n.mean() - (lo + hi) / 2) < 0.5


def test_fixed_sample_size():
    b = sample_gmm(16, 2, 2, 10, 10, make_generator(5))
    assert b.mask.all() and (b.labels >= 0).all() and b.N == 10


# ------------------------------------------------------------------------------ means

def test_means_in_range_and_separated(batch):
    assert (batch.means.abs() < 5).all()
    assert (_pairwise_cos(batch.means) < 0.8).all()


def test_mean_distribution_symmetric(batch):
    c = batch.means.flatten().numpy()
    se = c.std() / math.sqrt(c.size)
    assert abs(c.mean()) < 5 * se
    assert abs((c > 0).mean() - 0.5) < 0.02
    qs = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(c, qs), -np.quantile(c, 1 - qs), atol=0.15)
    # every coordinate and every component slot alike
    per_slot = batch.means.mean(0)  # (K, D)
    assert per_slot.abs().max() < 0.3
    # The unconditional distribution of the real points is symmetric too.
    x = batch.x[batch.mask].flatten().numpy()
    assert abs(x.mean()) < 0.1
    np.testing.assert_allclose(np.quantile(x, qs), -np.quantile(x, 1 - qs), atol=0.15)


def test_mean_range_and_cosine_parameters():
    b = sample_gmm(500, 4, 3, 8, 8, make_generator(3), mean_range=2.0, max_cosine=0.3)
    assert (b.means.abs() < 2).all()
    assert b.means.abs().max() > 1.8
    assert (_pairwise_cos(b.means) < 0.3).all()


# ------------------------------------------------------------------------------ weights and labels

def test_weights_on_simplex_with_bounded_ratio(batch):
    w = batch.weights
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(B), atol=1e-6, rtol=0)
    ratio = w.max(1).values / w.min(1).values
    assert (ratio <= 4 + 1e-5).all()  # unnormalised weights lie in (0.2, 0.8)
    assert ratio.max() > 3.5  # ... and the range is used
    # bounds of a normalised weight: 0.2 / (0.2 + 0.8 (K-1)) and 0.8 / (0.8 + 0.2 (K-1))
    assert w.min() >= 0.2 / (0.2 + 0.8 * (K - 1)) - 1e-6
    assert w.max() <= 0.8 / (0.8 + 0.2 * (K - 1)) + 1e-6
    # weights are not sorted: the order carries no information
    assert abs((w[:, 0] > w[:, 1]).float().mean().item() - 0.5) < 0.05
    torch.testing.assert_close(w.mean(0), torch.full((K,), 1 / K), atol=0.01, rtol=0)


def test_label_frequencies_match_weights(big_n):
    b = big_n
    freq = torch.nn.functional.one_hot(b.labels, K).float().mean(1)  # (B, K); no padding here
    dev = (freq - b.weights).abs()
    # E|freq - w| ~ sqrt(2/pi) sqrt(w(1-w)/N) ~ 0.012 for N=1024
    assert dev.mean() < 0.02
    assert dev.max() < 0.08
    assert (freq - b.weights).mean(0).abs().max() < 0.004  # unbiased in every component slot


def test_label_frequencies_with_padding(batch):
    m = batch.mask.float()
    freq = (torch.nn.functional.one_hot(batch.labels.clamp_min(0), K).float() * m[..., None]).sum(1) / m.sum(1, True)
    assert ((freq - batch.weights).mean(0)).abs().max() < 0.005


def test_component_means_and_identity_noise(big_n):
    b = big_n
    onehot = torch.nn.functional.one_hot(b.labels, K).double()  # (B, N, K)
    counts = onehot.sum(1)  # (B, K)
    emp = torch.einsum("bnk,bnd->bkd", onehot, b.x.double()) / counts[..., None]
    err = (emp - b.means.double()).abs()
    # std of an empirical mean ~ 1/sqrt(count) <= 1/sqrt(~100)
    assert err.mean() < 0.1 and err.max() < 0.6
    resid = (b.x.double() - torch.gather(b.means.double(), 1, b.labels[..., None].expand(-1, -1, D)))
    r = resid.reshape(-1, D)
    torch.testing.assert_close(r.mean(0), torch.zeros(D, dtype=torch.float64), atol=0.01, rtol=0)
    cov = torch.cov(r.T)
    torch.testing.assert_close(cov, torch.eye(D, dtype=torch.float64), atol=0.02, rtol=0)
    # Gaussian: about 68.3% of coordinates within one standard deviation
    assert abs((r.abs() < 1).double().mean().item() - 0.6827) < 0.005


# ------------------------------------------------------------------------------ anisotropic

def test_anisotropic_scales(aniso):
    s = aniso.scales
    assert s is not None and s.shape == (400, K, D)
    assert (s > SCALE_LO).all() and (s < SCALE_HI).all()
    u = torch.log(torch.expm1(s.double() / 2))  # invert 2*softplus: U(-1, 1)
    assert abs(u.mean().item()) < 0.05
    assert u.min() < -0.95 and u.max() > 0.95
    assert abs(u.var().item() - 1 / 3) < 0.03


def test_anisotropic_residual_std_matches_scales(aniso):
    b = aniso
    idx = b.labels[..., None].expand(-1, -1, D)
    resid = b.x.double() - torch.gather(b.means.double(), 1, idx)
    z = resid / torch.gather(b.scales.double(), 1, idx)
    zr = z.reshape(-1, D)
    torch.testing.assert_close(zr.mean(0), torch.zeros(D, dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(zr.T), torch.eye(D, dtype=torch.float64), atol=0.02, rtol=0)
    # per task and component: empirical std of the residual vs the true scale
    onehot = torch.nn.functional.one_hot(b.labels, K).double()  # (B, N, K)
    cnt = onehot.sum(1)  # (B, K)
    var = torch.einsum("bnk,bnd->bkd", onehot, resid ** 2) / cnt[..., None]
    rel = (var.sqrt() / b.scales.double() - 1).abs()
    assert rel.mean() < 0.05 and rel.max() < 0.4
    # the scales matter: the ratio to the isotropic residual is not 1
    assert var.sqrt().std() > 0.3


# ------------------------------------------------------------------------------ reproducibility

def test_same_seed_step_rank_same_batch():
    a = sample_gmm(64, 2, 3, 8, 16, make_generator(0, 7, 1))
    b = sample_gmm(64, 2, 3, 8, 16, make_generator(0, 7, 1))
    _assert_same(a, b)
    a = sample_gmm(64, 2, 3, 8, 16, make_generator(0, 7, 1), anisotropic=True)
    b = sample_gmm(64, 2, 3, 8, 16, make_generator(0, 7, 1), anisotropic=True)
    _assert_same(a, b)


@pytest.mark.parametrize("other", [(0, 8, 1), (0, 7, 0), (1, 7, 1), (0, 1, 7), (0, 7)])
def test_different_stream_different_batch(other):
    a = sample_gmm(64, 2, 3, 8, 16, make_generator(0, 7, 1))
    b = sample_gmm(64, 2, 3, 8, 16, make_generator(*other))
    assert not torch.equal(a.means, b.means)
    assert not torch.equal(a.x, b.x)


def test_streams_are_unrelated():
    """Neighbouring steps/ranks give generators with distinct seeds and uncorrelated draws."""
    seeds = {make_generator(0, s, r).initial_seed() for s, r in itertools.product(range(20), range(4))}
    assert len(seeds) == 80
    a = torch.rand(10_000, generator=make_generator(0, 0, 0))
    b = torch.rand(10_000, generator=make_generator(0, 1, 0))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


@pytest.mark.parametrize("words", [(-1,), (0, -1), (0, 3, -2)])
def test_make_generator_rejects_negative_words(words):
    with pytest.raises(ValueError, match="non-negative"):
        make_generator(*words)


def test_make_generator_accepts_large_words():
    g = make_generator(2**40, 2**33, 0)
    assert isinstance(g, torch.Generator)


# ------------------------------------------------------------------------------ rejection sampling

def test_k5_in_d2_converges():
    b = sample_gmm(400, 2, 5, 10, 20, make_generator(4))
    assert b.means.shape == (400, 5, 2)
    assert (_pairwise_cos(b.means) < 0.8).all()
    assert (b.means.abs() < 5).all()


def test_impossible_request_raises_quickly():
    import time

    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="K=3"):
        sample_gmm(50, 1, 3, 6, 12, make_generator(0), max_rounds=5)
    assert time.perf_counter() - t < 5


def test_d1_k2_possible():
    b = sample_gmm(200, 1, 2, 4, 8, make_generator(0))
    # in 1-D two means need opposite signs
    assert (torch.sign(b.means[:, 0, 0]) != torch.sign(b.means[:, 1, 0])).all()


@pytest.mark.parametrize("d,K,max_cosine", [(2, 8, 0.8), (8, 3, -0.6)])
def test_every_valid_config_can_be_sampled(d, K, max_cosine):
    from pipeline.core.config import ConfigError

    try:
        run = make_run("gmm", task={"d": d, "ks": [K], "n0": 32, "max_cosine": max_cosine})
    except ConfigError:
        return  # rejected before any compute: fine
    t = run.task
    b = F.get("gmm").sample(t, K, 64, make_generator(0), "cpu", step=0)
    assert b.means.shape == (64, K, d) and (_pairwise_cos(b.means) < t.max_cosine).all()


# ------------------------------------------------------------------------------ the family's sampler

def test_family_sample_training_and_fixed_sizes():
    fam = F.get("gmm")
    t = make_run("gmm", task={"d": 3, "ks": [2, 4], "n0": 20}).task
    g = lambda: make_generator(0, rng.TRAIN, 5, 0)  # noqa: E731
    train = fam.sample(t, 4, 256, g(), "cpu", step=5)  # training: N ~ U[n0/2, n0], padded to n0
    assert (train.B, train.N, train.d, train.K) == (256, 20, 3, 4) and fam.group_of(train) == 4
    assert train.n.min() >= 10 and train.n.max() == 20 and len(set(train.n.tolist())) > 5
    _assert_same(train, fam.sample(t, 4, 256, g(), "cpu", step=5))  # same stream, same tasks
    fixed = fam.sample(t, 2, 16, g(), "cpu")  # step None: the fixed-size distribution, N = n0
    assert fixed.mask.all() and fixed.N == 20 and fixed.K == 2
    other = fam.sample(t, 2, 16, g(), "cpu", n=7)
    assert other.mask.all() and other.N == 7
    aniso = make_run("gmm", task={"d": 3, "ks": [2], "n0": 20, "anisotropic": True}).task
    assert fam.sample(aniso, 2, 4, g(), "cpu").scales.shape == (4, 2, 3)


def test_means_follow_the_one_at_a_time_rejection_law():
    """The batched rejection sampler (many candidates per task, first accepted kept) against a plain
    loop that redraws one task at a time until accepted: the same law of the means (two-sample KS on
    the smallest pairwise angle and on the coordinates), K = 5 in d = 2 where only 5.5 % of draws pass."""
    from scipy.stats import ks_2samp

    K, d, r, c, n = 5, 2, 5.0, 0.8, 3000
    rng = np.random.default_rng(0)

    def one_task():
        while True:
            m = rng.uniform(-r, r, (K, d))
            u = m / np.linalg.norm(m, axis=1, keepdims=True)
            cos = u @ u.T
            if (cos[np.triu_indices(K, 1)] < c).all():
                return m

    ref = np.stack([one_task() for _ in range(n)])  # (n, K, d)
    ours = sample_gmm(n, d, K, 10, 10, make_generator(7), mean_range=r, max_cosine=c).means.double().numpy()

    def min_angle(m):
        u = m / np.linalg.norm(m, axis=-1, keepdims=True)
        cos = np.einsum("bkd,bjd->bkj", u, u)[:, *np.triu_indices(K, 1)]
        return np.arccos(np.clip(cos.max(1), -1, 1))

    assert (np.cos(min_angle(ours)) < c).all()
    assert ks_2samp(min_angle(ours), min_angle(ref)).pvalue > 1e-3
    assert ks_2samp(ours.ravel(), ref.ravel()).pvalue > 1e-3
    # the law is not the unconditional one: the test can tell them apart
    free = rng.uniform(-r, r, (n, K, d))
    assert ks_2samp(min_angle(free), min_angle(ref)).pvalue < 1e-6
