"""Run a validated sweep with Ray Tune: start a loopback-only local Ray (or connect to a cluster),
build the Tuner (or restore an interrupted one), fit, then write the results table and plots.

Layout of `<out_dir>/sweeps/<name>/`:
    sweep.json              the resolved spec + params (a resumed sweep must match it)
    ray_nodes.json          the Ray nodes the sweep ran on (address, resources)
    ray/<name>/             Tune's experiment directory (state, per-trial results, checkpoints);
                            `--storage URI` puts it elsewhere (NFS path, s3://...)
    trials/<trial_id>/      each trial's train() out_dir: checkpoints/, log/, model.*, metrics.json,
                            attempts.jsonl (one line per start), params.json
    wandb/                  one W&B run per trial (offline by default), group sweep-<name>
    results.csv/.json, *.png
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import Config
from pipeline.tuning.spec import SpecError, SweepSpec, check_resources, fingerprint, sweep_group

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Forwarded to every trial process (a cluster's workers do not share the driver's environment).
FORWARD_ENV_PREFIXES = ("WANDB_",)
FORWARD_ENV = ("PYTHONUNBUFFERED", "DVC_NO_ANALYTICS")


@dataclass
class SweepOutcome:
    sweep_dir: Path
    experiment_path: str
    rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    interrupted: bool = False
    n_errors: int = 0
    wall_time_s: float = 0.0


def sweep_dir(cfg: Config, spec: SweepSpec) -> Path:
    return Path(cfg.out_dir).expanduser().resolve() / "sweeps" / spec.name


def storage_root(cfg: Config, spec: SweepSpec, storage: str | None) -> str:
    """Where Tune keeps the experiment: <sweep_dir>/ray by default; a URI (s3://, gs://) or a
    shared path on a multi-node cluster."""
    if storage:
        if "://" in storage:
            return storage.rstrip("/") + f"/{spec.name}"
        return str(Path(storage).expanduser().resolve() / spec.name)
    return str(sweep_dir(cfg, spec) / "ray")


def experiment_path(cfg: Config, spec: SweepSpec, storage: str | None) -> str:
    root = storage_root(cfg, spec, storage)
    return f"{root}/{spec.name}" if "://" in root else str(Path(root) / spec.name)


def _trial_id(trial) -> str:  # trial name and folder; short paths: Ray's unix sockets and logs live under them
    return trial.trial_id


# ----------------------------------------------------------------------------------------- Ray

def _loopback_env() -> None:
    """Local Ray binds loopback only: this must be in the environment before `import ray`
    (ray_constants reads it at import) and is inherited by every Ray process."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _quiet_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no usage report: nothing leaves the machine
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")


def _runtime_env(local: bool) -> dict | None:
    """What every trial process gets: environment variables, and on a cluster the `pipeline`
    package. Inside `ray job submit` the job's own runtime env (working_dir, env_vars) applies and
    nothing is added (Ray refuses to merge a field set in both)."""
    if not local and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray in a job's driver
        return None
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARD_ENV_PREFIXES) or k in FORWARD_ENV}
    if local:  # trials import `pipeline` from this checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {"env_vars": env}
    # A cluster: ship this checkout's `pipeline` package to every node (Ray uploads it to the
    # cluster once); the nodes need the same Python dependencies installed.
    return {"env_vars": env, "py_modules": [str(REPO_ROOT / "pipeline")], "excludes": ["__pycache__/"]}


def prepare_env(address: str | None) -> None:
    """Environment for Ray, set before `import ray`: loopback only for a local Ray, no usage stats."""
    _quiet_env()
    if address is None or _is_loopback(address):
        _loopback_env()
        if "ray" in sys.modules:
            from ray._private import ray_constants

            if ray_constants.ENABLE_RAY_CLUSTER:
                raise SpecError("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: "
                                "a local Ray would bind the network interface; set it before importing ray")


