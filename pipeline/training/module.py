"""The LightningModule: what is learned (a TGMMNet) and how a step's loss is made.

Training data is never stored: every step draws fresh tasks on the module's device from a
generator seeded by (seed, TRAIN_STREAM, global_step, rank), so a run is reproducible and a
resumed run sees exactly the tasks it would have seen without the interruption.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from pipeline.config import Config, from_dict
from pipeline.models.tgmm import TGMMNet, matched_loss
from pipeline.tasks.gmm import TRAIN_STREAM, VAL_STREAM, GMMBatch, make_generator, sample_gmm



class NonFiniteLossError(RuntimeError):
    """Raised on every rank when any rank sees a NaN/inf loss or gradient."""


def sample_tasks(cfg: Config, d: int, K: int, batch_size: int, generator: torch.Generator, device,
                 n_min: int, n_max: int) -> GMMBatch:
    t = cfg.task
    return sample_gmm(batch_size, d, K, n_min, n_max, generator, device, mean_range=t.mean_range,
                      max_cosine=t.max_cosine, weight_low=t.weight_low, weight_high=t.weight_high,
                      anisotropic=t.anisotropic)


class TGMMModule(pl.LightningModule):
    def __init__(self, config: dict, d: int):
        super().__init__()
        self.save_hyperparameters()  # plain dict + int: safe to load with weights_only=True
        self.cfg: Config = from_dict(config, source="checkpoint hyper_parameters")
        self.d = d
        self.net = TGMMNet(d, self.cfg.task.ks, self.cfg.model, scales=self.cfg.task.anisotropic)
        self._val_tasks: dict[int, GMMBatch] | None = None

    # ------------------------------------------------------------------ data
    def training_tasks(self, step: int, rank: int, world_size: int) -> dict[int, GMMBatch]:
        c = self.cfg
        g = make_generator(c.seed, TRAIN_STREAM, step, rank, device=self.device)
        per_rank = c.train.batch_per_k // world_size
        return {K: sample_tasks(c, self.d, K, per_rank, g, self.device, c.task.n0 // 2, c.task.n0)
                for K in c.task.ks}

    def validation_tasks(self) -> dict[int, GMMBatch]:
        if self._val_tasks is None or next(iter(self._val_tasks.values())).x.device != self.device:
            c = self.cfg
            self._val_tasks = {}
            for K in c.task.ks:
                g = make_generator(c.seed, VAL_STREAM, self.d, K, device=self.device)
                self._val_tasks[K] = sample_tasks(c, self.d, K, c.train.val_tasks, g, self.device,
                                                  c.task.n0, c.task.n0)
        return self._val_tasks

    # ------------------------------------------------------------------ steps
    def _losses(self, batches: dict[int, GMMBatch]) -> dict[int, dict[str, torch.Tensor]]:
        outs = self.net.forward_many(batches)
        return {K: matched_loss(logits, means, batches[K], scales) for K, (logits, means, scales) in outs.items()}

    def training_step(self, _batch, _batch_idx):
        batches = self.training_tasks(self.global_step, self.global_rank, self.trainer.world_size)
        losses = self._losses(batches)
        loss = torch.stack([v["loss"] for v in losses.values()]).mean()
        finite = bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(f"non-finite training loss at step {self.global_step}; training stopped "
                                     "(the last good checkpoint is kept; lower train.lr or set train.grad_clip)")
        log_now = self.global_step % self.cfg.train.log_every == 0
        if log_now:
            metrics = {"train/loss": loss.detach()}
            for K, v in losses.items():
                metrics[f"train/loss/K={K}"] = v["loss"].detach()
                metrics[f"train/l2/K={K}"] = v["l2"]
            self.log_dict(metrics, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # A step with non-finite gradients would poison the weights (and the next checkpoint).
        if self.cfg.train.precision == "16-mixed":  # GradScaler makes inf gradients on purpose and skips those steps
            return
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(f"non-finite gradient at step {self.global_step}; training stopped "
                                     "(the last good checkpoint is kept; lower train.lr or set train.grad_clip)")

    def validation_step(self, _batch, _batch_idx):
        losses = self._losses(self.validation_tasks())
        l2 = torch.stack([v["l2"] for v in losses.values()]).mean()
        metrics = {f"val/l2/K={K}": v["l2"] for K, v in losses.items()}
        metrics["val/l2"] = l2
        self.log_dict(metrics, sync_dist=True)
        self.log("val_l2", l2, prog_bar=True, logger=False, sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        t = self.cfg.train
        decay = [p for n, p in self.net.named_parameters() if p.dim() >= 2 and "query" not in n]
        no_decay = [p for n, p in self.net.named_parameters() if not (p.dim() >= 2 and "query" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr_ratio
            if step < t.warmup_steps:
                return (step + 1) / t.warmup_steps
            progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
