"""Typed parameters: params.yaml -> dataclasses, validated before any compute starts.

Every problem is reported as one line naming the file, the key and what is allowed, e.g.
    params.yaml: model.n_head: 3 does not divide model.n_embd=64 (choose a divisor of 64)
and the CLI exits with status 2. Defaults here are the CPU-sized study; `profiles/paper.yaml`
overlays the paper-scale setting.
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

PROFILES_DIR = Path(__file__).parent / "profiles"
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
class TaskConfig:
    name: str = _f("gmm", "task family", choices=("gmm",))
    dims: list[int] = _f([2, 8], "data dimensions d; one network is trained per d", min=1, nonempty=True)
    ks: list[int] = _f([2, 3, 4, 5], "numbers of components K; one shared backbone, one read-out per K",
                       min=2, max=8, nonempty=True)
    n0: int = _f(128, "training sample size: N ~ U[n0/2, n0], padded and masked", min=2)
    mean_range: float = _f(5.0, "mean coordinates ~ U(-mean_range, mean_range)", gt=0)
    max_cosine: float = _f(0.8, "redraw a task while two means have cosine >= this", gt=-1, max=1)
    weight_low: float = _f(0.2, "mixing weights ~ U(weight_low, weight_high), then normalised", gt=0)
    weight_high: float = _f(0.8, "", gt=0)
    anisotropic: bool = _f(False, "per-component diagonal std 2*softplus(U(-1,1)) instead of identity")


@dataclass
class ModelConfig:
    backbone: str = _f("transformer", "sequence backbone (models/backbone.py): transformer | mamba2 | lstm",
                       choices=BACKBONES)
    position: str = _f("set", "transformer only. set: no positions, full attention (permutation-equivariant); "
                              "gpt2: causal with learned positions (anchor-faithful)", choices=("set", "gpt2"))
    attention: str = _f("softmax", "transformer only. softmax (SDPA) | relu: ReLU(q.k/sqrt(hd)) / #keys | "
                                   "linear: q.k/sqrt(hd) / #keys (no softmax)", choices=ATTENTIONS)
    n_layer: int = _f(4, "backbone depth", min=1)
    n_head: int = _f(4, "attention heads; must divide n_embd", min=1)
    n_embd: int = _f(64, "width", min=1)
    mlp_ratio: int = _f(4, "MLP hidden = mlp_ratio * n_embd", min=1)
    dropout: float = _f(0.0, "dropout (paper: 0)", min=0, lt=1)
    k_embd: int = _f(16, "size of the learned embedding of K appended to each x_i at read-in", min=1)
    max_len: int = _f(1024, "longest sample the gpt2 position table covers", min=1)
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
    batch_per_k: int = _f(64, "tasks per K per step (global, split over devices)", min=1)
    lr: float = _f(1e-3, "AdamW peak learning rate", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = _f(100, "linear warm-up steps", min=0)
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr", min=0, max=1)
    grad_clip: float = _f(1.0, "gradient-norm clip; 0 disables", min=0)
    accelerator: str = _f("auto", "auto | cpu | gpu", choices=("auto", "cpu", "gpu", "cuda"))
    devices: Any = _f(1, "number of devices, or 'auto'", types=(int, str))
    strategy: str = _f("auto", "auto | ddp | ddp_spawn", choices=("auto", "ddp", "ddp_spawn"))
    precision: str = _f("32-true", "32-true | bf16-mixed | 16-mixed",
                        choices=("32-true", "32", "bf16-mixed", "16-mixed", "64-true"))
    ckpt_every: int = _f(250, "save last.ckpt every this many steps (resume point)", min=1)
    log_every: int = _f(25, "log training metrics every this many steps", min=1)
    val_every: int = _f(250, "score the network on fixed validation tasks every this many steps", min=1)
    val_tasks: int = _f(64, "validation tasks per K", min=1)


@dataclass
class EvalConfig:
    n_tasks: int = _f(256, "evaluation tasks per (d, K) (paper: 1280)", min=1)
    n: int = _f(128, "sample size of every evaluation task (paper: 128)", min=2)
    chunk_size: int = _f(512, "tasks per solver call (bounds memory)", min=1)
    device: str = _f("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))


@dataclass
class BaselinesConfig:
    methods: list[str] = _f(["em_paper", "em_strong", "spectral"], "classical solvers to compare",
                            choices=("em_paper", "em_strong", "spectral"))
    em_max_iter: int = _f(100, "EM iteration cap (paper: 100)", min=1)
    em_tol: float = _f(1e-7, "EM stops when the log-likelihood changes less than this (paper: 1e-7)", gt=0)
    strong_restarts: int = _f(5, "k-means++ restarts of the strong EM", min=1)
    spectral_restarts: int = _f(10, "tensor power iteration restarts per component", min=1)
    spectral_iters: int = _f(100, "tensor power iterations per restart", min=1)


@dataclass
class RobustnessConfig:
    d: int = _f(2, "dimension of the robustness studies", min=1)
    train_n0: list[int] = _f([32, 64, 128], "sample-size shift: one network per training N0", min=2, nonempty=True)
    eval_n: list[int] = _f([16, 32, 64, 128, 256], "sample sizes N at evaluation", min=2, nonempty=True)
    sigma_p: list[float] = _f([0.0, 1.0, 2.0, 5.0, 10.0], "distribution shift: means + N(0, sigma_p^2 I)",
                              min=0, nonempty=True)
    n_tasks: int = _f(128, "evaluation tasks per cell of the robustness studies", min=1)


@dataclass
class AblationConfig:
    d: int = _f(2, "dimension of the backbone ablation and the anisotropic study (if in task.dims, the main "
                   "network is reused as the variant equal to `model`)", min=1)
    variants: dict = _f({"transformer": {}, "relu_attention": {"attention": "relu"},
                         "linear_attention": {"attention": "linear"}, "mamba2": {"backbone": "mamba2"},
                         "lstm": {"backbone": "lstm"}},
                        "name -> model overrides on top of `model`; {} is the main network itself. Switching "
                        "backbone resets the keys only the other backbone reads; attention/position imply "
                        "the transformer")
    match_params: bool = _f(True, "choose each variant's n_embd so its parameter count is closest to the "
                                  "main network's (depth and heads unchanged)")


@dataclass
class WandbConfig:
    mode: str = _f("auto", "auto: online if W&B credentials are configured, else offline; WANDB_MODE wins",
                   choices=("auto", "online", "offline", "disabled"))
    project: str = _f("algorithm-simulators", "W&B project")
    entity: str | None = _f(None, "W&B entity (team); None = your default")
    group: str | None = _f(None, "run group; None = the study name")


@dataclass
class Config:
    seed: int = _f(0, "master seed: training data, evaluation sets and baselines derive from it", min=0)
    study: str = _f("tgmm", "study name: W&B group and output tag", choices=("tgmm",))
    out_dir: str = _f("outputs", "where checkpoints, metrics, figures and W&B runs are written")
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the given sections (all if none): tells whether a checkpoint belongs to this config."""
        d = self.to_dict()
        part = {k: d[k] for k in sections} if sections else d
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


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
        if tp is dict:  # ablation.variants: name -> mapping (checked in validate())
            if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
                raise ConfigError(f"{path}: expected a mapping of name -> mapping of keys, got {value!r}")
            if meta.get("nonempty", True) and not value:
                raise ConfigError(f"{path}: must not be empty")
            kwargs[name] = {str(k): dict(v or {}) for k, v in value.items()}
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
        elif tp is Any:  # devices: int or "auto"
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


