"""Ray Tune sweeps of a study's network over its run keys (sweeps/<name>.yaml: task.*, model.*,
train.*), each trial one call of the one training function `pipeline.core.train.train`.

    spec.py     parse + validate a sweep file (no ray import): load_spec(path, cfg) -> SweepSpec
    trial.py    the Tune trainable (run_trial) and the TuneReporter Lightning callback
    runner.py   loopback-only local Ray or a cluster; Tuner / Tuner.restore; run_sweep(...)
    results.py  results.csv / results.json and PNG plots in <out_dir>/sweeps/<name>/
    cli.py      `python -m pipeline sweep sweeps/<name>.yaml [--address A] [--resume] ...`
"""
