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

    # ------------------------------------------------------------------ data
    def training_tasks(self, step: int, rank: int, world_size: int) -> dict:
        r = self.run
        g = rng.make_generator(r.seed, rng.TRAIN, step, rank, device=self.device)
        per_rank = r.train.batch_size // world_size
        return {grp: self.family.sample(r.task, grp, per_rank, g, self.device, step) for grp in self.net.groups}

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
        finite = bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(f"non-finite training loss at step {self.global_step}; training stopped "
                                     "(the last good checkpoint is kept; lower train.lr or set train.grad_clip)")
        if self.global_step % self.run.train.log_every == 0:
            metrics = {"train/loss": loss.detach()}
            for g, parts in losses.items():
                for k, v in parts.items():
                    metrics[f"train/{k}" + ("" if g is None else f"/{self.family.group_label(g)}")] = v.detach()
            self.log_dict(metrics, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # A step with non-finite gradients would poison the weights (and the next checkpoint).
        if self.run.train.precision == "16-mixed":  # GradScaler makes inf gradients on purpose and skips those steps
            return
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(f"non-finite gradient at step {self.global_step}; training stopped "
                                     "(the last good checkpoint is kept; lower train.lr or set train.grad_clip)")

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
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr_ratio
            if step < t.warmup_steps:
                return (step + 1) / t.warmup_steps
            progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
