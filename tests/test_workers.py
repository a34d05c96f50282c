"""The train command's scheduler (core/workers.py): workers per CPU, longest first, a failure
stops new starts but lets the running job finish, and the exit status is the failing job's."""
from __future__ import annotations

import sys

import pytest

from pipeline.core import workers as W

# subprocesses, and forks of a forkserver that preloaded a module (what the train command uses)
LAUNCHERS = pytest.mark.parametrize("preload", [None, ["json"]], ids=["subprocess", "forkserver"])


def _job(tmp_path, name, code, expected):
    return W.Job(name, [sys.executable, "-c", code], tmp_path / name / "train.log", expected)


def test_resolve_workers_and_threads():
    assert W.resolve("auto", 14, cuda=False, cores=2) == (2, 1)
    assert W.resolve("auto", 14, cuda=False, cores=16) == (4, 4)  # at most 4 by default
    assert W.resolve("auto", 14, cuda=True, cores=16) == (1, 16)  # one device: one at a time
    assert W.resolve(3, 2, cuda=False, cores=8) == (2, 4)  # never more workers than networks
    assert W.resolve("auto", 1, cuda=False, cores=2) == (1, 2)


def test_makespan_is_longest_first_on_the_free_slot():
    assert W.makespan([100, 60, 50], 2) == 110
    assert W.makespan([100, 60, 50], 1) == 210
    assert W.makespan([30, 30, 30, 30], 2) == 60


@LAUNCHERS
def test_all_jobs_run_longest_first_with_their_threads(tmp_path, capsys, preload):
    code = "import os; print('done: threads', os.environ['OMP_NUM_THREADS'])"
    jobs = [_job(tmp_path, n, code, t) for n, t in (("short", 1.0), ("long", 9.0), ("mid", 5.0))]
    assert W.run_parallel(jobs, workers=2, threads=1, preload=preload) == 0
    out = capsys.readouterr().out
    starts = [ln.split()[-1] for ln in out.splitlines() if " started " in ln]
    assert starts == ["long", "mid", "short"]
    assert "3/3 networks trained" in out
    for n in ("short", "long", "mid"):
        assert (tmp_path / n / "train.log").read_text().strip() == "done: threads 1"


@LAUNCHERS
def test_a_failure_lets_the_running_job_finish_starts_no_new_one_and_returns_its_status(tmp_path, capsys, preload):
    jobs = [_job(tmp_path, "slow", "import time; time.sleep(2); print('done: slow')", 9.0),
            _job(tmp_path, "bad", "import sys; print('boom: a one-line reason'); sys.exit(3)", 5.0),
            _job(tmp_path, "never", "print('done: never')", 1.0)]
    assert W.run_parallel(jobs, workers=2, threads=1, preload=preload) == 3
    cap = capsys.readouterr()
    assert "bad FAILED (exit 3)" in cap.err and "boom: a one-line reason" in cap.err
    assert (tmp_path / "slow" / "train.log").read_text().strip() == "done: slow"  # finished, not killed
    assert not (tmp_path / "never" / "train.log").exists()  # not started after the failure


def test_a_forked_job_runs_a_module_with_its_arguments_and_exit_status(tmp_path, capsys):
    """`python -m module args` in a fork: sys.argv as the interpreter sets it, SystemExit's code."""
    mod = tmp_path / "echo_args.py"
    mod.write_text("import sys\nprint('done:', ' '.join(sys.argv[1:]))\nsys.exit(int(sys.argv[-1]))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ok = W.Job("ok", [sys.executable, "-m", "echo_args", "a", "0"], tmp_path / "ok" / "train.log", 2.0)
        bad = W.Job("bad", [sys.executable, "-m", "echo_args", "b", "7"], tmp_path / "bad" / "train.log", 1.0)
        assert W.run_parallel([ok, bad], workers=2, threads=1, preload=["json"]) == 7
    finally:
        sys.path.remove(str(tmp_path))
    assert (tmp_path / "ok" / "train.log").read_text().strip() == "done: a 0"
    assert (tmp_path / "bad" / "train.log").read_text().strip() == "done: b 7"
