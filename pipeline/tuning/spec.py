"""A sweep file (sweeps/<name>.yaml) -> a validated `SweepSpec`, before Ray starts.

A sweep names its study (and optionally one of its networks, `unit`; default the first): every
trial is that network's run (task, model, train: the keys of plans/runs/<run>.json) with the
sweep's `base` and the trial's values on top. Its default metric is the family's monitor.

Every problem is one line naming the file and the key, e.g.
    sweeps/depth.yaml: params.model.n_layers: not a key of the study's runs (task.*, model.*, train.*) (did you mean model.n_layer?)
and the CLI exits with status 2. The format is documented in sweeps/README.md. No ray is imported
here (only the standard library, yaml and the pipeline's config, study and family declarations),
so validation is cheap.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import Config, ConfigError, RunConfig, deep_merge, flatten, unflatten


class SpecError(ConfigError):
    """A bad sweep file: one line naming the file, the key and what is allowed."""


TOP_KEYS = ("name", "description", "study", "unit", "base", "params", "seeds", "num_samples", "metric", "mode",
            "resources", "max_concurrent", "max_failures", "scheduler")
KINDS = ("grid", "values", "uniform", "loguniform", "randint")
RESOURCE_KEYS = ("cpu", "gpu")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "max_t", "brackets")
SCHEDULERS = ("asha", "fifo")
# Keys the sweep itself manages.
MANAGED = {"seed": "use the top-level `seeds` list", "family": "set by the study", "name": "set by the sweep",
           "group": "set by the sweep"}
MAX_CHECKED_COMBINATIONS = 512
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ParamSpec:
    key: str            # dotted params.yaml key, e.g. model.n_layer
    kind: str           # grid | values | uniform | loguniform | randint
    args: tuple         # the values (grid, values) or (low, high)

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def candidate_values(self) -> list:
        """Values to validate a config with: every listed value, or the two ends of a range."""
        if self.kind in ("grid", "values"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1]]
        return [float(self.args[0]), float(self.args[1])]


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None      # in training steps; None = the trial's train.steps
    brackets: int = 1


@dataclass
class SweepSpec:
    path: str
    name: str
    description: str
    study: str
    unit: str
    family: str
    run: dict[str, Any]                   # the unit's resolved run (plain dict): what every trial starts from
    base: dict[str, Any]                  # dotted run key -> value, applied to every trial
    params: list[ParamSpec]
    seeds: list[int]
    num_samples: int = 1
    metric: str = ""
    mode: str = "min"
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: int | None = None
    max_failures: int = 2
    scheduler: SchedulerSpec | None = None

    @property
    def param_keys(self) -> list[str]:
        return [p.key for p in self.params]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = [{"key": p.key, "kind": p.kind, "args": list(p.args)} for p in self.params]
        return d

    def n_trials(self) -> int | None:
        """Trials Tune will create: grid size x seeds x num_samples."""
        n = len(self.seeds) * self.num_samples
        for p in self.params:
            if p.is_grid:
                n *= len(p.args)
        return n


# --------------------------------------------------------------------------------------- helpers

def _err(path, key: str, msg: str) -> SpecError:
    where = f"{key}: " if key else ""
    return SpecError(f"{path}: {where}{msg}".replace("\n", " "))


def sweep_group(name: str) -> str:
    """The W&B group of sweep `name`'s runs (the dashboard filters on it)."""
    return f"sweep-{name}"


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_flat_mapping(value, path, key) -> dict[str, Any]:
    """`base:` may be written with dotted keys ({train.steps: 300}) or nested ({train: {steps: 300}})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, key, f"expected a mapping of run keys (task.*, model.*, train.*), got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise _err(path, key, f"keys must be strings, got {bad[0]!r}")
    return flatten(value)


def _check_key(path, where: str, key: str, known: dict[str, Any]) -> None:
    if key in MANAGED:
        raise _err(path, f"{where}.{key}", f"set by the sweep, not here: {MANAGED[key]}")
    if key not in known:
        raise _err(path, f"{where}.{key}", f"not a key of the study's runs (task.*, model.*, train.*)"
                                           f"{_suggest(key, known)}")


# --------------------------------------------------------------------------------------- trials

def trial_params(run: dict, spec_base: dict[str, Any], values: dict[str, Any], seed: int) -> dict:
    """The run dict of one trial: the study's run <- spec base <- the trial's values <- seed."""
    p = copy.deepcopy(run)
    p = deep_merge(p, unflatten(spec_base))
    p = deep_merge(p, unflatten(values))
    p["seed"] = seed
    return p


def produced_metrics(run: RunConfig) -> list[str]:
    """What a training run of `run` reports (core/module.py): the monitor (val/<part>), the loss
    and the monitored part of the training loss (train/<part>), per read-out group too."""
    from pipeline.core import family as F

    fam = F.get(run.family)
    part = fam.monitor.split("/", 1)[1]  # e.g. "l2" of "val/l2": a part of the family's loss dict
    out = [fam.monitor, "train/loss"]
    groups = fam.groups(run.task)
    if groups == [None]:
        out.append(f"train/{part}")
    else:
        for g in groups:
            label = fam.group_label(g)
            out += [f"{fam.monitor}/{label}", f"train/loss/{label}", f"train/{part}/{label}"]
    return out


def _check_trial_config(path, cfg: RunConfig, spec_like: dict, where: str) -> None:
    """Cross-checks of one trial's run against what a sweep needs."""
    t = cfg.train
    if t.devices != 1:
        raise _err(path, f"{where}train.devices", f"a sweep trial trains on one device, got {t.devices!r} "
                   "(use resources.gpu: 1 and train.devices: 1; several GPUs per trial are not supported)")
    if t.strategy != "auto":
        raise _err(path, f"{where}train.strategy", f"a sweep trial trains on one device; must be auto, got {t.strategy!r}")
    gpu = spec_like["resources"]["gpu"]
    if t.accelerator in ("gpu", "cuda") and gpu <= 0:
        raise _err(path, f"{where}train.accelerator", f"{t.accelerator!r} needs resources.gpu > 0 (got {gpu})")
    val_interval = min(t.val_every, t.steps)
    if t.steps % val_interval:
        raise _err(path, f"{where}train.steps", f"{t.steps} must be a multiple of train.val_every={t.val_every} "
                   "so the final val metrics are measured at the last step")
    metric = spec_like["metric"]
    if metric not in produced_metrics(cfg):
        raise _err(path, "metric", f"{metric!r} is not produced by training this run "
                   f"(choose one of: {', '.join(produced_metrics(cfg))})")
    if metric.startswith("val/") and val_interval > min(t.ckpt_every, t.steps):
        raise _err(path, f"{where}train.val_every", f"{t.val_every} must be <= train.ckpt_every={t.ckpt_every}: "
                   f"every report to Tune (one per checkpoint) must carry {metric}")


