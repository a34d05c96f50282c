"""`python -m pipeline bench`: throughput figures for the current params (override with --set).

Prints (1) training throughput of the real train step (sample tasks on the device, forward over
every K, matched loss, backward, AdamW step) in tasks/s, with the share of the step spent
sampling; (2) inference throughput of the network; (3) each baseline's wall time on one
evaluation set of K = max(task.ks); (4) the same train step and inference for every backbone of
`ablation.variants`, each at its matched width (parameter count printed), at d = ablation.d.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from pipeline.config import Config
from pipeline.studies.tgmm import baseline_solvers, make_eval_set, resolve_device
from pipeline.training.module import TGMMModule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(cfg: Config, d: int, steps: int, device: torch.device, warmup: int = 3) -> dict:
    module = TGMMModule(cfg.to_dict(), d).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.train.lr)
    autocast = cfg.train.precision.startswith("bf16")
    t_sample = t_total = 0.0
    for step in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        batches = module.training_tasks(step, 0, 1)
        _sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            losses = module._losses(batches)
        loss = torch.stack([v["loss"] for v in losses.values()]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        if step >= warmup:
            t_sample += t1 - t0
            t_total += t2 - t0
    tasks = cfg.train.batch_per_k * len(cfg.task.ks) * steps
    n_params = sum(p.numel() for p in module.net.parameters())
    return {"params": n_params, "step_ms": 1e3 * t_total / steps, "tasks_per_s": tasks / t_total,
            "tokens_per_s": tasks * cfg.task.n0 * 0.75 / t_total, "sampling_share": t_sample / t_total,
            "net": module.net}


def infer_throughput(net, batch, repeats: int = 3) -> float:
    """Tasks per second of the network's forward pass (no grad) on one evaluation set."""
    from pipeline.models.tgmm import NetworkSolver

    solver = NetworkSolver(net.eval())
    solver(batch.slice(0, min(8, batch.B)))  # warm-up
    dev = batch.x.device
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        solver(batch)
    _sync(dev)
    return repeats * batch.B / (time.perf_counter() - t0)


def backbones(cfg: Config, steps: int, device: torch.device, infer_tasks: int = 256) -> dict:
    """Train-step and inference throughput of every ablation variant at its matched width."""
    from pipeline.studies.ablation import describe_variants, variant_config

    d = cfg.ablation.d
    info = describe_variants(cfg)
    K = max(cfg.task.ks)
    batch = make_eval_set(replace(cfg, eval=replace(cfg.eval, n_tasks=infer_tasks)), d, K, device=device)
    print(f"backbones at matched parameter count (d={d}, train: batch {cfg.train.batch_per_k}/K x "
          f"{len(cfg.task.ks)} K; inference: {infer_tasks} tasks, K={K}, N={cfg.eval.n}):")
    print(f"  {'variant':<18} {'model':<34} {'params':>9} {'step ms':>8} {'train tasks/s':>13} {'infer tasks/s':>13}")
    out = {}
    for name, v in info.items():
        tr = train_throughput(variant_config(cfg, name), d, steps, device)
        inf = infer_throughput(tr["net"], batch)
        print(f"  {name:<18} {v['label']:<34} {tr['params']:>9,} {tr['step_ms']:>8.1f} {tr['tasks_per_s']:>13.0f} "
              f"{inf:>13.0f}")
        out[name] = {"params": tr["params"], "step_ms": tr["step_ms"], "train_tasks_per_s": tr["tasks_per_s"],
                     "infer_tasks_per_s": inf}
    return out


def run(cfg: Config, d: int = 8, steps: int = 20, baseline_tasks: int = 256, device: str = "auto",
        baselines: bool = True, backbone_table: bool = True) -> dict:
    dev = resolve_device(device)
    m, t = cfg.model, cfg.train
    print(f"device {dev} | torch {torch.__version__} | threads {torch.get_num_threads()} | precision {t.precision}")
    print(f"model: {m.backbone}/{m.position} L={m.n_layer} D={m.n_embd} H={m.n_head} | d={d} ks={cfg.task.ks} "
          f"| batch {t.batch_per_k}/K x {len(cfg.task.ks)} K | n0={cfg.task.n0}")
    tr = train_throughput(cfg, d, steps, dev)
    print(f"train step: {tr['step_ms']:.1f} ms | {tr['tasks_per_s']:.0f} tasks/s | "
          f"~{tr['tokens_per_s']:.0f} tokens/s | sampling {100 * tr['sampling_share']:.1f}% of step | "
          f"{tr['params'] / 1e6:.3f} M params")
    out = {"train": {k: v for k, v in tr.items() if k != "net"}, "solvers": {}}
    K = max(cfg.task.ks)
    batch = make_eval_set(replace(cfg, eval=replace(cfg.eval, n_tasks=baseline_tasks)), d, K, device=dev)
    from pipeline.models.tgmm import NetworkSolver

    solvers = [NetworkSolver(tr["net"].eval(), name="tgmm (untrained)")]
    if baselines:
        solvers += baseline_solvers(cfg, d)
    print(f"solvers on {baseline_tasks} tasks, d={d}, K={K}, N={cfg.eval.n}:")
    for s in solvers:
        s(batch.slice(0, min(8, batch.B)))  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        est = s(batch)
        _sync(dev)
        dt = time.perf_counter() - t0
        note = "" if est.applicable else f" (not applicable: {est.reason})"
        print(f"  {s.name:<18} {dt * 1e3:9.1f} ms  ({1e3 * dt / batch.B:.3f} ms/task){note}")
        out["solvers"][s.name] = dt
    if backbone_table:
        out["backbones"] = backbones(cfg, steps, dev)
    return out
