"""Sweep files: malformed ones rejected with one line naming the file and the key (CLI exit 2,
before Ray starts); a sweep names its study (and unit), its keys are the keys of that network's
run (task.*, model.*, train.*) and its default metric is the family's monitor; the shipped specs
(and their commented cluster grids) validate; the Tune reporting callback checkpoints every
ckpt_every steps and its checkpoint resumes exactly. No Ray instance is started here."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core import plan as P
from pipeline.core.config import RunConfig, load
from pipeline.tuning import spec as S
from tests.conftest import make_run

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["depth", "width", "heads", "sample_size"]

VALID = {
    "name": "t",
    "study": "tgmm",
    "base": {"task.ks": [2, 3], "task.n0": 16, "model.n_embd": 16, "model.n_head": 2, "train.steps": 20,
             "train.ckpt_every": 10, "train.val_every": 10, "train.warmup_steps": 1, "train.accelerator": "cpu"},
    "params": {"model.n_layer": {"grid": [1, 2]}},
    "seeds": [0],
    "metric": "val/l2",
    "mode": "min",
    "resources": {"cpu": 1, "gpu": 0},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one intra-op thread is fastest, and much faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cfg():
    return load(REPO / "params.yaml")


@pytest.fixture(scope="module")
def paper_cfg():
    return load(REPO / "params.yaml", profile="paper")


def _write(tmp_path: Path, data, name="bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def _mutate(**changes) -> dict:
    d = copy.deepcopy(VALID)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return d


_DROP = object()

# (id, spec dict or raw text, key the message must name, words it must contain)
NOT_A_RUN_KEY = "not a key of the study's runs (task.*, model.*, train.*)"
MALFORMED = [
    ("unknown-top-key", _mutate(sweeps=3), "sweeps", "unknown key"),
    ("typo-top-key-suggests", _mutate(metrc="val/l2"), "metrc", "did you mean metric"),
    ("old-d-key", _mutate(d=2), "d", "unknown key (allowed: name, description, study, unit"),
    ("no-study", _mutate(study=_DROP), "study", "None: a sweep names its study (choose one of: "
     + ", ".join(__import__("pipeline.studies", fromlist=["names"]).names()) + ")"),
    ("unknown-study", _mutate(study="tgm"), "study", "'tgm': a sweep names its study"),
    ("unknown-unit", _mutate(unit="d3"), "unit", "'d3' is not a network of study tgmm (choose one of: d2, d8)"),
    ("unit-of-another-study", _mutate(unit="n0_32"), "unit", "'n0_32' is not a network of study tgmm"),
    ("unit-not-a-name", _mutate(unit=["d2"]), "unit", "is not a network of study tgmm"),
    ("param-not-a-run-key", _mutate(params={"model.n_layers": {"grid": [1, 2]}}), "params.model.n_layers",
     f"{NOT_A_RUN_KEY} (did you mean model.n_layer?)"),
    ("param-is-a-section", _mutate(params={"model": {"grid": [1]}}), "params.model", NOT_A_RUN_KEY),
    ("param-is-a-study-key", _mutate(params={"tgmm.n_tasks": {"grid": [8, 16]}}), "params.tgmm.n_tasks",
     NOT_A_RUN_KEY),
    ("base-key-not-a-run-key", _mutate(base={**VALID["base"], "train.stepz": 3}), "base.train.stepz",
     f"{NOT_A_RUN_KEY} (did you mean train.steps?)"),
    ("old-dims-key", _mutate(base={**VALID["base"], "task.dims": [2]}), "base.task.dims",
     f"{NOT_A_RUN_KEY} (did you mean task.d?)"),
    ("old-batch-key", _mutate(base={**VALID["base"], "train.batch_per_k": 8}), "base.train.batch_per_k",
     "(did you mean train.batch_size?)"),
    ("top-level-params-key", _mutate(base={**VALID["base"], "out_dir": "x"}), "base.out_dir", NOT_A_RUN_KEY),
    ("other-family-key", _mutate(base={**VALID["base"], "task.n_points": 11}), "base.task.n_points", NOT_A_RUN_KEY),
    ("empty-grid", _mutate(params={"model.n_layer": {"grid": []}}), "params.model.n_layer.grid", "empty grid"),
    ("non-list-grid", _mutate(params={"model.n_layer": {"grid": 3}}), "params.model.n_layer.grid", "expected a list"),
    ("duplicate-grid-values", _mutate(params={"model.n_layer": {"grid": [1, 1]}}), "params.model.n_layer.grid",
     "distinct"),
    ("unknown-kind", _mutate(params={"model.n_layer": {"choice": [1, 2]}}), "params.model.n_layer", "unknown kind"),
    ("two-kinds", _mutate(params={"model.n_layer": {"grid": [1], "values": [2]}}), "params.model.n_layer",
     "exactly one of"),
    ("no-params", _mutate(params={}), "params", "non-empty mapping"),
    ("uniform-on-int-key", _mutate(params={"model.n_layer": {"uniform": [1, 4]}}), "params.model.n_layer.uniform",
     "not a float"),
    ("loguniform-nonpositive", _mutate(params={"train.lr": {"loguniform": [0, 0.01]}}),
     "params.train.lr.loguniform", "low must be > 0"),
    ("range-reversed", _mutate(params={"train.lr": {"uniform": [0.01, 0.001]}}), "params.train.lr.uniform",
     "low must be < high"),
    ("randint-floats", _mutate(params={"model.n_layer": {"randint": [1.5, 4]}}), "params.model.n_layer.randint",
     "expected integers"),
    ("grid-value-params-rejects", _mutate(base={k: v for k, v in VALID["base"].items() if k != "model.n_head"},
                                          params={"model.n_head": {"grid": [2, 3]}}), "params",
     "trial {model.n_head=3}: model.n_head: 3 does not divide model.n_embd=16"),
    ("grid-value-bad-type", _mutate(params={"model.n_layer": {"grid": [1, "two"]}}), "params",
     "model.n_layer: expected an integer"),
    ("grid-value-family-rejects", _mutate(base={k: v for k, v in VALID["base"].items() if k != "task.n0"},
                                          params={"task.n0": {"grid": [16, 4]}}), "params",
     "trial {task.n0=4}: task.n0: must be >= 2*max(task.ks)=6"),
    ("base-value-rejected", _mutate(base={**VALID["base"], "model.n_head": 3}), "base", "model.n_head: 3 does not divide"),
    ("key-in-base-and-params", _mutate(base={**VALID["base"], "model.n_layer": 2}), "params.model.n_layer",
     "also set in base"),
    ("seed-is-managed", _mutate(params={"seed": {"grid": [0, 1]}}), "params.seed", "use the top-level `seeds`"),
    ("family-is-managed", _mutate(base={**VALID["base"], "family": "linreg"}), "base.family", "set by the study"),
    ("name-is-managed", _mutate(base={**VALID["base"], "name": "x"}), "base.name", "set by the sweep"),
    ("bad-mode", _mutate(mode="minimize"), "mode", "choose one of: min, max"),
    ("metric-not-produced", _mutate(metric="val/accuracy"), "metric", "not produced by training"),
    ("metric-of-another-family", _mutate(metric="val/mse"), "metric",
     "'val/mse' is not produced by training this run (choose one of: val/l2, train/loss, val/l2/K=2"),
    ("metric-K-not-trained", _mutate(metric="val/l2/K=5"), "metric", "train/l2/K=3)"),
    ("metric-not-a-string", _mutate(metric=3), "metric", "expected a metric name"),
    ("negative-num-samples", _mutate(num_samples=-1), "num_samples", "must be >= 1"),
    ("zero-max-concurrent", _mutate(max_concurrent=0), "max_concurrent", "must be >= 1"),
    ("float-num-samples", _mutate(num_samples=1.5), "num_samples", "expected an integer"),
    ("empty-seeds", _mutate(seeds=[]), "seeds", "non-empty list"),
    ("negative-seed", _mutate(seeds=[0, -1]), "seeds", ">= 0"),
    ("bad-name", _mutate(name="a b/c"), "name", "letters"),
    ("bad-scheduler-type", _mutate(scheduler={"type": "hyperband"}), "scheduler.type", "not supported"),
    ("scheduler-unknown-key", _mutate(scheduler={"type": "asha", "patience": 3}), "scheduler.patience", "unknown key"),
    ("scheduler-grace-after-end", _mutate(scheduler={"type": "asha", "grace_period": 50}), "scheduler.grace_period",
     "trial length (20 steps)"),
    ("scheduler-bad-reduction", _mutate(scheduler={"type": "asha", "reduction_factor": 1}),
     "scheduler.reduction_factor", "> 1"),
    ("resources-unknown-key", _mutate(resources={"cpu": 1, "tpu": 1}), "resources.tpu", "unknown key"),
    ("resources-zero-cpu", _mutate(resources={"cpu": 0}), "resources.cpu", "> 0"),
    ("resources-two-gpus", _mutate(resources={"cpu": 1, "gpu": 2}), "resources.gpu", "at most 1"),
    ("gpu-accelerator-without-gpu", _mutate(base={**VALID["base"], "train.accelerator": "gpu"}),
     "train.accelerator", "needs resources.gpu > 0"),
    ("ddp-in-trial", _mutate(base={**VALID["base"], "train.devices": 2, "train.strategy": "ddp"}),
     "train.devices", "one device"),
    ("val-after-ckpt", _mutate(base={**VALID["base"], "train.val_every": 20, "train.steps": 40}),
     "train.val_every", "<= train.ckpt_every"),
    ("steps-not-multiple-of-val", _mutate(base={**VALID["base"], "train.steps": 25}), "train.steps",
     "multiple of train.val_every"),
    ("not-yaml", "params: [1, 2\n", "", "not valid YAML"),
    ("top-level-list", "- 1\n- 2\n", "", "expected a mapping"),
]


@pytest.mark.parametrize("data,key,words", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_spec_one_line_error(tmp_path, cfg, data, key, words):
    path = _write(tmp_path, data)
    with pytest.raises(S.SpecError) as e:
        S.load_spec(path, cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    if key:
        assert f"{key}:" in msg, msg
    assert words in msg, msg


def test_missing_file(tmp_path, cfg):
    with pytest.raises(S.SpecError, match="sweep file not found"):
        S.load_spec(tmp_path / "nope.yaml", cfg)


def test_resources_beyond_machine(tmp_path, cfg):
    spec = S.load_spec(_write(tmp_path, _mutate(resources={"cpu": 4096})), cfg)
    with pytest.raises(S.SpecError, match=r"resources\.cpu: 4096 CPUs per trial, but this machine has 2"):
        S.check_resources(spec, 2, 0, "this machine")
    spec = S.load_spec(_write(tmp_path, _mutate(resources={"cpu": 1, "gpu": 1})), cfg)
    with pytest.raises(S.SpecError, match=r"resources\.gpu: 1 GPU per trial, but this machine has no GPU"):
        S.check_resources(spec, 2, 0, "this machine")
    S.check_resources(spec, 2, 1, "this machine")  # fits


def test_valid_spec_and_trial_params(tmp_path, cfg):
    spec = S.load_spec(_write(tmp_path, _mutate(seeds=[0, 1], num_samples=2)), cfg)
    assert spec.param_keys == ["model.n_layer"] and spec.n_trials() == 2 * 2 * 2
    assert (spec.study, spec.unit, spec.family, spec.metric) == ("tgmm", "d2", "gmm", "val/l2")
    # every trial starts from the unit's run as the plan resolves it (the network `dvc repro` trains)
    planned = P.resolve(cfg).run_of("tgmm", "d2").to_dict()
    assert spec.run == {k: v for k, v in planned.items() if k not in ("name", "group")}
    p = S.trial_params(spec.run, spec.base, {"model.n_layer": 2}, 1)
    run = RunConfig.from_dict(p)
    assert (run.family, run.model.n_layer, run.seed, run.task.d, run.task.ks, run.task.n0, run.train.steps) == \
        ("gmm", 2, 1, 2, [2, 3], 16, 20)
    assert run.train.lr == cfg.train.lr and run.task.k_embd == cfg.task["gmm"].k_embd  # not in base: the study's
    trial = S.trial_run(spec, {"model.n_layer": 2}, 1, "abc12")
    assert trial.identity() == run.identity()
    assert (trial.name, trial.group) == ("t-abc12", S.sweep_group("t")) == ("t-abc12", "sweep-t")
    # nested base is the same as dotted base
    nested = _mutate(base={"task": {"ks": [2, 3], "n0": 16}, "model": {"n_embd": 16, "n_head": 2},
                           "train": {"steps": 20, "ckpt_every": 10, "val_every": 10, "warmup_steps": 1,
                                     "accelerator": "cpu"}})
    assert S.load_spec(_write(tmp_path, nested, "n.yaml"), cfg).base == spec.base
    # the default metric is the family's monitor
    assert S.load_spec(_write(tmp_path, _mutate(metric=_DROP), "m.yaml"), cfg).metric == "val/l2"


def test_unit_picks_the_network(tmp_path, cfg):
    """`unit` names one of the study's networks: its overrides (d, a backbone) are every trial's."""
    spec = S.load_spec(_write(tmp_path, _mutate(unit="d8")), cfg)
    assert spec.unit == "d8" and spec.run["task"]["d"] == 8
    assert S.trial_run(spec, {"model.n_layer": 1}, 0).task.d == 8
    data = _mutate(study="ablation", unit="mamba2", base={k: v for k, v in VALID["base"].items()
                                                           if k not in ("model.n_head", "model.n_embd")})
    spec = S.load_spec(_write(tmp_path, data, "a.yaml"), cfg)
    assert (spec.family, spec.run["model"]["backbone"]) == ("gmm", "mamba2")
    assert spec.run["model"] == P.resolve(cfg).run_of("ablation", "mamba2").to_dict()["model"]
    assert S.trial_run(spec, {"model.n_layer": 2}, 0).model.backbone == "mamba2"


LINREG_BASE = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "train.steps": 20, "train.batch_size": 4,
               "train.ckpt_every": 10, "train.val_every": 10, "train.warmup_steps": 1, "train.accelerator": "cpu",
               "task.curriculum_every": 5}


def test_linreg_sweep_defaults_to_its_monitor(tmp_path, cfg):
    """A sweep of a linreg-family study: its keys are linreg run keys, its default metric val/mse."""
    data = {"name": "lr", "study": "linreg", "base": dict(LINREG_BASE),
            "params": {"train.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "task.n_points": {"grid": [7, 11]}},
            "seeds": [0, 1], "num_samples": 2}
    spec = S.load_spec(_write(tmp_path, data, "lr.yaml"), cfg)
    assert (spec.study, spec.unit, spec.family, spec.metric, spec.mode) == ("linreg", "main", "linreg", "val/mse", "min")
    assert spec.n_trials() == 2 * 2 * 2
    run = S.trial_run(spec, {"train.lr": 3e-3, "task.n_points": 7}, 1)
    assert (run.family, run.task.n_points, run.train.lr, run.train.steps, run.seed) == ("linreg", 7, 3e-3, 20, 1)
    assert run.model.position == "gpt2"  # the linreg study's own override, kept
    assert "val/mse" in S.produced_metrics(run) and "train/mse" in S.produced_metrics(run)
    assert not any("/K=" in m for m in S.produced_metrics(run))  # one read-out: no per-group metrics
    # a gmm metric or a gmm key is not one of a linreg run's
    for bad, key, words in [({"metric": "val/l2"}, "metric", "'val/l2' is not produced by training this run "
                             "(choose one of: val/mse, train/loss, train/mse)"),
                            ({"base": {**LINREG_BASE, "task.ks": [2, 3]}}, "base.task.ks", NOT_A_RUN_KEY),
                            ({"unit": "d2"}, "unit", "'d2' is not a network of study linreg (choose one of: main)")]:
        path = _write(tmp_path, {**data, **bad}, "bad_lr.yaml")
        with pytest.raises(S.SpecError) as e:
            S.load_spec(path, cfg)
        assert str(e.value).startswith(f"{path}: {key}: ") and words in str(e.value), str(e.value)
    # the linreg curriculum and positions are checked per trial too
    bad = {**data, "params": {"task.n_points": {"grid": [7, 2000]}}}
    path = _write(tmp_path, bad, "bad_lr2.yaml")
    with pytest.raises(S.SpecError, match=r"params: trial \{task.n_points=2000\}: model.max_len: 1024 is shorter") as e:
        S.load_spec(path, cfg)
    assert "\n" not in str(e.value)


def test_param_space(tmp_path, cfg):
    from ray import tune

    from pipeline.tuning.runner import param_space

    data = _mutate(params={"model.n_layer": {"randint": [1, 3]}, "train.lr": {"loguniform": [1e-4, 1e-2]},
                           "model.position": {"values": ["set", "gpt2"]}}, num_samples=4, seeds=[0, 1])
    spec = S.load_spec(_write(tmp_path, data), cfg)
    space = param_space(spec)
    assert space["seed"] == tune.grid_search([0, 1])
    assert (space["model.n_layer"].lower, space["model.n_layer"].upper) == (1, 4)  # inclusive high in the spec
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert spec.n_trials() == 8


def test_linreg_results_plot_its_monitor(tmp_path, cfg):
    """The results table and plots of a linreg sweep ranked by another metric: the family's monitor
    (val/mse) and the sweep's metric against the swept key, over seeds."""
    from pipeline.tuning import results as R

    data = {"name": "lr", "study": "linreg", "base": dict(LINREG_BASE), "metric": "train/loss",
            "params": {"train.lr": {"grid": [1.0e-3, 3.0e-3]}}, "seeds": [0, 1]}
    spec = S.load_spec(_write(tmp_path, data, "lr.yaml"), cfg)
    rows = [{"trial_id": f"t{i}", "train.lr": lr, "seed": seed, "status": "COMPLETED", "step": 20,
             "val/mse": 0.5 + i / 10, "train/loss": 0.9 - i / 10, "train/mse": 0.6}
            for i, (lr, seed) in enumerate([(1.0e-3, 0), (1.0e-3, 1), (3.0e-3, 0), (3.0e-3, 1)])]
    files = {f.name for f in R.write(rows, spec, tmp_path / "out")}
    assert {"results.csv", "results.json", "val_mse_vs_train.lr.png", "val_mse_vs_train.lr.csv",
            "train_loss_vs_train.lr.png"} <= files
    assert not any(f.startswith("val_l2") for f in files)
    table = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (table["study"], table["unit"], table["metric"], table["best"]["trial_id"]) == \
        ("linreg", "main", "train/loss", "t3")
    pts = (tmp_path / "out" / "val_mse_vs_train.lr.csv").read_text().splitlines()
    assert pts[0] == "train_lr,series,panel,val_mse,low,high,n" and len(pts) == 3  # one point per lr, n = 2 seeds


