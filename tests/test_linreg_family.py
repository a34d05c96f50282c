"""The in-context linear-regression family (pipeline/families/linreg): sampler, curriculum,
ill-conditioned inputs, the interleaved prompt, the causal network and its loss, decode/metrics,
the registered solvers and their names, and the batch's plain-array round trip.

No test here touches the global RNG: data come from local generators, and parameter initialisation
runs inside `seeded_init` (the global state is forked and restored)."""
from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.core import family as F
from pipeline.core import rng
from pipeline.core.evaluate import score
from pipeline.core.network import Network, NetworkSolver
from pipeline.families.linreg import FAMILY
from pipeline.families.linreg import config as C
from pipeline.families.linreg.data import LinRegBatch, RegEstimate, interleave, sample_linreg
from tests.conftest import make_run

DEFAULTS = dataclasses.asdict(C.LinRegSolvers())
CHANGED = {"ridge_lambda": 0.5, "knn": 1, "gd_steps": 4, "gd_lr": 0.05, "newton_steps": 5,
           "newton_alpha": "frobenius", "online_passes": 3, "online_lr": 0.02}


@contextlib.contextmanager
def seeded_init(seed: int):
    """Module construction with a fixed parameter initialisation, isolated from the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def gen(*words: int) -> torch.Generator:
    return rng.make_generator(0, rng.EVAL, *words)


def _net(run=None, seed: int = 0) -> Network:
    with seeded_init(seed):
        return Network(run or make_run("linreg")).double().eval()


def test_registered():
    assert F.get("linreg") is FAMILY and FAMILY.name == "linreg" and FAMILY.batch_type is LinRegBatch
    assert FAMILY.groups(make_run("linreg").task) == [None] and FAMILY.monitor == "val/mse"


# ----------------------------------------------------------------------------- sampling

def test_sampler_is_determined_by_the_generator_seed():
    a, b = sample_linreg(8, 4, 6, gen(1)), sample_linreg(8, 4, 6, gen(1))
    for name in ("xs", "ys", "w"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = sample_linreg(8, 4, 6, gen(2))
    assert not torch.equal(a.xs, c.xs) and not torch.equal(a.w, c.w)
    assert a.xs.shape == (8, 6, 4) and a.ys.shape == (8, 6) and a.w.shape == (8, 4)
    torch.testing.assert_close(a.ys, (a.xs @ a.w[..., None])[..., 0])  # noiseless: y = w.x
    noisy = sample_linreg(8, 4, 6, gen(1), noise_std=0.5)
    assert not torch.allclose(noisy.ys, (noisy.xs @ noisy.w[..., None])[..., 0])
    task = make_run("linreg").task
    s1 = FAMILY.sample(task, None, 5, gen(3), "cpu", step=1)
    s2 = FAMILY.sample(task, None, 5, gen(3), "cpu", step=1)
    assert torch.equal(s1.xs, s2.xs) and torch.equal(s1.ys, s2.ys)


def test_curriculum_is_a_pure_function_of_the_step():
    t = make_run("linreg").task  # d 3, n_points 7, every 2 steps: dims 2 (+1), points 3 (+2)
    expected = {0: (2, 3), 1: (2, 3), 2: (3, 5), 3: (3, 5), 4: (3, 7), 5: (3, 7), 100: (3, 7), None: (3, 7)}
    for step, want in expected.items():
        assert C.curriculum(t, step) == want, step
    assert [C.curriculum(t, s) for s in (3, 0, 2, 0)] == [(3, 5), (2, 3), (3, 5), (2, 3)]  # no hidden state
    off = make_run("linreg", task={"curriculum_every": 0}).task
    assert {C.curriculum(off, s) for s in (0, 7, None)} == {(off.d, off.n_points)}


def test_inactive_coordinates_are_zero():
    t = make_run("linreg").task
    b = FAMILY.sample(t, None, 64, gen(4), "cpu", step=0)
    assert b.xs.shape == (64, 3, 3)  # 3 points, d stays 3
    assert (b.xs[..., 2:] == 0).all() and (b.xs[..., :2] != 0).all()
    torch.testing.assert_close(b.ys, (b.xs[..., :2] @ b.w[:, :2, None])[..., 0])  # only active dims matter
    final = FAMILY.sample(t, None, 64, gen(4), "cpu", step=None)
    assert final.xs.shape == (64, 7, 3) and (final.xs[..., 2] != 0).all()


def test_condition_gives_the_eigenvalue_ratio_and_per_task_rotations():
    d, n, cond = 4, 40_000, 10.0
    b = sample_linreg(3, d, n, gen(5), condition=cond)
    cov = b.xs.double().transpose(1, 2) @ b.xs.double() / n  # (B, d, d), mean zero
    lam, U = torch.linalg.eigh(cov)  # ascending
    ratio = lam[:, -1] / lam[:, 0]
    assert ((ratio > 0.85 * cond) & (ratio < 1.15 * cond)).all(), ratio
    # eigenvalues c on floor(d/2) directions and 1 on the rest, trace d
    torch.testing.assert_close(lam.sum(1), torch.full((3,), float(d), dtype=torch.float64), rtol=0.05, atol=0)
    assert (lam[:, -2] / lam[:, 1] > 0.85 * cond).all() and (lam[:, 1] / lam[:, 0] < 1.2).all()
    # every task has its own rotation: the projections on the top eigenspaces differ
    P = U[:, :, -2:] @ U[:, :, -2:].transpose(1, 2)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (P[i] - P[j]).norm() > 0.3
    iso = sample_linreg(3, d, n, gen(5))
    lam_iso = torch.linalg.eigvalsh(iso.xs.double().transpose(1, 2) @ iso.xs.double() / n)
    assert (lam_iso[:, -1] / lam_iso[:, 0] < 1.2).all()


def test_interleave_puts_x_at_even_and_y_at_odd_positions():
    b = sample_linreg(2, 3, 4, gen(6))
    tok = interleave(b.xs, b.ys)
    assert tok.shape == (2, 8, 3)
    assert torch.equal(tok[:, 0::2], b.xs)
    assert torch.equal(tok[:, 1::2, 0], b.ys) and (tok[:, 1::2, 1:] == 0).all()


# ----------------------------------------------------------------------------- the network

def _changed(b: LinRegBatch, xs=None, ys=None) -> LinRegBatch:
    return LinRegBatch(b.xs if xs is None else xs, b.ys if ys is None else ys, b.w)


def test_network_is_causal():
    net = _net()
    b = sample_linreg(3, 3, 7, gen(7)).to("cpu", torch.float64)
    preds = net(b)
    assert preds.shape == (3, 7)
    g = torch.Generator().manual_seed(8)
    for k in (0, 3, 5):
        ys = b.ys.clone()
        ys[:, k] = ys[:, k] + 1 + torch.rand(3, generator=g, dtype=torch.float64)
        p_y = net(_changed(b, ys=ys))
        torch.testing.assert_close(p_y[:, :k + 1], preds[:, :k + 1], rtol=0, atol=1e-12)  # y_k is not seen at x_k
        assert not torch.allclose(p_y[:, k + 1:], preds[:, k + 1:])  # ... but it is afterwards
        xs = b.xs.clone()
        xs[:, k + 1] = torch.randn(3, 3, generator=g, dtype=torch.float64)
        p_x = net(_changed(b, xs=xs))
        torch.testing.assert_close(p_x[:, :k + 1], preds[:, :k + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(p_x[:, k + 1], preds[:, k + 1])


def test_loss_gives_every_parameter_a_gradient():
    run = make_run("linreg")
    net = _net(run).float().train()
    b = FAMILY.sample(run.task, None, 8, gen(9), "cpu", step=None)
    out = FAMILY.loss(net(b), b, run.task)
    assert set(out) >= {"loss", "mse"} and out["loss"].dim() == 0 and math.isfinite(float(out["loss"].detach()))
    out["loss"].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # the loss is the mean squared error over every prefix
    torch.testing.assert_close(out["loss"].detach(), (net(b).detach() - b.ys).pow(2).mean())


def test_decode_and_metric_shapes():
    run = make_run("linreg")
    net = _net(run).float()
    b = FAMILY.sample(run.task, None, 5, gen(10), "cpu", step=None)
    est = FAMILY.decode(net(b), b)
    assert isinstance(est, RegEstimate) and est.preds.shape == (5, 7) and est.applicable
    est2 = NetworkSolver(net)(b)
    torch.testing.assert_close(est2.preds, est.preds)
    m = FAMILY.metrics["sq_error"]
    assert m.axis == "k" and m.better == "lower"
    err = m.fn(b, est)
    assert err.shape == (5, 7) and torch.isfinite(err).all()
    torch.testing.assert_close(m.fn(b, RegEstimate(b.ys.clone())), torch.zeros(5, 7, dtype=torch.float64))
    torch.testing.assert_close(m.fn(b, RegEstimate(torch.zeros_like(b.ys))), b.ys.double() ** 2 / 3)
    values, _, ok, _ = score(NetworkSolver(net), b, FAMILY.metrics, 2)
    assert ok and values["sq_error"].shape == (5, 7)


# ----------------------------------------------------------------------------- solvers

@pytest.fixture(scope="module")
def prompts() -> LinRegBatch:
    return sample_linreg(6, 3, 9, gen(11))


@pytest.mark.parametrize("name", list(FAMILY.solvers))
def test_every_solver_answers_every_prefix(name, prompts):
    task = make_run("linreg").task
    solver = FAMILY.solvers[name].factory(dict(DEFAULTS), 0, task)
    est = solver(prompts)
    assert est.preds.shape == (6, 9) and torch.isfinite(est.preds).all()
    assert (est.preds[:, 0] == 0).all()  # no examples yet
    assert not torch.allclose(est.preds[:, 1:], torch.zeros(6, 8))
    values, _, ok, _ = score(solver, prompts, FAMILY.metrics, 4)
    assert ok and values["sq_error"].shape == (6, 9)
    np.testing.assert_array_equal(values["sq_error"], score(solver, prompts, FAMILY.metrics, None)[0]["sq_error"])


@pytest.mark.parametrize("name", list(FAMILY.solvers))
def test_solver_names_describe_their_settings(name, prompts):
    spec = FAMILY.solvers[name]
    task = make_run("linreg").task
    assert set(spec.uses) <= set(DEFAULTS)
    assert spec.factory(dict(DEFAULTS), 0, task).name == name  # default settings: the plain name
    base = spec.factory(dict(DEFAULTS), 0, task)(prompts).preds
    for key, value in CHANGED.items():
        solver = spec.factory({**DEFAULTS, key: value}, 0, task)
        if key in spec.uses:
            assert solver.name == f"{name}[{key}={value}]"
            assert solver.name == F.solver_name(name, {**DEFAULTS, key: value}, DEFAULTS, spec.uses)
            assert not torch.allclose(solver(prompts).preds, base), key  # the setting reaches the solver
        else:
            assert solver.name == name  # a setting the solver does not read leaves its name alone
    two = {**DEFAULTS, **{k: CHANGED[k] for k in spec.uses}}
    if len(spec.uses) > 1:
        assert spec.factory(two, 0, task).name == f"{name}[" + ",".join(f"{k}={two[k]}" for k in spec.uses) + "]"


def test_least_squares_is_exact_once_there_are_d_examples(prompts):
    est = FAMILY.solvers["least_squares"].factory(dict(DEFAULTS), 0, make_run("linreg").task)(prompts)
    torch.testing.assert_close(est.preds[:, 3:], prompts.ys[:, 3:], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- the batch

def test_batch_numpy_round_trip_slice_and_to():
    b = sample_linreg(5, 3, 4, gen(12), noise_std=0.1)
    arrays = b.to_numpy()
    assert set(arrays) == {"xs", "ys", "w"} and all(isinstance(a, np.ndarray) for a in arrays.values())
    b2 = LinRegBatch.from_numpy(arrays)
    for name in ("xs", "ys", "w"):
        assert torch.equal(getattr(b2, name), getattr(b, name)), name
    s = b.slice(2, 5)
    assert s.B == 3 and torch.equal(s.task_index(), torch.arange(2, 5)) and torch.equal(s.xs, b.xs[2:5])
    assert torch.equal(s.to("cpu", torch.float64).task_index(), torch.arange(2, 5))
    assert s.to("cpu", torch.float64).xs.dtype == torch.float64


def test_from_numpy_rejects_inconsistent_shapes():
    a = sample_linreg(5, 3, 4, gen(13)).to_numpy()
    for key, bad in {"ys": a["ys"][:, :3], "w": a["w"][:, :2], "xs": a["xs"][0], "ys ": a["ys"][:4]}.items():
        with pytest.raises(ValueError, match="set.npz"):
            LinRegBatch.from_numpy({**a, key.strip(): bad}, where="set.npz")
    with pytest.raises(ValueError, match="set.npz"):
        LinRegBatch.from_numpy({**a, "w": a["w"][:4]}, where="set.npz")
