"""The one LightningModule: what is learned (a Network of the run's family) and how a step's loss
is made. Every family trains through it.

Training data is never stored: every step draws fresh tasks on the module's device from a
generator seeded by (seed, TRAIN, global_step, rank), one batch per read-out group, so a run is
reproducible and a resumed run sees exactly the tasks it would have seen without the interruption.
A family's curriculum is a pure function of the step it receives, so it resumes exactly too.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from pipeline.core import rng
from pipeline.core.config import RunConfig
from pipeline.core.errors import NonFiniteLossError
from pipeline.core.network import Network, group_key


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """train.precision with `auto` resolved for `device`: bf16-mixed (bf16 autocast for the matmuls,
    fp32 master weights, the loss in fp32) on a CUDA device with bf16, else 32-true. CPUs get
    32-true because bf16 autocast was measured slower there (README, speed levers: 1.9x slower at
    the default size and 1.3x at paper size on an AVX512-BF16 CPU; no gain on an AMX one)."""
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _mean(parts: dict, key: str) -> torch.Tensor:
    return torch.stack([v[key] for v in parts.values()]).mean()


class TaskModule(pl.LightningModule):
    def __init__(self, run: dict):
        super().__init__()
        self.save_hyperparameters()  # a plain dict: safe to load with weights_only=True
        self.run = RunConfig.from_dict(run, where="checkpoint hyper_parameters")
        self.net = Network(self.run)
        self.family = self.net.family
        self._val_tasks: dict | None = None

    def resolved_precision(self) -> str:
        return resolve_precision(self.run.train.precision, self.device)

    # ------------------------------------------------------------------ data
    def training_tasks(self, step: int, rank: int, world_size: int) -> dict:
        r = self.run
        g = rng.make_generator(r.seed, rng.TRAIN, step, rank, device=self.device)
        per_rank = r.train.batch_size // world_size
        return self.family.sample_step(r.task, self.net.groups, per_rank, g, self.device, step)

    def validation_tasks(self) -> dict:
        if self._val_tasks is None or next(iter(self._val_tasks.values())).device != self.device:
            r = self.run
            self._val_tasks = {}
            for i, grp in enumerate(self.net.groups):
                g = rng.make_generator(r.seed, rng.VAL, *self.family.val_words(r.task, grp), device=self.device)
                self._val_tasks[grp] = self.family.sample(r.task, grp, r.train.val_tasks, g, self.device, None)
        return self._val_tasks

    # ------------------------------------------------------------------ steps
    def _losses(self, batches: dict) -> dict:
        outs = self.net.forward_many(batches)
        return {g: self.family.loss(out, batches[g], self.run.task) for g, out in outs.items()}

    def training_step(self, _batch, _batch_idx):
        batches = self.training_tasks(self.global_step, self.global_rank, self.trainer.world_size)
        losses = self._losses(batches)
        loss = _mean(losses, "loss")
        self._note_non_finite(loss)
        if self.global_step % self.run.train.log_every == 0:
            self.check_finite()
            metrics = {"train/loss": loss.detach()}
            for g, parts in losses.items():
                for k, v in parts.items():
                    metrics[f"train/{k}" + ("" if g is None else f"/{self.family.group_label(g)}")] = v.detach()
            self.log_dict(metrics, prog_bar=False)
            # the progress bar's loss, refreshed with the logs: a self.log call every step cost 2.4 ms
            # (6 % of a small network's step on a 2-core CPU; docs/speed.md)
            self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    # ------------------------------------------------------------------ non-finite values
    # No host synchronisation on the hot path: each step only records, on the device, the first
    # step whose loss was non-finite. The check (one sync) runs every train.log_every steps and
    # before every checkpoint is written, where the weights are checked too, so a non-finite
    # checkpoint is never written and the last good one stays the resume point.
    _first_bad: torch.Tensor | None = None

    def _note_non_finite(self, loss: torch.Tensor) -> None:
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        fresh = ~torch.isfinite(loss.detach()) & (self._first_bad < 0)
        self._first_bad = torch.where(fresh, step, self._first_bad)

    def check_finite(self, weights: bool = False) -> None:
        """Raise NonFiniteLossError if a training loss so far was non-finite (with weights: or a weight is)."""
        bad_step = -1 if self._first_bad is None else int(self._first_bad)
        bad_weight = False
        if weights:
            params = [p.detach() for p in self.parameters()]
            bad_weight = not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all())
        ok = bad_step < 0 and not bad_weight
        if self._trainer is not None:
            ok = self.trainer.strategy.reduce_boolean_decision(ok, all=True)
        if not ok:
            where = f"training loss at step {bad_step}" if bad_step >= 0 else f"weights at step {self.global_step}"
            raise NonFiniteLossError(f"non-finite {where}; training stopped (the last good checkpoint is kept; "
                                     "lower train.lr or set train.grad_clip)")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite(weights=True)  # raising here leaves the previous checkpoint file untouched

    def validation_step(self, _batch, _batch_idx):
        losses = self._losses(self.validation_tasks())
        key = self.family.monitor.split("/", 1)[1]  # e.g. "l2" of "val/l2"
        metrics = {}
        if len(losses) > 1 or next(iter(losses)) is not None:
            metrics = {f"val/{key}/{self.family.group_label(g)}": v[key] for g, v in losses.items()}
        value = _mean(losses, key)
        metrics[f"val/{key}"] = value
        self.log_dict(metrics, sync_dist=True)
        self.log("val_" + key, value, prog_bar=True, logger=False, sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        t = self.run.train

        def decays(name, p):
            return p.dim() >= 2 and not self.family.no_decay(name)

        decay = [p for n, p in self.net.named_parameters() if decays(n, p)]
        no_decay = [p for n, p in self.net.named_parameters() if not decays(n, p)]
        # fused AdamW (one kernel over all parameters) where the device has it: 5 % of a small
        # network's step on the CPU (linreg: 27.5 -> 26.0 ms; docs/speed.md)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in self.net.parameters())
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, fused=fused or None)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr_ratio
            if step < t.warmup_steps:
                return (step + 1) / t.warmup_steps
            progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
