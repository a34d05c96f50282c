"""Probing: which algorithm, and how many of its steps, does each layer of a trained network run?

For a frozen network and every layer l = 0 .. L (l = 0: the read-in tokens, l = L: the last block),
a read-out is fitted on that layer's hidden states on probe-training tasks (fresh draws of the
family's training distribution), then applied to held-out tasks (a study's stored evaluation set).
Each layer's predictions are compared with the iterates k of each classical algorithm the family
names (family.probe_targets) on the same held-out tasks (Fu et al. 2024):

    similarity(l, k) = mean over tasks of cos(r_l, r_k),  r = prediction - target over the prompt
                       (family.residual: a (B, P) vector per task)
    best step(l)     = argmax_k similarity(l, k)

All layers come from one forward pass (the backbones return every layer's states), so the whole
analysis is one job. Two read-outs:

    ridge    closed form, for families whose read-out is linear at known positions
             (family.probe_features): least squares with a bias (and a tiny ridge) on the raw
             hidden states, the plain linear probe
    trained  the family's own read-out head (family.read_out) from a fresh initialisation after a
             fresh LayerNorm, trained with the family's loss on the frozen states (Adam); works for
             any family, e.g. attentive-pooling heads

Unlike the anchor code (one SLURM job per layer, its probe accidentally warm-started from the
trained head), every probe here starts fresh and all layers are fitted in one job.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.core.results import summarize

FITS = ("ridge", "trained")


@dataclass(frozen=True)
class Probe:
    """A probing analysis declared by a study: network `unit`, held-out tasks = the stored set of
    `grid` at `point`, compared with `algorithms` {name in family.probe_targets: steps (ascending)}."""

    name: str
    unit: str
    grid: str
    point: dict
    algorithms: dict
    n_fit: int = 2048  # probe-training tasks
    fit: str = "ridge"  # ridge | trained
    fit_steps: int = 400  # trained read-out: Adam steps
    title: str = ""


@dataclass(frozen=True)
class ProbeTarget:
    """An algorithm whose iterates layers are compared with: fn(batch, steps, params) -> list of the
    family's Estimates, one per step (same order as `steps`). `log_steps`: steps grow geometrically
    (e.g. gradient descent's 1, 2, 4, ...), so plots use a log axis."""

    fn: Callable
    label: str = ""
    log_steps: bool = False


@dataclass
class ProbeResult:
    """What a probe found on the held-out tasks (B of them, L + 1 layers, S steps per algorithm)."""

    layer_error: np.ndarray  # (L + 1, B) mean squared residual of each layer's probe, per task
    cosine: dict = field(default_factory=dict)  # algorithm -> (L + 1, S, B) residual cosine per task
    steps: dict = field(default_factory=dict)  # algorithm -> its steps (S,)
    step_error: dict = field(default_factory=dict)  # algorithm -> (S, B) mean squared residual per task
    seconds: float = 0.0

    def similarity(self, algorithm: str) -> np.ndarray:
        """(L + 1, S) mean cosine over tasks."""
        return self.cosine[algorithm].mean(-1)

    def best_steps(self, algorithm: str) -> list[int]:
        """The best-matching step of every layer (argmax of the mean cosine)."""
        return [self.steps[algorithm][int(i)] for i in np.argmax(self.similarity(algorithm), axis=1)]

    def error_matched_steps(self, algorithm: str) -> list[int]:
        """Per layer, the step whose mean squared residual is closest (in log) to the layer's own: how
        many steps' worth of accuracy the layer reaches. The residual cosine cannot tell this for an
        algorithm with a random start (the power method): its errors point along directions set by
        the start, which the network never saw, so they are nearly orthogonal to any network's."""
        le = np.log(np.maximum(self.layer_error.mean(-1), 1e-300))  # (L + 1,)
        se = np.log(np.maximum(self.step_error[algorithm].mean(-1), 1e-300))  # (S,)
        return [self.steps[algorithm][int(i)] for i in np.abs(le[:, None] - se[None, :]).argmin(1)]


def check(study, cfg, units: list[str]) -> None:
    """A study's probes against its units, grids and family (a one-line ConfigError naming the probe)."""
    from pipeline.core import family as F
    from pipeline.core.config import ConfigError
    from pipeline.core.study import check_step_counts

    fam = F.get(study.family)
    grids = {g.name: g for g in study.grids(cfg)}
    for p in study.probes(cfg):
        where = f"{study.name}: probe {p.name!r}"
        if p.unit not in units:
            raise ConfigError(f"{where}: unit {p.unit!r} is not a network of the study (its units: {', '.join(units)})")
        if p.grid not in grids or p.point not in grids[p.grid].points:
            raise ConfigError(f"{where}: no evaluation set at grid {p.grid!r} point {p.point} (grids: "
                              f"{', '.join(f'{g.name} {g.points}' for g in grids.values())})")
        for name, steps in p.algorithms.items():
            if name not in fam.probe_targets:
                raise ConfigError(f"{where}: family {fam.name} has no probe target {name!r} (known: "
                                  f"{', '.join(fam.probe_targets) or 'none'})")
            check_step_counts(f"{where}: steps of {name}", steps)
        if p.fit not in FITS:
            raise ConfigError(f"{where}: fit must be one of {', '.join(FITS)}, got {p.fit!r}")
        if p.fit == "ridge" and not hasattr(fam, "probe_features"):
            raise ConfigError(f"{where}: family {fam.name} has no linear read-out positions; use fit: trained")


def run_study_probes(cfg, study, sets: dict, nets, device, params: dict, progress: bool = True):
    """Every probe a study declares, on its loaded evaluation sets ({(grid, point key): batch}) and
    networks (core/evaluate.py's _Networks) -> (results rows, meta {probe: description})."""
    import zlib

    from pipeline.core import family as F
    from pipeline.core import rng
    from pipeline.core.evaluate import point_key

    fam = F.get(study.family)
    grids = {g.name: g for g in study.grids(cfg)}
    rows, meta = [], {}
    for p in study.probes(cfg):
        net = nets.solvers[p.unit].net
        held = sets[(p.grid, point_key(p.point))].to(device)
        task = study.point_task(cfg, grids[p.grid], p.point)  # probe-fit tasks: the held-out distribution
        group = fam.group_of(held)
        g = rng.make_generator(cfg.seed, rng.STUDY, zlib.crc32(f"probe:{p.name}".encode()), device=device)
        fit_batch = fam.sample(task, group, p.n_fit, g, device, step=None)
        res = run_probe(fam, task, net.run.model, group, lambda b: layer_states(net, b), fit_batch, held,
                        p.algorithms, {**params, "seed": cfg.seed}, fit=p.fit, fit_steps=p.fit_steps, seed=cfg.seed)
        rows += result_rows(p, nets.run_of[p.unit], res)
        meta[p.name] = {"unit": p.unit, "network": nets.run_of[p.unit], "grid": p.grid, "point": p.point,
                        "fit": p.fit, "n_fit": p.n_fit, "n_held_out": held.B, "title": p.title,
                        "layers": int(res.layer_error.shape[0]), "seconds": res.seconds,
                        "algorithms": {a: {"steps": list(s), "label": fam.probe_targets[a].label,
                                           "log_steps": fam.probe_targets[a].log_steps,
                                           "best_steps": res.best_steps(a),
                                           "error_matched_steps": res.error_matched_steps(a)}
                                       for a, s in p.algorithms.items()}}
        if progress:
            best = "; ".join(f"{a} {res.best_steps(a)}" for a in p.algorithms)
            print(f"[probe {p.name}] {nets.run_of[p.unit]}: best-matching step per layer: {best} ({res.seconds:.1f} s)")
    return rows, meta


# ----------------------------------------------------------------------------- hidden states

@torch.no_grad()
def layer_states(net, batch, chunk: int = 512) -> tuple[list[Tensor], Tensor]:
    """Every layer's hidden states of a frozen network: ([L + 1 x (B, T, C)], mask (B, T))."""
    net.eval()
    parts, masks = None, []
    for start in range(0, batch.B, chunk):
        b = batch.slice(start, min(batch.B, start + chunk))
        _, mask, hidden = net.encode(b, return_hidden=True)
        parts = [[h] for h in hidden] if parts is None else [p + [h] for p, h in zip(parts, hidden)]
        masks.append(mask)
    return [torch.cat(p) for p in parts], torch.cat(masks)


# ----------------------------------------------------------------------------- read-outs

def ridge_fit(X: Tensor, y: Tensor, lam: float = 1e-6) -> Tensor:
    """Least squares with a bias: X (M, C), y (M,) or (M, O) -> w (C + 1[, O]) minimising ||[X 1] w - y||^2 +
    lam * tr(X^T X)/C * ||w[:C]||^2 (float64; the tiny ridge only keeps a rank-deficient X solvable)."""
    X64 = torch.cat([X.double(), torch.ones(X.shape[0], 1, dtype=torch.float64, device=X.device)], 1)
    A = X64.T @ X64
    reg = lam * torch.diagonal(A)[:-1].mean().clamp(min=1e-12)
    A[range(X.shape[1]), range(X.shape[1])] += reg
    return torch.linalg.solve(A, X64.T @ y.double())


def ridge_predict(X: Tensor, w: Tensor) -> Tensor:
    return X.double() @ w[:-1] + w[-1]


def _fit_ridge(fam, states_fit, mask_fit, fit_batch, states_eval, mask_eval, eval_batch):
    """Per layer: the closed-form read-out on family.probe_features -> held-out Estimates."""
    out = []
    for hf, he in zip(states_fit, states_eval):
        Xf, yf = fam.probe_features(hf, mask_fit, fit_batch)  # (B, P, C), targets (B, P) or (B, P, O)
        w = ridge_fit(Xf.reshape(-1, Xf.shape[-1]), yf.reshape(-1, *yf.shape[2:]))
        Xe, _ = fam.probe_features(he, mask_eval, eval_batch)
        out.append(fam.probe_decode(ridge_predict(Xe, w).float(), eval_batch))
    return out


def _fit_trained(fam, task, model, group, states_fit, mask_fit, fit_batch, states_eval, mask_eval, eval_batch,
                 steps: int, seed: int, batch_size: int = 256, lr: float = 3e-3):
    """Per layer: a fresh LayerNorm + the family's read-out head, trained with the family's loss on
    the frozen states (minibatches of fit tasks drawn from a seeded generator) -> held-out Estimates."""
    from pipeline.core import rng

    out = []
    for layer, (hf, he) in enumerate(zip(states_fit, states_eval)):
        torch.manual_seed(seed + layer)  # the fresh head's initialisation
        ln = nn.LayerNorm(hf.shape[-1]).to(hf.device)
        readout = fam.read_out(task, model, group).to(hf.device)
        opt = torch.optim.Adam([*ln.parameters(), *readout.parameters()], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        g = rng.make_generator(seed, rng.STUDY, 7, layer, device=hf.device)
        B = fit_batch.B
        for _ in range(steps):
            idx = torch.randint(0, B, (min(batch_size, B),), generator=g, device=hf.device)
            sub = _take(fit_batch, idx)
            loss = fam.loss(readout(ln(hf[idx].float()), mask_fit[idx], sub), sub, task)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            out.append(fam.decode(readout(ln(he.float()), mask_eval, eval_batch), eval_batch))
    return out


def _take(batch, idx: Tensor):
    """Rows `idx` of a family batch (every tensor field with a leading task axis)."""
    import dataclasses

    vals = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        vals[f.name] = v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch.B else v
    if "index" in vals:
        vals["index"] = None
    return type(batch)(**vals)


# ----------------------------------------------------------------------------- similarity

def residual_cosine(r_a: Tensor, r_b: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, P), (B, P) -> (B,) cosine similarity of two residual vectors per task."""
    a, b = r_a.double(), r_b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=eps)


def compare(fam, layer_estimates: list, batch, algorithms: dict, params: dict) -> ProbeResult:
    """Layers' held-out Estimates vs every algorithm's iterates on the same tasks."""
    r_layers = [fam.residual(e, batch).double() for e in layer_estimates]  # L + 1 x (B, P)
    res = ProbeResult(layer_error=torch.stack([r.pow(2).mean(-1) for r in r_layers]).cpu().numpy())
    for name, steps in algorithms.items():
        ests = fam.probe_targets[name].fn(batch, list(steps), params)
        r_alg = [fam.residual(e, batch).double() for e in ests]  # S x (B, P)
        cos = torch.stack([torch.stack([residual_cosine(rl, ra) for ra in r_alg]) for rl in r_layers])  # (L+1, S, B)
        res.cosine[name] = cos.cpu().numpy()
        res.steps[name] = list(steps)
        res.step_error[name] = torch.stack([r.pow(2).mean(-1) for r in r_alg]).cpu().numpy()
    return res


def result_rows(probe: Probe, network: str | None, res: ProbeResult) -> list[dict]:
    """core/results.py rows (grid 'probe:<name>'): the cosine at every (layer, step) per algorithm,
    the best step and its cosine per layer, the probe's error per layer, each algorithm's per step."""
    base = {"grid": f"probe:{probe.name}", "network": network, "seconds": res.seconds, "applicable": True,
            "reason": ""}
    rows = [{**base, "point": {"layer": layer}, "method": "probe", "metric": "error", **summarize(err)}
            for layer, err in enumerate(res.layer_error)]
    for name, cos in res.cosine.items():
        steps, best = res.steps[name], np.argmax(res.similarity(name), axis=1)
        for layer in range(cos.shape[0]):
            rows += [{**base, "point": {"layer": layer, "step": k}, "method": name, "metric": "cosine",
                      **summarize(cos[layer, j])} for j, k in enumerate(steps)]
            j = int(best[layer])
            rows.append({**base, "point": {"layer": layer}, "method": name, "metric": "best_step",
                         **summarize(np.array([float(steps[j])]))})
            rows.append({**base, "point": {"layer": layer}, "method": name, "metric": "best_cosine",
                         **summarize(cos[layer, j])})
            rows.append({**base, "point": {"layer": layer}, "method": name, "metric": "matched_step",
                         **summarize(np.array([float(res.error_matched_steps(name)[layer])]))})
        rows += [{**base, "point": {"step": k}, "method": name, "metric": "error", **summarize(res.step_error[name][j])}
                 for j, k in enumerate(steps)]
    return rows


# ----------------------------------------------------------------------------- the analysis

def run_probe(fam, task, model, group, states_fn: Callable, fit_batch, eval_batch, algorithms: dict, params: dict,
              fit: str = "ridge", fit_steps: int = 400, seed: int = 0) -> ProbeResult:
    """The whole analysis for one network: states_fn(batch) -> ([L + 1 x (B, T, C)], mask) (a frozen
    network's layer_states, or a hand-built stand-in in tests)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    t0 = time.perf_counter()
    sf, mf = states_fn(fit_batch)
    se, me = states_fn(eval_batch)
    if fit == "ridge":
        if not hasattr(fam, "probe_features"):
            raise ValueError(f"family {fam.name}: no linear read-out positions (probe_features); use fit: trained")
        ests = _fit_ridge(fam, sf, mf, fit_batch, se, me, eval_batch)
    else:
        ests = _fit_trained(fam, task, model, group, sf, mf, fit_batch, se, me, eval_batch, fit_steps, seed)
    res = compare(fam, ests, eval_batch, algorithms, params)
    res.seconds = time.perf_counter() - t0
    return res
