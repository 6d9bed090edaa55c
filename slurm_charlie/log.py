"""One logger.  Messages follow `slurm-charlie[pid]: job N: level: text`.

Sinks: stderr (CLI), syslog when /dev/log exists, the node log file from the
site config (log_file), and out/charlie.log inside the job directory.
"""

from __future__ import annotations

import logging
import os

from . import PROG
from .errors import printable

log = logging.getLogger("slurm_charlie")


class _Format(logging.Formatter):
    def __init__(self, job_id: str | None, with_time: bool) -> None:
        super().__init__()
        self.job_id = job_id
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        job = f"job {self.job_id}: " if self.job_id else ""
        level = record.levelname.lower()
        # one line per event, whatever the message quotes (file names from
        # images, option values, tool output): errors.printable
        text = f"{PROG}[{record.process}]: {job}{level}: {printable(record.getMessage(), 4000)}"
        if self.with_time:
            text = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + " " + text
        return text


def setup(level: str = "info", job_id: str | None = None, stderr: bool = True,
          syslog: bool = False, node_log: str | None = None) -> None:
    log.handlers.clear()
    log.setLevel(os.environ.get("SLURM_CHARLIE_LOG_LEVEL", level).upper())
    log.propagate = False
    if stderr:
        h = logging.StreamHandler()
        h.setFormatter(_Format(job_id, False))
        log.addHandler(h)
    if syslog and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # not for stderr-only logs
        try:
            h = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
            h.setFormatter(_Format(job_id, False))
            log.addHandler(h)
        except OSError:
            pass
    if node_log:
        try:
            h = logging.FileHandler(node_log)
            h.setFormatter(_Format(job_id, True))
            log.addHandler(h)
        except OSError as e:
            log.warning("log_file %s: %s", node_log, e.strerror)


def add_fd(fd: int, job_id: str | None) -> None:
    """Also log to an already opened file (out/charlie.log)."""
    h = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
    h.setFormatter(_Format(job_id, True))
    log.addHandler(h)


def flush() -> None:
    """Flush every sink (before os._exit, which flushes nothing)."""
    for h in log.handlers:
        try:
            h.flush()
        except (OSError, ValueError):
            pass
