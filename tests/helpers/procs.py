"""Small /proc readers the tests share."""

from slurm_charlie.procfs import proc_stat


def state(pid):
    """A process's state letter (R, S, D, T, Z, ...), None when it is gone."""
    fields = proc_stat(pid)
    return fields[0] if fields else None
