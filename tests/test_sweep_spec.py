"""Sweep files: malformed ones rejected with one line naming the file and the key (CLI exit 2,
before Ray starts); the shipped specs (and their commented cluster grids) validate; the Tune
reporting callback checkpoints every ckpt_every steps and its checkpoint resumes exactly.
No Ray instance is started here."""
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

from pipeline.config import from_dict, load
from pipeline.tuning import spec as S

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["depth", "width", "heads", "sample_size"]

VALID = {
    "name": "t",
    "d": 2,
    "base": {"task.ks": [2, 3], "task.n0": 16, "model.n_embd": 16, "model.n_head": 2, "train.steps": 20,
             "train.ckpt_every": 10, "train.val_every": 10, "train.warmup_steps": 1, "train.accelerator": "cpu"},
    "params": {"model.n_layer": {"grid": [1, 2]}},
    "seeds": [0],
    "metric": "val/l2",
    "mode": "min",
    "resources": {"cpu": 1, "gpu": 0},
}


@pytest.fixture(scope="module")
def cfg():
    return load(REPO / "params.yaml")


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
MALFORMED = [
    ("unknown-top-key", _mutate(sweeps=3), "sweeps", "unknown key"),
    ("typo-top-key-suggests", _mutate(metrc="val/l2"), "metrc", "did you mean metric"),
    ("param-not-in-params", _mutate(params={"model.n_layers": {"grid": [1, 2]}}), "params.model.n_layers",
     "not a params.yaml key (did you mean model.n_layer?)"),
    ("param-is-a-section", _mutate(params={"model": {"grid": [1]}}), "params.model", "not a params.yaml key"),
    ("base-key-not-in-params", _mutate(base={**VALID["base"], "train.stepz": 3}), "base.train.stepz",
     "not a params.yaml key"),
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
    ("base-value-rejected", _mutate(base={**VALID["base"], "model.n_head": 3}), "base", "model.n_head: 3 does not divide"),
    ("key-in-base-and-params", _mutate(base={**VALID["base"], "model.n_layer": 2}), "params.model.n_layer",
     "also set in base"),
    ("seed-is-managed", _mutate(params={"seed": {"grid": [0, 1]}}), "params.seed", "use the top-level `seeds`"),
    ("dims-is-managed", _mutate(base={**VALID["base"], "task.dims": [2]}), "base.task.dims", "top-level `d`"),
    ("bad-mode", _mutate(mode="minimize"), "mode", "choose one of: min, max"),
    ("metric-not-produced", _mutate(metric="val/accuracy"), "metric", "not produced by training"),
    ("metric-K-not-trained", _mutate(metric="val/l2/K=5"), "metric", "task.ks=[2, 3]"),
    ("negative-num-samples", _mutate(num_samples=-1), "num_samples", "must be >= 1"),
    ("zero-max-concurrent", _mutate(max_concurrent=0), "max_concurrent", "must be >= 1"),
    ("float-num-samples", _mutate(num_samples=1.5), "num_samples", "expected an integer"),
    ("empty-seeds", _mutate(seeds=[]), "seeds", "non-empty list"),
    ("negative-seed", _mutate(seeds=[0, -1]), "seeds", ">= 0"),
    ("bad-d", _mutate(d=0), "d", "positive integer"),
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
    p = S.trial_params(cfg.to_dict(), spec.base, {"model.n_layer": 2}, 1, spec.d, out_dir="/abs/out")
    c = from_dict(p)
    assert (c.model.n_layer, c.seed, c.task.dims, c.out_dir, c.train.steps) == (2, 1, [2], "/abs/out", 20)
    # nested base is the same as dotted base
    nested = _mutate(base={"task": {"ks": [2, 3], "n0": 16}, "model": {"n_embd": 16, "n_head": 2},
                           "train": {"steps": 20, "ckpt_every": 10, "val_every": 10, "warmup_steps": 1,
                                     "accelerator": "cpu"}})
    assert S.load_spec(_write(tmp_path, nested, "n.yaml"), cfg).base == spec.base


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


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs_validate(name, cfg):
    spec = S.load_spec(REPO / "sweeps" / f"{name}.yaml", cfg)
    assert spec.name == name
    assert spec.resources == {"cpu": 1, "gpu": 0}
    assert 3 <= spec.n_trials() <= 8
    c = from_dict(S.trial_params(cfg.to_dict(), spec.base, {}, 0, spec.d))
    assert c.train.steps <= 400 and c.task.ks == [2, 3] and c.train.accelerator == "cpu"
    grid = {p.key: list(p.args) for p in spec.params}
    if name == "sample_size":
        assert grid == {"task.n0": [32, 64, 128]}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cluster_grids_validate(tmp_path, name):
    """The commented paper-scale grid at the end of each shipped spec is a valid spec too."""
    text = (REPO / "sweeps" / f"{name}.yaml").read_text().splitlines()
    start = next(i for i, ln in enumerate(text) if ln.startswith("# name: "))
    body = "\n".join(ln[2:] for ln in text[start:] if ln.startswith("# "))
    path = _write(tmp_path, body, f"{name}_paper.yaml")
    spec = S.load_spec(path, load(REPO / "params.yaml", profile="paper"))
    assert spec.resources["gpu"] == 1 and spec.d == 8 and spec.n_trials() >= 12


# ------------------------------------------------------------------------------ CLI

PROBE = ("import sys; from pipeline.__main__ import main; rc = main(sys.argv[1:]); "
         "print('ray-imported' if 'ray' in sys.modules else 'no-ray'); sys.exit(rc)")


def _cli(args, tmp_path, **env):
    e = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path / "t"), **env)
    (tmp_path / "t").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("data,key", [
    (_mutate(params={"model.n_layers": {"grid": [1]}}), "params.model.n_layers"),
    (_mutate(params={"model.n_layer": {"grid": []}}), "params.model.n_layer.grid"),
    (_mutate(resources={"cpu": 4096}), "resources.cpu"),
    (_mutate(resources={"cpu": 1, "gpu": 1}), "resources.gpu"),
], ids=["unknown-param", "empty-grid", "too-many-cpus", "gpu-on-cpu-machine"])
def test_cli_exits_2_with_one_line_before_ray(tmp_path, data, key):
    if key == "resources.gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = _write(tmp_path, data)
    r = _cli(["sweep", str(path)], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {path}: {key}:"), lines[0]
    assert r.stdout.strip() == "no-ray"          # Ray was never imported, let alone started
    assert not (tmp_path / "t" / "ray").exists()


def test_cli_check_ok_and_bad_flags(tmp_path):
    r = _cli(["sweep", "sweeps/depth.yaml", "--check"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sweeps/depth.yaml: ok (6 trials" in r.stdout and r.stdout.strip().endswith("no-ray")
    r = _cli(["sweep", "sweeps/depth.yaml", "--max-concurrent", "0"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: --max-concurrent: must be >= 1, got 0"
    r = _cli(["sweep", "sweeps/depth.yaml", "--resume", "--fresh"], tmp_path)
    assert r.returncode == 2 and "exclude each other" in r.stderr
    # a --set that makes the shipped spec invalid is caught against the overridden params
    r = _cli(["--set", "train.devices=2", "--set", "train.strategy=ddp", "sweep", "sweeps/heads.yaml", "--check"],
             tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: sweeps/heads.yaml: base: train.devices: "), r.stderr


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


def _tiny(tmp_path, steps=20) -> dict:
    return {"seed": 0, "out_dir": str(tmp_path / "o"), "task": {"dims": [2], "ks": [2, 3], "n0": 16},
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "k_embd": 4},
            "train": {"steps": steps, "batch_per_k": 4, "warmup_steps": 1, "ckpt_every": 4, "val_every": 2,
                      "log_every": 1, "val_tasks": 4, "accelerator": "cpu"},
            "wandb": {"mode": "disabled"}}


def test_reporter_checkpoints_every_ckpt_every_and_resumes_exactly(tmp_path, monkeypatch):
    import ray.tune

    from pipeline.training.train import train, training_fingerprint
    from pipeline.tuning import trial as T

    cfg = from_dict(_tiny(tmp_path))
    fp = training_fingerprint(cfg, 2)
    fake = _FakeTune(tmp_path)
    monkeypatch.setattr(ray.tune, "report", fake.report)
    (tmp_path / "a").mkdir()
    rep = T.TuneReporter(every=4, max_steps=20, metric="val/l2", workdir=tmp_path / "a", fingerprint=fp)
    full = train(cfg, 2, tmp_path / "a", callbacks=[rep], track=False, progress_bar=False)
    ckpt_steps = [m["step"] for m, c in fake.reports if c is not None]
    all_steps = [m["step"] for m, _ in fake.reports]
    assert ckpt_steps == [4, 8, 12, 16]                      # every ckpt_every, the last step left to the trial
    assert all_steps == [2, 4, 6, 8, 10, 12, 14, 16, 18]     # + every validation
    assert all("val/l2" in m and "val/l2/K=3" in m and m["final"] == 0 for m, _ in fake.reports)
    assert not list((tmp_path / "a").glob(".tune-ckpt-*"))  # temporary checkpoint dirs cleaned up
    kept = dict((m["step"], c) for m, c in fake.reports if c is not None)[8]
    assert sorted(p.name for p in kept.iterdir()) == ["FINGERPRINT", "last.ckpt"]
    assert torch.load(kept / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8

    # A retried trial: Tune hands the step-8 checkpoint back; the trial restores it and train() resumes.
    fake2 = _FakeTune(tmp_path / "r", restore_from=kept)
    (tmp_path / "r").mkdir()
    monkeypatch.setattr(ray.tune, "get_checkpoint", fake2.get_checkpoint)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.ckpt").write_text("stale local state, never reported")
    assert T._restore_checkpoint(tmp_path / "b" / "checkpoints", fp) == 8
    res = train(cfg, 2, tmp_path / "b", track=False, progress_bar=False)
    assert res.resumed_from_step == 8
    a, b = full.net.state_dict(), res.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)           # bitwise the uninterrupted run
    # Without a Tune checkpoint a trial starts afresh, whatever is on the local disk.
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    assert T._restore_checkpoint(tmp_path / "b" / "checkpoints", fp) is None
    assert not (tmp_path / "b" / "checkpoints").exists()


# ------------------------------------------------------------------------------ a stored sweep

def test_stored_sweep_needs_resume_or_fresh_and_matching_params(tmp_path, cfg):
    """What the runner decides before Ray starts when a sweep of that name is already stored."""
    from pipeline.tuning import runner as R

    c = from_dict({**cfg.to_dict(), "out_dir": str(tmp_path / "out")})
    spec = S.load_spec(_write(tmp_path, VALID, "t.yaml"), c)
    exp = Path(R.experiment_path(c, spec, None))
    assert exp == tmp_path / "out" / "sweeps" / "t" / "ray" / "t"
    assert R._check_previous(spec, c, str(exp), resume=True, fresh=False) is False  # nothing stored: new sweep
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    sdir = R.sweep_dir(c, spec)
    (sdir / "sweep.json").write_text(json.dumps({"fingerprint": S.fingerprint(spec, c.to_dict())}))
    with pytest.raises(S.SpecError, match="already stored .* pass --resume to continue it or --fresh"):
        R._check_previous(spec, c, str(exp), resume=False, fresh=False)
    assert R._check_previous(spec, c, str(exp), resume=True, fresh=False) is True
    # other params than the stored sweep's: no silent mix
    c2 = from_dict({**c.to_dict(), "train": {**c.to_dict()["train"], "lr": 0.5}})
    with pytest.raises(S.SpecError, match="changed since the sweep"):
        R._check_previous(spec, c2, str(exp), resume=True, fresh=False)
    # execution knobs do not count
    spec.max_concurrent, spec.max_failures = 7, 0
    assert R._check_previous(spec, c, str(exp), resume=True, fresh=False) is True
    (sdir / "trials" / "x").mkdir(parents=True)
    assert R._check_previous(spec, c, str(exp), resume=False, fresh=True) is False
    assert not exp.exists() and not (sdir / "trials").exists()