def _is_loopback(address: str) -> bool:
    """A cluster on this machine's loopback (e.g. ray.cluster_utils.Cluster): the driver must bind
    loopback too, or it picks the interface address and cannot find its raylet."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def start_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Start a local loopback-only Ray (address None) or connect to a cluster. Returns True if this
    call started/connected Ray (and so must shut it down)."""
    prepare_env(address)
    import ray

    if ray.is_initialized():
        return False
    kw = dict(runtime_env=_runtime_env(address is None), log_to_driver=True, configure_logging=True,
              logging_level="WARNING")
    if address is None:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address=LOOPBACK, **kw)
    else:
        ray.init(address=address, **kw)
    return True


def ray_nodes() -> list[dict]:
    import ray

    return [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "alive": n["Alive"],
             "resources": n.get("Resources", {})} for n in ray.nodes()]


def assert_loopback(nodes: list[dict]) -> None:
    bad = [n["address"] for n in nodes if n["alive"] and n["address"] != LOOPBACK]
    if bad:
        raise RuntimeError(f"local Ray must bind {LOOPBACK} only, but nodes listen on {bad}; "
                           "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray starts")


def check_cluster_resources(spec: SweepSpec, nodes: list[dict]) -> None:
    alive = [n for n in nodes if n["alive"]]
    cpus = max((n["resources"].get("CPU", 0) for n in alive), default=0)
    gpus = max((n["resources"].get("GPU", 0) for n in alive), default=0)
    check_resources(spec, cpus, gpus, f"the largest node of the cluster ({len(alive)} nodes)")


# ----------------------------------------------------------------------------------------- Tuner

def build_trainable(spec: SweepSpec, cfg: Config, sdir: Path):
    from ray import tune

    from pipeline.tuning.trial import run_trial

    context = {"name": spec.name, "sweep_dir": str(sdir), "run": spec.run, "base": dict(spec.base),
               "tracking": cfg,
               "param_keys": spec.param_keys, "cpu": spec.resources["cpu"],
               "metric": spec.metric, "wandb_group": sweep_group(spec.name)}
    trainable = tune.with_parameters(run_trial, context=context)
    return tune.with_resources(trainable, {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]})


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    space = {}
    for p in spec.params:
        if p.kind == "grid":
            space[p.key] = tune.grid_search(list(p.args))
        elif p.kind == "values":
            space[p.key] = tune.choice(list(p.args))
        elif p.kind == "uniform":
            space[p.key] = tune.uniform(*p.args)
        elif p.kind == "loguniform":
            space[p.key] = tune.loguniform(*p.args)
        elif p.kind == "randint":  # inclusive [low, high] in the spec; Ray's upper bound is exclusive
            space[p.key] = tune.randint(p.args[0], p.args[1] + 1)
    space["seed"] = tune.grid_search(list(spec.seeds))
    return space


def build_scheduler(spec: SweepSpec, cfg: Config):
    s = spec.scheduler
    if s is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    steps = int(spec.base.get("train.steps", spec.run["train"]["steps"]))  # the study's run, not the base `train`
    for p in spec.params:
        if p.key == "train.steps":
            steps = max(int(v) for v in p.candidate_values())
    return ASHAScheduler(time_attr="step", max_t=s.max_t or steps, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets)


def build_tuner(spec: SweepSpec, cfg: Config, *, storage: str | None, max_concurrent: int | None):
    from ray import tune

    sdir = sweep_dir(cfg, spec)
    return tune.Tuner(
        build_trainable(spec, cfg, sdir),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=build_scheduler(spec, cfg),
                                    max_concurrent_trials=max_concurrent or spec.max_concurrent,
                                    reuse_actors=False, trial_name_creator=_trial_id,
                                    trial_dirname_creator=_trial_id),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage_root(cfg, spec, storage),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  verbose=1),
    )


# ----------------------------------------------------------------------------------------- run

