"""slurm-charlie: a per-job software stack (container or VM) for Slurm jobs."""

__version__ = "0.1.0"
PROG = "slurm-charlie"
