"""Studies as declarations.

A study names its family, the networks it trains (units: overrides of the base params), its
evaluation grids (axes, the tasks at each point, the methods at each point) and its report
(tables, figures). The spine does the rest: `core/plan.py` resolves the runs (identical runs are
one network, whichever studies use them), `core/evaluate.py` writes the evaluation sets and the
long-format results, `core/report.py` draws tables, figures, dvc-plots CSVs and metrics JSON.

A study module (studies/<name>.py) defines STUDY, an instance of a Study subclass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.core.config import Config, ConfigError, RunConfig


def check_step_counts(where: str, steps) -> None:
    """Step / iteration counts of a study key or a probe: distinct ascending integers >= 0."""
    steps = list(steps)
    if not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in steps) \
            or steps != sorted(set(steps)):
        raise ConfigError(f"{where}: distinct ascending integers >= 0, got {steps}")


def check_conditions(where: str, values) -> None:
    """Condition numbers of Cov(x) (a study's evaluation grid): a non-empty list of numbers >= 1."""
    if not values or any(isinstance(c, bool) or not isinstance(c, (int, float)) or c < 1 for c in values):
        raise ConfigError(f"{where}: condition numbers >= 1, got {values}")


class SkipPoint(Exception):
    """Raised by a grid's make_set when a point cannot be built on this machine (e.g. a dataset whose
    source is not installed): the point is recorded as skipped with this one-line reason, every
    method there is reported not applicable with it, and nothing else fails."""


@dataclass(frozen=True)
class Unit:
    """A network of the study: `overrides` of the run params ({"task": {...}, "model": {...},
    "train": {...}}) on top of the base sections and the study's own overrides."""

    name: str
    overrides: dict = field(default_factory=dict)
    label: str = ""  # e.g. "transformer(set, softmax) L4 D64"


@dataclass(frozen=True)
class Method:
    """One column of a grid: a trained network (`unit`) or a classical solver (`solver`, a name
    in the family's registry). `name` is what tables and plots call it."""

    name: str
    unit: str | None = None
    solver: str | None = None
    label: str = ""
    params: dict | None = None  # a solver's settings over the family's baselines (e.g. {"newton_steps": 5})


@dataclass
class Grid:
    """An evaluation grid: `points` (dicts over `axes`), the fixed tasks at each point, the methods."""

    name: str
    axes: list[str]
    points: list[dict]
    make_set: Callable[[Config, dict], Any]  # (cfg, point) -> the family's batch; deterministic
    methods: Callable[[Config, dict], list[Method]]
    title: str = ""
    n_tasks: int | None = None  # for the report


@dataclass(frozen=True)
class Table:
    """Markdown table: rows = methods, columns = values of `cols`, one table per value of the other axes.
    stat: mean (± 95 % CI) | median | seconds."""

    grid: str
    metric: str
    cols: str
    stat: str = "mean"
    title: str = ""
    where: dict | None = None  # restrict to points matching these axis values
    values: tuple | None = None  # show only these columns


@dataclass(frozen=True)
class Figure:
    """PNG: x = axis `x`, one line per method, one panel per value of `panels`; also a dvc-plots CSV."""

    name: str
    grid: str
    metric: str
    x: str
    panels: str | None = None
    title: str = ""
    xscale: str = "linear"  # linear | log2 | symlog
    where: dict | None = None


@dataclass
class StudySection:
    """The fields every study's params section has: overrides for all of its networks."""

    task: dict = field(default_factory=dict, metadata={"help": "overrides of task.<family> for every network of the study"})
    model: dict = field(default_factory=dict, metadata={"help": "overrides of `model` for every network of the study"})
    train: dict = field(default_factory=dict, metadata={"help": "overrides of `train` for every network of the study"})
    expected_s: dict = field(default_factory=dict, metadata={
        "help": "expected wall time (s) of the study's stages on the reference machine (2 CPU cores): "
                "train (each network, or {unit: s}), generate, evaluate, report; `plan` sums them"})


class Study:
    """Base class of a study declaration."""

    name: str = ""
    family: str = ""
    title: str = ""
    Config: type = object  # the study's params section; a dataclass with task/model/train override dicts
    doc: str = ""  # docs/studies/<name>.md
    inputs: tuple[str, ...] = ()  # pipeline input stages its evaluation sets read, e.g. ("datasets",)

    def check(self, cfg: Config) -> None:
        """Cross-section checks (e.g. an axis value that must be one of another key's values)."""

    def units(self, cfg: Config) -> list[Unit]:
        raise NotImplementedError

    def grids(self, cfg: Config) -> list[Grid]:
        raise NotImplementedError

    def tables(self, cfg: Config) -> list[Table]:
        return []

    def figures(self, cfg: Config) -> list[Figure]:
        return []

    def probes(self, cfg: Config) -> list:
        """Probing analyses (core/probe.py Probe): which algorithm step each layer of a unit matches."""
        return []

    def notes(self, cfg: Config, results: dict) -> list[str]:
        """Free text for the report (findings computed from the results)."""
        return []

    # ------------------------------------------------------------------ resolution
    def section(self, cfg: Config):
        return cfg.section(self.name)

    def base_run(self, cfg: Config) -> dict:
        """The study's run params before unit overrides: base sections <- the study's overrides."""
        from pipeline.core.config import deep_merge

        d = cfg.to_dict()
        run = {"family": self.family, "seed": cfg.seed, "task": d["task"][self.family], "model": d["model"],
               "train": d["train"]}
        sec = self.section(cfg)
        for key in ("task", "model", "train"):
            over = getattr(sec, key, None) or {}
            run[key] = deep_merge(run[key], over)
        return run

    def run(self, cfg: Config, unit: Unit) -> RunConfig:
        """The resolved, validated run of one unit; errors name the study and unit."""
        from pipeline.core.config import deep_merge

        data = self.base_run(cfg)
        for key, over in unit.overrides.items():
            if key not in ("task", "model", "train"):
                raise ConfigError(f"{self.name}: unit {unit.name!r} overrides {key!r} (allowed: task, model, train)")
            data[key] = deep_merge(data[key], over)
        data.update(name=f"{self.name}-{unit.name}", group=self.name)
        try:
            return RunConfig.from_dict(data, where=self.name)
        except ConfigError as e:
            raise ConfigError(f"{self.name} (network {unit.name}): {e}") from None

    def task(self, cfg: Config, **over):
        """The study's typed task config (base task.<family> <- the study's overrides <- `over`)."""
        from pipeline.core import family as F
        from pipeline.core.config import _build

        return _build(F.get(self.family).TaskConfig, {**self.base_run(cfg)["task"], **over}, f"{self.name}.task")

    def point_task(self, cfg: Config, grid: Grid, point: dict):
        """The task config the tasks at `point` were drawn from (classical solvers may depend on it)."""
        return self.task(cfg)

    def solver_params(self, cfg: Config) -> dict:
        import dataclasses

        return dataclasses.asdict(cfg.baselines[self.family])

