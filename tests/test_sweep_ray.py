"""Sweeps on a real Ray, loopback only (all slow-marked: `pytest -m slow`): a local sweep end to end (table, plot, one offline W&B run
per trial in one group), Ctrl+C then --resume without rerunning a finished trial, and a 2-node
local cluster losing its worker node mid-trial. Every Ray here binds 127.0.0.1 only
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray starts); the tests check the node addresses and
every listening socket of the Ray processes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.wandb_log import wandb_records
import yaml

REPO = Path(__file__).resolve().parents[1]
LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # v4-mapped loopback is loopback

PARAMS = {
    "seed": 0,
    "out_dir": "out",   # relative on purpose: resolved against the driver's cwd, never a trial's
    "studies": ["tgmm"],
    "task": {"gmm": {"d": 2, "ks": [2, 3], "n0": 16, "k_embd": 4}},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16},
    "train": {"steps": 30, "batch_size": 4, "warmup_steps": 1, "ckpt_every": 10, "val_every": 10, "log_every": 5,
              "val_tasks": 4, "accelerator": "cpu"},
    "tgmm": {"dims": [2], "n_tasks": 8, "n": 16},
    "wandb": {"mode": "offline"},
}


def _spec(name: str, steps: int, layers: list[int], max_concurrent: int, every: int = 10, **extra) -> dict:
    """A sweep of the tgmm study's network (its one unit, d2), a checkpoint (and a validation) every
    `every` steps; the metric is the family's default."""
    base = {"train.steps": steps, "train.ckpt_every": every, "train.val_every": every}
    return {"name": name, "study": "tgmm", "base": base,
            "params": {"model.n_layer": {"grid": layers}}, "seeds": [0], "mode": "min",
            "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": max_concurrent, "max_failures": 2, **extra}


# The interrupted / lost trials must outlive their second checkpoint (see _registered_checkpoint) by
# several seconds (a tiny network trains 15-30 steps/s on one thread); fewer checkpoints than one per
# 10 steps keep Tune's overhead low.
EVERY = 50
RESUME_STEPS = 300
NODELOSS_STEPS = 300


