"""`dvc repro` end to end on a tiny params file, in a temporary copy of the project."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import deep_merge
from tests.test_training import TINY

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_dvc_repro_tiny_project(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(REPO / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", proj)
    shutil.copy(REPO / ".gitignore", proj)
    # DVC needs every tracked key present: start from the real params.yaml and shrink it.
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), json.loads(json.dumps(TINY)))
    params["task"]["dims"] = [2, 3]
    params["wandb"]["mode"] = "offline"
    params["ablation"]["variants"] = {"transformer": {}, "mamba2": {"backbone": "mamba2", "headdim": 8, "d_state": 8}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], PYTHONPATH=str(proj),
               WANDB_MODE="offline", DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], proj, env)
    _run(dvc + ["init", "-q"], proj, env)
    shutil.copytree(REPO / ".dvc" / "plots", proj / ".dvc" / "plots", dirs_exist_ok=True)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "init"], proj, env)

    # The sweep stages (Ray Tune) have tests of their own; here: the TGMM study and its robustness.
    targets = ["report", "robustness_report", "ablation_report"]
    _run(dvc + ["repro", *targets], proj, env)
    out = proj / "outputs"
    assert sorted(p.name for p in (proj / "data" / "gmm").glob("*.npz")) == [
        f"d{d}_K{K}.npz" for d in (2, 3) for K in (2, 3)]
    for d in (2, 3):
        assert (out / "train" / f"d{d}" / "model.safetensors").is_file()
        assert (out / "train" / f"d{d}" / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for method in ("tgmm", "em_paper", "em_strong", "spectral"):
        cell = metrics[method]["d=3"]["K=3"]
        assert set(cell) == {"l2", "accuracy", "loglik"}, method
    assert "spectral d=2 K=3" in metrics["not_applicable"]  # K > d
    assert {p.name for p in (out / "report" / "figures").glob("*.png")} >= {"l2_vs_K.png"}
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    # robustness: N0 = 16 = task.n0 reuses the main d=2 network, N0 = 8 is trained
    rob = json.loads((out / "robustness" / "report" / "metrics.json").read_text())
    assert rob and (out / "robustness" / "report" / "report.md").is_file()
    assert (out / "robustness" / "train" / "n0_8" / "model.safetensors").is_file()
    # ablation: the transformer variant is the main d=2 network, mamba2 is trained at a matched width
    abl = json.loads((out / "ablation" / "report" / "metrics.json").read_text())
    assert set(abl["params"]) == {"transformer", "mamba2"} and abl["params"]["transformer"] == abl["reference_params"]
    assert "spectral d=2 K=2" in abl["anisotropic"]["not_applicable"]
    assert (out / "ablation" / "train" / "mamba2" / "model.safetensors").is_file()
    assert (out / "ablation" / "train" / "anisotropic" / "model.safetensors").is_file()
    shown = _run(dvc + ["metrics", "show", "--json"], proj, env)
    assert "em_paper" in shown

    again = _run(dvc + ["repro", *targets], proj, env)
    assert "up to date" in again.lower() and "Running stage" not in again

    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "lock"], proj, env)
    exp = _run(dvc + ["exp", "run", "-S", "train.lr=0.0005", *targets], proj, env)
    assert "Running stage 'train@2'" in exp and "Running stage 'evaluate'" in exp
    assert "Running stage 'generate'" not in exp
