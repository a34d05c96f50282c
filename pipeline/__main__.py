"""One CLI for every stage:  python -m pipeline [--params F] [--profile P] [--set k=v ...] [--study S] COMMAND

  validate   check params.yaml (every study's runs resolved) and exit
  plan       resolve every study's networks -> plans/, and write dvc.yaml (--check-dvc: fail if it would change)
  train      train networks: --run ID (repeatable), else every run of --study, else of every listed study
  generate   write the fixed evaluation sets of --study (default: every listed study) into data/<study>/
  evaluate   networks + classical solvers on those sets -> <out_dir>/<study>/results.json
  report     tables, figures, dvc-plots CSVs, metrics JSON -> <out_dir>/<study>/report/ (--summary: + summary)
  summary    the top-level report of every listed study, with the cross-study probing table -> <out_dir>/report.md
  sweep      a Ray Tune sweep from sweeps/<name>.yaml (a sweep names its study)
  bench      throughput of the train step and the classical solvers
  dashboard  the W&B dashboard (a panel section per study)
  profile    print a profile as `dvc exp run -S` arguments (e.g. `profile paper`)

Bad input exits with status 2 and one line naming the key or file, before any compute starts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
import warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="overlay pipeline/profiles/<name>.yaml (e.g. paper)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--study", action="append", default=None, help="restrict to this study (repeatable)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check the parameters and exit")
    pl = sub.add_parser("plan", help="write plans/ and dvc.yaml")
    pl.add_argument("--check-dvc", action="store_true", help="fail (after rewriting it) if dvc.yaml was out of date")
    sub.add_parser("generate", help="write the evaluation sets")
    t = sub.add_parser("train", help="train networks")
    t.add_argument("--run", action="append", default=None, help="run id (plans/runs/<id>.json; repeatable)")
    t.add_argument("--no-track", action="store_true", help="no W&B run")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    e = sub.add_parser("evaluate", help="evaluate every method on the evaluation sets")
    e.add_argument("--no-track", action="store_true", help="no W&B run")
    e.add_argument("--force", action="store_true", help="without --study: evaluate studies whose results are "
                                                         "up to date too")
    rp = sub.add_parser("report", help="write metrics, plots, figures and tables")
    rp.add_argument("--summary", action="store_true", help="then the top-level report too (as `summary`)")
    sub.add_parser("summary", help="write the top-level report (every study, the cross-study probing table)")
    b = sub.add_parser("bench", help="print throughput figures")
    b.add_argument("--steps", type=int, default=20, help="timed train steps (after 3 warm-up steps)")
    b.add_argument("--device", default="auto")
    b.add_argument("--skip-baselines", action="store_true")
    b.add_argument("--vs-anchor", action="store_true",
                   help="the TGMM train step at paper size against an anchor-style model (HF GPT2Model; needs .[bench])")
    b.add_argument("--solvers", action="store_true",
                   help="batched EM / least squares against sklearn GaussianMixture / numpy lstsq, same tasks")
    b.add_argument("--precision", default=None, help="precision of the project's step (default: train.precision)")
    b.add_argument("--compare", action="append", default=None, metavar="K=V[,K=V]",
                   help="time the --run (default: the study's first network) as configured against this variant "
                        "of its run keys, interleaved (repeatable), e.g. --compare task.n_per=task")
    b.add_argument("--time-to-quality", action="store_true",
                   help="train a run until its validation metric reaches --target; print the wall time")
    b.add_argument("--target", type=float, default=None, help="--time-to-quality: the monitor's target value")
    b.add_argument("--run", default=None, help="--compare / --time-to-quality: run id (default: the study's first network)")
    ds = sub.add_parser("datasets", help="materialise the real image datasets (digits, mnist5k, fashion_mnist)")
    ds.add_argument("--root", default="data/datasets", help="output folder (default: data/datasets)")
    pr = sub.add_parser("profile", help="print a profile as dvc exp run -S arguments")
    pr.add_argument("name")
    for name, (module, help_text) in EXTENSIONS.items():
        _extension(module).add_arguments(sub.add_parser(name, help=help_text))
    return p


# Commands that live in their own modules: each defines add_arguments(parser) and
# main(args, cfg) -> exit status, and keeps heavy imports (ray, wandb) inside functions.
EXTENSIONS = {
    "sweep": ("pipeline.tuning.cli", "run a Ray Tune sweep from sweeps/<name>.yaml"),
    "dashboard": ("pipeline.core.dashboard", "define the W&B dashboard (a section per study)"),
}


def _extension(module: str):
    import importlib

    return importlib.import_module(module)


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _studies(args, cfg) -> list[str]:
    from pipeline import studies as S
    from pipeline.core.config import ConfigError

    names = args.study or cfg.studies
    for n in names:
        if n not in S.names():
            raise ConfigError(f"--study {n}: not a registered study (choose from: {', '.join(S.names())})")
    return names


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipeline.core import config as C
    from pipeline.core.arrays import DataError

    if args.command == "profile":
        try:
            over = C.profile_overrides(args.name)
        except C.ConfigError as e:
            return _fail(str(e), 2)
        base = C.flatten(C._read_yaml(Path(args.params)))
        # a key params.yaml lacks (e.g. a new ablation variant) is added with hydra's `++`
        print(" ".join(f"-S '{'' if k in base else '++'}{k}={_yaml_value(v)}'" for k, v in C.flatten(over).items()))
        return 0
    os.environ.setdefault("WANDB_SILENT", "true")
    from pipeline.core.allocator import tune_allocator

    tune_allocator()
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    from pipeline.core.errors import NonFiniteLossError, TrainingInterrupted

    try:
        cfg = C.load(args.params, args.overrides, args.profile)
        studies = _studies(args, cfg)
        if args.command == "validate":
            print(f"{args.params}: ok")
            return 0
        if args.command in EXTENSIONS:
            return _extension(EXTENSIONS[args.command][0]).main(args, cfg)
        return _run(args, cfg, studies)
    except (C.ConfigError, DataError, FileNotFoundError) as e:
        return _fail(str(e).strip("'\""), 2)
    except NonFiniteLossError as e:
        return _fail(str(e), 1)
    except TrainingInterrupted as e:
        return _fail(str(e), 143)


def _run(args, cfg, studies: list[str]) -> int:
    from pathlib import Path

    from pipeline import studies as S
    from pipeline.core import plan as P

    if args.command == "plan":
        plan = P.resolve(cfg)
        P.write(cfg, plan)
        changed = P.write_dvc_yaml(cfg, plan, check=args.check_dvc)
        print(f"plans/: {len(plan.runs)} networks for {len(plan.studies)} studies"
              + ("; dvc.yaml rewritten" if changed else "; dvc.yaml up to date"))
        print(P.budget_table(cfg, plan)[0])
    elif args.command == "train":
        from pipeline.core import workers as W

        plan = P.resolve_all(cfg, studies)
        if args.run:
            for rid in args.run:
                if rid not in plan.runs:
                    from pipeline.core.config import ConfigError

                    raise ConfigError(f"--run {rid}: not a run of the plan (known: {', '.join(sorted(plan.runs))})")
            runs = {rid: plan.runs[rid] for rid in args.run}
        else:
            used = {r for s in studies for r in plan.studies[s].networks.values()}
            runs = {rid: run for rid, run in plan.runs.items() if rid in used}
        todo = {}
        for rid, run in runs.items():
            if not args.no_resume and W.is_trained(run, P.run_dir(cfg, rid)):
                print(f"[train {rid}] up to date (its fingerprint): {P.run_dir(cfg, rid) / 'model.safetensors'}")
            else:
                todo[rid] = run
        cuda = any(run.train.accelerator in ("gpu", "cuda") for run in todo.values()) or (
            cfg.train.accelerator == "auto" and _cuda_available())
        workers, threads = W.resolve(cfg.train.workers, len(todo), cuda=cuda)
        if workers > 1:
            expected = P.expected_network_times(cfg, plan)
            jobs = [W.Job(rid, W.child_argv(args, rid), P.run_dir(cfg, rid) / "train.log", expected.get(rid) or 0.0)
                    for rid in todo]
            return W.run_parallel(jobs, workers, threads, preload=W.TRAIN_PRELOAD)
        from pipeline.core.train import train

        for rid, run in todo.items():
            res = train(run, P.run_dir(cfg, rid), track=not args.no_track, resume=not args.no_resume, tracking_cfg=cfg)
            if res.model_path.is_file():
                mon = run and res.net.family.monitor
                print(f"[train {rid}] done: step {res.metrics['global_step']}, {mon} "
                      f"{res.metrics.get(mon, float('nan')):.4g} -> {res.model_path}")
    elif args.command == "generate":
        from pipeline.core.evaluate import generate

        for name in studies:
            paths = generate(cfg, S.get(name))
            print(f"[{name}] wrote {len(paths)} evaluation sets to {P.data_dir(name)}")
    elif args.command == "evaluate":
        from pipeline.core import workers as W
        from pipeline.core.evaluate import evaluate, is_evaluated, resolve_device

        if args.study:  # asked for by name: evaluated, whatever its results hold
            for name in studies:
                res = evaluate(cfg, S.get(name), track=not args.no_track)
                print(f"[{name}] done: {len(res['rows'])} result rows -> {P.study_dir(cfg, name) / 'results.json'}")
            return 0
        todo = []
        for name in studies:
            if not args.force and is_evaluated(cfg, name):
                print(f"[evaluate {name}] up to date (the fingerprint of its inputs): "
                      f"{P.study_dir(cfg, name) / 'results.json'}")
            else:
                todo.append(name)
        workers, threads = W.resolve(cfg.eval.workers, len(todo), cuda=resolve_device(cfg.eval.device).type == "cuda")
        if workers > 1:
            plan = P.resolve_all(cfg, todo)
            expected = P.expected_evaluation_times(cfg, plan)
            tail = ["evaluate"] + (["--no-track"] if args.no_track else [])
            jobs = [W.Job(n, W.pipeline_argv(args) + ["--study", n] + tail, P.study_dir(cfg, n) / "evaluate.log",
                          expected.get(n) or 0.0) for n in todo]
            return W.run_parallel(jobs, workers, threads, tag="[evaluate]", preload=W.EVALUATE_PRELOAD,
                                  noun="studies", verb="evaluated")
        for name in todo:
            res = evaluate(cfg, S.get(name), track=not args.no_track)
            print(f"[{name}] done: {len(res['rows'])} result rows -> {P.study_dir(cfg, name) / 'results.json'}")
    elif args.command == "report":
        from pipeline.core.report import write_report
        from pipeline.core.results import load_results

        results = {name: load_results(P.study_dir(cfg, name) / "results.json",
                                      f"python -m pipeline --study {name} evaluate") for name in studies}
        from pipeline.core.workers import resolve

        n_proc, _ = resolve("auto", len(studies), cuda=False)  # one process per core, as many as train uses
        if n_proc > 1:  # figures are most of the stage, one core each (matplotlib): studies side by side
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ProcessPoolExecutor(n_proc, mp_context=ctx) as pool:
                futures = [pool.submit(write_report, cfg, S.get(n), results[n], P.study_dir(cfg, n) / "report")
                           for n in studies]
                written = [f.result() for f in futures]
        else:
            written = [write_report(cfg, S.get(n), results[n], P.study_dir(cfg, n) / "report") for n in studies]
        for paths in written:
            for p in paths:
                print(p)
        if args.summary:
            from pipeline.core.report import write_summary

            print(write_summary(cfg, [S.get(n) for n in studies], Path(cfg.out_dir) / "report.md"))
    elif args.command == "summary":
        from pipeline.core.report import write_summary

        print(write_summary(cfg, [S.get(n) for n in studies], Path(cfg.out_dir) / "report.md"))
    elif args.command == "datasets":
        from pipeline.datasets import materialise, summary_line

        for name, entry in materialise(Path(args.root)).items():
            print(summary_line(name, entry))
    elif args.command == "bench":
        from pipeline import bench

        if args.compare or args.time_to_quality:
            if args.time_to_quality and args.target is None:
                return _fail("bench --time-to-quality: give --target (e.g. --target 0.315 for val/l2)", 2)
            plan = P.resolve_all(cfg, studies)
            rid = args.run or next(iter(plan.studies[studies[0]].networks.values()))
            if rid not in plan.runs:
                return _fail(f"--run {rid}: not a network of the listed studies (known: {', '.join(plan.runs)})", 2)
            if args.compare:
                bench.compare_variants(plan.runs[rid], args.compare, steps=args.steps, device=args.device)
            else:
                from pipeline.bench import quality

                quality.run(plan.runs[rid], args.target)
        elif args.vs_anchor or args.solvers:
            bench.compare(cfg, studies, anchor=args.vs_anchor, solvers=args.solvers, steps=args.steps,
                          device=args.device, precision=args.precision)
        else:
            bench.run(cfg, studies, steps=args.steps, device=args.device, baselines=not args.skip_baselines)
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _yaml_value(v) -> str:
    import json

    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


if __name__ == "__main__":
    sys.exit(main())
