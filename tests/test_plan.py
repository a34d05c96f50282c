"""What identifies a network, and the plan that dvc.yaml is generated from."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from pipeline.core import fingerprint as FP
from pipeline.core import plan as P
from pipeline.core.config import from_dict, load
from tests.conftest import REPO, TINY_PARAMS, make_run


def _cfg(**over):
    p = copy.deepcopy(TINY_PARAMS)
    p["studies"] = ["tgmm", "robustness", "ablation", "linreg"]
    for k, v in over.items():
        node = p
        *path, last = k.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = v
    return from_dict(p)


def _fps(cfg) -> dict:
    plan = P.resolve(cfg)
    return {rid: plan.fingerprints[rid] for rid in plan.runs}


def test_fingerprint_is_deterministic_and_sensitive():
    a = make_run("gmm")
    assert FP.fingerprint(a) == FP.fingerprint(make_run("gmm"))
    assert FP.fingerprint(a) != FP.fingerprint(make_run("gmm", train={"lr": 3e-4}))
    assert FP.fingerprint(a) != FP.fingerprint(make_run("gmm", task={"n0": 12}))
    assert FP.fingerprint(a) != FP.fingerprint(make_run("gmm", model={"n_layer": 2}))
    assert FP.fingerprint(a).startswith("gmm-")


@pytest.mark.parametrize("key,value", [("train.log_every", 7), ("train.ckpt_every", 3), ("train.val_every", 3),
                                       ("train.devices", "auto"), ("train.accelerator", "auto"),
                                       ("wandb.mode", "offline"), ("eval.chunk_size", 3), ("out_dir", "elsewhere")])
def test_logging_and_device_keys_do_not_change_any_network(key, value):
    assert _fps(_cfg(**{key: value})) == _fps(_cfg())


def test_another_studys_params_do_not_change_a_network():
    base = _fps(_cfg())
    linreg = _fps(_cfg(**{"linreg.train": {"lr": 3e-4}, "task.linreg.noise_std": 0.1, "baselines.linreg.knn": 5}))
    assert {k: v for k, v in linreg.items() if not k.startswith("linreg")} == \
        {k: v for k, v in base.items() if not k.startswith("linreg")}
    assert linreg["linreg-main"] != base["linreg-main"]
    tg = _fps(_cfg(**{"tgmm.n_tasks": 3, "robustness.sigma_p": [1.0], "baselines.gmm.em_max_iter": 5}))
    assert tg == base  # evaluation params: no network changes


def test_code_fingerprint_covers_spine_backbones_and_own_family_only():
    gmm = {p.relative_to(FP.PACKAGE).as_posix() for p in FP.code_files("gmm")}
    lin = {p.relative_to(FP.PACKAGE).as_posix() for p in FP.code_files("linreg")}
    assert "core/module.py" in gmm and "models/transformer.py" in gmm and "families/gmm/loss.py" in gmm
    assert not any(f.startswith("families/linreg") for f in gmm)
    assert not any(f.startswith("families/gmm") for f in lin)
    for f in ("core/report.py", "core/evaluate.py", "core/plan.py", "studies/tgmm.py", "algorithms/em.py"):
        assert f not in gmm, f


def test_editing_a_family_changes_only_its_networks(tmp_path, monkeypatch):
    """Copy the package, append a comment to a linreg file: linreg's fingerprint changes, gmm's do not."""
    pkg = tmp_path / "pipeline"
    shutil.copytree(REPO / "pipeline", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = {f: FP.code_fingerprint(f) for f in ("gmm", "linreg")}
    monkeypatch.setattr(FP, "PACKAGE", pkg)
    from pipeline.core import family as F

    monkeypatch.setattr(F, "module_dir", lambda name: pkg / "families" / name)
    same = {f: FP.code_fingerprint(f) for f in ("gmm", "linreg")}
    assert same == before
    with open(pkg / "families" / "linreg" / "net.py", "a") as fh:
        fh.write("\n# an edit\n")
    after = {f: FP.code_fingerprint(f) for f in ("gmm", "linreg")}
    assert after["gmm"] == before["gmm"] and after["linreg"] != before["linreg"]


def test_shared_networks_and_run_ids():
    plan = P.resolve(_cfg())
    assert plan.studies["robustness"].networks["n0_16"] == "tgmm-d2"
    assert plan.studies["ablation"].networks["transformer"] == "tgmm-d2"
    order = P.resolve(_cfg(studies=["robustness", "tgmm"]))  # the first study to need a network names it
    assert order.studies["tgmm"].networks["d2"] == "robustness-n0_16"


def test_committed_plan_and_dvc_yaml_are_up_to_date():
    """dvc.yaml and plans/ are generated from params.yaml: `python -m pipeline plan` must leave them unchanged."""
    import json

    cfg = load(REPO / "params.yaml")
    plan = P.resolve(cfg)
    assert (REPO / "dvc.yaml").read_text() == P.dvc_yaml_text(cfg, plan, REPO / "sweeps"), \
        "dvc.yaml is stale: run `python -m pipeline plan`"
    for rid, run in plan.runs.items():
        path = REPO / "plans" / "runs" / f"{rid}.json"
        assert json.loads(path.read_text()) == P.run_file(run, plan.fingerprints[rid]), f"{path} is stale"
    assert sorted(p.stem for p in (REPO / "plans" / "runs").glob("*.json")) == sorted(plan.runs)


def test_dvc_yaml_has_no_hand_kept_params_lists():
    text = (REPO / "dvc.yaml").read_text()
    assert text.count("params.yaml:") == 1  # only the plan stage reads params; every other stage reads its plan file
    assert "python -m pipeline train" in text and "plans/runs/linreg-main.json" in text and "python -m pipeline evaluate" in text


def test_default_pipeline_declares_every_stage_and_fits_its_budget():
    """Every stage of the default `dvc repro` has an expected time and the total keeps budget_minutes
    (a declaration check, not a timing: the measured figures are in the README)."""
    cfg = load(REPO / "params.yaml")
    plan = P.resolve(cfg)
    times = P.expected_times(cfg, plan)
    stages = P.dvc_stages(cfg, plan, REPO / "sweeps")
    missing = [k for k in stages if times.get(k) is None]
    assert not missing, f"stages without an expected time: {missing}"
    text, total = P.budget_table(cfg, plan)
    assert total == pytest.approx(sum(times[k] for k in stages))
    assert total <= 60 * cfg.budget_minutes, text
    assert "within the budget" in text.splitlines()[-1]


def test_expected_times_count_a_shared_network_once_and_flag_overruns():
    cfg = _cfg(**{"tgmm.expected_s": {"train": 100, "evaluate": 10}, "robustness.expected_s": {"train": 50},
                  "budget_minutes": 1})
    plan = P.resolve(cfg)
    nets = P.expected_network_times(cfg, plan)
    assert nets["tgmm-d2"] == 100  # robustness' n0_16 is the same network: tgmm's figure, once
    assert nets["robustness-n0_8"] == 50
    times = P.expected_times(cfg, plan)
    assert P.expected_evaluation_times(cfg, plan)["tgmm"] == 10
    assert times["evaluate"] is None and times["generate"] is None  # one stage for every study: robustness undeclared
    text, total = P.budget_table(cfg, plan)
    assert "OVER by" in text.splitlines()[-1] and "not declared" in text


def test_train_stage_time_is_the_makespan_of_its_networks_two_at_a_time():
    from pipeline.core import workers as W

    cfg = _cfg(**{"studies": ["tgmm", "robustness"], "tgmm.dims": [2, 3],
                  "tgmm.expected_s": {"train": {"d2": 100, "d3": 60}}, "robustness.expected_s": {"train": 50}})
    plan = P.resolve(cfg)
    nets = P.expected_network_times(cfg, plan)
    assert sorted(nets.values()) == [50, 60, 100], nets  # robustness' n0_16 is tgmm-d2
    times = P.expected_times(cfg, plan)
    assert times["train"] == pytest.approx(W.makespan(list(nets.values()), 2))
    assert times["train"] < sum(nets.values())
    # longest first on two slots: {100}, {60, 50} -> 110 (not 100 + 60 = 160 one after the other)
    assert W.makespan([100, 60, 50], 2) == 110 and W.makespan([100, 60, 50], 1) == 210
    assert cfg.train.workers == "auto" and W.resolve("auto", 3, cuda=False, cores=2) == (2, 1)
    assert W.resolve("auto", 3, cuda=True, cores=16) == (1, 16) and W.resolve(3, 2, cuda=False, cores=8) == (2, 4)


def test_report_stage_time_is_the_studies_side_by_side_plus_the_summary():
    cfg = _cfg(**{"studies": ["tgmm", "robustness", "linreg"], "tgmm.expected_s": {"report": 10},
                  "robustness.expected_s": {"report": 6}, "linreg.expected_s": {"report": 5, "generate": 2}})
    times = P.expected_times(cfg, P.resolve(cfg))
    # figures on 2 processes, longest first: {10}, {6, 5} -> 11, then the summary
    assert times["report"] == pytest.approx(11 + P.SUMMARY_STAGE_S)
    assert times["generate"] is None  # undeclared for two of the studies


@pytest.mark.parametrize("over, key", [
    ({"tgmm.expected_s": {"trian": 5}}, "tgmm.expected_s.trian"),
    ({"tgmm.expected_s": {"train": {"d3": 5}}}, "tgmm.expected_s.train.d3"),
    ({"tgmm.expected_s": {"evaluate": -1}}, "tgmm.expected_s.evaluate"),
    ({"sweeps": {"depth": "soon"}}, "sweeps.depth"),
])
def test_bad_expected_times_name_their_key(over, key):
    from pipeline.core.config import ConfigError

    with pytest.raises(ConfigError, match=f"^params.yaml: {key}: "):
        _cfg(**over)


def test_expected_times_rerun_nothing():
    """An expected time is documentation of the budget: no plan file a stage depends on changes with it."""
    a, b = _cfg(), _cfg(**{"tgmm.expected_s": {"train": 1, "evaluate": 2}, "sweeps": {}})
    pa, pb = P.resolve(a), P.resolve(b)
    assert pa.fingerprints == pb.fingerprints
    for name in pa.studies:
        assert P.study_file(a, pa, name) == P.study_file(b, pb, name)
        assert P.data_file(a, name) == P.data_file(b, name)


def test_evaluation_fingerprint_follows_its_own_inputs_only(tmp_path, monkeypatch):
    """The evaluate command skips a study whose results carry this: it must change with the study's
    sets, its section (a --set override too) and its networks' files, and not with another study's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "tgmm").mkdir(parents=True)
    (tmp_path / "data" / "tgmm" / "a.npz").write_bytes(b"one")
    cfg = _cfg(**{"out_dir": str(tmp_path / "out")})
    plan = P.resolve(cfg)
    fp = P.evaluation_fingerprint(cfg, plan, "tgmm")
    assert P.evaluation_fingerprint(cfg, plan, "tgmm") == fp  # deterministic
    other = _cfg(**{"out_dir": str(tmp_path / "out"), "robustness.n_tasks": 3})
    assert P.evaluation_fingerprint(other, P.resolve(other), "tgmm") == fp  # another study's key
    mine = _cfg(**{"out_dir": str(tmp_path / "out"), "tgmm.n_tasks": 3})
    assert P.evaluation_fingerprint(mine, P.resolve(mine), "tgmm") != fp  # its own key
    (tmp_path / "data" / "tgmm" / "a.npz").write_bytes(b"two")
    assert P.evaluation_fingerprint(cfg, plan, "tgmm") != fp  # its evaluation sets
    fp2 = P.evaluation_fingerprint(cfg, plan, "tgmm")
    model = tmp_path / "out" / "runs" / "tgmm-d2" / "model.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    assert P.evaluation_fingerprint(cfg, plan, "tgmm") != fp2  # its network
