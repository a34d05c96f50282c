"""Typed parameters: params.yaml -> dataclasses, validated before any compute starts.

Layout of params.yaml (every section optional except `studies`):

    seed, out_dir, studies     master seed, output folder, the studies `dvc repro` runs
    model, train               the base network and training (every run starts from these)
    eval, wandb                how evaluations run (chunking, device) and W&B
    task.<family>              each family's task distribution (families/<family>/config.py)
    baselines.<family>         each family's classical-solver settings
    <study>                    each study's own section (studies/<study>.py), which may override
                               `task`, `model` and `train` for all of its networks

A *run* (RunConfig) is what trains one network: (family, seed, task, model, train), resolved
from the base sections, the study's overrides and the unit's overrides. Its fingerprint is what
identifies the trained network (core/fingerprint.py).

Every problem is reported as one line naming the file, the key and what is allowed, e.g.
    params.yaml: model.n_head: 3 does not divide model.n_embd=64 (choose a divisor of 64)
and the CLI exits with status 2. `profiles/paper.yaml` overlays the paper-scale setting.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
BACKBONES = ("transformer", "mamba2", "lstm")
ATTENTIONS = ("softmax", "relu", "linear")


class ConfigError(ValueError):
    """A bad parameter: the message is one line naming the source, the key and what is allowed."""


def _f(default, help: str = "", **checks):
    """A dataclass field with a one-line help and validation rules (min, max, choices, ...)."""
    if isinstance(default, (list, dict)):
        kw = {"default_factory": (lambda d=default: copy.deepcopy(d))}
    else:
        kw = {"default": default}
    return field(**kw, metadata={"help": help, **checks})



@dataclass
class ModelConfig:
    backbone: str = _f("transformer", "sequence backbone (models/backbone.py): transformer | mamba2 | lstm",
                       choices=BACKBONES)
    position: str = _f("set", "transformer only. set: no positions, full attention (permutation-equivariant); "
                              "gpt2: causal with learned positions (anchor-faithful)", choices=("set", "gpt2"))
    attention: str = _f("softmax", "transformer only. softmax (SDPA) | relu: ReLU(q.k/sqrt(hd)) / #keys | "
                                   "linear: q.k/sqrt(hd) / #keys (no softmax)", choices=ATTENTIONS)
    mlp: str = _f("gelu", "transformer only. MLP activation: gelu (GPT-2) | relu (the in-context Newton "
                          "constructions, e.g. linear attention + ReLU MLP)", choices=("gelu", "relu"))
    n_layer: int = _f(4, "backbone depth", min=1)
    n_head: int = _f(4, "attention heads; must divide n_embd", min=1)
    n_embd: int = _f(64, "width", min=1)
    mlp_ratio: int = _f(4, "MLP hidden = mlp_ratio * n_embd", min=1)
    dropout: float = _f(0.0, "dropout (paper: 0)", min=0, lt=1)
    max_len: int = _f(1024, "longest token sequence the gpt2 position table covers", min=1)
    d_state: int = _f(16, "mamba2: SSM state size per head (paper: 16)", min=1)
    d_conv: int = _f(4, "mamba2: causal depthwise convolution width", min=1)
    expand: int = _f(2, "mamba2: inner width = expand * n_embd", min=1)
    headdim: int = _f(32, "mamba2: channels per SSM head; must divide expand * n_embd", min=1)
    chunk_size: int = _f(64, "mamba2: chunk length of the state-space-duality scan (speed only, not the result)",
                         min=1)
    bidirectional: bool = _f(False, "mamba2 / lstm: add a second scan over each sample in reverse order "
                                    "(default: causal, as in the paper)")


@dataclass
class TrainConfig:
    steps: int = _f(1500, "optimizer steps", min=1)
    batch_size: int = _f(64, "tasks per read-out group (e.g. per K) per step (global, split over devices)", min=1)
    lr: float = _f(1e-3, "AdamW peak learning rate", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = _f(100, "linear warm-up steps", min=0)
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr", min=0, max=1)
    grad_clip: float = _f(1.0, "gradient-norm clip; 0 disables", min=0)
    accelerator: str = _f("auto", "auto | cpu | gpu", choices=("auto", "cpu", "gpu", "cuda"))
    devices: Any = _f(1, "number of devices, or 'auto'", types=(int, str))
    strategy: str = _f("auto", "auto | ddp | ddp_spawn", choices=("auto", "ddp", "ddp_spawn"))
    precision: str = _f("32-true", "32-true | bf16-mixed | 16-mixed | auto (bf16-mixed on a CUDA device with "
                                   "bf16, else 32-true: bf16 autocast measured slower on CPUs)",
                        choices=("32-true", "32", "bf16-mixed", "16-mixed", "64-true", "auto"))
    compile: bool = _f(False, "torch.compile the backbone (dynamic shapes; the compile time is paid once per "
                              "process, cached on disk across runs); a speed key, not part of a network's identity")
    workers: Any = _f("auto", "networks the train command trains at once, each in its own process (read from "
                              "the base train section): auto = one per CPU core (at most 4), one at a time "
                              "on a CUDA device; a speed key, not part of a network's identity",
                      types=(int, str))
    ckpt_every: int = _f(250, "save last.ckpt every this many steps (resume point)", min=1)
    log_every: int = _f(25, "log training metrics every this many steps", min=1)
    val_every: int = _f(250, "score the network on fixed validation tasks every this many steps", min=1)
    val_tasks: int = _f(64, "validation tasks per read-out group", min=1)


# Keys that cannot change the trained network: left out of its identity (fingerprint), so editing
# them neither retrains nor invalidates it. (devices: the data of a step are drawn per rank, but
# a run keeps its identity across hardware; a checkpoint resumes on other hardware too.)
NOT_IDENTITY = {"train": ("log_every", "ckpt_every", "val_every", "devices", "accelerator", "strategy", "compile",
                          "workers")}


@dataclass
class EvalConfig:
    chunk_size: int = _f(512, "tasks per solver call (bounds memory; results do not depend on it)", min=1)
    device: str = _f("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    workers: Any = _f("auto", "studies the evaluate command evaluates at once, each in its own process: auto = "
                              "one per CPU core (at most 4), one at a time on a CUDA device",
                      types=(int, str))


@dataclass
class WandbConfig:
    mode: str = _f("auto", "auto: online if W&B credentials are configured, else offline; WANDB_MODE wins",
                   choices=("auto", "online", "offline", "disabled"))
    project: str = _f("algorithm-simulators", "W&B project")
    entity: str | None = _f(None, "W&B entity (team); None = your default")


@dataclass
class _Top:
    seed: int = _f(0, "master seed: training data, evaluation sets and baselines derive from it", min=0)
    out_dir: str = _f("outputs", "where networks, results, figures and W&B runs are written")
    studies: list[str] = _f([], "the studies `dvc repro` runs (studies/__init__.py lists them)", nonempty=True)
    sweeps: dict = _f({}, "the Ray Tune sweeps `dvc repro` runs: name (sweeps/<name>.yaml) -> expected seconds "
                          "on the reference machine")
    budget_minutes: float = _f(15.0, "time budget of the whole default `dvc repro` on the reference machine "
                                     "(2 CPU cores); `python -m pipeline plan` prints the expected total", gt=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """The whole params.yaml, typed. `task`/`baselines`: family -> its typed section;
    `sections`: study -> its typed section."""

    seed: int = 0
    out_dir: str = "outputs"
    studies: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sweeps: dict = field(default_factory=dict)
    budget_minutes: float = 15.0
    task: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)

    def section(self, study: str):
        return self.sections[study]

    def to_dict(self) -> dict:
        out = {k: dataclasses.asdict(getattr(self, k)) if dataclasses.is_dataclass(getattr(self, k))
               else copy.deepcopy(getattr(self, k)) for k in ("seed", "out_dir", "studies", "sweeps", "budget_minutes",
                                                              "model", "train", "eval", "wandb")}
        out["task"] = {f: dataclasses.asdict(t) for f, t in self.task.items()}
        out["baselines"] = {f: dataclasses.asdict(b) for f, b in self.baselines.items()}
        out.update({s: dataclasses.asdict(c) for s, c in self.sections.items()})
        return out


@dataclass
class RunConfig:
    """What trains one network. `name` (the run id) and `group` (the W&B group: its study) label it;
    they are not part of its identity."""

    family: str
    seed: int
    task: Any
    model: ModelConfig
    train: TrainConfig
    name: str = "run"
    group: str = ""

    def to_dict(self) -> dict:
        return {"family": self.family, "seed": self.seed, "task": dataclasses.asdict(self.task),
                "model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train),
                "name": self.name, "group": self.group}

    def identity(self) -> dict:
        """What identifies the trained network (hashed by its fingerprint, with the code)."""
        d = self.to_dict()
        for k in ("name", "group"):
            d.pop(k)
        for section, keys in NOT_IDENTITY.items():
            for k in keys:
                d[section].pop(k, None)
        return d

    @classmethod
    def from_dict(cls, data: dict, where: str = "run") -> "RunConfig":
        """Build and validate a run from a plain dict (a plan file, a checkpoint, a sweep trial)."""
        from pipeline.core import family as F

        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {"family", "seed", "task", "model", "train", "name", "group"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key of a run "
                              "(allowed: family, seed, task, model, train, name, group)")
        fam_name = data.get("family")
        if fam_name not in F.names():
            raise ConfigError(f"{where}.family: {fam_name!r} is not a registered task family "
                              f"(choose one of: {', '.join(F.names())})")
        fam = F.get(fam_name)
        seed = _check_scalar(data.get("seed", 0), int, f"{where}.seed")
        _check_rules(seed, {"min": 0}, f"{where}.seed")
        run = cls(family=fam_name, seed=seed, task=_build(fam.TaskConfig, data.get("task", {}), "task"),
                  model=_build(ModelConfig, data.get("model", {}), "model"),
                  train=_build(TrainConfig, data.get("train", {}), "train"),
                  name=str(data.get("name", "run")), group=str(data.get("group", "")))
        validate_run(run)
        return run


def validate_run(run: RunConfig) -> RunConfig:
    """Cross-field checks of one run: the model, the training schedule and the family's own rules."""
    from pipeline.core import family as F

    m, tr = run.model, run.train
    check_model(m, "model")
    if tr.warmup_steps >= tr.steps and tr.steps > 1:
        raise ConfigError(f"train.warmup_steps: must be < train.steps={tr.steps}, got {tr.warmup_steps}")
    if isinstance(tr.devices, int) and tr.devices > 1 and tr.batch_size % tr.devices:
        raise ConfigError(f"train.batch_size: {tr.batch_size} must be divisible by train.devices={tr.devices}")
    if tr.strategy.startswith("ddp") and tr.devices == 1:
        raise ConfigError("train.strategy: ddp needs train.devices > 1 (or 'auto')")
    F.get(run.family).validate(run.task, m, "task")
    return run


