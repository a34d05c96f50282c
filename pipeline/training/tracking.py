"""Weights & Biases: offline unless credentials are configured; never blocks or fails a run.

Mode resolution (first match wins):
  1. the WANDB_MODE environment variable (online | offline | disabled),
  2. params.yaml `wandb.mode` if it is not `auto`,
  3. `auto`: online when W&B credentials are configured (WANDB_API_KEY or a ~/.netrc entry for
     the W&B host), otherwise offline. Offline runs land in <out_dir>/wandb/offline-run-*; upload
     them later with `wandb sync <dir>`.
"""
from __future__ import annotations

import netrc
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import Config, flatten

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


def run_config(cfg: Config, **extra) -> dict:
    """What a run records as its config: every parameter, flattened, plus run-specific extras."""
    return {**flatten(cfg.to_dict()), **extra}


def make_logger(cfg: Config, name: str, job_type: str, save_dir: str | Path, group: str | None = None,
                tags: list[str] | None = None, run_id: str | None = None, **extra_config):
    """A Lightning WandbLogger whose run is already started, or None if tracking is unavailable.

    The run is created eagerly so that a tracking failure shows here, as a warning, and not as a
    crashed training run. Online init failures fall back to offline. A `run_id` makes a retried or
    resumed job continue the same run (resume="allow") instead of starting a second one.
    """
    mode = resolve_mode(cfg.wandb.mode)
    if mode == "disabled":
        return None
    try:
        from pytorch_lightning.loggers import WandbLogger
        import wandb
    except ImportError as e:  # pragma: no cover - wandb is a declared dependency
        warnings.warn(f"W&B unavailable ({e}); continuing without tracking")
        return None
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    finish()  # a run left open by an earlier failure must not swallow this one
    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            logger = WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, name=name, id=run_id,
                                 group=group or cfg.wandb.group or cfg.study, job_type=job_type, tags=tags,
                                 save_dir=str(save_dir), mode=attempt, config=run_config(cfg, **extra_config),
                                 settings=wandb.Settings(init_timeout=30, silent=True, x_disable_stats=True))
            run = logger.experiment  # start now (rank 0); other ranks get a dummy
            run_dir = getattr(run, "dir", None)
            if run_dir:
                print(f"[wandb] {attempt} run {name!r} (group {group or cfg.wandb.group or cfg.study}) -> "
                      f"{Path(run_dir).parent}", file=sys.stderr)
            return logger
        except Exception as e:  # tracking must never fail a run
            warnings.warn(f"W&B {attempt} init failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          + ("retrying offline" if attempt == "online" else "continuing without tracking"))
            finish()
    return None


def finish(exit_code: int = 0) -> None:
    """Close the current W&B run, if any, so the next run in this process starts clean."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except Exception as e:  # pragma: no cover
        warnings.warn(f"W&B finish failed: {e}")


@contextmanager
def tracked_run(cfg: Config, name: str, job_type: str, save_dir: str | Path, **kw):
    """`with tracked_run(...) as logger:` — a started run (or None) that is always finished."""
    logger = make_logger(cfg, name, job_type, save_dir, **kw)
    code = 1
    try:
        yield logger
        code = 0
    finally:
        if logger is not None:
            finish(exit_code=code)
