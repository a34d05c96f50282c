"""Shared fixtures: an isolated environment (no network, no home-directory writes) and tiny configs."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest

from pipeline.core.config import Config, RunConfig, from_dict

REPO = Path(__file__).resolve().parents[1]

_TRAIN = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "ckpt_every": 2, "val_every": 2, "log_every": 1,
          "val_tasks": 4, "accelerator": "cpu"}
TINY_PARAMS: dict = {
    "seed": 0,
    "studies": ["tgmm", "linreg"],
    "task": {"gmm": {"d": 2, "ks": [2, 3], "n0": 16, "k_embd": 4},
             "linreg": {"d": 3, "n_points": 7, "curriculum_every": 2, "dims_start": 2, "points_start": 3},
             "logreg": {"d": 3, "n_points": 8, "test_points": 8, "target_steps": 10},
             "pca": {"d": 4, "n_points": 8, "k": 2},
             "cluster": {"d": 2, "ks": [2, 3], "n_points": 12, "k_embd": 4},
             "mixreg": {"d": 3, "n_points": 8}},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16},
    "train": dict(_TRAIN),
    "tgmm": {"dims": [2], "n_tasks": 8, "n": 16, "probe_tasks": 32, "probe_fit_steps": 5, "probe_em_steps": [1, 2]},
    "robustness": {"d": 2, "train_n0": [8, 16], "eval_n": [8, 16], "sigma_p": [0.0, 2.0], "n": 16, "n_tasks": 4},
    "ablation": {"d": 2, "n_tasks": 4, "n": 16, "variants": {"transformer": {}, "lstm": {"backbone": "lstm"}}},
    "linreg": {"n_tasks": 16, "model": {"position": "gpt2"}},
    "logreg": {"n_tasks": 16, "probe_tasks": 32, "probe_newton": [0, 1, 2], "probe_gd": [0, 1, 2]},
    "second_order": {"n_tasks": 16, "other_train": {"steps": 4}, "probe_tasks": 32, "probe_newton": [0, 1, 2],
                     "probe_gd": [1, 2, 4], "probe_online": [0, 1]},
    "pca": {"n_tasks": 8, "gaps": [2.0], "probe_tasks": 32, "probe_fit_steps": 5, "probe_power": [0, 1, 2], "power_steps": [1, 2],
            "block_steps": [1], "datasets": ["digits"]},
    "clustering": {"n_tasks": 8, "separations": [4.0], "probe_tasks": 32, "probe_fit_steps": 5, "probe_em_steps": [1, 2],
                   "model": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
    "mixreg": {"n_tasks": 8, "snrs": [2.0], "n_points": [4, 8], "probe_tasks": 32, "probe_fit_steps": 5,
               "probe_em": [0, 1], "components_snrs": [4.0], "components_tasks": 8},
    "wandb": {"mode": "disabled"},
}


# The pca study's real-data points read the datasets stage's output; tests use digits (sklearn's,
# always installed), materialised once per session into a temporary folder.
_DATASETS_ROOT = Path(tempfile.mkdtemp(prefix="pipeline-test-datasets-"))
TINY_PARAMS["pca"]["datasets_root"] = str(_DATASETS_ROOT)


@pytest.fixture(scope="session", autouse=True)
def _materialised_datasets():
    from pipeline.datasets import materialise

    materialise(_DATASETS_ROOT, names=["digits"], log=None)
    yield _DATASETS_ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer test (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test: W&B disabled (tests of tracking switch to offline), all W&B / DVC state under
    tmp_path, no analytics, no credentials."""
    env_root = tmp_path / "_env"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(env_root / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(env_root / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(env_root / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(env_root / "wandb-data"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(env_root / "dvc-site-cache"))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield


@pytest.fixture
def tiny_params(tmp_path) -> dict:
    """The raw parameter dict behind `tiny_cfg` (a fresh deep copy; edit freely)."""
    p = copy.deepcopy(TINY_PARAMS)
    p["out_dir"] = str(tmp_path / "outputs")
    return p


@pytest.fixture
def tiny_cfg(tiny_params) -> Config:
    """A validated Config for runs of a few seconds on CPU (tgmm: d=2, K in {2, 3}; linreg: d=3; 4 steps)."""
    return from_dict(tiny_params, source="tiny_cfg")


def make_run(family: str = "gmm", **over) -> RunConfig:
    """A tiny validated run of `family`; `over`: {"task": {...}, "model": {...}, "train": {...}} merged in."""
    from pipeline.core.config import deep_merge

    base = {"family": family, "seed": 0, "task": copy.deepcopy(TINY_PARAMS["task"][family]),
            "model": copy.deepcopy(TINY_PARAMS["model"]), "train": dict(_TRAIN), "name": f"tiny-{family}",
            "group": "tests"}
    if family == "linreg":
        base["model"]["position"] = "gpt2"
    return RunConfig.from_dict(deep_merge(base, over), where="make_run")


@pytest.fixture
def tiny_run() -> RunConfig:
    return make_run("gmm")


@pytest.fixture
def tiny_linreg_run() -> RunConfig:
    return make_run("linreg")
