"""The one training function: fast_dev_run, DDP on 2 CPU processes, kill-and-resume, NaN stop."""
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

from pipeline.config import from_dict
from pipeline.training.train import train

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "task": {"dims": [2], "ks": [2, 3], "n0": 16},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "k_embd": 4},
    "train": {"steps": 6, "batch_per_k": 4, "warmup_steps": 1, "ckpt_every": 2, "val_every": 3, "log_every": 1,
              "val_tasks": 4, "accelerator": "cpu"},
    "eval": {"n_tasks": 8, "n": 16},
    "baselines": {"strong_restarts": 2, "em_max_iter": 20, "spectral_restarts": 2, "spectral_iters": 10},
    "robustness": {"d": 2, "train_n0": [8, 16], "eval_n": [8, 16], "sigma_p": [0.0, 5.0], "n_tasks": 4},
    "wandb": {"mode": "disabled"},
}


def tiny(tmp_path, **over) -> dict:
    p = json.loads(json.dumps(TINY))
    p["out_dir"] = str(tmp_path / "outputs")
    for key, value in over.items():
        section, name = key.split("__")
        p[section][name] = value
    return p


def _env():
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    return env


def test_fast_dev_run(tmp_path):
    cfg = from_dict(tiny(tmp_path))
    res = train(cfg, d=2, out_dir=tmp_path / "run", fast_dev_run=True, track=False, progress_bar=False)
    assert res.metrics["global_step"] == 1
    assert res.model_path.is_file()


KILLER = """
import os, signal, sys, yaml
import pytorch_lightning as pl
from pipeline.config import from_dict
from pipeline.training.train import train

class KillAfterCheckpoint(pl.Callback):
    # SIGKILL (no clean-up, like a pre-empted job) right after the checkpoint of step `at` is written
    def __init__(self, at): self.at = at
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)

cfg = from_dict(yaml.safe_load(open(sys.argv[1])))
cbs = [KillAfterCheckpoint(int(sys.argv[3]))] if len(sys.argv) > 3 else []
train(cfg, d=2, out_dir=sys.argv[2], callbacks=cbs, track=False, progress_bar=False)
"""


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny(tmp_path, train__steps=8, train__ckpt_every=3)))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILLER))
    run = lambda *a: subprocess.run([sys.executable, str(script), str(params), *a], env=_env(),
                                    capture_output=True, text=True, timeout=300)
    ref = run(str(tmp_path / "straight"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = run(str(tmp_path / "killed"), "4")  # last checkpoint at step 3: steps 4.. are redone on resume
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    resumed = run(str(tmp_path / "killed"))
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
    train(from_dict(tiny(tmp_path, train__steps=4)), d=2, out_dir=out, track=False, progress_bar=False)
    res = train(from_dict(tiny(tmp_path, train__steps=4, train__lr=3e-4)), d=2, out_dir=out, track=False,
                progress_bar=False)
    assert res.resumed_from_step is None
    assert list(tmp_path.glob("run/checkpoints-stale-*/last.ckpt"))  # the old one is kept aside, not lost
    again = train(from_dict(tiny(tmp_path, train__steps=6, train__lr=3e-4)), d=2, out_dir=out, track=False,
                  progress_bar=False)  # steps changed -> schedule changed -> fresh
    assert again.resumed_from_step is None


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import pipeline.training.module as module

    real = module.matched_loss

    def poisoned(logits, means, batch, scales=None):
        out = real(logits, means, batch, scales)
        if poisoned.calls >= 2 * 5:  # 2 Ks per step: the loss turns NaN at step 5
            out["loss"] = out["loss"] * float("nan")
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    monkeypatch.setattr(module, "matched_loss", poisoned)
    cfg = from_dict(tiny(tmp_path, train__steps=10, train__ckpt_every=2, train__val_every=100))
    with pytest.raises(module.NonFiniteLossError, match="non-finite training loss at step 5"):
        train(cfg, d=2, out_dir=tmp_path / "run", track=False, progress_bar=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_cli_reports_non_finite_loss_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny(tmp_path, train__lr=1e30, train__grad_clip=0.0, train__steps=30)))
    r = subprocess.run([sys.executable, "-m", "pipeline", "--params", str(params), "train"], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train d=2: non-finite"), last


def test_ddp_on_two_cpu_processes(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny(tmp_path, train__devices=2, train__strategy="ddp", train__steps=4)))
    r = subprocess.run([sys.executable, "-m", "pipeline", "--params", str(params), "train", "--d", "2",
                        "--no-track"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "train" / "d2" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    assert (tmp_path / "outputs" / "train" / "d2" / "model.safetensors").is_file()


def test_sigterm_keeps_a_resume_point_and_fails_loudly(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny(tmp_path, train__steps=400, train__ckpt_every=1000, train__val_every=1000)))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--params", str(params), "train", "--no-track"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "outputs" / "train" / "d2" / "checkpoints" / "last.ckpt"
    log = tmp_path / "outputs" / "train" / "d2" / "log" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.stat().st_size > 0):
        time.sleep(0.2)  # wait until training has logged its first steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM at step" in err.strip().splitlines()[-1]
    step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 0 < step < 400
    assert not (tmp_path / "outputs" / "train" / "d2" / "model.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "pipeline", "--params", str(params), "train", "--no-track"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(step {step})" in r.stdout
    metrics = json.loads((tmp_path / "outputs" / "train" / "d2" / "metrics.json").read_text())
    assert metrics["global_step"] == 400 and "val/l2" in metrics


def test_rerun_of_a_finished_training_keeps_its_metrics(tmp_path):
    cfg = from_dict(tiny(tmp_path))
    first = train(cfg, d=2, out_dir=tmp_path / "run", track=False, progress_bar=False)
    again = train(cfg, d=2, out_dir=tmp_path / "run", track=False, progress_bar=False)
    assert again.resumed_from_step == 6
    assert again.metrics["val/l2"] == pytest.approx(first.metrics["val/l2"])
    a = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], first.net.state_dict()[k]) for k in a)
