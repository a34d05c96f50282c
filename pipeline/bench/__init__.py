"""`python -m pipeline [--study S] bench`: throughput figures for the current params (override with --set).

Per study (default: every listed study), per distinct network it trains: the real train step
(sample tasks on the device, forward over every group, the family's loss, backward, AdamW) in
ms and tasks/s, the share of the step spent sampling and the parameter count; then every method
of the study's first grid point (the untrained network and each classical solver) timed on that
point's evaluation tasks.
"""
from __future__ import annotations

import time

import torch

from pipeline.core.config import Config, RunConfig
from pipeline.core.module import TaskModule, _mean


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stepper:
    """One network's real train step (sample on the device, forward over every group, the family's
    loss, backward, clipping, AdamW), timed as (sampling, total) seconds per call."""

    def __init__(self, run: RunConfig, device: torch.device):

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)  # the same initialisation for every variant
            self.module = TaskModule(run.to_dict()).to(device)
        if run.train.compile:
            self.module.net.backbone.compile(dynamic=True)
        self.run, self.device = run, device
        self.params = list(self.module.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=run.train.lr)
        self.precision = self.module.resolved_precision()

    def __call__(self, step: int) -> tuple[float, float]:
        _sync(self.device)
        t0 = time.perf_counter()
        batches = self.module.training_tasks(step, 0, 1)
        _sync(self.device)
        t1 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.startswith("bf16")):
            losses = self.module._losses(batches)
        loss = _mean(losses, "loss")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.run.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.run.train.grad_clip)
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - t0, t1 - t0


def train_throughput(run: RunConfig, steps: int, device: torch.device, warmup: int = 3) -> dict:
    st = _Stepper(run, device)
    t_sample = t_total = 0.0
    for step in range(warmup + steps):
        total, sampling = st(step)
        if step >= warmup:
            t_sample += sampling
            t_total += total
    tasks = run.train.batch_size * len(st.module.net.groups) * steps
    n_params = sum(p.numel() for p in st.module.net.parameters())
    return {"params": n_params, "step_ms": 1e3 * t_total / steps, "tasks_per_s": tasks / t_total,
            "sampling_share": t_sample / t_total, "precision": st.precision, "net": st.module.net}


def compare_variants(run: RunConfig, variants: list[str], steps: int = 30, device: str = "auto",
                     warmup: int = 3) -> dict:
    """`bench --compare K=V[,K=V...]` (repeatable): the run as configured against each variant (run
    keys, e.g. task.n_per=task or train.precision=bf16-mixed), steps interleaved in one process so
    that drift in the machine's speed hits all alike; median ms/step and the ratio to the base."""
    import statistics

    from pipeline.core.config import RunConfig as R, deep_merge, parse_override
    from pipeline.core.evaluate import resolve_device

    dev = resolve_device(device)
    steppers = {"as configured": _Stepper(run, dev)}
    for v in variants:
        merged = run.to_dict()
        for kv in v.split(","):
            merged = deep_merge(merged, parse_override(kv))
        steppers[v] = _Stepper(R.from_dict(merged, where=f"--compare {v}"), dev)
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for step in range(warmup + steps):
        for k, st in steppers.items():
            total, _ = st(step)
            if step >= warmup:
                times[k].append(total)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["as configured"]
    print(f"{run.name}: {steps} interleaved steps per variant (median), device {dev}, threads {torch.get_num_threads()}")
    for k, m in med.items():
        print(f"  {k:<40} {1e3 * m:8.1f} ms/step  {base / m:5.2f}x  (precision {steppers[k].precision})")
    return med


def run(cfg: Config, studies: list[str], steps: int = 20, device: str = "auto", baselines: bool = True) -> dict:
    from pipeline import studies as S
    from pipeline.core import family as F
    from pipeline.core import plan as P
    from pipeline.core.evaluate import resolve_device
    from pipeline.core.network import NetworkSolver
    from pipeline.models.backbone import describe

    dev = resolve_device(device)
    print(f"device {dev} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    plan = P.resolve_all(cfg, studies)
    out: dict = {}
    for name in studies:
        st, sp = S.get(name), plan.studies[name]
        fam = F.get(st.family)
        print(f"\n[{name}] train step per network:")
        print(f"  {'network':<22} {'model':<34} {'params':>9} {'step ms':>8} {'tasks/s':>8} {'sampling':>8}")
        nets = {}
        for unit, rid in sp.networks.items():
            run = plan.runs[rid]
            tr = train_throughput(run, steps, dev)
            nets[unit] = tr.pop("net")
            out[f"{name}/{unit}"] = tr
            print(f"  {unit:<22} {describe(run.model):<34} {tr['params']:>9,} {tr['step_ms']:>8.1f} "
                  f"{tr['tasks_per_s']:>8.0f} {100 * tr['sampling_share']:>7.1f}%")
        grid = st.grids(cfg)[0]
        point = grid.points[0]
        batch = grid.make_set(cfg, point).to(dev)
        print(f"  methods on {batch.B} tasks of grid {grid.name} point {point}:")
        for method in grid.methods(cfg, point):
            if method.unit is not None:
                solver = NetworkSolver(nets[method.unit].eval(), name=f"{method.name} (untrained)")
            elif baselines:
                solver = fam.solvers[method.solver].factory(st.solver_params(cfg), cfg.seed,
                                                            st.point_task(cfg, grid, point))
            else:
                continue
            with torch.no_grad():
                solver(batch.slice(0, min(8, batch.B)))  # warm-up
                _sync(dev)
                t0 = time.perf_counter()
                est = solver(batch)
                _sync(dev)
            dt = time.perf_counter() - t0
            ok = getattr(est, "applicable", True)
            note = "" if ok else f" (not applicable: {est.reason})"
            print(f"    {solver.name:<24} {dt * 1e3:9.1f} ms  ({1e3 * dt / batch.B:.3f} ms/task){note}")
            out[f"{name}/solver/{solver.name}"] = dt
    return out


def compare(cfg: Config, studies: list[str], anchor: bool, solvers: bool, steps: int = 6, device: str = "auto",
            precision: str | None = None) -> dict:
    """The side-by-side measurements: --vs-anchor (bench/anchor.py) and --solvers (bench/solvers.py)."""
    from pipeline.core import plan as P
    from pipeline.core.evaluate import resolve_device

    out: dict = {}
    if anchor:
        from pipeline.bench import anchor as A

        plan = P.resolve_all(cfg, studies)
        gmm = [rid for rid, r in plan.runs.items() if r.family == "gmm" and r.model.backbone == "transformer"]
        if not gmm:
            raise SystemExit("error: bench --vs-anchor needs a listed study that trains a gmm transformer (e.g. tgmm)")
        print(f"device {resolve_device(device)} | torch {torch.__version__} | base run {gmm[0]}")
        out["anchor"] = A.run(plan.runs[gmm[0]], steps=steps, device=str(resolve_device(device)),
                              precision=precision)
    if solvers:
        from pipeline.bench import solvers as B

        out["solvers"] = B.run()
    return out
