"""The one training function. `dvc repro` (via the CLI), Ray Tune trials and the tests all call
`train(cfg, d, out_dir)`; a sweep is this function with other params.

Layout of `out_dir` (default <cfg.out_dir>/train/d<d>):
    checkpoints/last.ckpt   resume point, written every train.ckpt_every steps and at the end
    checkpoints/FINGERPRINT hash of the params the checkpoint belongs to
    model.safetensors/.json the trained network (what the evaluate stage loads)
    metrics.json            final training/validation figures
    log/metrics.csv         the training curve (Lightning CSVLogger; `dvc plots`)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, IterableDataset

from pipeline.config import Config
from pipeline.models.tgmm import TGMMNet, save_network
from pipeline.training import tracking
from pipeline.training.module import NonFiniteLossError, TGMMModule


class TrainingInterrupted(RuntimeError):
    """Training stopped early (SIGTERM); the checkpoint of the last finished step is kept."""


class _Ticks(IterableDataset):
    """Lightning needs a loader; the data itself is sampled inside training_step from the step index."""

    def __iter__(self) -> Iterator[int]:
        while True:
            yield 0


def _one_batch() -> DataLoader:
    return DataLoader([0], batch_size=1)


@dataclass
class TrainResult:
    net: TGMMNet
    metrics: dict
    out_dir: Path
    model_path: Path
    resumed_from_step: int | None


def default_out_dir(cfg: Config, d: int) -> Path:
    return Path(cfg.out_dir) / "train" / f"d{d}"


def code_fingerprint() -> str:
    """Hash of the code a training run depends on (the same folders dvc.yaml lists as the train
    stage's deps): a checkpoint written by other code is not resumed."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted([root / "config.py", *[p for sub in ("tasks", "models", "training")
                                              for p in (root / sub).rglob("*.py")]]):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def training_fingerprint(cfg: Config, d: int) -> str:
    """Checkpoints are resumed only by runs with the same params and code (a changed lr starts
    afresh). task.dims is left out: adding a dimension to the study must not invalidate the others."""
    c = cfg.to_dict()
    c["task"].pop("dims")
    part = {k: c[k] for k in ("seed", "task", "model", "train")}
    part["code"] = code_fingerprint()
    return f"d{d}-" + hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


