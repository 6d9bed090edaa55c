"""The short form of the churn run (tests/helpers/churn.py; `make churn`
runs 200 jobs): jobs of every type with faults injected at random points,
then nothing may be left behind."""

import os

from helpers import churn


def test_churn_leaves_nothing(capsys):
    jobs = int(os.environ.get("CHARLIE_CHURN_JOBS", "24"))
    seed = int(os.environ.get("CHARLIE_CHURN_SEED", "8"))
    rc = churn.main(["--jobs", str(jobs), "--seed", str(seed)])
    out = capsys.readouterr().out
    print(out)
    left = out.split("left behind: ")[1]
    assert rc == 0, out
    for what in ("drained 0", "processes 0", "job_dirs 0", "records 0", "cgroups 0",
                 "shm 0", "deleted_open 0", "mounts 0", "kept_unlisted 0"):
        assert what in left, out
