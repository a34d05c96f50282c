"""Weights & Biases: offline unless credentials are configured; never blocks or fails a run.

Mode resolution (first match wins):
  1. the WANDB_MODE environment variable (online | offline | disabled),
  2. params.yaml `wandb.mode` if it is not `auto`,
  3. `auto`: online when W&B credentials are configured (WANDB_API_KEY or a ~/.netrc entry for
     the W&B host), otherwise offline. Offline runs land in <out_dir>/wandb/offline-run-*; upload
     them later with `wandb sync <dir>`.

Grouping: every run of a study is in the W&B group named after the study (a network shared by
several studies is in the group of the first); every sweep has its own group (tuning/spec.py).
"""
from __future__ import annotations

import netrc
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from pipeline.core.config import Config, RunConfig, WandbConfig, flatten

MODES = ("online", "offline", "disabled")


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(configured: str) -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "dryrun":
        env = "offline"
    if env in MODES:
        return env
    if configured != "auto":
        return configured
    return "online" if has_credentials() else "offline"


def run_record(run: RunConfig, **extra) -> dict:
    """What a training run records as its W&B config: the run's params, flattened, plus extras."""
    return {**flatten(run.to_dict()), **extra}


def start_run(cfg: Config | None, name: str, job_type: str, save_dir: str | Path, group: str,
              tags: list[str] | None = None, run_id: str | None = None, config: dict | None = None):
    """A started W&B run (plain `wandb.init`: no Lightning import, which costs 6 s on a 2-core CPU, so
    an evaluation stage does not pay for it), or None if tracking is disabled or unavailable.

    `cfg` supplies the W&B settings (mode, project, entity; defaults if None). `save_dir` is where
    the runs land, e.g. <out_dir>/wandb -> <out_dir>/wandb/offline-run-*: W&B puts its runs in a
    `wandb` folder below the directory it is given, so a save_dir named `wandb` is handed over as
    its parent (any other save_dir gets the `wandb` folder below it). The run is created
    eagerly so that a tracking failure shows here, as a warning, and not as a crashed job.
    Online init failures fall back to offline. A `run_id` makes a retried or resumed job continue the
    same run (resume="allow") instead of starting a second one.
    """
    w = cfg.wandb if cfg is not None else WandbConfig()
    mode = resolve_mode(w.mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError as e:  # pragma: no cover - wandb is a declared dependency
        warnings.warn(f"W&B unavailable ({e}); continuing without tracking")
        return None
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    wandb_root = save_dir.parent if save_dir.name == "wandb" else save_dir  # W&B adds the `wandb` folder
    finish()  # a run left open by an earlier failure must not swallow this one
    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            run = wandb.init(project=w.project, entity=w.entity, name=name, id=run_id, group=group,
                             job_type=job_type, tags=tags, dir=str(wandb_root), mode=attempt, config=config or {},
                             resume="allow" if run_id else None,
                             settings=wandb.Settings(init_timeout=30, silent=True, x_disable_stats=True))
            run_dir = getattr(run, "dir", None)
            if run_dir:
                print(f"[wandb] {attempt} run {name!r} (group {group}) -> {Path(run_dir).parent}", file=sys.stderr)
            return run
        except Exception as e:  # tracking must never fail a run
            warnings.warn(f"W&B {attempt} init failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          + ("retrying offline" if attempt == "online" else "continuing without tracking"))
            finish()
    return None


def make_logger(cfg: Config | None, name: str, job_type: str, save_dir: str | Path, group: str,
                tags: list[str] | None = None, run_id: str | None = None, config: dict | None = None):
    """A Lightning WandbLogger around a run started by `start_run` (same arguments), or None."""
    run = start_run(cfg, name, job_type, save_dir, group, tags=tags, run_id=run_id, config=config)
    if run is None:
        return None
    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(experiment=run, save_dir=str(Path(save_dir)))


def finish(exit_code: int = 0) -> None:
    """Close the current W&B run, if any, so the next run in this process starts clean."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except Exception as e:  # pragma: no cover
        warnings.warn(f"W&B finish failed: {e}")


@contextmanager
def tracked_run(cfg: Config | None, name: str, job_type: str, save_dir: str | Path, group: str, **kw):
    """`with tracked_run(...) as run:` — a started W&B run (or None) that is always finished."""
    run = start_run(cfg, name, job_type, save_dir, group, **kw)
    code = 1
    try:
        yield run
        code = 0
    finally:
        if run is not None:
            finish(exit_code=code)
