"""The one training function. `dvc repro` (via the CLI), Ray Tune trials and the tests all call
`train(run, out_dir)` for a run of any family; a sweep is this function with other params.

Layout of `out_dir` (the pipeline's: <out_dir>/runs/<run id>):
    checkpoints/last.ckpt   resume point, written every train.ckpt_every steps and at the end
    checkpoints/FINGERPRINT the run's fingerprint (core/fingerprint.py): what the checkpoint belongs to
    model.safetensors/.json the trained network and its run (what the evaluate stage loads)
    metrics.json            final training/validation figures
    log/metrics.csv         the training curve (Lightning CSVLogger; `dvc plots`)
"""
from __future__ import annotations

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

from pipeline.core import tracking
from pipeline.core.config import RunConfig
from pipeline.core.fingerprint import fingerprint as run_fingerprint
from pipeline.core.errors import NonFiniteLossError, TrainingInterrupted
from pipeline.core.module import TaskModule, resolve_precision
from pipeline.core.network import Network, save_network


class _Ticks(IterableDataset):
    """Lightning needs a loader; the data itself is sampled inside training_step from the step index."""

    def __iter__(self) -> Iterator[int]:
        while True:
            yield 0


def _one_batch() -> DataLoader:
    return DataLoader([0], batch_size=1)


@dataclass
class TrainResult:
    net: Network
    metrics: dict
    out_dir: Path
    model_path: Path
    resumed_from_step: int | None


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


def _accelerator(run: RunConfig) -> str:
    a = run.train.accelerator
    if a == "cuda":
        return "gpu"
    return a


def _uses_cuda(run: RunConfig) -> bool:
    return run.train.accelerator in ("gpu", "cuda") or (run.train.accelerator == "auto" and torch.cuda.is_available())


def build_trainer(run: RunConfig, out_dir: Path, callbacks: list, loggers: list, *, progress_bar: bool,
                  fast_dev_run: bool | int = False) -> pl.Trainer:
    t = run.train
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="step{step}", save_top_k=0, save_last=True,
                           every_n_train_steps=t.ckpt_every, enable_version_counter=False)
    cbs = [ckpt, *callbacks]
    if progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, min(t.log_every, 10))))
    if loggers:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    return pl.Trainer(
        accelerator=_accelerator(run), devices=t.devices, strategy=t.strategy,
        precision=resolve_precision(t.precision, "cuda" if _uses_cuda(run) else "cpu"),
        max_steps=t.steps, max_epochs=-1, val_check_interval=min(t.val_every, t.steps),
        check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=1,
        gradient_clip_val=t.grad_clip or None, log_every_n_steps=t.log_every, logger=loggers or False,
        callbacks=cbs, enable_progress_bar=progress_bar, enable_model_summary=False,
        default_root_dir=str(out_dir), deterministic=False, fast_dev_run=fast_dev_run,
        benchmark=False, use_distributed_sampler=False,
    )


def train(run: RunConfig, out_dir: str | Path, *, callbacks: list | None = None, track: bool = True,
          resume: bool = True, progress_bar: bool = True, fast_dev_run: bool | int = False,
          wandb_id: str | None = None, wandb_config: dict | None = None, tracking_cfg=None) -> TrainResult:
    """Train the network of `run` into out_dir. Resumes from out_dir/checkpoints/last.ckpt when it
    belongs to the same run (fingerprint). Raises NonFiniteLossError on NaN/inf (checkpoint kept).
    W&B: run name run.name, group run.group; `tracking_cfg` (a Config) gives the W&B settings."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    fingerprint = run_fingerprint(run)
    tag = f"[train {run.name}]"
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
        print(f"{tag} resuming from {ckpt_path} (step {resumed_step})")

    pl.seed_everything(run.seed, workers=True, verbose=False)  # parameter initialisation
    module = TaskModule(run.to_dict())
    if run.train.compile:
        module.net.backbone.compile(dynamic=True)  # in place: parameter names (checkpoints) unchanged
    # The curve of a resumed run continues in a file of its own, so nothing already logged is lost.
    version = "" if resumed_step is None else f"resumed-step{resumed_step}"
    loggers: list = [CSVLogger(str(out_dir), name="log", version=version)]
    wandb_logger = None
    if track and not fast_dev_run:
        wandb_logger = tracking.make_logger(tracking_cfg, run.name, "train", _wandb_dir(out_dir), group=run.group,
                                            run_id=wandb_id, config=wandb_config or tracking.run_record(run))
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    exit_code = 1
    monitor = module.family.monitor
    try:  # from here on the W&B run is always finished, whatever fails
        trainer = build_trainer(run, out_dir, list(callbacks or []), loggers, progress_bar=progress_bar,
                                fast_dev_run=fast_dev_run)
        trainer.fit(module, train_dataloaders=DataLoader(_Ticks(), batch_size=None),
                    val_dataloaders=_one_batch(), ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True)
        module.check_finite(weights=True)  # never save a non-finite network
        if monitor not in trainer.callback_metrics:  # e.g. resumed from a finished checkpoint: fit was a no-op
            trainer.validate(module, dataloaders=_one_batch(), verbose=False)
        exit_code = 0
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{tag} {e} [{ckpt_dir / 'last.ckpt'}]") from None
    except SIGTERMException:
        # Lightning stops at a step boundary on SIGTERM (pre-emption); keep that step as the resume
        # point and fail loudly instead of exiting 0 with a half-trained network.
        step = int(trainer.global_step)
        if trainer.world_size == 1 and step > 0:
            trainer.save_checkpoint(ckpt_dir / "last.ckpt")
        raise TrainingInterrupted(f"{tag} interrupted by SIGTERM at step {step}; "
                                  f"rerun the same command to resume from {ckpt_dir / 'last.ckpt'}") from None
    finally:
        if wandb_logger is not None:
            tracking.finish(exit_code)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    metrics.update(global_step=int(trainer.global_step), world_size=int(trainer.world_size))
    model_path = out_dir / "model.safetensors"
    if trainer.is_global_zero:
        save_network(module.net, model_path, meta={"global_step": int(trainer.global_step),
                                                   "fingerprint": fingerprint})
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return TrainResult(net=module.net, metrics=metrics, out_dir=out_dir, model_path=model_path,
                       resumed_from_step=resumed_step)


def _wandb_dir(out_dir: Path) -> Path:
    """W&B runs go to <out_dir of the pipeline>/wandb: two levels above a run's folder."""
    out_dir = Path(out_dir).resolve()
    return out_dir.parents[1] / "wandb" if out_dir.parent.name in ("runs", "trials") else out_dir / "wandb"
