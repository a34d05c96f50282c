"""The Tune trainable: one trial = one call of the one training function, `train()`.

A trial builds its run (the sweep's unit's run + the spec's `base` + the trial's values + seed), restores
the Tune checkpoint (if Tune gives one) into `<sweep_dir>/trials/<trial_id>/checkpoints/`, where
`train()` resumes from it, and trains with `TuneReporter`, a small Lightning callback that reports
metrics and a checkpoint to Tune every `train.ckpt_every` steps (and the metrics of every
validation). The final metrics are reported when `train()` returns, with the trained network as
the trial's last checkpoint. Every path is absolute: Tune changes the working directory.

Why not `TuneReportCheckpointCallback`: it reports on one Lightning hook (validation end by
default), so it checkpoints every `val_every` steps rather than `ckpt_every`, and its report at the
last step lets a scheduler stop the trial before `train()` has written the network and finished
its W&B run. Its checkpoint is the same thing as ours: `trainer.save_checkpoint()` (the full
Lightning state, what `last.ckpt` holds).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytorch_lightning as pl

CKPT_FILE = "last.ckpt"
FINGERPRINT_FILE = "FINGERPRINT"
FINAL_FILES = ("model.safetensors", "model.json", "metrics.json")
ATTEMPTS_FILE = "attempts.jsonl"


def _scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        if "/" in k:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                pass
    return out


class TuneReporter(pl.Callback):
    """Report to Tune every `every` steps (metrics + a checkpoint of the full training state) and
    after every validation (metrics). A checkpoint is taken at the end of its step, exactly where
    ModelCheckpoint writes last.ckpt, and reported once that step's validation (if any) has run,
    so the report carries fresh val metrics. The last step is left to the trial's final report."""

    def __init__(self, every: int, max_steps: int, metric: str, workdir: Path, fingerprint: str,
                 extra: dict | None = None):
        self.every, self.max_steps, self.metric = every, max_steps, metric
        self.workdir, self.fingerprint = Path(workdir), fingerprint
        self.extra = dict(extra or {})
        self._pending: tuple[int, Path] | None = None
        self.reports = 0

    # Lightning hooks -------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step >= self.max_steps or step % self.every:
            return
        self._flush(trainer)
        d = Path(tempfile.mkdtemp(prefix=f".tune-ckpt-{step}-", dir=self.workdir))
        trainer.save_checkpoint(str(d / CKPT_FILE))  # full, resumable state; read back with weights_only=True
        (d / FINGERPRINT_FILE).write_text(self.fingerprint + "\n")
        self._pending = (step, d)

    def on_validation_end(self, trainer, pl_module):
        step = trainer.global_step
        pending = None
        if self._pending is not None and self._pending[0] == step:
            pending, self._pending = self._pending, None
        else:
            self._flush(trainer)
        if trainer.sanity_checking or step >= self.max_steps:  # the last step: the trial's final report
            if pending is not None:
                shutil.rmtree(pending[1], ignore_errors=True)
            return
        self._report(trainer, pending)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if _STOP_REQUESTED.is_set():  # Tune is stopping this trial: end train() now (it closes W&B)
            self._discard()
            raise SystemExit(0)
        self._flush(trainer)  # a checkpoint step without validation: report it now, before the next step

    def on_train_end(self, trainer, pl_module):
        self._flush(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self._discard()

    # internals -------------------------------------------------------------------------------
    def _flush(self, trainer):
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._report(trainer, pending)

    def _discard(self):
        if self._pending is not None:
            shutil.rmtree(self._pending[1], ignore_errors=True)
            self._pending = None

    def _report(self, trainer, pending: tuple[int, Path] | None):
        import ray.tune

        if _STOP_REQUESTED.is_set():
            if pending is not None:
                shutil.rmtree(pending[1], ignore_errors=True)
            return
        metrics = _scalar_metrics(trainer)
        if self.metric not in metrics:  # spec validation prevents this; never report a metric-less result
            if pending is not None:
                shutil.rmtree(pending[1], ignore_errors=True)
            return
        metrics.update(self.extra, step=int(trainer.global_step), final=0)
        try:
            if pending is None:
                ray.tune.report(metrics)
            else:
                ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(str(pending[1])))
            self.reports += 1
        finally:
            if pending is not None:
                shutil.rmtree(pending[1], ignore_errors=True)


def _restore_checkpoint(ckpt_dir: Path, fingerprint: str) -> int | None:
    """Put Tune's checkpoint (if any) where train() resumes from; returns its step. Without one,
    start afresh: a local last.ckpt that was never reported to Tune is not this trial's state."""
    import ray.tune
    import torch

    checkpoint = ray.tune.get_checkpoint()
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    if checkpoint is None:
        return None
    ckpt_dir.mkdir(parents=True)
    with checkpoint.as_directory() as src:
        src = Path(src)
        shutil.copy2(src / CKPT_FILE, ckpt_dir / CKPT_FILE)
        stamp = src / FINGERPRINT_FILE
        # A checkpoint from other params is moved aside by train(), which then starts afresh.
        (ckpt_dir / FINGERPRINT_FILE).write_text(stamp.read_text() if stamp.is_file() else fingerprint + "\n")
    return int(torch.load(ckpt_dir / CKPT_FILE, map_location="cpu", weights_only=True)["global_step"])