def _values_product(params: list[ParamSpec]):
    lists = [p.candidate_values() for p in params]
    n = math.prod(len(v) for v in lists) if lists else 1
    if n <= MAX_CHECKED_COMBINATIONS:
        for combo in itertools.product(*lists):
            yield dict(zip((p.key for p in params), combo))
    else:  # too many: vary one key at a time around the first values
        first = {p.key: v[0] for p, v in zip(params, lists)}
        for p, vals in zip(params, lists):
            for v in vals:
                yield {**first, p.key: v}


# --------------------------------------------------------------------------------------- parsing

def _read(path: Path) -> dict:
    if not path.is_file():
        raise _err(path, "", "sweep file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as e:
        raise _err(path, "", f"not readable as UTF-8 text ({type(e).__name__})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise _err(path, "", f"not valid YAML{at} ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise _err(path, "", f"expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _parse_param(path, key: str, raw, known: dict[str, Any]) -> ParamSpec:
    where = f"params.{key}"
    _check_key(path, "params", key, known)
    if not isinstance(raw, dict) or len(raw) != 1:
        raise _err(path, where, "expected exactly one of {grid: [...]}, {values: [...]}, {uniform: [a, b]}, "
                   f"{{loguniform: [a, b]}}, {{randint: [a, b]}}, got {raw!r}")
    (kind, args), = raw.items()
    if kind not in KINDS:
        raise _err(path, where, f"unknown kind {kind!r} (choose one of: {', '.join(KINDS)})")
    current = known[key]
    if kind in ("grid", "values"):
        if not isinstance(args, list):
            raise _err(path, f"{where}.{kind}", f"expected a list of values, got {args!r}")
        if not args:
            raise _err(path, f"{where}.{kind}", "empty grid: give at least one value")
        seen = [json.dumps(a, sort_keys=True, default=str) for a in args]
        if len(set(seen)) != len(seen):
            raise _err(path, f"{where}.{kind}", f"values must be distinct, got {args!r}")
        return ParamSpec(key, kind, tuple(args))
    # a range
    if not (isinstance(args, list) and len(args) == 2):
        raise _err(path, f"{where}.{kind}", f"expected [low, high], got {args!r}")
    lo, hi = args
    if isinstance(lo, str) or isinstance(hi, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            lo, hi = float(lo), float(hi)
        except ValueError:
            raise _err(path, f"{where}.{kind}", f"expected numbers, got {args!r}") from None
    if not (_is_number(lo) and _is_number(hi)):
        raise _err(path, f"{where}.{kind}", f"expected numbers, got {args!r}")
    if not lo < hi:
        raise _err(path, f"{where}.{kind}", f"low must be < high, got {args!r}")
    if kind == "randint":
        if not (_is_int(lo) and _is_int(hi)):
            raise _err(path, f"{where}.randint", f"expected integers, got {args!r}")
    else:
        if _is_int(current) or isinstance(current, bool) or not isinstance(current, float):
            raise _err(path, f"{where}.{kind}", f"{key} is a {type(current).__name__}, not a float: "
                       "use grid, values or randint")
        if kind == "loguniform" and lo <= 0:
            raise _err(path, f"{where}.loguniform", f"low must be > 0, got {lo}")
    if kind == "randint" and not (_is_int(current) or isinstance(current, float)):
        raise _err(path, f"{where}.randint", f"{key} is a {type(current).__name__}, not a number")
    return ParamSpec(key, kind, (lo, hi))


def _int_field(data: dict, path, key: str, default, *, minimum: int, allow_none: bool = False):
    v = data.get(key, default)
    if v is None and allow_none:
        return None
    if not _is_int(v):
        raise _err(path, key, f"expected an integer, got {v!r}")
    if v < minimum:
        raise _err(path, key, f"must be >= {minimum}, got {v}")
    return v


def _parse_scheduler(path, raw) -> SchedulerSpec | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise _err(path, "scheduler", f"expected null or a mapping like {{type: asha, grace_period: 100}}, got {raw!r}")
    for k in raw:
        if k not in SCHEDULER_KEYS:
            raise _err(path, f"scheduler.{k}", f"unknown key (allowed: {', '.join(SCHEDULER_KEYS)})")
    typ = raw.get("type", "asha")
    if typ not in SCHEDULERS:
        raise _err(path, "scheduler.type", f"{typ!r} is not supported (choose one of: {', '.join(SCHEDULERS)})")
    if typ == "fifo":
        if len(raw) > 1:
            raise _err(path, "scheduler", "fifo takes no options")
        return None
    grace = raw.get("grace_period", 1)
    if not _is_int(grace) or grace < 1:
        raise _err(path, "scheduler.grace_period", f"expected a positive integer (training steps), got {grace!r}")
    rf = raw.get("reduction_factor", 2)
    if not _is_number(rf) or rf <= 1:
        raise _err(path, "scheduler.reduction_factor", f"must be a number > 1, got {rf!r}")
    max_t = raw.get("max_t")
    if max_t is not None and (not _is_int(max_t) or max_t < 1):
        raise _err(path, "scheduler.max_t", f"expected a positive integer (training steps), got {max_t!r}")
    if max_t is not None and grace > max_t:
        raise _err(path, "scheduler.grace_period", f"{grace} must be <= scheduler.max_t={max_t}")
    brackets = raw.get("brackets", 1)
    if not _is_int(brackets) or brackets < 1:
        raise _err(path, "scheduler.brackets", f"expected a positive integer, got {brackets!r}")
    return SchedulerSpec("asha", grace, float(rf), max_t, brackets)


def _parse_resources(path, raw) -> dict[str, float]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _err(path, "resources", f"expected a mapping like {{cpu: 1, gpu: 0}}, got {raw!r}")
    for k in raw:
        if k not in RESOURCE_KEYS:
            raise _err(path, f"resources.{k}", f"unknown key (allowed: {', '.join(RESOURCE_KEYS)})")
    cpu, gpu = raw.get("cpu", 1), raw.get("gpu", 0)
    if not _is_number(cpu) or cpu <= 0:
        raise _err(path, "resources.cpu", f"must be a number > 0, got {cpu!r}")
    if not _is_number(gpu) or gpu < 0:
        raise _err(path, "resources.gpu", f"must be a number >= 0, got {gpu!r}")
    if gpu > 1:
        raise _err(path, "resources.gpu", f"a trial trains on one device: at most 1 (fractions share a GPU), got {gpu}")
    return {"cpu": cpu, "gpu": gpu}


def load_spec(path: str | Path, cfg: Config) -> SweepSpec:
    """Parse and validate a sweep file against the loaded params (`cfg`: params.yaml after --set).
    Raises SpecError (one line) on any problem; starts nothing."""
    path = Path(path)
    data = _read(path)
    for k in data:
        if k not in TOP_KEYS:
            raise _err(path, str(k), f"unknown key (allowed: {', '.join(TOP_KEYS)}){_suggest(str(k), TOP_KEYS)}")
    from pipeline import studies as S
    from pipeline.core import family as F

    study = data.get("study")
    if study not in S.names():
        raise _err(path, "study", f"{study!r}: a sweep names its study (choose one of: {', '.join(S.names())})")
    st = S.get(study)
    try:
        units = {u.name: u for u in st.units(cfg)}
        unit = data.get("unit", next(iter(units)))
        if not isinstance(unit, str) or unit not in units:
            raise _err(path, "unit", f"{unit!r} is not a network of study {study} "
                       f"(choose one of: {', '.join(units)})")
        run = st.run(cfg, units[unit]).to_dict()
    except SpecError:
        raise
    except ConfigError as e:  # a study that params.yaml `studies` does not list is validated only here
        raise _err(path, "study", f"{study}: {e}") from None
    run.pop("name")
    run.pop("group")
    known = {k: v for k, v in flatten(run).items()
             if k.split(".")[0] in ("task", "model", "train")}  # every run key (dotted) -> its current value

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(path, "name", f"expected a name of letters, digits, '_', '-', '.', got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(path, "description", f"expected a string, got {description!r}")

    base = _as_flat_mapping(data.get("base"), path, "base")
    for k in base:
        _check_key(path, "base", k, known)

    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise _err(path, "params", "expected a non-empty mapping of run keys to vary, "
                   "e.g. {model.n_layer: {grid: [1, 2, 4]}}")
    params = []
    for k, raw in raw_params.items():
        if not isinstance(k, str):
            raise _err(path, "params", f"keys must be dotted run keys, got {k!r}")
        if k in base:
            raise _err(path, f"params.{k}", "also set in base: a key is either fixed (base) or varied (params)")
        params.append(_parse_param(path, k, raw, known))

    seeds = data.get("seeds", [cfg.seed])
    if not isinstance(seeds, list) or not seeds:
        raise _err(path, "seeds", f"expected a non-empty list of integers, got {seeds!r}")
    for s in seeds:
        if not _is_int(s) or s < 0:
            raise _err(path, "seeds", f"expected integers >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(path, "seeds", f"values must be distinct, got {seeds!r}")

    num_samples = _int_field(data, path, "num_samples", 1, minimum=1)
    metric = data.get("metric", F.get(st.family).monitor)
    if not isinstance(metric, str):
        raise _err(path, "metric", f"expected a metric name such as val/l2, got {metric!r}")
    mode = data.get("mode", "min")
    if mode not in ("min", "max"):
        raise _err(path, "mode", f"{mode!r} is not allowed (choose one of: min, max)")
    resources = _parse_resources(path, data.get("resources"))
    max_concurrent = _int_field(data, path, "max_concurrent", None, minimum=1, allow_none=True)
    max_failures = _int_field(data, path, "max_failures", 2, minimum=-1)
    scheduler = _parse_scheduler(path, data.get("scheduler"))

    spec = SweepSpec(path=str(path), name=name, description=description, study=study, unit=unit,
                     family=st.family, run=run, base=base, params=params,
                     seeds=seeds, num_samples=num_samples, metric=metric, mode=mode, resources=resources,
                     max_concurrent=max_concurrent, max_failures=max_failures, scheduler=scheduler)
    _validate_trials(spec)
    return spec


def trial_run(spec: SweepSpec, values: dict, seed: int, trial_id: str = "") -> RunConfig:
    """The validated run of one trial (W&B group sweep-<name>)."""
    p = trial_params(spec.run, spec.base, values, seed)
    p.update(name=f"{spec.name}-{trial_id}" if trial_id else spec.name, group=sweep_group(spec.name))
    return RunConfig.from_dict(p, where="x")


def _validate_trials(spec: SweepSpec) -> None:
    """Build the run of every grid combination (or range end): a value the run rejects
    (n_head not dividing n_embd, ...) fails here, before Ray starts."""
    path = spec.path
    like = {"resources": spec.resources, "metric": spec.metric}
    try:
        base_cfg = trial_run(spec, {}, spec.seeds[0])
    except ConfigError as e:
        raise _err(path, "base", _strip_source(str(e))) from None
    _check_trial_config(path, base_cfg, like, "base: ")
    max_steps = base_cfg.train.steps
    for values in _values_product(spec.params):
        try:
            cfg = trial_run(spec, values, spec.seeds[0])
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise _err(path, "params", f"trial {{{shown}}}: {_strip_source(str(e))}") from None
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        _check_trial_config(path, cfg, like, f"params: trial {{{shown}}}: ")
        max_steps = max(max_steps, cfg.train.steps)
    s = spec.scheduler
    if s is not None and s.grace_period > (s.max_t or max_steps):
        raise _err(path, "scheduler.grace_period", f"{s.grace_period} must be <= the trial length "
                   f"({s.max_t or max_steps} steps)")


def _strip_source(msg: str) -> str:
    return msg.removeprefix("x: ").removeprefix("x.")


# --------------------------------------------------------------------------------------- resources

def local_resources() -> tuple[int, int]:
    """(CPUs, GPUs) this machine can give a local Ray."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch is a dependency
        gpus = 0
    return cpus, gpus


def check_resources(spec: SweepSpec, cpus: float, gpus: float, where: str) -> None:
    """A trial must fit on one node: more CPUs/GPUs than the biggest node has would wait forever."""
    r = spec.resources
    if r["cpu"] > cpus:
        raise _err(spec.path, "resources.cpu", f"{r['cpu']} CPUs per trial, but {where} has {cpus:g}")
    if r["gpu"] > gpus:
        raise _err(spec.path, "resources.gpu", f"{r['gpu']} GPU per trial, but {where} has "
                   f"{'no GPU' if not gpus else f'{gpus:g}'}")


def fingerprint(spec: SweepSpec) -> str:
    """What a resumed sweep must match: the spec (minus execution knobs) with the run it starts from,
    and the code of its family."""
    from pipeline.core.fingerprint import code_fingerprint

    s = spec.to_dict()
    for k in ("path", "max_concurrent", "max_failures", "description"):
        s.pop(k, None)
    blob = json.dumps({"spec": s, "code": code_fingerprint(spec.family)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