def test_scheduler_counts_the_trials_steps(tmp_path, cfg):
    """ASHA's max_t defaults to the trials' train.steps: the study's run's (linreg overrides the base
    `train`), or the longest of base/params."""
    from pipeline.tuning.runner import build_scheduler

    base = {k: v for k, v in LINREG_BASE.items() if k not in ("train.steps", "train.ckpt_every", "train.val_every")}
    data = {"study": "linreg", "base": {**base, "train.ckpt_every": 500, "train.val_every": 500},
            "params": {"train.lr": {"values": [1.0e-3, 3.0e-3]}}, "scheduler": {"type": "asha", "grace_period": 500}}
    spec = S.load_spec(_write(tmp_path, data, "asha.yaml"), cfg)
    steps = P.resolve(cfg).run_of("linreg", "main").train.steps
    assert steps != cfg.train.steps and build_scheduler(spec, cfg)._max_t == steps
    data = {**data, "params": {"train.steps": {"grid": [1000, 1500]}}}
    assert build_scheduler(S.load_spec(_write(tmp_path, data, "asha2.yaml"), cfg), cfg)._max_t == 1500


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs_validate(name, cfg):
    spec = S.load_spec(REPO / "sweeps" / f"{name}.yaml", cfg)
    assert spec.name == name and (spec.study, spec.unit, spec.metric) == ("tgmm", "d2", "val/l2")
    assert spec.resources == {"cpu": 1, "gpu": 0}
    assert 3 <= spec.n_trials() <= 8
    run = S.trial_run(spec, {}, 0)
    assert run.train.steps <= 400 and run.task.ks == [2, 3] and run.train.accelerator == "cpu"
    grid = {p.key: list(p.args) for p in spec.params}
    if name == "sample_size":
        assert grid == {"task.n0": [32, 64, 128]}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cluster_grids_validate(tmp_path, paper_cfg, name):
    """The commented paper-scale grid at the end of each shipped spec is a valid spec too."""
    text = (REPO / "sweeps" / f"{name}.yaml").read_text().splitlines()
    start = next(i for i, ln in enumerate(text) if ln.startswith("# name: "))
    body = "\n".join(ln[2:] for ln in text[start:] if ln.startswith("# "))
    path = _write(tmp_path, body, f"{name}_paper.yaml")  # what "copy to sweeps/<name>_paper.yaml" gives
    spec = S.load_spec(path, paper_cfg)
    assert spec.study == yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())["study"]
    assert spec.resources["gpu"] == 1 and spec.unit == "d8" and spec.run["task"]["d"] == 8
    assert spec.n_trials() >= 12 and S.trial_run(spec, {}, 0).train.accelerator == "gpu"