def check_model(m: ModelConfig, where: str) -> None:
    """Cross checks of one model section (the base `model`, a study's or an ablation variant's)."""
    if m.n_embd % m.n_head:
        raise ConfigError(f"{where}.n_head: {m.n_head} does not divide {where}.n_embd={m.n_embd} "
                          f"(choose a divisor of {m.n_embd})")
    if m.backbone != "transformer":
        if m.attention != "softmax":
            raise ConfigError(f"{where}.attention: {m.attention!r} applies to backbone transformer only, "
                              f"not {m.backbone!r} (leave it softmax)")
        if m.mlp != "gelu":
            raise ConfigError(f"{where}.mlp: {m.mlp!r} applies to backbone transformer only, "
                              f"not {m.backbone!r} (leave it gelu)")
        if m.position != "set":
            raise ConfigError(f"{where}.position: {m.position!r} applies to backbone transformer only; {m.backbone} "
                              "reads the sample in order already (leave it set; see model.bidirectional)")
    elif m.bidirectional:
        raise ConfigError(f"{where}.bidirectional: applies to mamba2 / lstm only; the transformer sees the whole "
                          "sample with position set")
    if m.backbone == "mamba2" and (m.expand * m.n_embd) % m.headdim:
        raise ConfigError(f"{where}.headdim: {m.headdim} does not divide expand*n_embd={m.expand * m.n_embd} "
                          "(mamba2 splits its inner width into heads of headdim channels)")


