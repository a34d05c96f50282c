"""The one training function, for every family: fast_dev_run, DDP on 2 CPU processes, kill -9 and
bitwise resume, NaN stop, SIGTERM, foreign checkpoints, a curriculum that resumes exactly."""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core import family as F
from pipeline.core.config import RunConfig
from pipeline.core.errors import NonFiniteLossError
from pipeline.core.train import train
from tests.conftest import TINY_PARAMS, make_run

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["gmm", "linreg"]
STUDY_OF = {"gmm": "tgmm", "linreg": "linreg"}
RUN_OF = {"gmm": "tgmm-d2", "linreg": "linreg-main"}


def params_file(tmp_path, family: str, **train_over) -> Path:
    """A params.yaml with the one study of `family` and train overrides (base `train` section)."""
    p = copy.deepcopy(TINY_PARAMS)
    p["studies"] = [STUDY_OF[family]]
    p["out_dir"] = str(tmp_path / "outputs")
    p["train"].update(train_over)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def run_dir(tmp_path, family: str) -> Path:
    return tmp_path / "outputs" / "runs" / RUN_OF[family]


def _env():
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    return env


def _cli(tmp_path, params: Path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", "--params", str(params), *args], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_dev_run(tmp_path, family):
    res = train(make_run(family), tmp_path / "run", fast_dev_run=True, track=False, progress_bar=False)
    assert res.metrics["global_step"] == 1
    assert res.model_path.is_file()


KILLER = """
import json, os, signal, sys
import pytorch_lightning as pl
from pipeline.core.config import RunConfig
from pipeline.core.train import train

class KillAfterCheckpoint(pl.Callback):
    # SIGKILL (no clean-up, like a pre-empted job) right after the checkpoint of step `at` is written
    def __init__(self, at): self.at = at
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)

run = RunConfig.from_dict(json.load(open(sys.argv[1])))
cbs = [KillAfterCheckpoint(int(sys.argv[3]))] if len(sys.argv) > 3 else []
train(run, sys.argv[2], callbacks=cbs, track=False, progress_bar=False)
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_kill_and_resume_is_bitwise_identical(tmp_path, family):
    # linreg: the curriculum changes at step 2 and 4 (curriculum_every = 2): the resumed run must see it too
    run = make_run(family, train={"steps": 8, "ckpt_every": 3})
    spec = tmp_path / "run.json"
    spec.write_text(json.dumps(run.to_dict()))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILLER))
    go = lambda *a: subprocess.run([sys.executable, str(script), str(spec), *a], env=_env(),  # noqa: E731
                                   capture_output=True, text=True, timeout=300)
    ref = go(str(tmp_path / "straight"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = go(str(tmp_path / "killed"), "4")  # last checkpoint at step 3: steps 4.. are redone on resume
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    resumed = go(str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "(step 3)" in resumed.stdout
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["global_step"] == 8


def test_changed_params_do_not_resume_a_foreign_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(make_run(train={"steps": 4}), out, track=False, progress_bar=False)
    res = train(make_run(train={"steps": 4, "lr": 3e-4}), out, track=False, progress_bar=False)
    assert res.resumed_from_step is None
    assert list(tmp_path.glob("run/checkpoints-stale-*/last.ckpt"))  # the old one is kept aside, not lost
    again = train(make_run(train={"steps": 6, "lr": 3e-4}), out, track=False, progress_bar=False)
    assert again.resumed_from_step is None  # steps changed -> schedule changed -> fresh


def test_logging_and_device_keys_keep_the_checkpoint(tmp_path):
    """log_every / ckpt_every / val_every / devices / accelerator are not part of the network's identity."""
    out = tmp_path / "run"
    first = train(make_run(train={"steps": 4}), out, track=False, progress_bar=False)
    again = train(make_run(train={"steps": 4, "log_every": 3, "val_every": 4, "accelerator": "auto"}), out,
                  track=False, progress_bar=False)
    assert again.resumed_from_step == 4  # the finished run is recognised, nothing retrained
    a = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], first.net.state_dict()[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, family):
    fam = F.get(family)
    real = type(fam).loss
    groups = len(fam.groups(make_run(family).task))

    def poisoned(out, batch, task):
        res = real(fam, out, batch, task)
        if poisoned.calls >= groups * 5:  # the loss turns NaN at step 5
            res["loss"] = res["loss"] * float("nan")
        poisoned.calls += 1
        return res

    poisoned.calls = 0
    monkeypatch.setattr(fam, "loss", poisoned)
    run = make_run(family, train={"steps": 10, "ckpt_every": 2, "val_every": 100})
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step 5"):
        train(run, tmp_path / "run", track=False, progress_bar=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_cli_reports_non_finite_loss_in_one_line(tmp_path):
    params = params_file(tmp_path, "gmm", lr=1e30, grad_clip=0.0, steps=30)
    r = _cli(tmp_path, params, "train", "--no-track")
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: [train tgmm-d2] non-finite"), last


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_on_two_cpu_processes(tmp_path, family):
    params = params_file(tmp_path, family, devices=2, strategy="ddp", steps=4)
    r = _cli(tmp_path, params, "train", "--run", RUN_OF[family], "--no-track", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run_dir(tmp_path, family) / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    assert (run_dir(tmp_path, family) / "model.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_sigterm_keeps_a_resume_point_and_fails_loudly(tmp_path, family):
    params = params_file(tmp_path, family, steps=400, ckpt_every=1000, val_every=1000)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--params", str(params), "train", "--no-track"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    d = run_dir(tmp_path, family)
    log = d / "log" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.stat().st_size > 0):
        time.sleep(0.2)  # wait until training has logged its first steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM at step" in err.strip().splitlines()[-1]
    step = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 400
    assert not (d / "model.safetensors").exists()
    r = _cli(tmp_path, params, "train", "--no-track")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(step {step})" in r.stdout
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["global_step"] == 400 and F.get(family).monitor in metrics


def test_rerun_of_a_finished_training_keeps_its_metrics(tmp_path):
    run = make_run(train={"steps": 6, "val_every": 3})
    first = train(run, tmp_path / "run", track=False, progress_bar=False)
    again = train(run, tmp_path / "run", track=False, progress_bar=False)
    assert again.resumed_from_step == 6
    assert again.metrics["val/l2"] == pytest.approx(first.metrics["val/l2"])
    a = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], first.net.state_dict()[k]) for k in a)


def test_curriculum_is_a_function_of_the_step(tiny_linreg_run):
    """The sampler at step s draws the curriculum's (dims, points) of step s, whatever came before."""
    from pipeline.core import rng
    from pipeline.families.linreg.config import curriculum

    fam, task = F.get("linreg"), tiny_linreg_run.task
    for step in (0, 1, 2, 5, 100):
        dims, n = curriculum(task, step)
        b = fam.sample(task, None, 3, rng.make_generator(0, rng.TRAIN, step, 0), "cpu", step)
        assert b.n == n and bool((b.xs[..., dims:] == 0).all()) and bool((b.xs[..., :dims] != 0).all())
        again = fam.sample(task, None, 3, rng.make_generator(0, rng.TRAIN, step, 0), "cpu", step)
        assert torch.equal(b.xs, again.xs) and torch.equal(b.ys, again.ys)
    assert curriculum(task, 0) == (2, 3) and curriculum(task, 2) == (3, 5) and curriculum(task, 100) == (3, 7)


def test_run_round_trips_through_its_dict(tiny_run):
    assert RunConfig.from_dict(tiny_run.to_dict()) == tiny_run
