"""W&B tracking: mode resolution, offline runs written without any network (named and grouped as
their run, the run's params as flat config), and a broken W&B never failing a training run.
Online runs are never started: `online` is only ever *resolved*."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.core import tracking
from pipeline.core.config import from_dict
from tests.wandb_log import wandb_records

REPO = Path(__file__).resolve().parents[1]
SECRET = "hunter2-not-a-real-token"
UNROUTABLE = "http://127.0.0.1:9"


@pytest.fixture
def no_credentials(tmp_path, monkeypatch) -> Path:
    """An empty home: no ~/.netrc, no WANDB_API_KEY, default W&B host, no WANDB_MODE."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return home


def _write_netrc(home: Path, host: str):
    p = home / ".netrc"
    p.write_text(f"machine {host}\n  login user\n  password 0123456789abcdef\n")
    p.chmod(0o600)


# ------------------------------------------------------------------------------ resolve_mode

@pytest.mark.parametrize("env,configured,expected", [
    ("offline", "online", "offline"),
    ("disabled", "online", "disabled"),
    ("online", "disabled", "online"),
    ("OFFLINE", "auto", "offline"),
    ("dryrun", "online", "offline"),
    (" disabled ", "auto", "disabled"),
])
def test_env_mode_wins(monkeypatch, no_credentials, env, configured, expected):
    monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setenv("WANDB_API_KEY", "fake-key")  # credentials do not override an explicit env mode
    assert tracking.resolve_mode(configured) == expected


@pytest.mark.parametrize("configured", ["online", "offline", "disabled"])
def test_configured_mode_used_when_not_auto(no_credentials, monkeypatch, configured):
    assert tracking.resolve_mode(configured) == configured
    monkeypatch.setenv("WANDB_MODE", "")  # empty env counts as unset
    assert tracking.resolve_mode(configured) == configured
    monkeypatch.setenv("WANDB_MODE", "bogus")  # unknown env value is ignored
    assert tracking.resolve_mode(configured) == configured


def test_auto_offline_without_credentials(no_credentials):
    assert not (no_credentials / ".netrc").exists()
    assert not tracking.has_credentials()
    assert tracking.resolve_mode("auto") == "offline"


