"""W&B tracking: mode resolution, offline runs written without any network, and a broken W&B never
failing a training run. Online runs are never started: `online` is only ever *resolved*."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.wandb_log import wandb_records

from pipeline.config import from_dict
from pipeline.training import tracking

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


def test_run_config_is_flat(tiny_cfg):
    rc = tracking.run_config(tiny_cfg, d=2)
    assert rc["train.lr"] == tiny_cfg.train.lr and rc["task.ks"] == [2, 3] and rc["d"] == 2
    assert not any(isinstance(v, dict) for v in rc.values())


# ------------------------------------------------------------------------------ make_logger

def test_make_logger_disabled_returns_none(tiny_cfg, tmp_path, monkeypatch):
    save = tmp_path / "wb"
    assert tracking.make_logger(tiny_cfg, "x", "train", save) is None  # env WANDB_MODE=disabled (conftest)
    monkeypatch.delenv("WANDB_MODE")
    assert tiny_cfg.wandb.mode == "disabled"
    assert tracking.make_logger(tiny_cfg, "x", "train", save) is None  # config says disabled
    assert not save.exists()
    with tracking.tracked_run(tiny_cfg, "x", "eval", save) as logger:
        assert logger is None


def test_online_failure_falls_back_to_offline_then_none(tiny_cfg, tmp_path, monkeypatch, no_credentials):
    """Resolved online (fake key); wandb.init is faked, so nothing is ever sent."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "fake-key-only-resolved-never-used")
    cfg = from_dict({**tiny_cfg.to_dict(), "wandb": {**tiny_cfg.to_dict()["wandb"], "mode": "auto"}})
    attempts = []

    def fake_init(**kw):
        attempts.append(kw.get("mode"))
        raise RuntimeError("simulated W&B outage\nsecond line")

    monkeypatch.setattr(wandb, "init", fake_init)
    with pytest.warns(UserWarning, match="init failed"):
        assert tracking.make_logger(cfg, "x", "train", tmp_path / "wb") is None
    assert attempts == ["online", "offline"]
    assert wandb.run is None


# ------------------------------------------------------------------------------ offline runs

def _offline_run_config(run_dir: Path) -> dict | None:
    """The run's config: files/config.yaml if W&B wrote one, else the config records of the .wandb log
    (None if the protobuf schema is unavailable)."""
    cfg_file = run_dir / "files" / "config.yaml"
    if cfg_file.is_file():
        import yaml

        raw = yaml.safe_load(cfg_file.read_text()) or {}
        return {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in raw.items()}
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except Exception:  # pragma: no cover - internal module moved
        return None
    out: dict = {}
    (log,) = run_dir.glob("run-*.wandb")
    for raw in wandb_records(log):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for it in items:
            out[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
    return out


def _check_offline_run(out_dir: Path, lr: float, secret: str):
    wb = out_dir / "wandb"
    runs = sorted(wb.glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in wb.iterdir()) if wb.is_dir() else "no wandb dir"
    run_dir = runs[0]
    logs = list(run_dir.glob("run-*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    assert b"train.lr" in logs[0].read_bytes() or (run_dir / "files" / "config.yaml").is_file()
    cfg = _offline_run_config(run_dir)
    if cfg is not None:
        assert cfg["train.lr"] == pytest.approx(lr)
        assert cfg["d"] == 2
    leaked = [str(p) for p in out_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, f"secret found in {leaked}"
    # The trained model was written too.
    assert (out_dir / "train" / "d2" / "model.safetensors").is_file()


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
from pipeline.config import from_dict
from pipeline.training.train import train
cfg = from_dict(json.loads(sys.argv[1]), source="test")
res = train(cfg, 2, out_dir=sys.argv[2], track=True, progress_bar=False)
assert res.model_path.is_file()
print("TRAINED", res.metrics["global_step"])
"""


def test_offline_run_without_network_namespace(tiny_params, tmp_path):
    """Training with W&B offline inside `unshare -rn` (no network at all) writes an offline run."""
    if not _unshare_works():
        pytest.skip("unshare -rn is not available here")
    params = _offline_params(tiny_params)
    out = Path(params["out_dir"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "MY_SECRET_TOKEN": SECRET,
           "WANDB_BASE_URL": UNROUTABLE, "HOME": str(tmp_path / "home")}
    env.pop("WANDB_API_KEY", None)
    (tmp_path / "home").mkdir()
    res = subprocess.run([shutil.which("unshare"), "-rn", sys.executable, "-c", _CHILD, json.dumps(params),
                          str(out / "train" / "d2")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "TRAINED 4" in res.stdout
    _check_offline_run(out, tiny_params["train"].get("lr", 1e-3), SECRET)


def test_offline_run_in_process(tiny_params, tmp_path, monkeypatch):
    """Same, in this process, with W&B pointed at an unroutable server: offline never contacts it."""
    import wandb

    from pipeline.training.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", UNROUTABLE)
    monkeypatch.setenv("MY_SECRET_TOKEN", SECRET)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = from_dict(_offline_params(tiny_params), source="test")
    out = Path(cfg.out_dir)
    res = train(cfg, 2, out_dir=out / "train" / "d2", track=True, progress_bar=False)
    assert res.metrics["global_step"] == 4
    assert wandb.run is None  # finished
    _check_offline_run(out, cfg.train.lr, SECRET)


def test_broken_wandb_does_not_fail_training(tiny_params, tmp_path, monkeypatch):
    import wandb

    from pipeline.training.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = []

    def broken_init(**kw):
        calls.append(kw.get("mode"))
        raise RuntimeError("wandb is broken")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = from_dict(_offline_params(tiny_params), source="test")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="init failed"):
        res = train(cfg, 2, out_dir=out, track=True, progress_bar=False)
    assert calls == ["offline"]
    assert res.metrics["global_step"] == 4
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert (out / "log" / "metrics.csv").is_file()
    assert not glob.glob(str(Path(cfg.out_dir) / "wandb" / "offline-run-*"))
    assert wandb.run is None


def test_failed_setup_finishes_wandb_run(tiny_params, tmp_path, monkeypatch):
    """A corrupt resume checkpoint makes train() fail before fit(): the W&B run must still be closed."""
    import wandb

    from pipeline.training.train import train, training_fingerprint

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = from_dict(_offline_params(tiny_params), source="test")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    (out / "checkpoints" / "FINGERPRINT").write_text(training_fingerprint(cfg, 2) + "\n")
    try:
        with pytest.raises(Exception):
            train(cfg, 2, out_dir=out, track=True, progress_bar=False)
        leaked = wandb.run is not None
    finally:
        tracking.finish()  # never let a leaked run reach the next test
    assert not leaked, "W&B run left open after a failed train()"
