"""Typed parameters: params.yaml and profiles validate; malformed configs are rejected with one line
naming the key; the CLI exits 2 before any compute; --set overrides; fingerprints."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core import config as C
from pipeline.core.config import Config, ConfigError, deep_merge, from_dict, load, parse_override

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PROFILES = sorted(C.PROFILES_DIR.glob("*.yaml"))


def _base() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def _assert_one_line(msg: str, key: str):
    assert "\n" not in msg.strip(), f"message spans several lines: {msg!r}"
    assert key in msg, f"{key!r} not named in {msg!r}"


# ------------------------------------------------------------------------------ valid files

def test_params_yaml_loads_and_validates():
    cfg = load(PARAMS)
    assert isinstance(cfg, Config)
    raw = _base()
    assert cfg.seed == raw["seed"]
    assert cfg.section("tgmm").dims == raw["tgmm"]["dims"] and cfg.task["gmm"].ks == raw["task"]["gmm"]["ks"]
    assert cfg.studies == raw["studies"]
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(float(raw["train"]["lr"]))
    assert isinstance(cfg.baselines["gmm"].em_tol, float)  # "1.0e-7" style values become floats
    # Round trip: the dict form validates to the same config.
    assert from_dict(cfg.to_dict()) == cfg


def test_defaults_validate():
    """`studies` is the one required key; every other section defaults to its dataclass defaults."""
    cfg = from_dict({"studies": ["tgmm", "linreg"]})
    assert cfg.model == C.ModelConfig() and cfg.train == C.TrainConfig()
    assert cfg.task["gmm"].ks == [2, 3, 4, 5] and cfg.task["linreg"].d == 5
    with pytest.raises(ConfigError, match="studies: missing"):
        from_dict({"seed": 1})


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_overlays_validate(profile):
    over = yaml.safe_load(profile.read_text()) or {}
    assert isinstance(over, dict)
    cfg = load(PARAMS, profile=profile.stem)
    assert cfg == from_dict(deep_merge(_base(), over))


def test_unknown_profile_rejected():
    with pytest.raises(ConfigError, match="no-such-profile"):
        load(PARAMS, profile="no-such-profile")


def test_tiny_cfg_fixture(tiny_cfg, tmp_path):
    assert tiny_cfg.section("tgmm").dims == [2] and tiny_cfg.task["gmm"].ks == [2, 3]
    assert tiny_cfg.train.accelerator == "cpu" and tiny_cfg.wandb.mode == "disabled"
    assert Path(tiny_cfg.out_dir) == tmp_path / "outputs"


# ------------------------------------------------------------------------------ malformed

BAD = [
    ({"foo": 1}, "foo"),                                          # unknown top-level key
    ({"model": {"n_layers": 2}}, "model.n_layers"),                # unknown nested key (typo)
    ({"train": {"steps": "many"}}, "train.steps"),                 # string for an int
    ({"train": {"steps": True}}, "train.steps"),                   # bool for an int
    ({"train": {"steps": 1.5}}, "train.steps"),                    # non-integral float for an int
    ({"train": {"steps": None}}, "train.steps"),                   # null for an int
    ({"train": {"steps": 0}}, "train.steps"),                      # below min
    ({"model": {"n_head": 3}}, "model.n_head"),                    # does not divide n_embd=64
    ({"task": {"gmm": {"ks": [1, 2]}}}, "task.gmm.ks"),            # K=1
    ({"task": {"gmm": {"ks": [2, 9]}}}, "task.gmm.ks"),            # K above max
    ({"tgmm": {"dims": [0, 2]}}, "tgmm.dims"),                     # d=0
    ({"tgmm": {"dims": [1]}}, "task.d"),                           # d=1 with K up to 5 (named with its study)
    ({"task": {"gmm": {"n0": 9}}}, "task.n0"),                     # < 2*max(ks)=10
    ({"task": {"nosuch": {}}}, "task.nosuch"),                     # unknown family
    ({"task": {"linreg": {"n_points": 0}}}, "task.linreg.n_points"),
    ({"linreg": {"model": {"position": "set"}}}, "model.position"),  # linreg needs a causal model
    ({"linreg": {"train": {"stepz": 3}}}, "train.stepz"),          # a study's override with a typo
    ({"studies": []}, "studies"),                                  # nothing to run
    ({"studies": ["tgmm", "nosuch"]}, "studies[1]"),               # unknown study
    ({"train": {"lr": -1e-3}}, "train.lr"),                        # negative
    ({"train": {"lr": 0}}, "train.lr"),                            # zero (gt=0)
    ({"train": {"lr": float("nan")}}, "train.lr"),                 # NaN
    ({"train": {"lr": float("inf")}}, "train.lr"),                 # inf
    ({"train": {"lr": "fast"}}, "train.lr"),                       # not a number
    ({"train": {"precision": "8-bit"}}, "train.precision"),        # not allowed
    ({"model": {"position": "rope"}}, "model.position"),           # not allowed
    ({"task": {"gmm": {"ks": []}}}, "task.gmm.ks"),                # empty
    ({"task": {"gmm": {"ks": [2, 3, 3]}}}, "task.gmm.ks"),         # duplicate
    ({"task": {"gmm": {"ks": "2,3"}}}, "task.gmm.ks"),             # not a list
    ({"model": {"dropout": 1.0}}, "model.dropout"),                # >= 1
    ({"model": {"dropout": -0.1}}, "model.dropout"),               # < 0
    ({"wandb": {"mode": "cloud"}}, "wandb.mode"),                  # not allowed
    ({"wandb": {"entity": 3}}, "wandb.entity"),                    # not a string
    ({"model": 3}, "model"),                                       # section as a scalar
    ({"train": [1, 2]}, "train"),                                  # section as a list
    ({"tgmm": {"n": 4}}, "tgmm.n"),                                # < 2*max(ks)
    ({"robustness": {"eval_n": [4, 8]}}, "robustness.eval_n[0]"),  # < 2*max(ks)
    ({"train": {"devices": 0}}, "train.devices"),                  # no devices
    ({"train": {"devices": "two"}}, "train.devices"),              # neither int nor 'auto'
    ({"train": {"devices": True}}, "train.devices"),               # bool
    ({"train": {"strategy": "ddp"}}, "train.strategy"),            # ddp with devices=1
    ({"train": {"warmup_steps": 5000}}, "train.warmup_steps"),     # >= steps
    ({"train": {"devices": 3}}, "train.batch_size"),               # 16 not divisible by 3
    ({"task": {"gmm": {"weight_low": 0.9}}}, "task.weight_low"),   # >= weight_high
    ({"task": {"gmm": {"max_cosine": 1.5}}}, "task.gmm.max_cosine"),  # above max
    ({"task": {"gmm": {"n0_warmup_ratio": 1.5}}}, "task.gmm.n0_warmup_ratio"),  # above 1
    ({"task": {"gmm": {"n0_warmup_steps": 10, "n0_warmup_ratio": 0.05}}}, "task.n0_warmup_ratio"),  # N0 6 < 10
    ({"task": {"gmm": {"anisotropic": "yes please"}}}, "task.gmm.anisotropic"),  # not a bool
    ({"seed": -1}, "seed"),                                        # negative seed
    ({"out_dir": 5}, "out_dir"),                                   # not a string
    ({"tgmm": {"methods": ["kmeans"]}}, "tgmm.methods"),           # unknown method
    ({"linreg": {"methods": ["lasso"]}}, "linreg.methods"),        # not a linreg solver
    ({"baselines": {"linreg": {"newton_alpha": "magic"}}}, "baselines.linreg.newton_alpha"),
    ({"ablation": {"variants": {"anisotropic": {}}}}, "ablation.variants.anisotropic"),  # reserved name
    ({"ablation": {"variants": {"x": {"backbone": "gru"}}}}, "ablation.variants.x.backbone"),
    ({"ablation": {"variants": {"a b": {}}}}, "ablation.variants.a b"),  # not a folder name
    ({"model": {"position": "gpt2", "max_len": 64}}, "model.max_len"),  # shorter than n0=128
]


@pytest.mark.parametrize("override,key", BAD, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD)])
def test_malformed_config_rejected(override, key):
    data = deep_merge(_base(), copy.deepcopy(override))
    with pytest.raises(ConfigError) as ei:
        from_dict(data, source="params.yaml")
    msg = str(ei.value)
    _assert_one_line(msg, key)
    assert msg.startswith("params.yaml: "), msg


def test_yaml_nan_rejected_from_file(tmp_path):
    raw = PARAMS.read_text()
    line = next(ln for ln in raw.splitlines() if ln.startswith("  lr: "))  # train.lr (the base section)
    text = raw.replace(line, "  lr: .nan", 1)
    assert ".nan" in text
    p = tmp_path / "params.yaml"
    p.write_text(text)
    assert math.isnan(yaml.safe_load(text)["train"]["lr"])
    with pytest.raises(ConfigError) as ei:
        load(p)
    _assert_one_line(str(ei.value), "train.lr")
    assert str(p) in str(ei.value)


def test_top_level_not_a_mapping(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as ei:
        load(p)
    _assert_one_line(str(ei.value), str(p))


def test_empty_file_is_rejected(tmp_path):
    """An empty params file is a mistake (a truncated copy, the wrong path), not "all defaults"."""
    p = tmp_path / "params.yaml"
    p.write_text("# nothing\n")
    with pytest.raises(ConfigError) as ei:
        load(p)
    _assert_one_line(str(ei.value), str(p))
    assert "empty" in str(ei.value)


# ------------------------------------------------------------------------------ --set overrides

def test_parse_override():
    lr = parse_override("train.lr=3e-4")["train"]["lr"]  # PyYAML (YAML 1.1) may keep "3e-4" a string
    assert float(lr) == 3e-4
    assert parse_override("task.gmm.ks=[2, 3]") == {"task": {"gmm": {"ks": [2, 3]}}}
    assert parse_override("seed=7") == {"seed": 7}
    assert parse_override("wandb.entity=null") == {"wandb": {"entity": None}}
    assert parse_override("study=a=b") == {"study": "a=b"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_overrides_are_type_parsed():
    cfg = load(PARAMS, ["train.lr=3e-4", "model.n_layer=2", "task.gmm.ks=[2,3]", "task.gmm.anisotropic=true",
                        "wandb.entity=me", "train.devices=auto", "model.dropout=0.1", "seed=11"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 2 and type(cfg.model.n_layer) is int
    assert cfg.task["gmm"].ks == [2, 3]
    assert cfg.task["gmm"].anisotropic is True
    assert cfg.wandb.entity == "me"
    assert cfg.train.devices == "auto"
    assert cfg.model.dropout == pytest.approx(0.1)
    assert cfg.seed == 11
    # Untouched keys keep params.yaml's values.
    assert cfg.model.n_embd == load(PARAMS).model.n_embd


def test_later_override_wins():
    assert load(PARAMS, ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize("override,key", [
    ("model.n_layers=2", "model.n_layers"),
    ("nosuch=1", "nosuch"),
    ("train.steps=many", "train.steps"),
    ("model.n_head=5", "model.n_head"),
])
def test_bad_override_rejected(override, key):
    with pytest.raises(ConfigError) as ei:
        load(PARAMS, [override])
    _assert_one_line(str(ei.value), key)


# ------------------------------------------------------------------------------ CLI

def _cli(args: list[str], cwd: Path, **extra_env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra_env}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _bad_params(tmp_path: Path, out_dir: Path, **override) -> Path:
    data = deep_merge(_base(), {"out_dir": str(out_dir), **override})
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _assert_cli_error(res: subprocess.CompletedProcess, *names: str):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:"), lines[0]
    for n in names:
        assert n in lines[0], (n, lines[0])


def test_cli_validate_ok(tmp_path):
    res = _cli(["--params", str(PARAMS), "validate"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_cli_validate_bad_key(tmp_path):
    p = _bad_params(tmp_path, tmp_path / "outputs", model={"n_head": 3})
    res = _cli(["--params", str(p), "validate"], tmp_path)
    _assert_cli_error(res, "model.n_head", str(p))


def test_cli_missing_params_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    res = _cli(["--params", str(missing), "validate"], tmp_path)
    _assert_cli_error(res, str(missing))


def test_cli_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("tgmm:\n  dims: [2, 8\n  ks: [2, 3]\n")
    res = _cli(["--params", str(p), "validate"], tmp_path)
    _assert_cli_error(res, str(p))


def test_cli_bad_override(tmp_path):
    res = _cli(["--params", str(PARAMS), "--set", "model.n_layers=2", "validate"], tmp_path)
    _assert_cli_error(res, "model.n_layers")
    res = _cli(["--params", str(PARAMS), "--set", "train.lr=3e-4", "--set", "seed=3", "validate"], tmp_path)
    assert res.returncode == 0, res.stderr


def test_cli_train_bad_config_fails_before_compute(tmp_path):
    out = tmp_path / "outputs"
    p = _bad_params(tmp_path, out, train={"precision": "8-bit"})
    res = _cli(["--params", str(p), "train", "--no-track"], tmp_path)
    _assert_cli_error(res, "train.precision")
    assert not out.exists(), list(out.rglob("*"))


def test_cli_train_bad_config_leaves_existing_outputs(tmp_path):
    out = tmp_path / "outputs"
    (out / "runs" / "tgmm-d2").mkdir(parents=True)
    keep = out / "runs" / "tgmm-d2" / "model.safetensors"
    keep.write_bytes(b"previous model")
    os.utime(keep, (1_000_000, 1_000_000))
    before = sorted(str(q.relative_to(out)) for q in out.rglob("*"))
    p = _bad_params(tmp_path, out, task={"gmm": {"ks": [2, 2]}})
    res = _cli(["--params", str(p), "train", "--no-track"], tmp_path)
    _assert_cli_error(res, "task.gmm.ks")
    assert sorted(str(q.relative_to(out)) for q in out.rglob("*")) == before
    assert keep.read_bytes() == b"previous model" and keep.stat().st_mtime == 1_000_000


def test_cli_train_unknown_run_fails_before_compute(tmp_path):
    out = tmp_path / "outputs"
    data = deep_merge(_base(), {"out_dir": str(out)})
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    res = _cli(["--params", str(p), "train", "--run", "tgmm-d7", "--no-track"], tmp_path)
    _assert_cli_error(res, "--run tgmm-d7", "tgmm-d2")
    assert not out.exists()
    res = _cli(["--params", str(p), "--study", "nosuch", "generate"], tmp_path)
    _assert_cli_error(res, "--study nosuch")


def test_cli_non_utf8_params_file(tmp_path):
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"seed: 0\n\xff\xfe\x00 not text\n")
    res = _cli(["--params", str(p), "validate"], tmp_path)
    _assert_cli_error(res, str(p))