def test_auto_online_with_api_key(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-only-resolved-never-used")
    assert tracking.has_credentials()
    assert tracking.resolve_mode("auto") == "online"


def test_auto_online_with_netrc_entry(no_credentials, monkeypatch):
    _write_netrc(no_credentials, "api.wandb.ai")
    assert tracking.resolve_mode("auto") == "online"
    # an entry for another host does not count when W&B points elsewhere
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert tracking.resolve_mode("auto") == "offline"
    _write_netrc(no_credentials, "wandb.example.org")
    assert tracking.resolve_mode("auto") == "online"


def test_auto_offline_with_unparsable_netrc(no_credentials):
    (no_credentials / ".netrc").write_text("machine\n")
    (no_credentials / ".netrc").chmod(0o600)
    assert tracking.resolve_mode("auto") == "offline"


def test_run_record_is_flat(tiny_run, tiny_linreg_run):
    rc = tracking.run_record(tiny_run, trial="abc")
    assert rc["train.lr"] == tiny_run.train.lr and rc["task.ks"] == [2, 3] and rc["task.d"] == 2
    assert (rc["family"], rc["seed"], rc["name"], rc["group"], rc["trial"]) == ("gmm", 0, "tiny-gmm", "tests", "abc")
    assert rc["model.n_layer"] == 1 and rc["train.batch_size"] == 4
    assert not any(isinstance(v, dict) for v in rc.values())
    # every family's run: its own task keys, nothing of the other family's
    lr = tracking.run_record(tiny_linreg_run)
    assert lr["family"] == "linreg" and lr["task.n_points"] == 7 and lr["model.position"] == "gpt2"
    assert "task.ks" not in lr and "task.n_points" not in rc


# ------------------------------------------------------------------------------ make_logger

def test_make_logger_disabled_returns_none(tiny_cfg, tmp_path, monkeypatch):
    save = tmp_path / "wb"
    assert tracking.make_logger(tiny_cfg, "x", "train", save, "g") is None  # env WANDB_MODE=disabled (conftest)
    assert tracking.make_logger(None, "x", "train", save, "g") is None      # default settings: the env still wins
    monkeypatch.delenv("WANDB_MODE")
    assert tiny_cfg.wandb.mode == "disabled"
    assert tracking.make_logger(tiny_cfg, "x", "train", save, "g") is None  # config says disabled
    assert not save.exists()
    with tracking.tracked_run(tiny_cfg, "x", "evaluate", save, "g") as run:
        assert run is None


def test_online_failure_falls_back_to_offline_then_none(tiny_params, tmp_path, monkeypatch, no_credentials):
    """Resolved online (fake key); wandb.init is faked, so nothing is ever sent."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "fake-key-only-resolved-never-used")
    cfg = from_dict({**tiny_params, "wandb": {"mode": "auto"}})
    attempts = []

    def fake_init(**kw):
        attempts.append((kw.get("mode"), kw.get("group"), kw.get("job_type")))
        raise RuntimeError("simulated W&B outage\nsecond line")

    monkeypatch.setattr(wandb, "init", fake_init)
    with pytest.warns(UserWarning, match="init failed"):
        assert tracking.make_logger(cfg, "x", "train", tmp_path / "wb", "tgmm") is None
    assert attempts == [("online", "tgmm", "train"), ("offline", "tgmm", "train")]
    assert wandb.run is None


# ------------------------------------------------------------------------------ offline runs

def _offline_run(run_dir: Path, timeout: float = 30.0) -> dict:
    """What an offline run recorded, read from its .wandb transaction log: name, group, job type,
    exit code and config (files/config.yaml preferred for the config if W&B wrote one). W&B's
    service may still be flushing the log when wandb.finish() returns: read it once it ends with
    the exit record (or after `timeout` s, as it is)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in wandb_records(log):
            rec = pb.Record()
            rec.ParseFromString(raw)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    info: dict = {"config": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type)
        elif kind == "exit":
            info["exit"] = rec.exit.exit_code
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for it in items:
            info["config"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
    cfg_file = run_dir / "files" / "config.yaml"
    if cfg_file.is_file():
        import yaml

        raw = yaml.safe_load(cfg_file.read_text()) or {}
        info["config"].update({k: (v.get("value") if isinstance(v, dict) and "value" in v else v)
                               for k, v in raw.items()})
    return info


def _check_offline_run(out_dir: Path, run, secret: str, model_dir: Path):
    """One offline run in <out_dir>/wandb, named and grouped as `run`, its params as flat config."""
    wb = out_dir / "wandb"
    runs = sorted(wb.glob("offline-run-*"))
    assert len(runs) == 1, sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("offline-run-*"))
    run_dir = runs[0]
    logs = list(run_dir.glob("run-*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    info = _offline_run(run_dir)
    assert (info["name"], info["group"], info["job_type"], info.get("exit")) == (run.name, run.group, "train", 0)
    cfg = info["config"]
    assert cfg["train.lr"] == pytest.approx(run.train.lr)
    assert (cfg["family"], cfg["task.d"], cfg["task.ks"], cfg["model.n_layer"]) == ("gmm", 2, [2, 3], 1)
    leaked = [str(p) for p in out_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, f"secret found in {leaked}"
    # The trained model was written too.
    assert (model_dir / "model.safetensors").is_file()


def _offline_params(tiny_params: dict) -> dict:
    p = json.loads(json.dumps(tiny_params))
    p["wandb"]["mode"] = "offline"
    return p


def _unshare_works() -> bool:
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_CHILD = r"""
import json, socket, sys
try:  # prove the sandbox: no route to the outside world
    socket.create_connection(("1.1.1.1", 443), timeout=2).close()
    sys.exit("network reachable inside the sandbox")
except OSError:
    pass
import torch
torch.set_num_threads(1)
from pipeline.core.config import RunConfig, from_dict
from pipeline.core.train import train
cfg = from_dict(json.loads(sys.argv[1]), source="test")
run = RunConfig.from_dict(json.loads(sys.argv[2]))
res = train(run, sys.argv[3], track=True, progress_bar=False, tracking_cfg=cfg)
assert res.model_path.is_file()
print("TRAINED", res.metrics["global_step"])
"""


@pytest.fixture
def one_thread():
    """Tiny networks train fastest on one intra-op thread (and far faster on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_offline_run_without_network_namespace(tiny_params, tiny_run, tmp_path):
    """Training with W&B offline inside `unshare -rn` (no network at all) writes an offline run."""
    if not _unshare_works():
        pytest.skip("unshare -rn is not available here")
    params = _offline_params(tiny_params)
    out = Path(params["out_dir"])
    model_dir = out / "runs" / tiny_run.name  # the pipeline's layout: W&B runs in <out_dir>/wandb
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "MY_SECRET_TOKEN": SECRET,
           "WANDB_BASE_URL": UNROUTABLE, "HOME": str(tmp_path / "home")}
    env.pop("WANDB_API_KEY", None)
    (tmp_path / "home").mkdir()
    res = subprocess.run([shutil.which("unshare"), "-rn", sys.executable, "-c", _CHILD, json.dumps(params),
                          json.dumps(tiny_run.to_dict()), str(model_dir)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "TRAINED 4" in res.stdout
    _check_offline_run(out, tiny_run, SECRET, model_dir)


def test_offline_run_in_process(tiny_params, tiny_run, tmp_path, monkeypatch, one_thread):
    """Same, in this process, with W&B pointed at an unroutable server: offline never contacts it."""
    import wandb

    from pipeline.core.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", UNROUTABLE)
    monkeypatch.setenv("MY_SECRET_TOKEN", SECRET)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = from_dict(_offline_params(tiny_params), source="test")
    out = Path(cfg.out_dir)
    model_dir = out / "runs" / tiny_run.name
    res = train(tiny_run, model_dir, track=True, progress_bar=False, tracking_cfg=cfg)
    assert res.metrics["global_step"] == 4
    assert wandb.run is None  # finished
    _check_offline_run(out, tiny_run, SECRET, model_dir)


def test_evaluation_run_is_grouped_by_study(tiny_params, tmp_path, monkeypatch):
    """A study's evaluation: one offline run, group = the study, job type evaluate, flat metrics."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = from_dict(_offline_params(tiny_params), source="test")
    save = Path(cfg.out_dir) / "wandb"
    with tracking.tracked_run(cfg, "tgmm-evaluate", "evaluate", save, "tgmm") as run:
        assert run is not None
        run.log({"tgmm/main/l2/d=2/K=2/em_paper": 0.25})
    assert wandb.run is None
    (run_dir,) = save.glob("offline-run-*")  # directly in <out_dir>/wandb
    info = _offline_run(run_dir)
    assert (info["name"], info["group"], info["job_type"], info.get("exit")) == ("tgmm-evaluate", "tgmm",
                                                                                  "evaluate", 0)
    assert b"tgmm/main/l2/d=2/K=2/em_paper" in next(run_dir.glob("run-*.wandb")).read_bytes()


def test_an_evaluation_run_does_not_import_lightning(tmp_path):
    """Importing Lightning costs ~6 s on a 2-core CPU: the evaluate/report stages must not pay it."""
    code = ("import sys, os; os.environ['WANDB_MODE'] = 'offline'; os.environ['WANDB_SILENT'] = 'true'\n"
            "from pipeline.core import evaluate, report, tracking\n"
            "with tracking.tracked_run(None, 'x-evaluate', 'evaluate', sys.argv[1], 'x') as run:\n"
            "    run.log({'a': 1.0})\n"
            "print('lightning' if 'pytorch_lightning' in sys.modules else 'no lightning')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "wandb")], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "no lightning"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_broken_wandb_does_not_fail_training(tiny_params, tiny_run, tmp_path, monkeypatch, one_thread):
    import wandb

    from pipeline.core.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = []

    def broken_init(**kw):
        calls.append(kw.get("mode"))
        raise RuntimeError("wandb is broken")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = from_dict(_offline_params(tiny_params), source="test")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="init failed"):
        res = train(tiny_run, out, track=True, progress_bar=False, tracking_cfg=cfg)
    assert calls == ["offline"]
    assert res.metrics["global_step"] == 4
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert (out / "log" / "metrics.csv").is_file()
    assert not glob.glob(str(tmp_path / "**" / "offline-run-*"), recursive=True)
    assert wandb.run is None


@pytest.mark.parametrize("failure", ["corrupt-checkpoint", "callback-raises"])
def test_failed_training_finishes_wandb_run(tiny_params, tiny_run, tmp_path, monkeypatch, one_thread, failure):
    """train() failing (a corrupt resume checkpoint; an error once the W&B run has started) never leaves
    a W&B run open; a started run is closed as failed."""
    import pytorch_lightning as pl
    import wandb

    from pipeline.core.fingerprint import fingerprint
    from pipeline.core.train import train

    class Boom(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            raise RuntimeError("boom")

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = from_dict(_offline_params(tiny_params), source="test")
    out = Path(cfg.out_dir) / "runs" / tiny_run.name
    callbacks = []
    if failure == "corrupt-checkpoint":
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
        (out / "checkpoints" / "FINGERPRINT").write_text(fingerprint(tiny_run) + "\n")
    else:
        callbacks = [Boom()]
    try:
        with pytest.raises(Exception) as e:
            train(tiny_run, out, callbacks=callbacks, track=True, progress_bar=False, tracking_cfg=cfg)
        leaked = wandb.run is not None
    finally:
        tracking.finish()  # never let a leaked run reach the next test
    assert not leaked, "W&B run left open after a failed train()"
    runs = sorted((Path(cfg.out_dir) / "wandb").glob("offline-run-*"))
    if failure == "callback-raises":
        assert "boom" in str(e.value)
        assert len(runs) == 1 and _offline_run(runs[0]).get("exit") == 1  # started, then closed as failed
    assert not (out / "model.safetensors").exists()
