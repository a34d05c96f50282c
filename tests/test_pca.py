"""The PCA family: power-method iterates against plain-loop references, sign- and order-invariant
metrics, the real-data task builder's checks, and the study's declarations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.algorithms.power import block_power_iterates, power_deflation_iterates, top_eigenpairs
from pipeline.core.arrays import DataError
from pipeline.families.pca import FAMILY, abs_cosine, eig_error, subspace_distance
from pipeline.families.pca.data import PCABatch, PCAEstimate, covariance, projection, real_tasks, sample_pca


def _sym(B=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, 20, d, generator=g, dtype=torch.float64)
    return A.transpose(1, 2) @ A / 20


def _power_loop(S: np.ndarray, k: int, tau: int, v0: np.ndarray):
    """Plain numpy power method with deflation for one matrix."""
    S = S.copy()
    vecs, vals = [], []
    for j in range(k):
        v = v0[j] / np.linalg.norm(v0[j])
        for _ in range(tau):
            w = S @ v
            v = w / np.linalg.norm(w)
        lam = v @ S @ v
        S = S - lam * np.outer(v, v)
        vecs.append(v)
        vals.append(lam)
    return np.array(vecs), np.array(vals)


def test_power_deflation_equals_a_plain_loop_at_every_step():
    S = _sym()
    v0 = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    steps = [0, 1, 2, 5, 13]
    out = power_deflation_iterates(S, 3, steps, v0)
    for (V, L), tau in zip(out, steps):
        for b in range(5):
            rv, rl = _power_loop(S[b].numpy(), 3, tau, v0[b].numpy())
            np.testing.assert_allclose(V[b].numpy(), rv, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(L[b].numpy(), rl, rtol=1e-10, atol=1e-12)


def test_block_power_equals_a_plain_loop_subspace_and_values():
    S = _sym(seed=2)
    V0 = torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for (V, L), tau in zip(block_power_iterates(S, 2, [0, 1, 4], V0), [0, 1, 4]):
        for b in range(5):
            Q = np.linalg.qr(V0[b].numpy().T)[0]
            for _ in range(tau):
                Q = np.linalg.qr(S[b].numpy() @ Q)[0]
            ritz = np.sort(np.linalg.eigvalsh(Q.T @ S[b].numpy() @ Q))[::-1]
            np.testing.assert_allclose(L[b].numpy(), ritz, rtol=1e-10)
            P = V[b].numpy().T @ V[b].numpy()
            np.testing.assert_allclose(P, Q @ Q.T, atol=1e-10)


def test_power_methods_converge_to_eigh_and_eigh_matches_numpy():
    S = _sym(seed=4)
    V, L = top_eigenpairs(S, 3)
    ref = np.linalg.eigh(S.numpy())
    np.testing.assert_allclose(L.numpy(), ref[0][:, ::-1][:, :3], rtol=1e-12)
    batch = PCABatch(torch.zeros(5, 2, 6), V, L)
    v0 = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for fn in (power_deflation_iterates, block_power_iterates):
        Vp, Lp = fn(S, 3, [3000], v0)[0]
        est = PCAEstimate(Vp, Lp)
        assert abs_cosine(batch, est).min() > 1 - 1e-6
        assert eig_error(batch, est).max() < 1e-6


def test_metrics_are_sign_and_rotation_invariant():
    b = sample_pca(16, 5, 20, 3, torch.Generator().manual_seed(0))
    exact = PCAEstimate(b.vecs.clone(), b.vals.clone())
    flipped = PCAEstimate(b.vecs * torch.tensor([-1.0, 1.0, -1.0])[None, :, None], b.vals.clone())
    for m in (abs_cosine, eig_error, subspace_distance):
        torch.testing.assert_close(m(b, exact), m(b, flipped))
    assert torch.allclose(abs_cosine(b, exact), torch.ones(16, 3, dtype=torch.float64), atol=1e-6)
    assert subspace_distance(b, exact).max() < 1e-5
    # equal eigenvalues: any rotation (or reordering) of the basis within the span is the same subspace
    R = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0]
    rotated = PCAEstimate(R.T[None] @ b.vecs, b.vals)
    reordered = PCAEstimate(b.vecs[:, [2, 0, 1]], b.vals)
    assert subspace_distance(b, rotated).max() < 1e-5 and subspace_distance(b, reordered).max() < 1e-5
    # a disjoint span is far: in d = 6 with k = 3, the span of the bottom 3 eigenvectors gives sqrt(2k)
    b6 = sample_pca(4, 6, 30, 6, torch.Generator().manual_seed(5))
    top = PCABatch(b6.xs, b6.vecs[:, :3], b6.vals[:, :3])
    bottom = PCAEstimate(b6.vecs[:, 3:], b6.vals[:, 3:])
    torch.testing.assert_close(subspace_distance(top, bottom), torch.full((4,), 6 ** 0.5, dtype=torch.float64))


def test_targets_are_the_sample_covariance_eigenpairs():
    b = sample_pca(8, 6, 30, 2, torch.Generator().manual_seed(3), gap_min=2, gap_max=2)
    for i in range(8):
        x = b.xs[i].double().numpy()
        w, U = np.linalg.eigh(np.cov(x.T, bias=True))
        np.testing.assert_allclose(b.vals[i].numpy(), w[::-1][:2], rtol=1e-5)
        np.testing.assert_allclose(np.abs((U[:, ::-1][:, :2].T * b.vecs[i].double().numpy()).sum(-1)), 1, atol=1e-5)
    np.testing.assert_allclose(covariance(b.xs.double())[0].numpy(), np.cov(b.xs[0].double().numpy().T, bias=True),
                               rtol=1e-10)


def test_loss_is_sign_invariant_and_zero_at_the_answer():
    from pipeline.families.pca.net import scale2

    b = sample_pca(6, 4, 12, 2, torch.Generator().manual_seed(0))
    lam = b.vals / scale2(b.xs)[:, None]
    out = torch.cat([b.vecs, lam[..., None]], -1)
    flip = torch.cat([-b.vecs, lam[..., None]], -1)
    assert FAMILY.loss(out, b, None)["loss"] < 1e-6
    torch.testing.assert_close(FAMILY.loss(out, b, None)["loss"], FAMILY.loss(flip, b, None)["loss"])
    est = FAMILY.decode(out, b)  # decode undoes the read-in's per-task scaling
    torch.testing.assert_close(est.vals, b.vals, rtol=1e-5, atol=1e-6)


def test_real_tasks_checks_and_determinism():
    imgs = np.random.default_rng(0).random((50, 16)).astype(np.float32)
    P = projection(16, 4, seed=1)
    np.testing.assert_allclose(P.T @ P, np.eye(4), atol=1e-5)
    a, b = real_tasks(imgs, 3, 10, 2, P, seed=2), real_tasks(imgs, 3, 10, 2, P, seed=2)
    assert a.xs.shape == (3, 10, 4) and torch.equal(a.xs, b.xs)
    with pytest.raises(DataError, match="d = 32 coordinates"):
        projection(16, 32, seed=0)
    bad = imgs.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="1 non-finite pixel"):
        real_tasks(bad, 3, 10, 2, P, seed=0, where="fake.npz")
    with pytest.raises(DataError, match="60 points per task"):
        real_tasks(imgs, 3, 60, 2, P, seed=0)


def test_pca_study_declares_grids_probes_and_bad_keys(tiny_params):
    from pipeline.core.config import ConfigError, from_dict
    from pipeline.studies import get

    p = dict(tiny_params, studies=["pca"])
    cfg = from_dict(p)
    st = get("pca")
    names = [g.name for g in st.grids(cfg)]
    assert names == ["synthetic", "real"]
    assert [u.name for u in st.units(cfg)] == ["softmax", "relu"]
    assert {pr.fit for pr in st.probes(cfg)} == {"trained"}
    for key, value, msg in (("gaps", [1.0], "gaps > 1"), ("networks", ["relu", "relu"], "distinct"),
                            ("power_steps", [2, 1], "ascending")):
        bad = {**p, "pca": {**p["pca"], key: value}}
        with pytest.raises(ConfigError, match=msg):
            from_dict(bad)
    with pytest.raises(ConfigError, match="k: at most d"):
        from_dict({**p, "task": {**p["task"], "pca": {"d": 2, "k": 3}}})


def test_probe_of_a_network_that_runs_the_power_method_matches_its_error():
    """A stand-in network whose layer l holds power-method iterate steps[l] (from other random starts
    than the probe's): the error-matched step recovers the diagonal; the residual cosine cannot."""
    from pipeline.core import probe
    from pipeline.core.config import ModelConfig
    from pipeline.families.pca.config import PCATask

    task = PCATask(d=4, n_points=16, k=1, gap_min=3.0, gap_max=3.0)
    steps = [0, 1, 2, 4]
    fit = sample_pca(256, 4, 16, 1, torch.Generator().manual_seed(0), gap_min=3.0, gap_max=3.0)
    held = sample_pca(256, 4, 16, 1, torch.Generator().manual_seed(1), gap_min=3.0, gap_max=3.0)

    def states_fn(batch):
        ests = FAMILY.probe_targets["power"].fn(batch, steps, {"seed": 99})
        out = []
        for e in ests:  # the read-out token (last) holds the direction and the eigenvalue / s^2
            h = torch.zeros(batch.B, batch.n + 1, 8)
            h[:, -1, :4] = e.vecs[:, 0].float()
            out.append(h)
        return out, torch.ones(batch.B, batch.n + 1, dtype=torch.bool)

    res = probe.run_probe(FAMILY, task, ModelConfig(n_embd=8), None, states_fn, fit, held, {"power": steps},
                          {"seed": 0}, fit="trained", fit_steps=300)
    assert res.error_matched_steps("power") == steps
