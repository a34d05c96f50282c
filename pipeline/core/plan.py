"""The plan: every study's networks resolved to runs, identical runs merged, and the DVC pipeline
written from it.

    python -m pipeline plan   -> plans/runs/<run>.json      what trains each network (its fingerprint input)
                                 plans/studies/<study>.json  what each study evaluates, with which networks
                                 plans/sweeps/<sweep>.json   each sweep's resolved base run
                                 dvc.yaml                    the stages, generated (never edited by hand)

A network's run id is "<study>-<unit>" of the first study (in params.yaml `studies` order) that
needs it; a later study that needs an identical run (same fingerprint) uses that network, with no
copy. The train stage depends on the networks' plan files only, so a rerun of the plan stage that
leaves them unchanged triggers nothing downstream of it, and it retrains only the networks whose
plan file (fingerprint) changed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import Config, ConfigError, RunConfig

PLANS = Path("plans")


@dataclass
class StudyPlan:
    name: str
    family: str
    networks: dict[str, str]  # unit -> run id
    labels: dict[str, str]  # unit -> label


@dataclass
class Plan:
    runs: dict[str, RunConfig] = field(default_factory=dict)  # run id -> run
    fingerprints: dict[str, str] = field(default_factory=dict)  # run id -> fingerprint
    studies: dict[str, StudyPlan] = field(default_factory=dict)

    def run_of(self, study: str, unit: str) -> RunConfig:
        return self.runs[self.studies[study].networks[unit]]


_CACHE: dict = {}


def resolve(cfg: Config, studies: list[str] | None = None) -> Plan:
    """Resolve (and validate) every run of the listed studies; raises ConfigError naming the key.
    Memoised per Config object (a Config is never mutated after loading)."""
    key = (id(cfg), tuple(studies or cfg.studies))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is cfg:
        return hit[1]
    plan = _resolve(cfg, studies)
    _CACHE[key] = (cfg, plan)
    return plan


def resolve_all(cfg: Config, extra: list[str] | None = None) -> Plan:
    """The plan of every listed study (plus `extra` ones after them): run ids and sharing as dvc.yaml has them."""
    names = list(cfg.studies) + [s for s in (extra or []) if s not in cfg.studies]
    return resolve(cfg, names)


def _resolve(cfg: Config, studies: list[str] | None) -> Plan:
    from pipeline import studies as S
    from pipeline.core.fingerprint import fingerprint

    plan = Plan()
    by_fp: dict[str, str] = {}
    for name in studies or cfg.studies:
        st = S.get(name)
        st.check(cfg)
        nets, labels = {}, {}
        for unit in st.units(cfg):
            run = st.run(cfg, unit)
            fp = fingerprint(run)
            if fp not in by_fp:
                by_fp[fp] = run.name
                plan.runs[run.name] = run
                plan.fingerprints[run.name] = fp
            nets[unit.name] = by_fp[fp]
            labels[unit.name] = unit.label
        plan.studies[name] = StudyPlan(name, st.family, nets, labels)
        _check_expected(cfg, name, list(nets))
        from pipeline.core.probe import check as check_probes

        check_probes(st, cfg, list(nets))
    return plan


# ----------------------------------------------------------------------------- time budget

STAGE_KINDS = ("train", "generate", "evaluate", "report")
PLAN_STAGE_S = 5.0  # the plan stage itself (resolving every study, writing plans/)
SUMMARY_STAGE_S = 4.0  # the top-level report (reads every study's results)
# Input stages a study may name (Study.inputs): stage -> (command, code, output, expected s).
INPUT_STAGES = {"datasets": ("python -m pipeline datasets", "pipeline/datasets", "data/datasets", 6.0)}


def _check_expected(cfg: Config, study: str, units: list[str]) -> None:
    exp = cfg.section(study).expected_s
    for kind, v in exp.items():
        where = f"{study}.expected_s.{kind}"
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: unknown stage kind (allowed: {', '.join(STAGE_KINDS)})")
        values = v.items() if kind == "train" and isinstance(v, dict) else [(None, v)]
        for unit, sec in values:
            if unit is not None and unit not in units:
                raise ConfigError(f"{where}.{unit}: not a network of the study (its units: {', '.join(units)})")
            if isinstance(sec, bool) or not isinstance(sec, (int, float)) or sec < 0:
                raise ConfigError(f"{where}{'' if unit is None else '.' + unit}: expected seconds (a number >= 0), "
                                  f"got {sec!r}")


REFERENCE_CORES = 2  # the machine the expected times are stated on (and the budget holds on): 2 CPU cores


def expected_network_times(cfg: Config, plan: Plan) -> dict[str, float | None]:
    """Each network's expected wall time (s), trained beside another on the reference machine (one
    thread each), from the studies' `expected_s.train`; None where none is declared. A network two
    studies share is counted once, at the first study that trains it."""
    out: dict[str, float | None] = {}
    for name, sp in plan.studies.items():
        train = cfg.section(name).expected_s.get("train")
        for unit, rid in sp.networks.items():
            sec = train.get(unit) if isinstance(train, dict) else train
            if out.get(rid) is None:
                out[rid] = None if sec is None else float(sec)
    return out


def expected_evaluation_times(cfg: Config, plan: Plan) -> dict[str, float | None]:
    """Each study's expected evaluation wall time (s), evaluated beside another on the reference
    machine (one thread each), from `expected_s.evaluate`; None where none is declared."""
    out = {}
    for name in plan.studies:
        sec = cfg.section(name).expected_s.get("evaluate")
        out[name] = None if sec is None else float(sec)
    return out


def expected_times(cfg: Config, plan: Plan) -> dict[str, float | None]:
    """Each dvc stage's expected wall time (s) on the reference machine, from the studies'
    `expected_s` and `sweeps`; None where a study declares none. The train stage trains its networks
    REFERENCE_CORES at a time (core/workers.py), longest first: its time is that schedule's makespan."""
    from pipeline.core import workers as W

    out: dict[str, float | None] = {"plan": PLAN_STAGE_S}
    for stage in _inputs(plan):
        out[stage] = INPUT_STAGES[stage][3]
    def makespan(items: dict, setting, declared_only: bool) -> float | None:
        n_workers, _ = W.resolve(setting, len(items), cuda=False, cores=REFERENCE_CORES)
        known = [t for t in items.values() if t is not None]
        if not known or (not declared_only and len(known) < len(items)):
            return None
        return W.makespan(known, n_workers)

    nets = expected_network_times(cfg, plan)
    if nets:  # undeclared networks: flagged by budget_table
        out["train"] = makespan(nets, cfg.train.workers, declared_only=True)
    evals = expected_evaluation_times(cfg, plan)
    if evals:  # the evaluate stage: the studies REFERENCE_CORES at a time, longest first, like train
        out["evaluate"] = makespan(evals, cfg.eval.workers, declared_only=False)
    shared = {"generate": [], "report": []}
    for name in plan.studies:
        exp = cfg.section(name).expected_s
        for kind in shared:
            shared[kind].append(exp.get(kind))
    for kind, vals in shared.items():  # one stage for every study
        if vals and any(v is None for v in vals):
            out[kind] = None
        elif vals and kind == "report":  # the studies' figures side by side, then the summary
            out[kind] = makespan(dict(enumerate(vals)), "auto", declared_only=True) + SUMMARY_STAGE_S
        elif vals:  # generate: one after another (each is a second or two)
            out[kind] = float(sum(vals))
    for name, sec in cfg.sweeps.items():
        out[f"sweep-{name}"] = float(sec)
    return out