def validate(cfg: Config) -> Config:
    """Cross-field checks that one key alone cannot express."""
    t, m, tr, ev = cfg.task, cfg.model, cfg.train, cfg.eval
    check_model(m, "model")
    if t.weight_low >= t.weight_high:
        raise ConfigError(f"task.weight_low: must be < task.weight_high={t.weight_high}, got {t.weight_low}")
    kmax = max(t.ks)
    if t.n0 < 2 * kmax:
        raise ConfigError(f"task.n0: must be >= 2*max(task.ks)={2 * kmax} so every task has >= 2 points "
                          f"per component on average, got {t.n0}")
    if ev.n < 2 * kmax:
        raise ConfigError(f"eval.n: must be >= 2*max(task.ks)={2 * kmax}, got {ev.n}")
    if 1 in t.dims and kmax > 2:
        raise ConfigError("task.dims: d=1 allows at most K=2 (two 1-D means always have cosine +-1); "
                          f"remove 1 or use task.ks <= 2")
    if m.position == "gpt2" and max(t.n0, ev.n) > m.max_len:
        raise ConfigError(f"model.max_len: {m.max_len} is shorter than the longest sample "
                          f"{max(t.n0, ev.n)} (raise it to at least that)")
    if tr.warmup_steps >= tr.steps and tr.steps > 1:
        raise ConfigError(f"train.warmup_steps: must be < train.steps={tr.steps}, got {tr.warmup_steps}")
    if t.max_cosine <= -1 / (kmax - 1):
        raise ConfigError(f"task.max_cosine: K={kmax} vectors cannot all have pairwise cosine below "
                          f"{t.max_cosine} (must be > {-1 / (kmax - 1):.3g})")
    _check_sampleable(t)
    a = cfg.ablation
    if "anisotropic" in a.variants:
        raise ConfigError("ablation.variants.anisotropic: the name is taken by the anisotropic study; rename it")
    for name in a.variants:
        variant_model(cfg, name)
    if isinstance(tr.devices, int) and tr.devices > 1 and tr.batch_per_k % tr.devices:
        raise ConfigError(f"train.batch_per_k: {tr.batch_per_k} must be divisible by train.devices={tr.devices}")
    if tr.strategy.startswith("ddp") and tr.devices == 1:
        raise ConfigError("train.strategy: ddp needs train.devices > 1 (or 'auto')")
    return cfg


