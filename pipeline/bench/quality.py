"""`bench --time-to-quality`: wall time until a network first reaches a validation target.

Throughput alone can mislead (a faster step that learns less per step gains nothing), so this
trains a planned run through the one `train()` with validation every `val_every` steps (not part
of the network's identity) and Lightning's EarlyStopping(stopping_threshold=target) on the
family's monitor, and reports the wall time and step at which the target was first reached.
Run it with --set overrides to compare settings, e.g. the levers of the README's speed table:

    python -m pipeline --study tgmm bench --time-to-quality --target 0.315
    python -m pipeline --study tgmm --set task.gmm.n_per=task bench --time-to-quality --target 0.315
"""
from __future__ import annotations

import tempfile
import time


def run(run_cfg, target: float, val_every: int = 50) -> dict:
    from pytorch_lightning.callbacks import EarlyStopping

    from pipeline.core import family as F
    from pipeline.core.config import RunConfig, deep_merge
    from pipeline.core.train import train

    r = RunConfig.from_dict(deep_merge(run_cfg.to_dict(), {"train": {"val_every": val_every,
                                                                    "ckpt_every": run_cfg.train.steps}}),
                            where="bench --time-to-quality")
    fam = F.get(r.family)
    metric = fam.monitor
    better = fam.metrics[metric.split("/", 1)[1]].better
    mode = "min" if better == "lower" else "max"
    stop = EarlyStopping(monitor=metric, mode=mode, stopping_threshold=target, patience=10**9,
                         check_finite=False, check_on_train_epoch_end=False)
    print(f"[time-to-quality] {r.name}: until {metric} {'<=' if mode == 'min' else '>='} {target} "
          f"(validated every {val_every} steps, at most {r.train.steps} steps, precision {r.train.precision})")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(r, tmp, callbacks=[stop], track=False, resume=False, progress_bar=True)
        wall = time.perf_counter() - t0
    final = res.metrics.get(metric)
    reached = final is not None and (final <= target if mode == "min" else final >= target)
    steps = res.metrics["global_step"]
    print(f"[time-to-quality] {'reached' if reached else 'NOT reached'}: {metric} = {final:.4f} after {steps} steps, "
          f"{wall:.1f} s wall ({1e3 * wall / max(1, steps):.0f} ms/step including validation)")
    return {"reached": reached, "seconds": wall, "steps": steps, "value": final}