def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _check_previous(spec: SweepSpec, cfg: Config, exp: str, *, resume: bool, fresh: bool) -> bool:
    """Decide between a new sweep and a restore. Returns True to restore."""
    from ray.tune import Tuner

    sdir = sweep_dir(cfg, spec)
    exists = Tuner.can_restore(exp)
    if fresh:
        if "://" not in exp and Path(exp).exists():
            shutil.rmtree(exp)
        for sub in ("trials", "wandb"):
            shutil.rmtree(sdir / sub, ignore_errors=True)
        return False
    if resume:
        if not exists:
            print(f"[sweep {spec.name}] nothing to resume at {exp}: starting a new sweep", file=sys.stderr)
            return False
        stamp = sdir / "sweep.json"
        if stamp.is_file():
            old = json.loads(stamp.read_text()).get("fingerprint")
            if old != fingerprint(spec):
                raise SpecError(f"{spec.path}: the spec or params changed since the sweep at {exp} started; "
                                "restore them to resume, or pass --fresh to start over")
        return True
    if exists:
        raise SpecError(f"{spec.path}: a sweep is already stored at {exp}; pass --resume to continue it "
                        "or --fresh to discard it")
    return False


def run_sweep(spec: SweepSpec, cfg: Config, *, address: str | None = None, resume: bool = False,
              fresh: bool = False, max_concurrent: int | None = None, storage: str | None = None,
              num_cpus: int | None = None) -> SweepOutcome:
    """Run (or resume) the sweep; returns the table rows and files written. Raises SpecError for
    problems found after connecting (a cluster that cannot give the resources, a changed spec)."""
    from pipeline.tuning import results as R

    t0 = time.time()
    sdir = sweep_dir(cfg, spec)
    exp = experiment_path(cfg, spec, storage)
    address = address or os.environ.get("RAY_ADDRESS") or None
    prepare_env(address)
    restore = _check_previous(spec, cfg, exp, resume=resume, fresh=fresh)  # before Ray starts
    started = start_ray(address, num_cpus=num_cpus)
    import ray
    from ray.tune import Tuner

    prev_sigterm = None
    try:
        nodes = ray_nodes()
        if address is None:
            assert_loopback(nodes)
        else:
            check_cluster_resources(spec, nodes)
        sdir.mkdir(parents=True, exist_ok=True)
        _write_json(sdir / "ray_nodes.json", nodes)
        _write_json(sdir / "sweep.json", {"fingerprint": fingerprint(spec), "spec": spec.to_dict(),
                                          "params": cfg.to_dict(), "experiment_path": exp,
                                          "address": address or "local"})
        if restore:
            print(f"[sweep {spec.name}] resuming {exp}", file=sys.stderr)
            tuner = Tuner.restore(exp, trainable=build_trainable(spec, cfg, sdir), resume_unfinished=True,
                                  resume_errored=True)
        else:
            tuner = build_tuner(spec, cfg, storage=storage, max_concurrent=max_concurrent)
        # SIGTERM (a cluster scheduler, `kill`) stops as gracefully as Ctrl+C: state saved, resumable.
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            prev_sigterm = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
        grid = tuner.fit()
        exp = grid.experiment_path
    finally:
        if prev_sigterm is not None:
            signal.signal(signal.SIGTERM, prev_sigterm)
        if started:
            ray.shutdown()
    rows = R.collect(exp, spec, sdir)
    out = SweepOutcome(sweep_dir=sdir, experiment_path=exp, rows=rows)
    out.interrupted = any(r["status"] in ("PENDING", "RUNNING", "PAUSED") for r in rows)
    out.n_errors = sum(r["status"] == "ERROR" for r in rows)
    out.files = R.write(rows, spec, sdir, cfg)
    out.wall_time_s = time.time() - t0
    return out


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def report_only(spec: SweepSpec, cfg: Config, *, storage: str | None = None) -> list[Path]:
    """Rewrite the table and plots from the stored experiment (no Ray started)."""
    from pipeline.tuning import results as R

    prepare_env(None)
    from ray.tune import Tuner

    exp = experiment_path(cfg, spec, storage)
    if not Tuner.can_restore(exp):
        raise SpecError(f"{spec.path}: no stored sweep at {exp} (run it first)")
    sdir = sweep_dir(cfg, spec)
    return R.write(R.collect(exp, spec, sdir), spec, sdir, cfg)