def model_with(base: ModelConfig, over: dict, where: str) -> ModelConfig:
    """`base` with some keys overridden (an ablation variant). Switching backbone resets the keys only
    the other backbone reads; {attention: relu} alone means the transformer with ReLU attention."""
    over = dict(over)
    b = dataclasses.asdict(base)
    if "backbone" not in over and {"attention", "position"} & set(over):
        over["backbone"] = "transformer"
    if over.get("backbone", b["backbone"]) != b["backbone"]:
        only = ("position", "attention") if b["backbone"] == "transformer" else ("bidirectional",)
        b.update({k: getattr(ModelConfig(), k) for k in only})
    m = _build(ModelConfig, {**b, **over}, where)
    check_model(m, where)
    return m


# --------------------------------------------------------------------------------------- parsing

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check_scalar(value, tp, where: str):
    """Coerce/check one scalar against a type; returns the value or raises ConfigError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return v
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                v = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(v):
                    return v
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(tp)


def _check_rules(value, meta: dict, where: str):
    allowed = meta.get("choices")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not allowed (choose one of: {', '.join(map(str, allowed))})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for rule, ok, text in (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                               ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")):
            if rule in meta and not ok(value, meta[rule]):
                raise ConfigError(f"{where}: must be {text} {meta[rule]}, got {value!r}")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{path}: unknown key (allowed: {', '.join(names)})")
    kwargs = {}
    for name, f in names.items():
        if name not in data:
            continue
        path = f"{where}.{name}" if where else name
        tp, value, meta = hints[name], data[name], dict(f.metadata)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path)
            continue
        origin = typing.get_origin(tp)
        if tp is dict:  # overrides (a mapping of keys) or named variants (name -> mapping)
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of keys, got {value!r}")
            if meta.get("named"):
                if not all(isinstance(v, dict) or v is None for v in value.values()):
                    raise ConfigError(f"{path}: expected a mapping of name -> mapping of keys, got {value!r}")
                if meta.get("nonempty", True) and not value:
                    raise ConfigError(f"{path}: must not be empty")
                for k in value:
                    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(k)):
                        raise ConfigError(f"{path}.{k}: a name becomes a folder name; use letters, digits, "
                                          "'_', '-', '.'")
                kwargs[name] = {str(k): dict(v or {}) for k, v in value.items()}
            else:
                kwargs[name] = copy.deepcopy(value)
        elif origin is list:
            (inner,) = typing.get_args(tp)
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected a list of {_type_name(inner)}, got {value!r}")
            if meta.get("nonempty") and not value:
                raise ConfigError(f"{path}: must not be empty")
            items = [_check_scalar(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
            for i, v in enumerate(items):
                _check_rules(v, meta, f"{path}[{i}]")
            if len(set(items)) != len(items):
                raise ConfigError(f"{path}: values must be distinct, got {value!r}")
            kwargs[name] = items
        elif origin in (typing.Union, types.UnionType):  # Optional[str]
            if value is None:
                kwargs[name] = None
            else:
                inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
                kwargs[name] = _check_scalar(value, inner, path)
        elif tp is Any:  # devices, workers: int or "auto"
            if isinstance(value, bool) or not isinstance(value, meta.get("types", (int, str))):
                raise ConfigError(f"{path}: expected an integer or 'auto', got {value!r}")
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"{path}: expected an integer or 'auto', got {value!r}")
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"{path}: must be >= 1, got {value!r}")
            kwargs[name] = value
        else:
            v = _check_scalar(value, tp, path)
            _check_rules(v, meta, path)
            kwargs[name] = v
    return cls(**kwargs)



OVERRIDABLE = ("task", "model", "train")  # what a study section may override for all of its networks


def _build_config(data: dict) -> Config:
    from pipeline import studies as S
    from pipeline.core import family as F

    top_keys = [f.name for f in dataclasses.fields(_Top)]
    allowed = [*top_keys, "task", "baselines", *S.names()]
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown key (allowed: {', '.join(allowed)})")
    top = _build(_Top, {k: v for k, v in data.items() if k in top_keys}, "")
    if "studies" not in data:
        raise ConfigError(f"studies: missing (list the studies to run, from: {', '.join(S.names())})")
    for i, s in enumerate(top.studies):
        if s not in S.names():
            raise ConfigError(f"studies[{i}]: {s!r} is not a registered study (choose from: {', '.join(S.names())})")
    families = {}
    for section in ("task", "baselines"):
        raw = data.get(section) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{section}: expected a mapping of family -> keys, got {raw!r}")
        for f in raw:
            if f not in F.names():
                raise ConfigError(f"{section}.{f}: not a registered task family (choose from: {', '.join(F.names())})")
        families[section] = {f: _build(getattr(F.get(f), "TaskConfig" if section == "task" else "SolverConfig"),
                                       raw.get(f) or {}, f"{section}.{f}") for f in F.names()}
    sections = {s: _build(S.get(s).Config, data.get(s) or {}, s) for s in S.names()}
    for name, sec in top.sweeps.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
            raise ConfigError(f"sweeps.{name}: not a sweep name (sweeps/<name>.yaml)")
        if isinstance(sec, bool) or not isinstance(sec, (int, float)) or sec < 0:
            raise ConfigError(f"sweeps.{name}: expected the sweep's expected seconds (a number >= 0), got {sec!r}")
    return Config(seed=top.seed, out_dir=top.out_dir, studies=top.studies, model=top.model, train=top.train,
                  eval=top.eval, wandb=top.wandb, sweeps=top.sweeps, budget_minutes=top.budget_minutes, task=families["task"], baselines=families["baselines"],
                  sections=sections)


def validate(cfg: Config) -> Config:
    """Cross-section checks, then every run of every listed study resolved and validated."""
    from pipeline.core import plan

    check_model(cfg.model, "model")
    plan.resolve(cfg)  # raises ConfigError naming the study section and key
    return cfg


def from_dict(data: dict | None, source: str = "params.yaml") -> Config:
    try:
        if not data:
            raise ConfigError("empty: expected the pipeline's parameters (at least `studies`; see README)")
        return validate(_build_config(data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: not readable as UTF-8 text ({type(e).__name__})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise ConfigError(f"{path}: empty (expected the pipeline's parameters, at least `studies`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 0.0003}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return unflatten({key.strip(): value})


def profile_overrides(name: str) -> dict:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"profile {name!r}: not found (known: {', '.join(known)})")
    return _read_yaml(path)


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None,
         profile: str | None = None) -> Config:
    """Read params.yaml, apply a profile overlay and key=value overrides, validate."""
    path = Path(path)
    data = _read_yaml(path)
    if profile:
        data = deep_merge(data, profile_overrides(profile))
    for o in overrides or []:
        data = deep_merge(data, parse_override(o))
    return from_dict(data, source=str(path))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{'train.lr': 1e-3} -> {'train': {'lr': 1e-3}} (inverse of flatten)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