def _is_rank_zero() -> bool:
    """True in the launching process (before Lightning's DDP launcher sets RANK for the others)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _resume_point(ckpt_dir: Path, fingerprint: str) -> Path | None:
    last, stamp = ckpt_dir / "last.ckpt", ckpt_dir / "FINGERPRINT"
    if not last.is_file():
        return None
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return last
    # Params changed since that checkpoint: keep it aside rather than resuming the wrong run.
    stale = ckpt_dir.with_name(ckpt_dir.name + f"-stale-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}")
    shutil.move(str(ckpt_dir), stale)
    warnings.warn(f"{last}: belongs to other params; moved to {stale} and training from scratch")
    return None


def _accelerator(cfg: Config) -> str:
    a = cfg.train.accelerator
    if a == "cuda":
        return "gpu"
    return a


def build_trainer(cfg: Config, out_dir: Path, callbacks: list, loggers: list, *, progress_bar: bool,
                  fast_dev_run: bool | int = False) -> pl.Trainer:
    t = cfg.train
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="step{step}", save_top_k=0, save_last=True,
                           every_n_train_steps=t.ckpt_every, enable_version_counter=False)
    cbs = [ckpt, *callbacks]
    if progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, min(t.log_every, 10))))
    if loggers:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    return pl.Trainer(
        accelerator=_accelerator(cfg), devices=t.devices, strategy=t.strategy, precision=t.precision,
        max_steps=t.steps, max_epochs=-1, val_check_interval=min(t.val_every, t.steps),
        check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=1,
        gradient_clip_val=t.grad_clip or None, log_every_n_steps=t.log_every, logger=loggers or False,
        callbacks=cbs, enable_progress_bar=progress_bar, enable_model_summary=False,
        default_root_dir=str(out_dir), deterministic=False, fast_dev_run=fast_dev_run,
        benchmark=False, use_distributed_sampler=False,
    )


def train(cfg: Config, d: int, out_dir: str | Path | None = None, *, callbacks: list | None = None,
          track: bool = True, resume: bool = True, progress_bar: bool = True,
          fast_dev_run: bool | int = False, run_name: str | None = None,
          wandb_group: str | None = None, wandb_id: str | None = None) -> TrainResult:
    """Train a TGMM network for dimension d. Resumes from out_dir/checkpoints/last.ckpt when it
    belongs to the same params. Raises NonFiniteLossError on NaN/inf (checkpoint kept)."""
    if d not in cfg.task.dims:
        warnings.warn(f"d={d} is not in task.dims={cfg.task.dims}")
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg, d)
    ckpt_dir = out_dir / "checkpoints"
    fingerprint = training_fingerprint(cfg, d)
    if _is_rank_zero():
        ckpt_path = _resume_point(ckpt_dir, fingerprint) if resume and not fast_dev_run else None
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "FINGERPRINT").write_text(fingerprint + "\n")
    else:  # DDP worker re-launched by rank 0, which has already prepared the directory
        last = ckpt_dir / "last.ckpt"
        ckpt_path = last if resume and not fast_dev_run and last.is_file() else None

    resumed_step = None
    if ckpt_path is not None:
        resumed_step = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["global_step"])
        print(f"[train d={d}] resuming from {ckpt_path} (step {resumed_step})")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # parameter initialisation
    module = TGMMModule(cfg.to_dict(), d)
    # The curve of a resumed run continues in a file of its own, so nothing already logged is lost.
    version = "" if resumed_step is None else f"resumed-step{resumed_step}"
    loggers: list = [CSVLogger(str(out_dir), name="log", version=version)]
    name = run_name or f"{cfg.study}-train-d{d}"
    wandb_logger = None
    if track and not fast_dev_run:
        wandb_logger = tracking.make_logger(cfg, name, "train", cfg.out_dir, group=wandb_group, run_id=wandb_id, d=d)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    exit_code = 1
    try:  # from here on the W&B run is always finished, whatever fails
        trainer = build_trainer(cfg, out_dir, list(callbacks or []), loggers, progress_bar=progress_bar,
                                fast_dev_run=fast_dev_run)
        trainer.fit(module, train_dataloaders=DataLoader(_Ticks(), batch_size=None),
                    val_dataloaders=_one_batch(), ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True)
        if "val/l2" not in trainer.callback_metrics:  # e.g. resumed from a finished checkpoint: fit was a no-op
            trainer.validate(module, dataloaders=_one_batch(), verbose=False)
        exit_code = 0
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"train d={d}: {e} [{ckpt_dir / 'last.ckpt'}]") from None
    except SIGTERMException:
        # Lightning stops at a step boundary on SIGTERM (pre-emption); keep that step as the resume
        # point and fail loudly instead of exiting 0 with a half-trained network.
        step = int(trainer.global_step)
        if trainer.world_size == 1 and step > 0:
            trainer.save_checkpoint(ckpt_dir / "last.ckpt")
        raise TrainingInterrupted(f"train d={d}: interrupted by SIGTERM at step {step}; "
                                  f"rerun the same command to resume from {ckpt_dir / 'last.ckpt'}") from None
    finally:
        if wandb_logger is not None:
            tracking.finish(exit_code)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    metrics.update(global_step=int(trainer.global_step), d=d, world_size=int(trainer.world_size))
    model_path = out_dir / "model.safetensors"
    if trainer.is_global_zero:
        save_network(module.net, model_path, meta={"global_step": int(trainer.global_step),
                                                   "fingerprint": fingerprint})
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return TrainResult(net=module.net, metrics=metrics, out_dir=out_dir, model_path=model_path,
                       resumed_from_step=resumed_step)