@pytest.fixture
def ray_tmp():
    """A short TMPDIR for Ray (its unix socket paths have a length limit)."""
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sweep_env(tmp_path, ray_tmp, monkeypatch) -> dict:
    for k, v in {"RAY_AUTH_MODE": "disabled", "TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return env


def _setup(tmp_path: Path, spec: dict) -> tuple[Path, Path, Path]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    spec_path = tmp_path / f"{spec['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return cwd, params, spec_path


def _cmd(params: Path, spec: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--params", str(params), "sweep", str(spec), *extra]


class ListenWatch:
    """Every listening TCP/UDP socket of a process tree, sampled while it runs."""

    def __init__(self, pid: int | None = None):
        import psutil

        self.psutil, self.root = psutil, pid or os.getpid()
        self.addresses: set[str] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> set[int]:
        try:
            root = self.psutil.Process(self.root)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        except self.psutil.Error:
            return set()

    def sample(self):
        pids = self._pids()
        for c in self.psutil.net_connections(kind="inet"):
            if c.pid in pids and (c.status == self.psutil.CONN_LISTEN or c.type == 2) and c.laddr:
                self.addresses.add(c.laddr.ip)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)


def _rows(sdir: Path) -> list[dict]:
    with open(sdir / "results.csv") as f:
        return list(csv.DictReader(f))


def _attempts(sdir: Path, trial_id: str) -> list[dict]:
    f = sdir / "trials" / trial_id / "attempts.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def _wandb_runs(wandb_dir: Path) -> list[dict]:
    """(group, name, job type, config, exit code) of every offline run, read from its .wandb log."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for run_dir in sorted(wandb_dir.glob("offline-run-*")):
        (log,) = run_dir.glob("run-*.wandb")
        info = {"dir": run_dir.name, "config": {}}
        for raw in wandb_records(log):
            rec = pb.Record()
            rec.ParseFromString(raw)
            which = rec.WhichOneof("record_type")
            items = []
            if which == "run":
                info.update(group=rec.run.run_group, name=rec.run.display_name, job_type=rec.run.job_type)
                items = rec.run.config.update
            elif which == "config":
                items = rec.config.update
            elif which == "exit":
                info["exit"] = rec.exit.exit_code
            for it in items:
                info["config"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        out.append(info)
    return out


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep exited (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _registered_checkpoint(trial_dir: Path) -> bool:
    """Whether Tune has registered one of this trial's checkpoints. A `checkpoint_00000k` folder
    appears when the trial's process writes it, before the driver has processed the report (a
    node lost or a Ctrl+C in that window restarts the trial from step 0). A function trainable
    does not train on until the driver has processed its last report and saved that checkpoint, so
    a second folder proves the first is registered."""
    return any(int(c.name.rsplit("_", 1)[1]) >= 1 for c in trial_dir.glob("checkpoint_*"))


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ (a) a local sweep

@pytest.mark.slow
def test_local_sweep_end_to_end(tmp_path, sweep_env):
    cwd, params, spec = _setup(tmp_path, _spec("tiny", steps=30, layers=[1, 2], max_concurrent=2))
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(_cmd(params, spec), cwd=cwd, env=sweep_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with ListenWatch(proc.pid) as watch:
            rc = proc.wait(240)
    finally:
        _stop(proc)
    out = (tmp_path / "sweep.log").read_text()
    assert rc == 0, out[-3000:]
    sdir = cwd / "out" / "sweeps" / "tiny"  # the relative out_dir resolved against the driver's cwd
    assert sorted(p.name for p in cwd.iterdir()) == ["out"], "something was written to the driver's cwd"

    # Loopback only: the nodes Ray reported, and every socket its processes listened on.
    nodes = json.loads((sdir / "ray_nodes.json").read_text())
    assert nodes and {n["address"] for n in nodes} == {"127.0.0.1"}
    assert watch.addresses, "no listening socket seen (is psutil able to see the Ray processes?)"
    assert watch.addresses <= LOOPBACK_IPS, watch.addresses

    rows = _rows(sdir)
    assert [(r["model.n_layer"], r["seed"], r["status"], r["step"]) for r in rows] == \
        [("1", "0", "COMPLETED", "30"), ("2", "0", "COMPLETED", "30")]
    for r in rows:
        assert float(r["val/l2"]) > 0 and float(r["val/l2/K=2"]) > 0 and float(r["val/l2/K=3"]) > 0
        assert float(r["wall_time_s"]) > 0
        assert (sdir / "trials" / r["trial_id"] / "model.safetensors").is_file()
    table = json.loads((sdir / "results.json").read_text())
    assert table["best"]["trial_id"] in {r["trial_id"] for r in rows} and len(table["trials"]) == 2
    png = sdir / "val_l2_vs_model.n_layer.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with open(png.with_suffix(".csv")) as f:  # the same points for `dvc plots`
        pts = list(csv.DictReader(f))
    assert {p["series"] for p in pts} == {"K=2", "K=3", "mean over K"} and {p["model_n_layer"] for p in pts} == {"1", "2"}

    runs = _wandb_runs(sdir / "wandb")
    assert len(runs) == 2, runs                       # one offline run per trial ...
    assert {r["group"] for r in runs} == {"sweep-tiny"}  # ... in one group
    assert {r["job_type"] for r in runs} == {"train"}
    assert sorted(r["name"].rsplit("-", 1)[1] for r in runs) == sorted(r["trial_id"] for r in rows)
    assert all(r.get("exit") == 0 for r in runs)
    # each run's config is the trial's run, flat (what the dashboard groups by: config.model.n_layer)
    layers = {r["trial_id"]: int(r["model.n_layer"]) for r in rows}
    for r in runs:
        c = r["config"]
        assert c.get("model.n_layer") == layers[r["name"].rsplit("-", 1)[1]], c
        assert (c.get("family"), c.get("task.d"), c.get("task.ks"), c.get("train.steps")) == ("gmm", 2, [2, 3], 30)
    assert "metric val/l2 min" in out                 # the family's monitor, by default
    assert "[sweep tiny] 2 trials (2 COMPLETED)" in out
    for r in rows:  # each trial trained the study's run with its value on top
        run = json.loads((sdir / "trials" / r["trial_id"] / "params.json").read_text())
        assert (run["family"], run["group"], run["model"]["n_layer"]) == ("gmm", "sweep-tiny", int(r["model.n_layer"]))


# ------------------------------------------------------------------------------ (b) interrupt, --resume

@pytest.mark.slow
def test_interrupt_and_resume(tmp_path, sweep_env):
    cwd, params, spec = _setup(tmp_path, _spec("resume", steps=RESUME_STEPS, layers=[1, 2, 3], max_concurrent=1,
                                              every=EVERY))
    sdir = cwd / "out" / "sweeps" / "resume"
    exp = sdir / "ray" / "resume"
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(_cmd(params, spec), cwd=cwd, env=sweep_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = _wait_for(lambda: list(sdir.glob("trials/*/metrics.json")), 150, "the first trial to finish", proc)
        first_id = first[0].parent.name
        # ... and the second to have reported a checkpoint to Tune; then Ctrl+C the driver.
        second = _wait_for(lambda: [t.name for t in exp.glob("*/") if t.name != first_id and _registered_checkpoint(t)],
                           90, "a registered checkpoint of the second trial", proc)[0]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(90)
    finally:
        _stop(proc)
    out1 = (tmp_path / "run1.log").read_text()
    assert rc == 130, out1[-3000:]
    assert "--resume" in out1
    rows = {r["trial_id"]: r for r in _rows(sdir)}
    assert rows[first_id]["status"] == "COMPLETED"
    assert rows[second]["status"] != "COMPLETED"
    done_mtime = (sdir / "trials" / first_id / "metrics.json").stat().st_mtime_ns

    # Without --resume the stored sweep is not silently overwritten (exit 2, before Ray starts).
    r = subprocess.run(_cmd(params, spec), cwd=cwd, env=sweep_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pass --resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    r = subprocess.run(_cmd(params, spec, "--resume"), cwd=cwd, env=sweep_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = {r["trial_id"]: r for r in _rows(sdir)}
    assert len(rows) == 3 and {r["status"] for r in rows.values()} == {"COMPLETED"}
    # The finished trial was not rerun: one start, its outputs untouched, one W&B run.
    assert len(_attempts(sdir, first_id)) == 1
    assert (sdir / "trials" / first_id / "metrics.json").stat().st_mtime_ns == done_mtime
    runs = _wandb_runs(sdir / "wandb")
    assert sum(r.get("name", "").endswith(first_id) for r in runs) == 1
    # The interrupted trial continued from its last Tune checkpoint, not from step 0.
    att = _attempts(sdir, second)
    assert len(att) == 2 and att[0]["restored_step"] is None and att[1]["restored_step"] >= EVERY
    assert int(rows[second]["restored_step"]) == att[1]["restored_step"]
    third = (set(rows) - {first_id, second}).pop()
    assert len(_attempts(sdir, third)) == 1
    # W&B: one run per attempt, all in the group, each closed (the interrupted attempt too: the
    # trial's process waits for train() to finish its run before it ends)
    assert len(runs) == 4 and {r.get("group") for r in runs} == {"sweep-resume"}, runs
    by_trial = {t: [r for r in runs if r["name"].endswith(t)] for t in (first_id, second, third)}
    assert [len(v) for v in by_trial.values()] == [1, 2, 1]
    assert sorted(r.get("exit") for r in by_trial[second]) == [0, 1]
    assert all(r.get("exit") == 0 for t in (first_id, third) for r in by_trial[t])


# ------------------------------------------------------------------------------ (c) node loss

@pytest.mark.slow
def test_two_node_cluster_survives_losing_the_worker(tmp_path, sweep_env):
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    cwd, params, spec = _setup(tmp_path, _spec("nodeloss", steps=NODELOSS_STEPS, layers=[1, 2], max_concurrent=2,
                                              every=EVERY))
    sdir = cwd / "out" / "sweeps" / "nodeloss"
    exp = sdir / "ray" / "nodeloss"
    cluster = None
    proc = None
    try:
        with ListenWatch() as watch:  # this process's tree: the cluster's head and worker
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            worker = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            nodes = ray.nodes()
            assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
            head_id = cluster.head_node.node_id
            worker_id = worker.node_id
            assert head_id != worker_id

            log = open(tmp_path / "sweep.log", "w")
            proc = subprocess.Popen(_cmd(params, spec, "--address", cluster.address), cwd=cwd, env=sweep_env,
                                    stdout=log, stderr=subprocess.STDOUT)

            def on_worker_with_checkpoint():
                for f in sdir.glob("trials/*/attempts.jsonl"):
                    att = _attempts(sdir, f.parent.name)
                    if att and att[0]["node_id"] == worker_id and _registered_checkpoint(exp / f.parent.name):
                        return f.parent.name
                return None

            victim = _wait_for(on_worker_with_checkpoint, 150, "a trial on the worker node to register a checkpoint", proc)
            assert not (sdir / "trials" / victim / "metrics.json").exists(), "trial finished before the node loss"
            cluster.remove_node(worker)  # the node dies mid-trial
            rc = proc.wait(300)
            watch.sample()
        out = (tmp_path / "sweep.log").read_text()
        assert rc == 0, out[-4000:]
        assert watch.addresses and watch.addresses <= LOOPBACK_IPS, watch.addresses
        assert {n["address"] for n in json.loads((sdir / "ray_nodes.json").read_text())} == {"127.0.0.1"}

        rows = {r["trial_id"]: r for r in _rows(sdir)}
        assert len(rows) == 2 and {r["status"] for r in rows.values()} == {"COMPLETED"}, rows
        assert all(r["step"] == str(NODELOSS_STEPS) for r in rows.values())
        att = _attempts(sdir, victim)
        assert len(att) == 2, att
        assert att[0]["node_id"] == worker_id and att[1]["node_id"] == head_id  # retried on the surviving node
        assert att[1]["restored_step"] >= EVERY                                  # ... from its checkpoint
        assert int(rows[victim]["num_failures"]) >= 1 and int(rows[victim]["restored_step"]) >= EVERY
    finally:
        if proc is not None:
            _stop(proc)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
