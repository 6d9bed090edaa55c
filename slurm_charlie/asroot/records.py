"""Root's own records of a job: <runtime_root>/.root/<job>.json (root, 0700).

What root started for a job and what it must undo.  The epilog acts on this
record only; files in the user-owned job directory are hints.  Records are
schema-checked when read (a torn or hand-edited one reads as none).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from typing import Any

from .. import layout
from ..layout import RECORD_DIR
from ..config import check_root_safe
from ..errors import NodeFault, UserError
from ..files import read_bytes, write_file
from ..log import log
from .jobdir import open_root

RECORD_VERSION = 1
RECORD_MAX = 1 << 20


@dataclasses.dataclass(frozen=True)
class ProcRecord:
    """A process root started: identified by more than its pid."""
    role: str           # "qemu", "holder"
    pid: int
    start: int          # /proc/PID/stat field 22 (clock ticks since boot)
    uid: int
    exe: str            # /proc/PID/exe when started
    mntns: int = 0      # container holder: its mount namespace inode

    @classmethod
    def from_dict(cls, d: Any) -> "ProcRecord":
        if not isinstance(d, dict):
            raise ValueError("process record is not an object")
        out = cls(role=_typed(d, "role", str), pid=_typed(d, "pid", int),
                  start=_typed(d, "start", int), uid=_typed(d, "uid", int),
                  exe=_typed(d, "exe", str), mntns=_typed(d, "mntns", int, 0))
        if out.pid <= 1 or out.start <= 0 or out.uid <= 0:
            raise ValueError("process record out of range")
        return out


@dataclasses.dataclass(frozen=True)
class JobRecord:
    job_id: str
    uid: int
    gid: int
    type: str = "none"          # container | vm | none (resolved by root)
    guest_id: int = 0
    phase: str = "preparing"    # preparing | started
    procs: tuple[ProcRecord, ...] = ()
    facts: dict = dataclasses.field(default_factory=dict)  # back end's own

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["version"] = RECORD_VERSION
        return json.dumps(d, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "JobRecord":
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("version") != RECORD_VERSION:
            raise ValueError("not a version-1 record")
        procs = d.get("procs", [])
        facts = d.get("facts", {})
        if not isinstance(procs, list) or not isinstance(facts, dict):
            raise ValueError("bad record")
        rec = cls(job_id=_typed(d, "job_id", str), uid=_typed(d, "uid", int),
                  gid=_typed(d, "gid", int), type=_typed(d, "type", str, "none"),
                  guest_id=_typed(d, "guest_id", int, 0),
                  phase=_typed(d, "phase", str, "preparing"),
                  procs=tuple(ProcRecord.from_dict(p) for p in procs), facts=facts)
        layout.check_job_id(rec.job_id)
        return rec

    def proc(self, role: str) -> ProcRecord | None:
        return next((p for p in self.procs if p.role == role), None)


def _typed(d: dict, key: str, kind: type, default: Any = ...) -> Any:
    value = d.get(key, default)
    if value is ... or type(value) is not kind:  # bool is not int here
        raise ValueError(f"{key}: expected {kind.__name__}")
    return value


class Records:
    """<runtime_root>/.root/<job>.json, written and read by root only."""

    def __init__(self, runtime_root: str) -> None:
        self.root = runtime_root

    def _dirfd(self, create: bool) -> int | None:
        if create:
            rootfd = open_root(self.root)
        else:
            check_root_safe(self.root)
            try:
                rootfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise NodeFault("runtime_root", f"cannot open: {e.strerror}",
                                self.root) from None
        try:
            if create:
                try:
                    os.mkdir(RECORD_DIR, 0o700, dir_fd=rootfd)
                except FileExistsError:
                    pass
            try:
                fd = os.open(RECORD_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=rootfd)
            except FileNotFoundError:
                return None
        finally:
            os.close(rootfd)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            if create:
                os.fchown(fd, os.geteuid(), os.getegid())
                os.fchmod(fd, 0o700)
            else:
                os.close(fd)
                raise NodeFault("runtime_root", f"{RECORD_DIR} is not root's and 0700",
                                os.path.join(self.root, RECORD_DIR),
                                hint="remove it; slurm-charlie recreates it")
        return fd

    def write(self, rec: JobRecord) -> None:
        layout.check_job_id(rec.job_id)
        fd = self._dirfd(create=True)
        assert fd is not None
        name = f"{rec.job_id}.json"
        try:  # no fsync: after a crash a torn record reads as none, and
            # reconcile then goes by the job directory's owner
            write_file(name, rec.to_json(), 0o600, dir_fd=fd)
        except OSError as e:
            where = os.path.join(self.root, RECORD_DIR, name)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a job can fill it
                raise UserError("runtime_root", "full: the job cannot be set up on "
                                "this node", where, hint="tell the site's admins "
                                "(slurm-charlie doctor shows the free space)") from None
            raise NodeFault("runtime_root", f"cannot write root's job record: {e.strerror}",
                            where) from None
        finally:
            os.close(fd)

    def read(self, job_id: str) -> JobRecord | None:
        """The record, or None when there is none.  A record that does not
        parse is reported and treated as none (root wrote it; only a crash
        mid-write or a disk fault gets here)."""
        layout.check_job_id(job_id)
        fd = self._dirfd(create=False)
        if fd is None:
            return None
        try:
            data = read_bytes(f"{job_id}.json", RECORD_MAX, dir_fd=fd)
        finally:
            os.close(fd)
        if data is None:
            return None
        try:
            rec = JobRecord.from_json(data)
        except (ValueError, TypeError) as e:
            log.warning("root's record of job %s is unreadable (%s); ignored", job_id, e)
            return None
        return rec if rec.job_id == job_id else None

    def remove(self, job_id: str) -> None:
        layout.check_job_id(job_id)
        fd = self._dirfd(create=False)
        if fd is None:
            return
        try:
            os.unlink(f"{job_id}.json", dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def job_ids(self) -> list[str]:
        fd = self._dirfd(create=False)
        if fd is None:
            return []
        try:
            return sorted((n[:-5] for n in os.listdir(fd)
                           if n.endswith(".json") and n[:-5].isascii()
                           and n[:-5].isdigit()), key=int)
        finally:
            os.close(fd)