# ------------------------------------------------------------------------------ CLI

# Several CLI invocations in one fresh process (each `main(argv)` call with its own stdout/stderr),
# recording after each whether `ray` has been imported: one interpreter start instead of one per call.
PROBE = r"""
import contextlib, io, json, sys
from pipeline.__main__ import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = main(argv)
        except SystemExit as x:
            rc = x.code
    out.append({"rc": rc, "stdout": o.getvalue(), "stderr": e.getvalue(), "ray": "ray" in sys.modules})
print(json.dumps(out))
"""

CLI_BAD = {  # id: (sweep file, the key the one-line error names)
    "unknown-run-key": (_mutate(params={"model.n_layers": {"grid": [1]}}), "params.model.n_layers"),
    "unknown-study": (_mutate(study="nope"), "study"),
    "too-many-cpus": (_mutate(resources={"cpu": 4096}), "resources.cpu"),
    "gpu-on-cpu-machine": (_mutate(resources={"cpu": 1, "gpu": 1}), "resources.gpu"),
}
CLI_FLAGS = {
    "check": ["sweep", "sweeps/depth.yaml", "--check"],
    "max-concurrent-0": ["sweep", "sweeps/depth.yaml", "--max-concurrent", "0"],
    "resume-and-fresh": ["sweep", "sweeps/depth.yaml", "--resume", "--fresh"],
    # a --set that makes the shipped spec invalid is caught against the overridden params
    "set-ddp": ["--set", "train.devices=2", "--set", "train.strategy=ddp", "sweep", "sweeps/heads.yaml", "--check"],
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    """Every CLI case above, run in one fresh process on params.yaml with only the tgmm study listed
    (the shipped sweeps' study; the ablation's matched widths would only add seconds)."""
    root = tmp_path_factory.mktemp("cli")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({**data, "studies": ["tgmm"]}))
    cases = {k: ["sweep", str(_write(root, spec, f"{k}.yaml"))] for k, (spec, _) in CLI_BAD.items()}
    cases.update(CLI_FLAGS)
    (root / "t").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(root / "t"))
    argvs = [["--params", str(params), *argv] for argv in cases.values()]
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    results = dict(zip(cases, json.loads(r.stdout.strip().splitlines()[-1])))
    for res in results.values():
        res["ray_dir"] = (root / "t" / "ray").exists()
    return {"root": root, **results}


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_exits_2_with_one_line_before_ray(cli_runs, case):
    if case == "gpu-on-cpu-machine" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r, key = cli_runs[case], CLI_BAD[case][1]
    assert r["rc"] == 2, r["stderr"]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1, r["stderr"]
    assert lines[0].startswith(f"error: {cli_runs['root'] / case}.yaml: {key}:"), lines[0]
    assert not r["ray"]              # Ray was never imported, let alone started
    assert not r["ray_dir"]


