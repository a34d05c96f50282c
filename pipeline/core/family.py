"""The task-family contract and its registry.

A *family* is one kind of problem (Gaussian-mixture estimation, in-context linear regression, ...).
It declares everything the spine needs, so training, evaluation, reporting, tuning and the CLI
never name a family:

    TaskConfig          its typed task parameters (params.yaml `task.<family>`, overridable per study)
    SolverConfig        its classical solvers' settings (params.yaml `baselines.<family>`)
    groups(task)        the read-out groups trained side by side (e.g. the K values; [None] for one head)
    sample(...)         a batch of tasks on the training device from a seeded generator; a
                        curriculum, if any, is a pure function of `step`
    read_in / read_out  the modules around the shared backbone (models/backbone.py)
    loss(out, batch)    {"loss": scalar, <monitored parts>: scalars}
    decode(out, batch)  the network's answer as the family's Estimate (what classical solvers return)
    metrics             name -> Metric (how good an Estimate is, per task)
    solvers             name -> factory(params, seed) -> Solver with a self-describing name
    batch_type          a dataclass with REQUIRED (array names), B, device, to_numpy / from_numpy,
                        slice (keeping task_index(): each task's row in its set) and to(device, dtype)
    monitor             the validation metric that sweeps optimise by default
    probe_targets       algorithm -> core.probe.ProbeTarget: its iterates over a steps axis (what
                        probing compares layers with); with residual(estimate, batch) -> (B, P), the
                        error vector over the prompt whose cosine similarity probing measures, and
                        optionally probe_features(states, mask, batch) -> ((B, P, C), targets (B, P))
                        and probe_decode(preds (B, P), batch) where the read-out is linear (the
                        closed-form probe); without them probing trains the family's read-out head

Register a family by listing its module in FAMILY_MODULES; its module defines FAMILY.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from torch import Tensor, nn

# name -> module that defines FAMILY. The only place a family is named outside its own folder.
FAMILY_MODULES = {
    "gmm": "pipeline.families.gmm",
    "linreg": "pipeline.families.linreg",
    "logreg": "pipeline.families.logreg",
    "pca": "pipeline.families.pca",
    "cluster": "pipeline.families.cluster",
    "mixreg": "pipeline.families.mixreg",
}


@runtime_checkable
class Solver(Protocol):
    """Anything that reads a batch of problem instances and answers in the family's Estimate.

    Trained networks and classical algorithms alike, so a study evaluates a list of them on the
    same sets with the same metrics. `name` is the column in tables and plots; it describes the
    solver's settings, so a changed setting shows as a changed name.
    """

    name: str

    def __call__(self, batch) -> Any: ...


@dataclass(frozen=True)
class Metric:
    """How good an answer is, per task: fn(batch, estimate) -> (B,) or, with `axis`, (B, P) over
    that axis (e.g. the prefix length k of in-context regression)."""

    name: str
    better: str  # "lower" | "higher"
    label: str  # axis label / table caption
    definition: str  # one sentence, copied into the report
    fn: Callable[[Any, Any], Tensor]
    axis: str | None = None  # name of the per-task axis of a (B, P) metric
    axis_start: int = 0  # the axis value of column 0 (e.g. 1: components are numbered from 1)
    log_scale: bool = False  # figures: log y axis


@dataclass(frozen=True)
class SolverSpec:
    """A classical solver by name: factory(params: dict, seed: int, task) -> Solver. `params` is the
    family's resolved solver settings (params.yaml `baselines.<family>`), `task` the evaluated
    task config (e.g. anisotropic mixtures switch EM to diagonal covariances)."""

    factory: Callable[[dict, int, Any], Solver]
    help: str = ""
    uses: tuple[str, ...] = ()  # the `params` keys this solver reads (they enter its name when not default)


def solver_name(base: str, params: dict, defaults: dict, uses: tuple[str, ...]) -> str:
    """A self-describing name: `base` at default settings, else e.g. 'em_paper[em_max_iter=50]'."""
    changed = [f"{k}={params[k]}" for k in uses if k in params and params[k] != defaults.get(k)]
    return base if not changed else f"{base}[{','.join(changed)}]"


class TaskFamily:
    """Base class of a family: subclasses set the attributes and implement the methods."""

    name: str = ""
    TaskConfig: type = object
    SolverConfig: type = object
    batch_type: type = object
    monitor: str = ""  # e.g. "val/l2"
    metrics: Mapping[str, Metric] = {}
    solvers: Mapping[str, SolverSpec] = {}
    probe_targets: Mapping[str, Callable] = {}
    uses: tuple[str, ...] = ()  # other families whose code this one imports (their code is in its fingerprint)

    # ------------------------------------------------------------------ parameters
    def validate(self, task, model, where: str) -> None:
        """Cross-field checks of one resolved run's task (and the model where they interact);
        raise core.config.ConfigError with one line naming `where`.<key>."""

    def groups(self, task) -> list:
        return [None]

    def describe(self, task) -> str:
        """A short label of the task, e.g. 'd=2'."""
        return ""

    # ------------------------------------------------------------------ data
    def sample(self, task, group, batch_size: int, generator, device, step: int | None = None):
        """Training/validation tasks; step=None means the final (post-curriculum) distribution."""
        raise NotImplementedError

    def sample_step(self, task, groups: list, batch_size: int, generator, device, step: int) -> dict:
        """One training step's batches {group: batch}, all drawn from `generator` (seeded by
        (seed, TRAIN, step, rank)). Default: sample() per group in turn; a family overrides it when
        a step's groups should share a draw (e.g. one sample size, so that nothing is padded)."""
        return {g: self.sample(task, g, batch_size, generator, device, step) for g in groups}

    def group_label(self, group) -> str:
        """How a group shows in metric names, e.g. 'K=3' (train/l2/K=3)."""
        return str(group)

    def val_words(self, task, group) -> tuple[int, ...]:
        """Seed words of a group's fixed validation tasks (after the seed and the VAL stream)."""
        return ()

    def group_of(self, batch):
        """The read-out group a batch belongs to (e.g. its K); None for single-head families."""
        return None

    # ------------------------------------------------------------------ network
    def read_in(self, task, model) -> nn.Module:
        """Module with .features(batch) -> (raw token features (B, T, F), mask (B, T) bool) and
        forward(features) -> tokens (B, T, C) for the backbone. Split so that several groups'
        features are concatenated before one projection."""
        raise NotImplementedError

    def read_out(self, task, model, group) -> nn.Module:
        """Module: (states (B, T, C), mask (B, T), batch) -> the family's raw network output."""
        raise NotImplementedError

    def loss(self, out, batch, task) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, out, batch):
        raise NotImplementedError

    def residual(self, est, batch) -> Tensor:
        """Probing: (B, P) prediction - target over the prompt (core/probe.py)."""
        raise NotImplementedError(f"family {self.name} defines no residual: it cannot be probed")

    def no_decay(self, param_name: str) -> bool:
        """Parameters exempt from weight decay besides biases and norms (e.g. learned queries)."""
        return False


_CACHE: dict[str, TaskFamily] = {}


def names() -> list[str]:
    return list(FAMILY_MODULES)


def get(name: str) -> TaskFamily:
    if name not in FAMILY_MODULES:
        raise KeyError(f"unknown task family {name!r} (registered: {', '.join(FAMILY_MODULES)})")
    if name not in _CACHE:
        fam = importlib.import_module(FAMILY_MODULES[name]).FAMILY
        if fam.name != name:
            raise RuntimeError(f"{FAMILY_MODULES[name]}.FAMILY.name is {fam.name!r}, registered as {name!r}")
        _CACHE[name] = fam
    return _CACHE[name]


def family_names_with_uses(name: str) -> list[str]:
    """The family and every family it `uses`, transitively, in first-use order."""
    out, todo = [], [name]
    while todo:
        n = todo.pop(0)
        if n not in out:
            out.append(n)
            todo += list(get(n).uses)
    return out


def module_dir(name: str):
    """The folder of a family's code (what its networks' fingerprints hash, with its `uses`)."""
    from pathlib import Path

    mod = importlib.import_module(FAMILY_MODULES[name])
    return Path(mod.__file__).parent
