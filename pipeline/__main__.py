"""One CLI for every stage:  python -m pipeline [--params F] [--profile P] [--set k=v ...] COMMAND

  validate   check params.yaml and exit
  generate   write the fixed evaluation sets into data/
  train      train the network for one d (--d) or every d in task.dims
  evaluate   network + classical solvers on the evaluation sets -> outputs/eval/results.json
  report     metrics JSON, dvc-plots CSVs, PNG figures, markdown tables -> outputs/report/
  bench      throughput of the train step, sampling share, baseline timings, every backbone
  ablation   backbone ablation at matched parameter count + anisotropic study (params|train|generate|evaluate|report)
  profile    print a profile as `dvc exp run -S` arguments (e.g. `profile paper`)

Bad input exits with status 2 and one line naming the key or file, before any compute starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="overlay pipeline/profiles/<name>.yaml (e.g. paper)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. --set train.lr=3e-4 (repeatable)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check the parameters and exit")
    sub.add_parser("generate", help="write the evaluation sets")
    t = sub.add_parser("train", help="train the network(s)")
    t.add_argument("--d", type=int, action="append", help="dimension to train (repeatable; default: task.dims)")
    t.add_argument("--no-track", action="store_true", help="no W&B run")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    e = sub.add_parser("evaluate", help="evaluate every solver on the evaluation sets")
    e.add_argument("--no-track", action="store_true", help="no W&B run")
    sub.add_parser("report", help="write metrics, plots, figures and tables")
    b = sub.add_parser("bench", help="print throughput figures")
    b.add_argument("--d", type=int, default=8)
    b.add_argument("--steps", type=int, default=20, help="timed train steps (after 3 warm-up steps)")
    b.add_argument("--baseline-tasks", type=int, default=256, help="tasks per baseline timing (K = max task.ks)")
    b.add_argument("--device", default="auto")
    b.add_argument("--skip-baselines", action="store_true")
    b.add_argument("--skip-backbones", action="store_true", help="leave out the table of ablation backbones")
    pr = sub.add_parser("profile", help="print a profile as dvc exp run -S arguments")
    pr.add_argument("name")
    for name, (module, help_text) in EXTENSIONS.items():
        _extension(module).add_arguments(sub.add_parser(name, help=help_text))
    return p


# Commands that live in their own modules: each defines add_arguments(parser) and
# main(args, cfg) -> exit status, and keeps heavy imports (ray, wandb) inside functions.
EXTENSIONS = {
    "sweep": ("pipeline.tuning.cli", "run a Ray Tune sweep from sweeps/<name>.yaml"),
    "robustness": ("pipeline.studies.robustness", "TGMM sample-size and distribution-shift studies"),
    "ablation": ("pipeline.studies.ablation", "TGMM backbone ablation (matched parameter count) and anisotropic study"),
    "dashboard": ("pipeline.studies.dashboard", "define the W&B robustness and scaling dashboard"),
}


def _extension(module: str):
    import importlib

    return importlib.import_module(module)


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipeline import config as C

    if args.command == "profile":
        try:
            over = C.profile_overrides(args.name)
        except C.ConfigError as e:
            return _fail(str(e), 2)
        print(" ".join(f"-S '{k}={_yaml_value(v)}'" for k, v in C.flatten(over).items()))
        return 0
    try:
        cfg = C.load(args.params, args.overrides, args.profile)
        if args.command == "train" and args.d:
            bad = [d for d in args.d if d not in cfg.task.dims]
            if bad:
                raise C.ConfigError(f"--d {bad[0]}: not in task.dims={cfg.task.dims}")
    except C.ConfigError as e:
        return _fail(str(e), 2)
    if args.command == "validate":
        print(f"{args.params}: ok")
        return 0

    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    from pipeline.training.module import NonFiniteLossError
    from pipeline.training.train import TrainingInterrupted

    try:
        if args.command == "generate":
            from pipeline.studies import tgmm

            paths = tgmm.generate(cfg)
            print(f"wrote {len(paths)} evaluation sets to {paths[0].parent}")
        elif args.command == "train":
            from pipeline.training.train import train

            for d in args.d or cfg.task.dims:
                res = train(cfg, d, track=not args.no_track, resume=not args.no_resume)
                if res.model_path.is_file():
                    print(f"[train d={d}] done: step {res.metrics['global_step']}, "
                          f"val/l2 {res.metrics.get('val/l2', float('nan')):.4g} -> {res.model_path}")
        elif args.command == "evaluate":
            from pipeline.studies import tgmm

            results = tgmm.evaluate(cfg, track=not args.no_track)
            print(f"evaluated {len(results['cells'])} (d, K, method) cells -> {Path(cfg.out_dir) / 'eval'}")
        elif args.command == "report":
            from pipeline.studies import tgmm

            for p in tgmm.report(cfg):
                print(p)
        elif args.command in EXTENSIONS:
            return _extension(EXTENSIONS[args.command][0]).main(args, cfg)
        elif args.command == "bench":
            from pipeline import bench

            bench.run(cfg, d=args.d, steps=args.steps, baseline_tasks=args.baseline_tasks, device=args.device,
                      baselines=not args.skip_baselines, backbone_table=not args.skip_backbones)
    except FileNotFoundError as e:
        return _fail(str(e).strip("'\""), 2)
    except NonFiniteLossError as e:
        return _fail(str(e), 1)
    except TrainingInterrupted as e:
        return _fail(str(e), 143)
    return 0


def _yaml_value(v) -> str:
    import json

    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


if __name__ == "__main__":
    sys.exit(main())
