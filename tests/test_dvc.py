"""`dvc repro` end to end on tiny params, in a temporary copy of the project: every study's stages,
a second repro that does nothing, `dvc exp run -S` on a linreg key rerunning only linreg stages and
retraining only the linreg network, an edit of a linreg file retraining no TGMM network, and `dvc metrics show` / `dvc plots show`."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import TINY_PARAMS

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def test_dvc_repro_tiny_project(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(REPO / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "sweeps").mkdir()  # the sweep stages (Ray Tune) have tests of their own
    shutil.copy(REPO / ".gitignore", proj)
    params = copy.deepcopy(TINY_PARAMS)
    params.update(studies=["tgmm", "robustness", "ablation", "linreg", "second_order", "pca", "clustering"],
                  out_dir="outputs")
    params["wandb"]["mode"] = "offline"
    params["pca"]["datasets_root"] = "data/datasets"  # what the project's own datasets stage writes
    # every key that `dvc exp run -S` may set must exist in the file
    params["linreg"]["train"] = {"steps": 4, "lr": 0.001}
    params["second_order"].update(networks=["transformer", "lstm"], train={"steps": 3})  # not linreg-main
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=str(proj), WANDB_MODE="offline", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp_path / "site"), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    dvc = [sys.executable, "-m", "dvc"]
    py = [sys.executable, "-m", "pipeline"]
    _run(["git", "init", "-q"], proj, env)
    _run(dvc + ["init", "-q"], proj, env)
    shutil.copytree(REPO / ".dvc" / "plots", proj / ".dvc" / "plots", dirs_exist_ok=True)
    _run(py + ["plan"], proj, env)  # writes plans/ and dvc.yaml (no hand-kept stage lists)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "init"], proj, env)

    first = _run(dvc + ["repro"], proj, env)
    stages = set(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"])
    assert _ran(first) == stages
    out = proj / "outputs"
    nets = {p.name for p in (out / "runs").iterdir() if (p / "model.safetensors").is_file()}
    assert {"tgmm-d2", "robustness-n0_8", "ablation-lstm", "linreg-main"} <= nets, nets
    assert "robustness-n0_16" not in nets and "ablation-transformer" not in nets  # shared: trained once
    assert "networks," in first and "at a time" in first  # the train stage trained them side by side
    assert "studies," in first and "7/7 studies evaluated" in first  # and evaluated them side by side

    def retrained(log: str) -> set[str]:  # the train command names each network it skips as up to date
        return {n for n in nets if f"[train {n}] up to date" not in log}

    def evaluated(log: str) -> set[str]:  # and the evaluate command each study
        return {s for s in params["studies"] if f"[evaluate {s}] up to date" not in log}

    for study in params["studies"]:
        assert (out / study / "report" / "report.md").is_file()
        assert json.loads((out / study / "report" / "metrics.json").read_text())
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    summary = (out / "report.md").read_text()
    assert all(f"**{study}**" in summary for study in params["studies"])
    shown = _run(dvc + ["metrics", "show", "--json"], proj, env)
    assert "em_paper" in shown and "least_squares" in shown
    _run(dvc + ["plots", "show", "-o", str(tmp_path / "plots")], proj, env)

    again = _run(dvc + ["repro"], proj, env)
    assert not _ran(again), again[-2000:]

    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "lock"], proj, env)
    exp = _run(dvc + ["exp", "run", "-S", "linreg.train.lr=0.0005"], proj, env)
    # one report stage writes every study's report and the top-level one: it follows
    assert _ran(exp) == {"plan", "train", "evaluate", "report"}, _ran(exp)
    assert retrained(exp) == {"linreg-main"} and "[train linreg-main] done" in exp, exp[-3000:]
    assert evaluated(exp) == {"linreg"} and "[evaluate] 1/1 linreg" not in exp, exp[-3000:]  # one: in-process
    _run(["git", "checkout", "--", "params.yaml"], proj, env)

    with open(proj / "pipeline" / "families" / "linreg" / "net.py", "a") as f:
        f.write("\n# an edit of the linreg family\n")
    edited = _run(dvc + ["repro"], proj, env)
    ran = _ran(edited)
    again = retrained(edited)
    assert "train" in ran and {"linreg-main", "second_order-lstm"} <= again, (ran, again)
    assert not {n for n in again if n.startswith(("tgmm", "robustness", "ablation"))}, again
    assert evaluated(edited) == {"linreg", "second_order"}, (ran, evaluated(edited))
