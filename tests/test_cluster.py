"""The clustering family: ARI / NMI against sklearn, Lloyd against a plain loop, the Hungarian-matched
loss against the K!-enumerated one, the misclustering rate against brute force, the solvers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pipeline.algorithms.lloyd import lloyd
from pipeline.families.cluster import FAMILY, Lloyd, Spectral2
from pipeline.families.cluster.data import ClusterEstimate, sample_clusters
from pipeline.core.matching import matched_assignment
from pipeline.families.cluster.loss import cost_matrix, matched_cross_entropy
from pipeline.families.cluster.metrics import (adjusted_rand_index, contingency, misclustering_rate,
                                               normalized_mutual_info)


def _labelings():
    g = np.random.default_rng(0)
    cases = [(g.integers(0, 3, 40), g.integers(0, 3, 40)) for _ in range(20)]
    a = g.integers(0, 4, 30)
    cases += [(a, a), (a, (a + 1) % 4), (np.zeros(30, int), np.zeros(30, int)),  # identical, permuted, one cluster
              (np.zeros(30, int), a), (a, np.zeros(30, int)),  # one side a single cluster
              (np.arange(30) % 2, np.arange(30) // 15)]  # independent halves
    return cases


def test_ari_and_nmi_equal_sklearn_including_degenerate_cases():
    for t, p in _labelings():
        K = int(max(t.max(), p.max())) + 1
        C = contingency(torch.tensor(t)[None], torch.tensor(p)[None], K, K)
        assert float(adjusted_rand_index(C)[0]) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12), (t, p)
        assert float(normalized_mutual_info(C)[0]) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-12)


def test_misclustering_rate_is_the_best_permutation():
    g = np.random.default_rng(1)
    for K in (2, 3, 4):
        t, p = g.integers(0, K, (6, 25)), g.integers(0, K, (6, 25))
        got = misclustering_rate(contingency(torch.tensor(t), torch.tensor(p), K, K)).numpy()
        want = [min(np.mean(np.array(perm)[pi] != ti) for perm in itertools.permutations(range(K)))
                for ti, pi in zip(t, p)]
        np.testing.assert_allclose(got, want)


def test_hungarian_matched_loss_equals_the_enumerated_one():
    g = torch.Generator().manual_seed(0)
    for K in (2, 3, 4, 5):
        logp = torch.log_softmax(torch.randn(8, 30, K, generator=g), -1)
        labels = torch.randint(0, K, (8, 30), generator=g)
        a = matched_cross_entropy(logp, labels, method="enumerate")
        b = matched_cross_entropy(logp, labels, method="hungarian")
        torch.testing.assert_close(a, b)
        brute = torch.stack([min(-(logp[i, torch.arange(30), torch.tensor(perm)[labels[i]]]).mean()
                                 for perm in itertools.permutations(range(K))) for i in range(8)])
        torch.testing.assert_close(a, brute)
    # K = 10 goes through the Hungarian path without a K! tensor
    logp = torch.log_softmax(torch.randn(2, 50, 10, generator=g), -1)
    pi = matched_assignment(cost_matrix(logp, torch.randint(0, 10, (2, 50), generator=g)))
    assert pi.shape == (2, 10) and all(sorted(r.tolist()) == list(range(10)) for r in pi)


def _lloyd_loop(x, c, iters):
    c = c.copy()
    lab = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    for _ in range(iters):
        for k in range(len(c)):
            if (lab == k).any():
                c[k] = x[lab == k].mean(0)
        new = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        if (new == lab).all():
            break
        lab = new
    return lab, c


def test_lloyd_equals_a_plain_loop_from_the_same_start():
    b = sample_clusters(6, 2, 3, 40, torch.Generator().manual_seed(2), separation=3.0)
    x = b.x.double()
    c0 = x[:, :3].clone()  # the first three points as starts
    res = lloyd(x, c0, 50)
    for i in range(6):
        lab, c = _lloyd_loop(x[i].numpy(), c0[i].numpy(), 50)
        np.testing.assert_array_equal(res.labels[i].numpy(), lab)
        np.testing.assert_allclose(res.centers[i].numpy(), c, atol=1e-12)


def test_solvers_separate_well_separated_clusters_and_spectral_needs_two():
    for K in (2, 3):
        b = sample_clusters(64, 2, K, 64, torch.Generator().manual_seed(K), separation=8.0)
        for solver in (Lloyd(5, 100, seed=0), FAMILY.solvers["em_strong"].factory(
                {"strong_restarts": 3, "em_max_iter": 100, "em_tol": 1e-7}, 0, None)):
            est = solver(b)
            assert FAMILY.metrics["ari"].fn(b, est).mean() > 0.9
        sp = Spectral2()(b)
        assert sp.applicable == (K == 2)
        if K == 2:
            assert FAMILY.metrics["error"].fn(b, sp).mean() < 0.1


def test_separation_range_scales_the_means_and_keeps_unit_noise():
    b = sample_clusters(200, 2, 2, 64, torch.Generator().manual_seed(3), separation=2.0, separation_max=6.0)
    s = b.means.abs().flatten(1).max(1).values
    assert s.max() <= 6.0 and s.min() < 2.5 and s.max() > 4.5
    centre = torch.gather(b.means, 1, b.labels[..., None].expand(-1, -1, 2))
    assert (b.x - centre).std().item() == pytest.approx(1.0, abs=0.05)


def test_loss_is_invariant_to_relabelling():
    b = sample_clusters(4, 2, 3, 20, torch.Generator().manual_seed(4))
    logits = torch.randn(4, 20, 3, generator=torch.Generator().manual_seed(5))
    a = FAMILY.loss(logits, b, None)["loss"]
    torch.testing.assert_close(a, FAMILY.loss(logits[..., [2, 0, 1]], b, None)["loss"])
    est = FAMILY.decode(logits, b)
    perm = ClusterEstimate((est.labels + 1) % 3)
    torch.testing.assert_close(FAMILY.metrics["ari"].fn(b, est), FAMILY.metrics["ari"].fn(b, perm))