def test_cli_check_ok_and_bad_flags(cli_runs):
    r = cli_runs["check"]
    assert r["rc"] == 0, r["stderr"]
    assert "sweeps/depth.yaml: ok (6 trials" in r["stdout"] and "metric val/l2 min" in r["stdout"]
    r = cli_runs["max-concurrent-0"]
    assert r["rc"] == 2 and r["stderr"].strip() == "error: --max-concurrent: must be >= 1, got 0"
    r = cli_runs["resume-and-fresh"]
    assert r["rc"] == 2 and "exclude each other" in r["stderr"]
    r = cli_runs["set-ddp"]
    assert r["rc"] == 2 and r["stderr"].startswith("error: sweeps/heads.yaml: base: train.devices: "), r["stderr"]
    assert not any(cli_runs[k]["ray"] for k in CLI_FLAGS)  # --check and flag errors import no Ray either


# ------------------------------------------------------------------------------ the reporting callback

class _FakeTune:
    """Stands in for ray.tune.report / get_checkpoint: keeps every report and a copy of its checkpoint."""

    def __init__(self, root: Path, restore_from: Path | None = None):
        self.root, self.reports, self.restore_from = root, [], restore_from

    def report(self, metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:
            kept = self.root / f"ckpt{len(self.reports)}"
            shutil.copytree(checkpoint.path, kept)
        self.reports.append((dict(metrics), kept))

    def get_checkpoint(self):
        from ray.tune import Checkpoint

        return Checkpoint.from_directory(str(self.restore_from)) if self.restore_from else None


def test_reporter_checkpoints_every_ckpt_every_and_resumes_exactly(tmp_path, monkeypatch):
    import ray.tune

    from pipeline.core.fingerprint import fingerprint
    from pipeline.core.train import train
    from pipeline.tuning import trial as T

    run = make_run("gmm", train={"steps": 12, "ckpt_every": 4, "val_every": 2})
    fp = fingerprint(run)
    fake = _FakeTune(tmp_path)
    monkeypatch.setattr(ray.tune, "report", fake.report)
    (tmp_path / "a").mkdir()
    rep = T.TuneReporter(every=4, max_steps=12, metric="val/l2", workdir=tmp_path / "a", fingerprint=fp)
    full = train(run, tmp_path / "a", callbacks=[rep], track=False, progress_bar=False)
    ckpt_steps = [m["step"] for m, c in fake.reports if c is not None]
    all_steps = [m["step"] for m, _ in fake.reports]
    assert ckpt_steps == [4, 8]                   # every ckpt_every, the last step (12) left to the trial
    assert all_steps == [2, 4, 6, 8, 10]          # + every validation
    assert all("val/l2" in m and "val/l2/K=3" in m and m["final"] == 0 for m, _ in fake.reports)
    assert not list((tmp_path / "a").glob(".tune-ckpt-*"))  # temporary checkpoint dirs cleaned up
    kept = dict((m["step"], c) for m, c in fake.reports if c is not None)[8]
    assert sorted(p.name for p in kept.iterdir()) == ["FINGERPRINT", "last.ckpt"]
    assert (kept / "FINGERPRINT").read_text().strip() == fp
    assert torch.load(kept / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8

    # A retried trial: Tune hands the step-8 checkpoint back; the trial restores it and train() resumes.
    fake2 = _FakeTune(tmp_path / "r", restore_from=kept)
    (tmp_path / "r").mkdir()
    monkeypatch.setattr(ray.tune, "get_checkpoint", fake2.get_checkpoint)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.ckpt").write_text("stale local state, never reported")
    assert T._restore_checkpoint(tmp_path / "b" / "checkpoints", fp) == 8
    res = train(run, tmp_path / "b", track=False, progress_bar=False)
    assert res.resumed_from_step == 8
    a, b = full.net.state_dict(), res.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)           # bitwise the uninterrupted run
    # Without a Tune checkpoint a trial starts afresh, whatever is on the local disk.
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    assert T._restore_checkpoint(tmp_path / "b" / "checkpoints", fp) is None
    assert not (tmp_path / "b" / "checkpoints").exists()


# ------------------------------------------------------------------------------ a stored sweep

def test_stored_sweep_needs_resume_or_fresh_and_matching_params(tmp_path):
    """What the runner decides before Ray starts when a sweep of that name is already stored."""
    from pipeline.tuning import runner as R

    def params(*over):
        return load(REPO / "params.yaml", [f"out_dir={tmp_path / 'out'}", *over])

    c = params()
    path = _write(tmp_path, VALID, "t.yaml")
    spec = S.load_spec(path, c)
    exp = Path(R.experiment_path(c, spec, None))
    assert exp == tmp_path / "out" / "sweeps" / "t" / "ray" / "t"
    assert R._check_previous(spec, c, str(exp), resume=True, fresh=False) is False  # nothing stored: new sweep
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    sdir = R.sweep_dir(c, spec)
    (sdir / "sweep.json").write_text(json.dumps({"fingerprint": S.fingerprint(spec)}))
    with pytest.raises(S.SpecError, match="already stored .* pass --resume to continue it or --fresh"):
        R._check_previous(spec, c, str(exp), resume=False, fresh=False)
    assert R._check_previous(spec, c, str(exp), resume=True, fresh=False) is True
    # other params for the study's run than the stored sweep's: no silent mix
    c2 = params("train.lr=0.5")
    with pytest.raises(S.SpecError, match="changed since the sweep"):
        R._check_previous(S.load_spec(path, c2), c2, str(exp), resume=True, fresh=False)
    c3 = params("tgmm.model={mlp_ratio: 2}")  # the study's own override of its networks counts too
    with pytest.raises(S.SpecError, match="changed since the sweep"):
        R._check_previous(S.load_spec(path, c3), c3, str(exp), resume=True, fresh=False)
    # params that are not the trained run's (another study, the evaluation) do not count
    c4 = params("linreg.n_tasks=7", "eval.chunk_size=8")
    assert R._check_previous(S.load_spec(path, c4), c4, str(exp), resume=True, fresh=False) is True
    # execution knobs do not count
    spec.max_concurrent, spec.max_failures = 7, 0
    assert R._check_previous(spec, c, str(exp), resume=True, fresh=False) is True
    (sdir / "trials" / "x").mkdir(parents=True)
    assert R._check_previous(spec, c, str(exp), resume=False, fresh=True) is False
    assert not exp.exists() and not (sdir / "trials").exists()