def budget_table(cfg: Config, plan: Plan) -> tuple[str, float]:
    """The planned stages with their expected times, the total and the budget: (text, total seconds)."""
    from pipeline.core import workers as W

    times = expected_times(cfg, plan)
    # the stages that run their items REFERENCE_CORES at a time (core/workers.py): stage -> (items, setting, noun)
    scheduled = {"train": (expected_network_times(cfg, plan), cfg.train.workers, "networks"),
                 "evaluate": (expected_evaluation_times(cfg, plan), cfg.eval.workers, "studies")}
    order = list(dvc_stages(cfg, plan))
    width = max([len(k) for k in order] + [len(r) + 4 for items, _, _ in scheduled.values() for r in items])
    lines = [f"planned stages (expected wall time on the reference machine, {REFERENCE_CORES} CPU cores):"]

    def fmt(t):
        return "not declared" if t is None else f"{t:7.0f} s"

    missing = []
    for k in order:
        items, setting, noun = scheduled.get(k, ({}, None, ""))
        if not items:
            lines.append(f"  {k:<{width}}  {fmt(times.get(k))}")
            missing += [k] if times.get(k) is None else []
            continue
        n_workers, _ = W.resolve(setting, len(items), cuda=False, cores=REFERENCE_CORES)
        lines.append(f"  {k:<{width}}  {fmt(times.get(k))}  ({len(items)} {noun}, {n_workers} at a time, "
                     "longest first:)")
        for name, t in sorted(items.items(), key=lambda kv: -(kv[1] or 0)):
            lines.append(f"    {name:<{width - 2}}  {fmt(t)}")
        missing += [f"{k} {name}" for name, t in items.items() if t is None]
    total = sum(t for t in times.values() if t is not None)
    budget = 60 * cfg.budget_minutes
    verdict = "within" if total <= budget else f"OVER by {(total - budget) / 60:.1f} min:"
    lines.append(f"  {'total':<{width}}  {total:7.0f} s = {total / 60:.1f} min, {verdict} the budget of "
                 f"{cfg.budget_minutes:g} min (budget_minutes)" + (f"; {len(missing)} stages not declared"
                                                                  if missing else ""))
    return "\n".join(lines), total