def check_model(m: ModelConfig, where: str) -> None:
    """Cross checks of one model section (the main `model` or an ablation variant)."""
    if m.n_embd % m.n_head:
        raise ConfigError(f"{where}.n_head: {m.n_head} does not divide {where}.n_embd={m.n_embd} "
                          f"(choose a divisor of {m.n_embd})")
    if m.backbone != "transformer":
        if m.attention != "softmax":
            raise ConfigError(f"{where}.attention: {m.attention!r} applies to backbone transformer only, "
                              f"not {m.backbone!r} (leave it softmax)")
        if m.position != "set":
            raise ConfigError(f"{where}.position: {m.position!r} applies to backbone transformer only; {m.backbone} "
                              "reads the sample in order already (leave it set; see model.bidirectional)")
    elif m.bidirectional:
        raise ConfigError(f"{where}.bidirectional: applies to mamba2 / lstm only; the transformer sees the whole "
                          "sample with position set")
    if m.backbone == "mamba2" and (m.expand * m.n_embd) % m.headdim:
        raise ConfigError(f"{where}.headdim: {m.headdim} does not divide expand*n_embd={m.expand * m.n_embd} "
                          "(mamba2 splits its inner width into heads of headdim channels)")


def variant_model(cfg: Config, name: str) -> ModelConfig:
    """The model of ablation variant `name`: `model` with the variant's overrides, validated."""
    if name not in cfg.ablation.variants:
        raise ConfigError(f"ablation.variants: no variant {name!r} (known: {', '.join(cfg.ablation.variants)})")
    where = f"ablation.variants.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"{where}: a variant name becomes a folder name; use letters, digits, '_', '-', '.'")
    over = dict(cfg.ablation.variants[name])
    base = dataclasses.asdict(cfg.model)
    if "backbone" not in over and {"attention", "position"} & set(over):
        over["backbone"] = "transformer"  # {attention: relu} means the transformer with ReLU attention
    if over.get("backbone", base["backbone"]) != base["backbone"]:
        # switching backbone: keys that only the other backbone reads go back to their defaults
        only = ("position", "attention") if base["backbone"] == "transformer" else ("bidirectional",)
        base.update({k: getattr(ModelConfig(), k) for k in only})
    m = _build(ModelConfig, {**base, **over}, where)
    check_model(m, where)
    return m


def _check_sampleable(t: TaskConfig) -> None:
    """Crowded means (large K in small d under the cosine rule) can make rejection sampling hang:
    try a few tasks per (d, K) now, in milliseconds, rather than fail after compute has started."""
    import torch

    from pipeline.tasks.gmm import sample_gmm

    g = torch.Generator().manual_seed(0)
    for d in t.dims:
        for K in t.ks:
            try:
                sample_gmm(8, d, K, 2 * K, 2 * K, g, mean_range=t.mean_range, max_cosine=t.max_cosine,
                           weight_low=t.weight_low, weight_high=t.weight_high, max_rounds=3000)
            except RuntimeError:
                raise ConfigError(f"task.ks: K={K} means in d={d} can (almost) never satisfy pairwise cosine < "
                                  f"task.max_cosine={t.max_cosine}; lower K or raise task.max_cosine") from None


def from_dict(data: dict | None, source: str = "params.yaml") -> Config:
    try:
        return validate(_build(Config, data or {}, ""))
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
        return {}
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
    node: dict = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


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