def run_name(name: str, values: dict, seed: int, trial_id: str) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in values.items()]
    return "-".join([name, *parts, f"s{seed}", trial_id])


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


# One trial per actor process (reuse_actors=False), so module-level flags are per trial.
_TRAINING_STARTED = threading.Event()
_TRAINING_DONE = threading.Event()     # run_trial returned or raised
_STOP_REQUESTED = threading.Event()    # Tune is stopping this trial
STOP_GRACE_S = 60.0


class _WaitForTraining:
    """Mixed into Tune's trainable class (via `run_trial.__mixins__`). When Tune stops a trial
    (a scheduler's decision, Ctrl+C of the sweep), FunctionTrainable.cleanup() tells the training
    thread to exit at its next report but does not wait, and the actor process ends right after:
    train() would not get to finish its W&B run (an offline run loses its data). Here the training
    thread is also told to exit at its next step (TuneReporter), and cleanup waits for it (at most
    STOP_GRACE_S), so train()'s `finally` closes the W&B run."""

    def cleanup(self):
        _STOP_REQUESTED.set()
        try:
            super().cleanup()
        finally:
            if _TRAINING_STARTED.is_set():
                _TRAINING_DONE.wait(STOP_GRACE_S)


def _teardown_wandb() -> None:
    """Stop W&B's service while this process is alive: its atexit hook fails noisily when Ray ends
    the actor process (the run itself is already finished by train())."""
    import sys

    if "wandb" in sys.modules:
        try:
            sys.modules["wandb"].teardown()
        except Exception:  # tracking never fails a trial
            pass


def run_trial(config: dict, context: dict) -> None:
    """The function trainable. `config`: the trial's values (dotted run keys) + `seed`;
    `context`: what the runner fixed for the whole sweep (absolute paths, the unit's run, the
    spec's base and metric, the params for W&B)."""
    _TRAINING_DONE.clear()
    _TRAINING_STARTED.set()
    try:
        _run_trial(config, context)
    finally:
        _TRAINING_DONE.set()


run_trial.__mixins__ = (_WaitForTraining,)  # see _WaitForTraining


def _run_trial(config: dict, context: dict) -> None:
    import warnings

    import ray.tune
    import torch

    from pipeline.core.config import RunConfig
    from pipeline.core.fingerprint import fingerprint
    from pipeline.core.train import train
    from pipeline.tuning.spec import sweep_group, trial_params

    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, int(context["cpu"])))
    from pipeline.core.allocator import tune_allocator

    tune_allocator()  # a trial runs in a Ray worker process: apply it there too
    t0 = time.time()

    trial_id = ray.tune.get_context().get_trial_id()
    values = {k: config[k] for k in context["param_keys"]}
    seed = int(config["seed"])
    sweep_dir = Path(context["sweep_dir"])
    params = trial_params(context["run"], context["base"], values, seed)
    params.update(name=run_name(context["name"], values, seed, trial_id), group=sweep_group(context["name"]))
    cfg = RunConfig.from_dict(params, where=f"sweep {context['name']} trial {trial_id}")

    trial_dir = sweep_dir / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    restored_step = _restore_checkpoint(trial_dir / "checkpoints", fp)
    node_id = None
    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover
        pass
    with open(trial_dir / ATTEMPTS_FILE, "a") as f:  # one line per start: tells a retry from a fresh run
        f.write(json.dumps({"trial_id": trial_id, "start": t0, "restored_step": restored_step,
                            "node_id": node_id, "pid": os.getpid(), "values": values, "seed": seed}) + "\n")
    (trial_dir / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")

    reporter = TuneReporter(every=cfg.train.ckpt_every, max_steps=cfg.train.steps, metric=context["metric"],
                            workdir=trial_dir, fingerprint=fp)
    try:
        res = train(cfg, trial_dir, callbacks=[reporter], track=True, resume=True, progress_bar=False,
                    wandb_id=f"{context['name']}-{trial_id}",  # a retry continues the trial's run
                    tracking_cfg=context.get("tracking"))
    finally:
        _teardown_wandb()

    if _STOP_REQUESTED.is_set():  # stopped while train() was finishing: Tune no longer listens
        return
    metrics = {k: float(v) for k, v in res.metrics.items() if "/" in k}
    metrics.update(step=int(res.metrics["global_step"]), final=1, wall_time_s=time.time() - t0,
                   restored_step=-1 if restored_step is None else restored_step)
    with tempfile.TemporaryDirectory(prefix=".tune-final-", dir=trial_dir) as tmp:
        tmp = Path(tmp)
        for src in (trial_dir / "checkpoints" / CKPT_FILE, trial_dir / "checkpoints" / FINGERPRINT_FILE,
                    *(trial_dir / f for f in FINAL_FILES)):
            if src.is_file():
                shutil.copy2(src, tmp / src.name)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(str(tmp)))
