"""The Hsu–Kakade spectral method: recovery on well-separated mixtures, K > d, batching, seeds."""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.algorithms import Spectral, tensor_power_decomposition
from pipeline.core.family import Solver
from pipeline.core.rng import make_generator
from pipeline.families.gmm.data import sample_gmm


def _matched(est, batch):
    """Per task: matched mean error (1/(K d)) sum ||mu_hat - mu||^2 and max |w_hat - w|."""
    mean_err, w_err = [], []
    for b in range(batch.B):
        cost = ((est.means[b][:, None].double() - batch.means[b][None].double()) ** 2).mean(-1).numpy()
        r, c = linear_sum_assignment(cost)
        mean_err.append(cost[r, c].mean())
        w_err.append(np.abs(est.weights[b][r].numpy() - batch.weights[b][c].numpy()).max())
    return np.array(mean_err), np.array(w_err)


def test_spectral_recovers_separated_mixture():
    batch = sample_gmm(6, 8, 3, 20000, 20000, make_generator(3), mean_range=10.0)
    est = Spectral()(batch)
    assert isinstance(Spectral(), Solver) and Spectral().name == "spectral"
    assert est.applicable and est.scales is None
    assert est.weights.dtype == torch.float32 and est.means.shape == (6, 3, 8)
    mean_err, w_err = _matched(est, batch)
    assert mean_err.max() < 0.01
    assert w_err.max() < 0.03
    torch.testing.assert_close(est.weights.sum(1), torch.ones(6))
    assert torch.all(est.weights >= 0)
    torch.testing.assert_close(est.extras["sigma2"], torch.ones(6), atol=0.05, rtol=0)


def test_spectral_ignores_padding():
    batch = sample_gmm(4, 6, 3, 3000, 6000, make_generator(4))
    x = batch.x.clone()
    x[~batch.mask] = 1e6
    x[0, -1, 0] = float("nan")  # task 0 has at most 6000 points: make sure one is padded
    batch.mask[0, -1] = False
    garbage = type(batch)(x=x, mask=batch.mask, weights=batch.weights, means=batch.means, labels=batch.labels)
    clean = type(batch)(x=batch.x * batch.mask[..., None], mask=batch.mask, weights=batch.weights,
                        means=batch.means, labels=batch.labels)
    a, b = Spectral()(clean), Spectral()(garbage)
    torch.testing.assert_close(a.means, b.means)
    torch.testing.assert_close(a.weights, b.weights)


def test_spectral_not_applicable_for_k_above_d():
    batch = sample_gmm(5, 2, 3, 50, 100, make_generator(5))
    est = Spectral()(batch)
    assert not est.applicable and "K <= d" in est.reason
    assert est.weights.shape == (5, 3) and est.means.shape == (5, 3, 2)
    assert torch.isnan(est.means).all()


def test_spectral_batched_equals_one_by_one_and_is_deterministic():
    batch = sample_gmm(8, 5, 4, 100, 128, make_generator(6))
    s = Spectral(seed=3)
    a, b = s(batch), s(batch)
    assert torch.equal(a.means, b.means) and torch.equal(a.weights, b.weights)
    assert torch.isfinite(a.means).all() and torch.isfinite(a.weights).all()
    # small-N tasks still give finite answers that are roughly right on average
    mean_err, _ = _matched(a, batch)
    assert np.median(mean_err) < 0.5
    # tasks do not interact and a task's random starts depend on its index only (kept by slice):
    # alone, a task gets exactly the answer it got in the batch
    for i in range(8):
        one = s(batch.slice(i, i + 1))
        assert torch.equal(one.means[0], a.means[i]) and torch.equal(one.weights[0], a.weights[i])
    # the seed picks the power-iteration starts: with one power step the answer still shows them
    s1 = Spectral(seed=3, n_iter=1, n_restarts=1)
    assert torch.equal(s1(batch).means, s1(batch).means)
    assert not torch.allclose(Spectral(seed=4, n_iter=1, n_restarts=1)(batch).means, s1(batch).means)


def test_spectral_runs_in_float32():
    batch = sample_gmm(4, 8, 3, 5000, 5000, make_generator(7))
    a, b = Spectral()(batch), Spectral(dtype=torch.float32)(batch)
    assert torch.isfinite(b.means).all()
    mean_err, _ = _matched(b, batch)
    assert mean_err.max() < 0.05
    torch.testing.assert_close(a.means, b.means, atol=1e-2, rtol=0)


def test_tensor_power_decomposition_recovers_orthogonal_tensor():
    """T = sum_k lam_k v_k^{⊗3} with orthonormal v_k: the method returns the (lam_k, v_k) pairs."""
    B, K = 3, 4
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(B, K, K, generator=g, dtype=torch.float64))[0].transpose(1, 2)  # rows v_k
    lam = 1.0 + torch.rand(B, K, generator=g, dtype=torch.float64) * 3
    T = torch.einsum("bk,bki,bkj,bkl->bijl", lam, V, V, V)
    lam_hat, v_hat = tensor_power_decomposition(T, K, make_generator(1), n_restarts=10, n_iter=50)
    for b in range(B):
        cos = (v_hat[b] @ V[b].T).abs()  # (K found, K true)
        r, c = linear_sum_assignment(-cos.numpy())
        np.testing.assert_allclose(cos[r, c].numpy(), 1.0, atol=1e-8)
        np.testing.assert_allclose(lam_hat[b][r].abs().numpy(), lam[b][c].numpy(), rtol=1e-8)


def test_degenerate_tasks_stay_finite():
    batch = sample_gmm(8, 6, 5, 1, 6, make_generator(1))
    batch.mask[0] = False
    batch.x[0] = 0.0
    est = Spectral()(batch)
    assert torch.isfinite(est.means).all() and torch.isfinite(est.weights).all()


def test_spectral_not_applicable_on_anisotropic_tasks():
    b = sample_gmm(4, 5, 2, 50, 50, make_generator(0), anisotropic=True)
    est = Spectral(anisotropic=True)(b)
    assert not est.applicable and "spherical" in est.reason
    assert Spectral()(b).applicable  # the same data, the solver not told: it runs (and is misspecified)
