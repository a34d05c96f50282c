"""Bad input on every CLI path ends in one line naming the file or key, exit status 2, before any
compute, and never suggests unsafe loading."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS


def _cli(cwd: Path, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(r, *names):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    assert "allow_pickle" not in lines[0] and "unsafe" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    p = copy.deepcopy(TINY_PARAMS)
    p.update(studies=["tgmm"], out_dir=str(root / "outputs"))
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    r = _cli(root, "generate")
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def _set(root: Path) -> Path:
    return root / "data" / "tgmm" / "main" / "d2_K2.npz"


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, -1])
def test_truncated_eval_set(project, cut):
    path = _set(project)
    data = path.read_bytes()
    try:
        path.write_bytes(data[: int(len(data) * cut)] if cut > 0 else data[:-1])
        msg = _one_line_error(_cli(project, "evaluate", "--no-track"), path.name)
        assert "generate" in msg  # says what to rerun
    finally:
        path.write_bytes(data)


def test_garbage_eval_set(project):
    path = _set(project)
    data = path.read_bytes()
    try:
        path.write_bytes(b"garbage")
        _one_line_error(_cli(project, "evaluate", "--no-track"), path.name)
    finally:
        path.write_bytes(data)


def test_missing_network_is_named_before_compute(project):
    msg = _one_line_error(_cli(project, "evaluate", "--no-track"), "tgmm-d2")
    assert "train --run tgmm-d2" in msg
    assert not (project / "outputs" / "tgmm" / "results.json").exists()


def test_corrupt_network_file(project):
    d = project / "outputs" / "runs" / "tgmm-d2"
    d.mkdir(parents=True, exist_ok=True)
    try:
        (d / "model.safetensors").write_bytes(b"\x00" * 11)
        (d / "model.json").write_text("{not json")
        _one_line_error(_cli(project, "evaluate", "--no-track"), "model.json")
    finally:
        import shutil

        shutil.rmtree(d)


def test_missing_and_corrupt_results(project):
    _one_line_error(_cli(project, "report"), "results.json", "evaluate")
    res = project / "outputs" / "tgmm" / "results.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    try:
        res.write_text('{"rows": ')
        _one_line_error(_cli(project, "report"), "results.json")
    finally:
        res.unlink()


@pytest.mark.parametrize("text,name", [("", "empty"), ("# only a comment\n", "empty"), ("- a\n", "mapping"),
                                       ("studies: [tgmm]\nrobustness: {d: 0}\n", "robustness.d"),
                                       ("studies: [tgmm]\nlinreg: {methods: [oracle]}\n", "linreg.methods")])
def test_bad_params_files(tmp_path, text, name):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    _one_line_error(_cli(tmp_path, "--params", str(p), "validate"), str(p), name)


def test_bad_plan_reference(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({**copy.deepcopy(TINY_PARAMS), "studies": ["tgmm"]}))
    _one_line_error(_cli(tmp_path, "--params", str(p), "train", "--run", "linreg-main"), "--run linreg-main")
    _one_line_error(_cli(tmp_path, "--params", str(p), "--set", "tgmm.dims=[2, 2]", "validate"), "tgmm.dims")
