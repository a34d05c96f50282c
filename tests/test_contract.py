"""The contract every registered task family and study keeps (a new family gets these tests for free):
sampler determinism by (seed, step, rank), the evaluation-set round trip, a loss whose backward reaches
every parameter, solver output shapes and not-applicable handling, a fast_dev_run, and the study's
declaration resolving to runs, grids and report specs that fit together."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import studies as S
from pipeline.core import family as F
from pipeline.core import rng
from pipeline.core.arrays import load_arrays, save_arrays
from pipeline.core.config import from_dict
from pipeline.core.module import TaskModule
from pipeline.core.network import Network
from pipeline.core.train import train
from tests.conftest import TINY_PARAMS, make_run

FAMILIES = F.names()
STUDIES = S.names()


def _sample(run, step: int, rank: int, group):
    fam = F.get(run.family)
    g = rng.make_generator(run.seed, rng.TRAIN, step, rank)
    return fam.sample(run.task, group, 3, g, "cpu", step)


def _arrays(batch) -> dict:
    return batch.to_numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_sampler_is_determined_by_seed_step_rank(family):
    run = make_run(family)
    g = F.get(family).groups(run.task)[0]
    a, b = _arrays(_sample(run, 5, 0, g)), _arrays(_sample(run, 5, 0, g))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for other in (_sample(run, 6, 0, g), _sample(run, 5, 1, g)):
        o = _arrays(other)
        assert any(a[k].shape != o[k].shape or not (a[k] == o[k]).all() for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_set_round_trip(tmp_path, family):
    run = make_run(family)
    fam = F.get(family)
    batch = fam.sample(run.task, fam.groups(run.task)[-1], 5, rng.make_generator(0, rng.EVAL), "cpu", None)
    path = save_arrays(tmp_path / "set.npz", batch.to_numpy(), {"family": family})
    arrays, meta = load_arrays(path, fam.batch_type.REQUIRED)
    back = fam.batch_type.from_numpy(arrays)
    assert meta == {"family": family}
    for k, v in batch.to_numpy().items():
        assert (back.to_numpy()[k] == v).all(), k
    part = back.slice(2, 4)
    assert part.B == 2 and part.task_index().tolist() == [2, 3]  # solvers seed by the index within the set


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_backward_reaches_every_parameter(family):
    run = make_run(family)
    module = TaskModule(run.to_dict())
    batches = module.training_tasks(0, 0, 1)
    losses = module._losses(batches)
    loss = torch.stack([v["loss"] for v in losses.values()]).mean()
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    mon = F.get(family).monitor.split("/", 1)[1]
    assert all(mon in v for v in losses.values())  # the validation metric comes from the loss dict


@pytest.mark.parametrize("family", FAMILIES)
def test_network_answers_like_a_solver_and_every_solver_has_the_shapes(family):
    from pipeline.core.network import NetworkSolver

    run = make_run(family)
    fam = F.get(family)
    task = run.task
    group = fam.groups(task)[-1]
    batch = fam.sample(task, group, 4, rng.make_generator(0, rng.EVAL), "cpu", None)
    net_est = NetworkSolver(Network(run))(batch)
    params = dataclasses.asdict(fam.SolverConfig())
    for name, spec in fam.solvers.items():
        solver = spec.factory(params, 0, task)
        assert solver.name == name  # default settings: the plain name
        est = solver(batch)
        for metric in fam.metrics.values():
            if not getattr(est, "applicable", True):
                assert est.reason
                continue
            a, b = torch.as_tensor(metric.fn(batch, est)), torch.as_tensor(metric.fn(batch, net_est))
            assert a.shape == b.shape and a.shape[0] == batch.B, (name, metric.name)
        if spec.uses:  # a changed setting changes the name
            k = spec.uses[0]
            v = params[k]
            changed = {**params, k: (v * 2 if isinstance(v, (int, float)) and not isinstance(v, bool) else v)}
            if changed[k] != v:
                assert spec.factory(changed, 0, task).name != name


def test_not_applicable_is_an_answer():
    fam = F.get("gmm")
    task = make_run("gmm").task  # d = 2
    batch = fam.sample(task, 3, 4, rng.make_generator(0, rng.EVAL), "cpu", None)
    est = fam.solvers["spectral"].factory(dataclasses.asdict(fam.SolverConfig()), 0, task)(batch)
    assert not est.applicable and "K <= d" in est.reason


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_dev_run(tmp_path, family):
    res = train(make_run(family), tmp_path / "run", fast_dev_run=True, track=False, progress_bar=False)
    assert res.metrics["global_step"] == 1 and res.model_path.is_file()


@pytest.mark.parametrize("study", STUDIES)
def test_study_declaration_fits_together(study):
    import copy

    p = copy.deepcopy(TINY_PARAMS)
    p["studies"] = [study]
    cfg = from_dict(p)
    st = S.get(study)
    fam = F.get(st.family)
    units = {u.name for u in st.units(cfg)}
    assert units and st.doc.startswith("docs/studies/")
    grids = st.grids(cfg)
    names = {g.name for g in grids}
    for g in grids:
        for point in g.points[:2]:
            assert set(point) == set(g.axes)
            for m in g.methods(cfg, point):
                assert (m.unit in units) if m.unit else (m.solver in fam.solvers), m
            batch = g.make_set(cfg, point)
            again = g.make_set(cfg, point)  # deterministic
            assert all((x == y).all() for x, y in zip(batch.to_numpy().values(), again.to_numpy().values()))
    for spec in [*st.tables(cfg), *st.figures(cfg)]:
        assert spec.grid in names and spec.metric in fam.metrics, spec


def test_gmm_step_shares_one_sample_size_and_pads_nothing():
    """n_per=step: every K of a step has the same N ~ U[n0/2, n0], no padding; n_per=task: one N per task."""
    from pipeline.core import rng

    fam = F.get("gmm")
    run = make_run("gmm", task={"n0": 16})
    sizes = set()
    for step in range(40):
        g = rng.make_generator(0, rng.TRAIN, step, 0)
        batches = fam.sample_step(run.task, fam.groups(run.task), 4, g, "cpu", step)
        ns = {b.N for b in batches.values()}
        assert len(ns) == 1 and all(bool(b.mask.all()) for b in batches.values())
        sizes |= ns
    assert sizes <= set(range(8, 17)) and len(sizes) > 5  # the law of N is kept: U[n0/2, n0]
    again = fam.sample_step(run.task, fam.groups(run.task), 4, rng.make_generator(0, rng.TRAIN, 3, 0), "cpu", 3)
    first = fam.sample_step(run.task, fam.groups(run.task), 4, rng.make_generator(0, rng.TRAIN, 3, 0), "cpu", 3)
    assert all(torch.equal(again[k].x, first[k].x) for k in again)
    per_task = make_run("gmm", task={"n0": 16, "n_per": "task"}).task
    b = fam.sample_step(per_task, [2], 64, rng.make_generator(0, rng.TRAIN, 0, 0), "cpu", 0)[2]
    assert b.N == 16 and len(set(b.n.tolist())) > 3  # padded to n0, sizes differ per task


def test_gmm_sample_size_warmup():
    """n0_warmup_steps: steps before it draw N ~ U[m/2, m], m = round(ratio * n0), in both n_per modes;
    from it on U[n0/2, n0]; off (0) it draws exactly what it drew without the keys."""
    fam = F.get("gmm")
    gen = lambda step: rng.make_generator(0, rng.TRAIN, step, 0)  # noqa: E731
    for n_per in ("step", "task"):
        t = make_run("gmm", task={"n0": 32, "n0_warmup_steps": 10, "n0_warmup_ratio": 0.5, "n_per": n_per}).task
        early = [fam.sample_step(t, fam.groups(t), 8, gen(s), "cpu", s) for s in range(10)]
        late = [fam.sample_step(t, fam.groups(t), 8, gen(s), "cpu", s) for s in range(10, 30)]
        n_early = {int(n) for bs in early for b in bs.values() for n in b.n}
        n_late = {int(n) for bs in late for b in bs.values() for n in b.n}
        assert n_early <= set(range(8, 17)) and max(n_late) > 16 and n_late <= set(range(16, 33)), n_per
    off = make_run("gmm", task={"n0": 32}).task
    zero = make_run("gmm", task={"n0": 32, "n0_warmup_steps": 0, "n0_warmup_ratio": 0.25}).task
    a, b = (fam.sample_step(t, fam.groups(t), 4, gen(5), "cpu", 5) for t in (off, zero))
    assert all(torch.equal(a[k].x, b[k].x) for k in a)


def test_gmm_sample_size_warmup_linear():
    """n0_warmup_shape linear: N0 rises from round(ratio * n0) at step 0 to n0 at n0_warmup_steps
    (never above n0, never below the start), each step's N ~ U[N0/2, N0]."""
    from pipeline.families.gmm.config import n0_at

    fam = F.get("gmm")
    t = make_run("gmm", task={"n0": 128, "n0_warmup_steps": 100, "n0_warmup_ratio": 0.25,
                              "n0_warmup_shape": "linear"}).task
    n0s = [n0_at(t, s) for s in range(0, 130)]
    assert n0s[0] == 32 and n0s[50] == 80 and n0s[99] < 128 and set(n0s[100:]) == {128}
    assert all(a <= b for a, b in zip(n0s, n0s[1:]))  # monotone
    for s in (0, 50, 99):
        bs = fam.sample_step(t, fam.groups(t), 4, rng.make_generator(0, rng.TRAIN, s, 0), "cpu", s)
        n = next(iter(bs.values())).N
        assert n0s[s] // 2 <= n <= n0s[s], (s, n)


def test_precision_auto_resolves_per_device():
    from pipeline.core.module import resolve_precision

    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # an explicit choice is kept
    assert resolve_precision("auto", "cpu") == "32-true"  # measured slower on CPUs (README)