def run_dir(cfg_or_out: Config | str, run_id: str) -> Path:
    out = cfg_or_out.out_dir if isinstance(cfg_or_out, Config) else cfg_or_out
    return Path(out) / "runs" / run_id


def study_dir(cfg: Config, study: str) -> Path:
    return Path(cfg.out_dir) / study


def data_dir(study: str) -> Path:
    return Path("data") / study


# ----------------------------------------------------------------------------- plan files

def _dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write_if_changed(path: Path, text: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def run_file(run: RunConfig, fp: str) -> dict:
    from pipeline.core.fingerprint import code_fingerprint

    return {"run": run.to_dict(), "fingerprint": fp, "code": code_fingerprint(run.family)}


def study_file(cfg: Config, plan: Plan, name: str) -> dict:
    """What a study's generate/evaluate/report stages depend on."""
    import dataclasses

    from pipeline import studies as S

    st, sp = S.get(name), plan.studies[name]
    section = {k: v for k, v in dataclasses.asdict(st.section(cfg)).items() if k != "expected_s"}
    return {"study": name, "family": st.family, "seed": cfg.seed, "section": section,
            "task": dataclasses.asdict(cfg.task[st.family]), "baselines": st.solver_params(cfg),
            "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k != "workers"},  # speed only
            "networks": {u: {"run": r, "fingerprint": plan.fingerprints[r]} for u, r in sp.networks.items()}}


def data_file(cfg: Config, name: str) -> dict:
    """What a study's evaluation sets depend on (its generate stage's input): the seed, the study's
    resolved task and its section without the network and method keys."""
    import dataclasses

    from pipeline import studies as S

    st = S.get(name)
    section = {k: v for k, v in dataclasses.asdict(st.section(cfg)).items()
               if k not in ("model", "train", "methods", "task", "expected_s")}
    return {"study": name, "family": st.family, "seed": cfg.seed, "task": dataclasses.asdict(st.task(cfg)),
            "section": section}


def sweep_names(root: Path = Path("sweeps")) -> list[str]:
    return sorted(p.stem for p in root.glob("*.yaml"))


def write(cfg: Config, plan: Plan, root: Path = PLANS, sweeps_root: Path = Path("sweeps")) -> list[Path]:
    """Write every plan file (unchanged files keep their bytes and mtime); stale ones are removed."""
    written = []
    keep = set()
    for rid, run in plan.runs.items():
        p = root / "runs" / f"{rid}.json"
        _write_if_changed(p, _dump(run_file(run, plan.fingerprints[rid])))
        keep.add(p)
    for name in plan.studies:
        p = root / "studies" / f"{name}.json"
        _write_if_changed(p, _dump(study_file(cfg, plan, name)))
        q = root / "data" / f"{name}.json"
        _write_if_changed(q, _dump(data_file(cfg, name)))
        keep.update((p, q))
    for name in sweep_names(sweeps_root):
        p = root / "sweeps" / f"{name}.json"
        _write_if_changed(p, _dump(sweep_file(cfg, sweeps_root / f"{name}.yaml")))
        keep.add(p)
    for sub in ("runs", "studies", "data", "sweeps"):
        for old in (root / sub).glob("*.json"):
            if old not in keep:
                old.unlink()
    written = sorted(keep)
    return written


def sweep_file(cfg: Config, path: Path) -> dict:
    """A sweep's resolved spec and the code of its study's family (its trials' fingerprint input)."""
    from pipeline.core.fingerprint import code_fingerprint
    from pipeline.tuning.spec import load_spec

    spec = load_spec(path, cfg)
    return {"spec": spec.to_dict(), "code": code_fingerprint(spec.family)}


def load_run(run_id: str, root: Path = PLANS) -> RunConfig:
    path = root / "runs" / f"{run_id}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "runs").glob("*.json"))
        raise ConfigError(f"--run {run_id}: no plan file {path} (known runs: {', '.join(known) or 'none'}; "
                          "run `python -m pipeline plan`)")
    return RunConfig.from_dict(json.loads(path.read_text())["run"], where=str(path))


# ----------------------------------------------------------------------------- dvc.yaml

HEADER = """\
# GENERATED by `python -m pipeline plan` from params.yaml and the study declarations (studies/).
# Do not edit by hand: change params.yaml (or add a study / family) and rerun the plan.
#   dvc repro                          the whole pipeline (plan -> train -> generate -> evaluate -> report)
#   dvc exp run -S linreg.train.lr=3e-4  reruns only the stages that depend on that key
"""


def _inputs(plan: Plan) -> list[str]:
    """The input stages (INPUT_STAGES) the planned studies read, in first-use order."""
    from pipeline import studies as S

    return list(dict.fromkeys(i for name in plan.studies for i in S.get(name).inputs))


def _family_dirs(study) -> list[str]:
    from pipeline.core import family as F

    return [f"pipeline/families/{f}" for f in F.family_names_with_uses(study.family)]


def evaluate_inputs(cfg: Config, plan: Plan, name: str) -> list[str]:
    """What a study's evaluation reads: its evaluation sets, its plan, its networks and the code."""
    from pipeline import studies as S

    models = sorted({f"{cfg.out_dir}/runs/{r}/model.safetensors" for r in plan.studies[name].networks.values()})
    return [f"data/{name}", f"plans/studies/{name}.json", *models, "pipeline/core/evaluate.py",
            "pipeline/core/network.py", "pipeline/core/results.py", "pipeline/core/probe.py", "pipeline/algorithms",
            *_family_dirs(S.get(name)), f"pipeline/studies/{name}.py"]


_PROJECT = Path(__file__).resolve().parents[2]  # the folder holding the pipeline package


def evaluation_fingerprint(cfg: Config, plan: Plan, name: str) -> str:
    """Hash of everything a study's evaluation reads (evaluate_inputs): the study's resolved plan as
    this configuration makes it (so a --set override counts) and the bytes of every other input file.
    The evaluate command stores it in results.json and skips a study whose results carry it."""
    import hashlib

    h = hashlib.sha256(_dump(study_file(cfg, plan, name)).encode())
    for dep in evaluate_inputs(cfg, plan, name):
        if dep == f"plans/studies/{name}.json":
            continue
        path = _PROJECT / dep if dep.startswith("pipeline/") else Path(dep)  # the code: wherever it is installed
        files = sorted(f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts) \
            if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(_PROJECT) if f.is_relative_to(_PROJECT) else f).encode())
            h.update(f.read_bytes() if f.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def dvc_stages(cfg: Config, plan: Plan, sweeps_root: Path = Path("sweeps")) -> dict:
    from pipeline import studies as S

    out = cfg.out_dir
    stages: dict = {
        "plan": {
            "cmd": "python -m pipeline plan --check-dvc",
            "deps": ["pipeline", "sweeps"],
            "params": [{"params.yaml": None}],
            "outs": [{"plans": {"cache": False}}],
        }
    }
    for stage in _inputs(plan):
        cmd, code, output, _ = INPUT_STAGES[stage]
        stages[stage] = {"cmd": cmd, "deps": [code, "pipeline/core/arrays.py"], "outs": [output]}
    if plan.runs:
        # One stage trains every network, several at once on a CPU (core/workers.py); a network whose
        # trained files already match its fingerprint is skipped, so changing one network's params
        # retrains that network only. Its outputs persist: DVC does not delete them before the run.
        outs, metrics = [], []
        for rid in plan.runs:
            d = f"{out}/runs/{rid}"
            outs += [{f"{d}/model.safetensors": {"persist": True}}, {f"{d}/model.json": {"persist": True}},
                     {f"{d}/checkpoints": {"persist": True, "cache": False}}]
            metrics.append({f"{d}/metrics.json": {"persist": True, "cache": False}})
        stages["train"] = {"cmd": "python -m pipeline train", "deps": [f"plans/runs/{rid}.json" for rid in plan.runs],
                           "outs": outs, "metrics": metrics}
    fams = _family_dirs

    # One stage writes every study's evaluation sets and one every study's report (each a process
    # start of ~4 s on a 2-core CPU saved per study).
    names = list(plan.studies)
    gen_deps = [f"plans/data/{n}.json" for n in names] + ["pipeline/core/rng.py", "pipeline/core/arrays.py"]
    for n in names:
        st = S.get(n)
        gen_deps += [*fams(st), f"pipeline/studies/{n}.py", *(INPUT_STAGES[i][2] for i in st.inputs)]
    if names:
        stages["generate"] = {"cmd": "python -m pipeline generate", "deps": list(dict.fromkeys(gen_deps)),
                              "outs": [f"data/{n}" for n in names]}
    # One stage evaluates every study, several at once on a CPU (core/workers.py); a study whose
    # results.json carries the fingerprint of its inputs (evaluate_inputs) is skipped, so changing one
    # study's params re-evaluates that study only. Its outputs persist: DVC does not delete them first.
    if names:
        stages["evaluate"] = {
            "cmd": "python -m pipeline evaluate",
            "deps": list(dict.fromkeys(d for n in names for d in evaluate_inputs(cfg, plan, n))),
            "outs": [{f"{out}/{n}/results.json": {"cache": False, "persist": True}} for n in names],
        }
    stages["report"] = {
        "cmd": "python -m pipeline report --summary",
        "deps": [f"{out}/{n}/results.json" for n in names] + ["pipeline/core/report.py"]
                + [f"pipeline/studies/{n}.py" for n in names],
        "outs": [{f"{out}/{n}/report/{k}": {"cache": False}} for n in names for k in ("figures", "plots", "report.md")]
                + [{f"{out}/report.md": {"cache": False}}],
        "metrics": [{f"{out}/{n}/report/metrics.json": {"cache": False}} for n in names],
    }
    known = sweep_names(sweeps_root)
    for name in cfg.sweeps:
        if name not in known:
            raise ConfigError(f"sweeps.{name}: no file {sweeps_root / (name + '.yaml')} (known sweeps: "
                              f"{', '.join(known) or 'none'})")
        stages[f"sweep-{name}"] = {
            "cmd": f"python -m pipeline sweep sweeps/{name}.yaml --fresh",
            "deps": [f"sweeps/{name}.yaml", f"plans/sweeps/{name}.json", "pipeline/tuning"],
            "outs": [{f"{out}/sweeps/{name}": {"cache": False}}],
        }
    return stages


def dvc_plots(cfg: Config, plan: Plan) -> list:
    """One dvc-plots entry per declared figure (CSV written by the report stage)."""
    from pipeline import studies as S
    from pipeline.core import family as F

    plots = []
    for name in plan.studies:
        st = S.get(name)
        for fig in st.figures(cfg):
            log = F.get(st.family).metrics[fig.metric].log_scale
            plots.append({f"{cfg.out_dir}/{name}/report/plots/{fig.name}.csv": {
                "title": f"{st.title}: {fig.title or fig.name} (columns: {fig.panels or 'all'})",
                "template": "by_series" if log else "by_series_linear", "x": fig.x, "y": "value"}})
    return plots


def dvc_yaml_text(cfg: Config, plan: Plan, sweeps_root: Path = Path("sweeps")) -> str:
    import yaml

    body = yaml.safe_dump({"stages": dvc_stages(cfg, plan, sweeps_root), "plots": dvc_plots(cfg, plan)},
                          sort_keys=False, width=120)
    return HEADER + body.replace("params.yaml: null", "params.yaml:")


def write_dvc_yaml(cfg: Config, plan: Plan, path: Path = Path("dvc.yaml"), check: bool = False) -> bool:
    """Write dvc.yaml; with check=True (inside `dvc repro`) fail instead if its stages would change."""
    text = dvc_yaml_text(cfg, plan)
    old = path.read_text() if path.is_file() else None
    if old == text:
        return False
    if check:
        _write_if_changed(path, text)
        raise ConfigError(f"{path}: its stages changed with params.yaml (networks or studies were added or "
                          "removed); it has been rewritten: run `dvc repro` again")
    _write_if_changed(path, text)
    return True
