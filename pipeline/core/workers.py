"""Train several networks (or evaluate several studies) at once: the `train` and `evaluate` scheduler.

Why: on a CPU the pipeline's networks are small (width 64, tens of tokens), and two threads make a
train step only 1.0-1.5x faster than one (docs/speed.md), so two networks trained side by side,
one thread each, finish 1.4-1.8x sooner than the same two one after the other at two threads; the
start-up of each process (importing torch and Lightning, ~10 s on a 2-core machine) overlaps too.
Each network still trains through the one training function (`core.train.train`), in a process of
its own (`python -m pipeline ... train --run ID`), so its result does not depend on the schedule:
a network's data are a function of (seed, step, rank), never of what runs beside it.

The processes are forked from a multiprocessing *forkserver* that has imported torch, Lightning
and W&B once (`preload`): a fresh interpreter spends ~12 s on those imports on a 2-core machine
(Lightning alone ~6 s) before its first step, a forked one ~0.1 s, so the start-up of the 14
default networks goes from ~3 minutes of CPU time to ~15 s (docs/speed.md). The forkserver
itself never runs a tensor operation or touches CUDA, so forking it is safe (no thread pool or
device context to inherit). Where forkserver is missing (Windows) each job is a plain subprocess.

`train.workers` (the base train section): `auto` = one network per CPU core, at most 4, each with
cores // workers threads; one at a time on a CUDA device (one device, its whole memory); an integer
forces that many. Networks start longest first (their declared expected time), which keeps the
makespan close to the optimum. Each worker's output goes to <run dir>/train.log; the command
prints a line when a network starts and ends, and a failing network's log tail.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MAX_AUTO_WORKERS = 4


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve(setting, n_jobs: int, cuda: bool, cores: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for `n_jobs` networks under train.workers = `setting`."""
    cores = cpu_cores() if cores is None else cores
    if n_jobs <= 1:
        return 1, cores
    if setting == "auto":
        workers = 1 if cuda else min(n_jobs, cores, MAX_AUTO_WORKERS)
    else:
        workers = min(int(setting), n_jobs)
    return workers, max(1, cores // workers)


def makespan(times: list[float], workers: int) -> float:
    """Wall time of jobs of these durations on `workers` slots, longest first (what run_parallel does)."""
    slots = [0.0] * max(1, workers)
    for t in sorted(times, reverse=True):
        i = slots.index(min(slots))
        slots[i] += t
    return max(slots)


@dataclass
class Job:
    name: str
    argv: list[str]  # [python, "-m", module, args...] or [python, "-c", code, args...]
    log: Path
    expected_s: float = 0.0
    proc: subprocess.Popen | _Forked | None = field(default=None, repr=False)
    started: float = 0.0


def _forked_main(argv: list[str], log: str, env: dict[str, str]) -> None:
    """A forked worker: output to `log`, the job's environment, then `python -m module` or
    `python -c code` exactly as the interpreter would run it (SystemExit gives the exit status)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    if "torch" in sys.modules:  # preloaded: its thread pool size is read from the env at first use only
        sys.modules["torch"].set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    flag, target, rest = argv[1], argv[2], argv[3:]
    if flag == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif flag == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise ValueError(f"a forked job runs `python -m module` or `python -c code`, got {argv[:3]}")


class _Forked:
    """The Popen calls run_parallel uses, for a job forked from the preloaded forkserver."""

    def __init__(self, ctx, argv: list[str], log: Path, env: dict[str, str]):
        self.p = ctx.Process(target=_forked_main, args=(argv, str(log), env), daemon=False)
        self.p.start()

    def poll(self) -> int | None:
        return self.p.exitcode

    def send_signal(self, sig: int) -> None:
        if self.p.exitcode is None and self.p.pid:
            os.kill(self.p.pid, sig)

    def wait(self) -> int | None:
        self.p.join()
        return self.p.exitcode


def _forkserver(preload: list[str] | None):
    """The forkserver context with `preload` imported once, or None (plain subprocesses)."""
    if preload is None or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)  # a preload that fails to import is skipped: the job imports it
    return ctx


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    keep = [ln for ln in text.splitlines() if ln.strip() and "it/s" not in ln and "s/it" not in ln]
    return "\n".join(keep[-lines:])


def _last_line(path: Path, marker: str) -> str:
    for ln in reversed(_tail(path, 50).splitlines()):
        if marker in ln:
            return ln.strip()
    return ""


def run_parallel(jobs: list[Job], workers: int, threads: int, tag: str = "[train]",
                 preload: list[str] | None = None, noun: str = "networks", verb: str = "trained") -> int:
    """Run the jobs, `workers` at a time, longest expected first; each with `threads` CPU threads.
    With `preload` (module names) each job is forked from a forkserver that imported them once;
    without it each is a subprocess. Returns 0, or the exit status of the first job that failed
    (the others already running are let finish, so their work is kept; none is started after a
    failure)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    ctx = _forkserver(preload)
    if ctx is not None:  # the forkserver starts with this environment (its threads at import)
        saved = dict(os.environ)
        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = sorted(jobs, key=lambda j: -j.expected_s)
    running: list[Job] = []
    failed: list[tuple[Job, int]] = []
    done = 0
    t0 = time.monotonic()
    print(f"{tag} {len(jobs)} {noun}, {workers} at a time, {threads} thread(s) each; "
          f"each one's output: <run dir>/train.log", flush=True)

    def stop_all(signum, _frame):
        for j in running:
            if j.proc and j.proc.poll() is None:
                j.proc.send_signal(signal.SIGTERM)  # each one checkpoints and exits 143
        pending.clear()

    old = signal.signal(signal.SIGTERM, stop_all)
    try:
        while pending or running:
            while pending and len(running) < workers and not failed:
                j = pending.pop(0)
                j.log.parent.mkdir(parents=True, exist_ok=True)
                if ctx is not None:
                    j.proc = _Forked(ctx, j.argv, j.log, env)
                else:
                    with open(j.log, "w") as fh:
                        j.proc = subprocess.Popen(j.argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
                j.started = time.monotonic()
                running.append(j)
                print(f"{tag} started {j.name}", flush=True)
            if failed:
                pending.clear()
            time.sleep(0.5)
            for j in list(running):
                rc = j.proc.poll()
                if rc is None:
                    continue
                running.remove(j)
                done += 1
                took = time.monotonic() - j.started
                if rc == 0:
                    line = _last_line(j.log, "done:") or "done"
                    print(f"{tag} {done}/{len(jobs)} {j.name}: {took:.1f} s; {line}", flush=True)
                else:
                    failed.append((j, rc))
                    print(f"{tag} {j.name} FAILED (exit {rc}) after {took:.1f} s; the end of {j.log}:\n"
                          f"{_tail(j.log)}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        stop_all(None, None)
        for j in running:
            j.proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        if ctx is not None:
            os.environ.clear()
            os.environ.update(saved)
    print(f"{tag} {done - len(failed)}/{len(jobs)} {noun} {verb} in {time.monotonic() - t0:.1f} s", flush=True)
    return failed[0][1] if failed else 0


def is_trained(run, run_dir: Path) -> bool:
    """True if run_dir holds the finished network of exactly this run (its fingerprint) and its
    metrics: the train command then skips it without starting Lightning."""
    import json

    from pipeline.core.fingerprint import fingerprint

    spec, weights, metrics = run_dir / "model.json", run_dir / "model.safetensors", run_dir / "metrics.json"
    if not (spec.is_file() and weights.is_file() and metrics.is_file()):
        return False
    try:
        meta = json.loads(spec.read_text())
        return meta.get("fingerprint") == fingerprint(run) and int(meta.get("global_step", -1)) >= run.train.steps
    except (ValueError, TypeError, OSError):
        return False


# What a forked job would otherwise import itself (`python -m pipeline ... train` / `evaluate`).
TRAIN_PRELOAD = ["pipeline.__main__", "pipeline.core.train", "wandb", "wandb.sdk.launch.inputs.internal"]
EVALUATE_PRELOAD = ["pipeline.__main__", "pipeline.core.evaluate", "pipeline.core.probe", "pipeline.studies",
                    "scipy.special", "wandb", "wandb.sdk.launch.inputs.internal"]


def pipeline_argv(args) -> list[str]:
    """`python -m pipeline` with the same parameters (params file, profile, overrides) as this command."""
    argv = [sys.executable, "-m", "pipeline", "--params", args.params]
    if args.profile:
        argv += ["--profile", args.profile]
    for kv in args.overrides:
        argv += ["--set", kv]
    return argv


def child_argv(args, run_id: str) -> list[str]:
    """The command line that trains one network in a process of its own, with the same parameters
    (params file, profile, overrides) as this command."""
    argv = pipeline_argv(args) + ["train", "--run", run_id]
    if args.no_track:
        argv.append("--no-track")
    if args.no_resume:
        argv.append("--no-resume")
    return argv
