"""Classical GMM solvers do not depend on how an evaluation set is chunked: task i's random start is
drawn from a generator seeded by (seed, SOLVER, i), with i its index in the set (GMMBatch.index,
kept by slice), so a set scored whole or in chunks gives the same answers and the same metrics."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.algorithms import EMPaper, EMStrong, Spectral
from pipeline.core.evaluate import score
from pipeline.families.gmm import FAMILY
from pipeline.families.gmm.config import GMMSolvers
from pipeline.families.gmm.data import GMMBatch, make_generator, sample_gmm
from tests.conftest import make_run

B, D, K = 40, 4, 3
CHUNKS = [(0, 16), (16, 32), (32, 40)]


@pytest.fixture(scope="module")
def iso() -> GMMBatch:
    return sample_gmm(B, D, K, 20, 32, make_generator(0, 11))


@pytest.fixture(scope="module")
def aniso() -> GMMBatch:
    return sample_gmm(B, D, K, 20, 32, make_generator(0, 12), anisotropic=True)


SOLVERS = {  # name -> (solver, which set)
    # tasks converge at different iterations, so the working set shrinks at other times in each chunk
    "em_paper": (lambda: EMPaper(max_iter=100, tol=1e-5, seed=3), "iso"),
    "em_paper_diag": (lambda: EMPaper(max_iter=12, seed=3, covariance="diag"), "aniso"),
    "em_strong": (lambda: EMStrong(restarts=3, max_iter=12, seed=3), "iso"),
    "em_strong_diag": (lambda: EMStrong(restarts=3, max_iter=12, seed=3, covariance="diag"), "aniso"),
    "spectral": (lambda: Spectral(n_restarts=3, n_iter=20, seed=3), "iso"),
}


def _fields(est):
    return [t for t in (est.weights, est.means, est.scales) if t is not None]


def _assert_equal(a, b, what):
    assert torch.equal(a, b), what


def test_slice_keeps_the_task_index(iso):
    assert torch.equal(iso.task_index(), torch.arange(B))
    for start, stop in CHUNKS:
        chunk = iso.slice(start, stop)
        assert torch.equal(chunk.task_index(), torch.arange(start, stop))
        assert torch.equal(chunk.x, iso.x[start:stop])
    assert torch.equal(iso.slice(16, 32).slice(4, 6).task_index(), torch.tensor([20, 21]))  # nested
    assert torch.equal(iso.slice(16, 32).to("cpu", torch.float64).task_index(), torch.arange(16, 32))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_whole_set_equals_concatenated_chunks(name, iso, aniso):
    make, which = SOLVERS[name]
    batch = {"iso": iso, "aniso": aniso}[which]
    solver = make()
    whole = solver(batch)
    assert whole.applicable
    parts = [solver(batch.slice(a, b)) for a, b in CHUNKS]
    for i, field in enumerate(_fields(whole)):
        cat = torch.cat([_fields(p)[i] for p in parts])
        assert cat.shape == field.shape
        _assert_equal(cat, field, f"{name}: field {i}")
    if name.startswith("em_strong"):
        ll = torch.cat([p.extras["restart_log_likelihood"] for p in parts])
        _assert_equal(ll, whole.extras["restart_log_likelihood"], f"{name}: restart log-likelihoods")
        assert torch.equal(torch.cat([p.extras["best_restart"] for p in parts]), whole.extras["best_restart"])
    # one task alone, sliced out at its index, gets its answer in the set
    one = solver(batch.slice(21, 22))
    for f1, fw in zip(_fields(one), _fields(whole)):
        _assert_equal(f1[0], fw[21], f"{name}: task 21 alone")


def _duplicated(batch: GMMBatch, i: int, j: int) -> GMMBatch:
    """The set with task j replaced by a copy of task i (so only their indices differ)."""
    parts = {}
    for f in dataclasses.fields(batch):
        t = getattr(batch, f.name)
        if t is None or f.name == "index":
            parts[f.name] = t
            continue
        t = t.clone()
        t[j] = t[i]
        parts[f.name] = t
    return GMMBatch(**parts)


@pytest.mark.parametrize("name, solver, which", [
    ("em_paper", EMPaper(max_iter=1, seed=3), "iso"),
    ("em_paper_diag", EMPaper(max_iter=1, seed=3, covariance="diag"), "aniso"),
    ("em_strong", EMStrong(restarts=2, max_iter=1, seed=3), "iso"),
    ("em_strong_diag", EMStrong(restarts=2, max_iter=1, seed=3, covariance="diag"), "aniso"),
    ("spectral", Spectral(n_restarts=1, n_iter=1, seed=3), "iso"),
])
def test_identical_tasks_at_other_indices_get_other_starts(name, solver, which, iso, aniso):
    """Tasks i and i + 16 (first rows of two chunks) are seeded by their index, not their row in a chunk."""
    batch = _duplicated({"iso": iso, "aniso": aniso}[which], 5, 21)
    est = solver(batch)
    assert not torch.allclose(est.means[5], est.means[21])
    chunks = [solver(batch.slice(a, b)) for a, b in CHUNKS]
    # the first task of each chunk (indices 0, 16, 32) starts differently too
    firsts = [c.means[0] for c in chunks]
    assert not torch.allclose(firsts[0], firsts[1]) and not torch.allclose(firsts[1], firsts[2])
    # ... and identically whether the set is chunked or not (with one iteration, the start shows)
    assert torch.equal(chunks[1].means[5], est.means[21])


@pytest.mark.parametrize("solver_name, anisotropic", [("em_paper", False), ("em_strong", True),
                                                      ("spectral", False)])
def test_evaluator_scores_do_not_depend_on_chunk_size(solver_name, anisotropic, iso, aniso):
    task = make_run("gmm", task={"d": D, "ks": [K], "n0": 32, "anisotropic": anisotropic}).task
    params = {**dataclasses.asdict(GMMSolvers()), "em_max_iter": 10, "strong_restarts": 2,
              "spectral_restarts": 3, "spectral_iters": 20}
    solver = FAMILY.solvers[solver_name].factory(params, 3, task)
    assert solver.name.startswith(solver_name + "[") and solver.name != solver_name  # changed settings show
    batch = aniso if anisotropic else iso
    runs = {c: score(solver, batch, FAMILY.metrics, c) for c in (7, 16, None)}
    ref, _, ok, _ = runs[None]
    assert ok and set(ref) == set(FAMILY.metrics)
    assert all(v.shape == (B,) and np.isfinite(v).all() for v in ref.values())
    for c in (7, 16):
        values, _, ok_c, _ = runs[c]
        assert ok_c
        for m in FAMILY.metrics:
            np.testing.assert_array_equal(values[m], ref[m], err_msg=f"{m}, chunk {c}")


def test_not_applicable_is_reported_whatever_the_chunking(aniso):
    task = make_run("gmm", task={"d": D, "ks": [K], "n0": 32, "anisotropic": True}).task
    solver = FAMILY.solvers["spectral"].factory(dataclasses.asdict(GMMSolvers()), 0, task)
    assert solver.name == "spectral"  # default settings: the plain name
    for c in (7, None):
        values, _, ok, reason = score(solver, aniso, FAMILY.metrics, c)
        assert not ok and values == {} and "spherical" in reason
