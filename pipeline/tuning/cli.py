"""`python -m pipeline sweep sweeps/<name>.yaml`: run a Ray Tune sweep of the training function.

Exit status: 0 all trials completed; 1 some trial failed (after its retries); 2 a bad sweep file
or resources the cluster cannot give (one line, before any trial starts); 130 interrupted
(Ctrl+C / SIGTERM: the state is saved, continue with --resume).
Heavy imports (ray, torch, lightning, wandb) happen inside main(), after validation.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="sweep file, e.g. sweeps/depth.yaml")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (e.g. auto, 10.0.0.1:6379, ray://head:10001); default: "
                        "$RAY_ADDRESS, else a local loopback-only Ray on this machine's resources")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (Tuner.restore): finished trials are kept, "
                        "unfinished and errored ones resume from their last checkpoint")
    p.add_argument("--fresh", action="store_true", help="discard a stored sweep of this name and start over")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="run at most N trials at once (default: the spec's max_concurrent)")
    p.add_argument("--storage", default=None, metavar="PATH_OR_URI",
                   help="where Tune keeps the experiment and checkpoints (default <out_dir>/sweeps/<name>/ray); "
                        "a shared path or s3://... on a multi-node cluster")
    p.add_argument("--num-cpus", type=int, default=None, metavar="N",
                   help="CPUs the local Ray may use (default: all of this machine's)")
    p.add_argument("--check", action="store_true", help="validate the sweep file and exit (no Ray)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the results table and plots from the stored sweep (no Ray, no training)")


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    return code


def main(args: argparse.Namespace, cfg) -> int:
    from pipeline.tuning.spec import SpecError, check_resources, load_spec, local_resources

    try:
        spec = load_spec(args.spec, cfg)
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise SpecError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
        if args.resume and args.fresh:
            raise SpecError("--resume and --fresh exclude each other")
        address = args.address or os.environ.get("RAY_ADDRESS") or None
        if address is None:  # a local Ray: this machine is the cluster
            cpus, gpus = local_resources()
            if args.num_cpus is not None:
                if args.num_cpus < 1:
                    raise SpecError(f"--num-cpus: must be >= 1, got {args.num_cpus}")
                cpus = min(cpus, args.num_cpus)
            check_resources(spec, cpus, gpus, "this machine")
    except SpecError as e:
        return _fail(str(e))
    n = spec.n_trials()
    print(f"[sweep {spec.name}] {args.spec}: ok ({n} trials: {', '.join(spec.param_keys)} x "
          f"{len(spec.seeds)} seed(s) x {spec.num_samples} sample(s); metric {spec.metric} {spec.mode})",
          flush=True)
    if args.check:
        return 0
    if args.report_only:
        from pipeline.tuning.runner import report_only

        try:
            files = report_only(spec, cfg, storage=args.storage)
        except SpecError as e:
            return _fail(str(e))
        for f in files:
            print(f"  {f}")
        return 0

    from pipeline.tuning.runner import run_sweep

    try:
        out = run_sweep(spec, cfg, address=address, resume=args.resume, fresh=args.fresh,
                        max_concurrent=args.max_concurrent, storage=args.storage, num_cpus=args.num_cpus)
    except SpecError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(f"sweep {spec.name} interrupted before Tune saved its state; rerun with --resume", 130)
    counts: dict[str, int] = {}
    for r in out.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"[sweep {spec.name}] {len(out.rows)} trials ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) "
          f"in {out.wall_time_s:.1f} s -> {out.sweep_dir}")
    for f in out.files:
        print(f"  {f}")
    from pipeline.tuning.results import best_row

    best = best_row(out.rows, spec)
    if best is not None:
        shown = ", ".join(f"{k}={best[k]}" for k in spec.param_keys)
        print(f"  best {spec.metric} = {best[spec.metric]:.4g} ({shown}, seed {best['seed']})")
    if out.interrupted:
        argv = [a for a in sys.argv[1:] if a not in ("--resume", "--fresh")]
        again = " ".join(argv) if "sweep" in argv else f"sweep {args.spec}"
        print(f"[sweep {spec.name}] interrupted; its state is saved: continue with  "
              f"python -m pipeline {again} --resume", file=sys.stderr)
        return 130
    return 1 if out.n_errors else 0
