"""The end of a guest (epilog): power-off through QMP and the guest's own
marker, then QEMU stopped; commit of the overlay when asked and safe, else
kept; the guest's outputs saved to the job's working directory.  What
touches the user's files runs as the user (call_as)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import stat
from typing import Any

from ... import asroot
from ...errors import UserError
from ...files import read_small
from ...log import log
from ...proc import call_as
from ..base import Context
from . import disks, helpers
from .qemu import guest_paths


def _qmp(sock_path: str, command: str, timeout: float = 5.0) -> bool:
    """Send one QMP command; True when QEMU acknowledged it."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline() or b"{}")
                    if "event" not in reply:
                        break
                if "error" in reply or not reply:
                    return False
            return True
    except (OSError, ValueError):
        return False


def poweroff_as_user(sync_dir: str, qmp: str) -> bool:
    """Ask the guest to power off: a marker it polls, then the ACPI button."""
    try:  # never through a link, never blocking on a FIFO planted there
        fd = os.open(os.path.join(sync_dir, "poweroff"), os.O_WRONLY | os.O_CREAT
                     | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            os.write(fd, b"epilog\n")
        finally:
            os.close(fd)
    except OSError:
        pass
    return _qmp(qmp, "system_powerdown")


def save_outputs(out_dir: str, work_dir: str, name: str, guest: int,
                  extra: str | None) -> str | None:
    """As the user: copy this guest's outputs into <work_dir>/<name> (the job
    directory goes at job end).  The directory is the user's own (created
    here, or made by another node of the job): one that is someone else's,
    not a directory, or writable by others is left alone and
    <name>.1, .2 … is used instead.  Files are created afresh, never
    through a link.  Returns the directory or None."""
    try:
        wfd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        log.warning("cannot save guest outputs to %s: %s", work_dir, e.strerror)
        return None
    try:
        for attempt in range(100):
            dest = name if attempt == 0 else f"{name}.{attempt}"
            try:
                os.mkdir(dest, 0o755, dir_fd=wfd)
            except FileExistsError:
                pass
            except OSError as e:
                log.warning("cannot save guest outputs in %s: %s", work_dir, e.strerror)
                return None
            try:
                dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=wfd)
            except OSError:
                continue
            st = os.fstat(dfd)
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                os.close(dfd)
                continue
            try:
                _copy_outputs(out_dir, dfd, guest, extra)
            finally:
                os.close(dfd)
            return os.path.join(work_dir, dest)
        return None
    except OSError as e:
        log.warning("cannot save guest outputs to %s: %s", work_dir, e.strerror)
        return None
    finally:
        os.close(wfd)


def _copy_outputs(out_dir: str, dfd: int, guest: int, extra: str | None) -> None:
    def create(fname: str) -> int:
        try:  # a link or file of that name in our own directory: replaced
            os.unlink(fname, dir_fd=dfd)
        except FileNotFoundError:
            pass
        return os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                       0o644, dir_fd=dfd)

    ofd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for fname in sorted(os.listdir(ofd)):
            if not fname.startswith(f"{guest}_"):
                continue
            try:
                src = os.open(fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                              dir_fd=ofd)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(src).st_mode):
                    continue
                dst = create(fname)
                try:
                    while chunk := os.read(src, 1 << 20):
                        os.write(dst, chunk)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
    finally:
        os.close(ofd)
    if extra:
        dst = create(f"{guest}_commit.txt")
        try:
            os.write(dst, (extra + "\n").encode())
        finally:
            os.close(dst)


def end_guest(ctx: Context, record: Any) -> None:
    """Stop the guest's helpers, power the guest off (QEMU killed after
    timeouts.shutdown), commit or keep its overlay when asked, save its
    outputs.  record: root's record of the job, or None (then the job
    user's processes that name this job are looked for)."""
    cfg = ctx.cfg
    helpers.stop_helper(ctx, record, "relay", "ssh-relay")
    helpers.stop_helper(ctx, record, "mux", "task-mux")
    facts = record.facts if record is not None else {}
    qemu = record.proc("qemu") if record is not None else helpers.sweep_qemu(ctx)
    n = facts.get("guest") if type(facts.get("guest")) is int else ctx.guest_id
    ctx = dataclasses.replace(ctx, guest_id=n)
    p = guest_paths(ctx)
    clean = False
    if qemu is not None and asroot.alive(qemu):
        try:
            acked = call_as(ctx.user, poweroff_as_user, f"{ctx.paths.meta}/sync",
                            p["qmp"], limit=30)
        except UserError as e:
            log.warning("guest %d: power-off request: %s", n, e.line())
            acked = False
        log.info("guest %d: power-off requested (ACPI %s)", n,
                 "acknowledged" if acked else "not acknowledged")
        if asroot.stop_process(qemu, cfg["timeouts.shutdown"], cfg["timeouts.kill"],
                               first=None):
            down = call_as(ctx.user, read_small, p["down"], limit=30)
            clean = (down or "").startswith("clean")
        else:
            log.warning("guest %d: no clean power-off in %d s; QEMU killed",
                        n, cfg["timeouts.shutdown"])
    note = None
    if facts.get("commit") is True and isinstance(facts.get("image"), str):
        note = commit_or_keep(ctx, facts, p, clean)
    work_dir = facts.get("work_dir")
    if isinstance(work_dir, str) and work_dir.startswith("/"):
        saved = call_as(ctx.user, save_outputs, ctx.paths.out, work_dir,
                        f"charlie-{ctx.job_id}", n, note, limit=120)
        if saved:
            log.info("guest %d outputs saved in %s", n, saved)


def commit_or_keep(ctx: Context, facts: dict[str, Any], p: dict[str, str],
                   clean: bool) -> str:
    """Commit guest N's overlay into the image (as the user) when the guest
    shut down cleanly; else keep it in the user's kept directory.  Returns
    the line for the user."""
    cfg, n = ctx.cfg, ctx.guest_id
    qemu_img = shutil.which(cfg["vm.qemu_img"]) or cfg["vm.qemu_img"]
    image = facts.get("image")
    if clean:
        ok, why = call_as(ctx.user, disks.commit, qemu_img, p["overlay"],
                          cfg["timeouts.commit"], limit=2 * cfg["timeouts.commit"] + 120)
        if ok:
            msg = f"guest {n}: changes committed into {image}"
            log.info("%s", msg)
            return msg
    else:
        why = "the guest did not shut down cleanly"
    kept = asroot.create_user_dir(cfg.kept_dir(ctx.node), ctx.user)
    dst = call_as(ctx.user, disks.keep, p["overlay"], kept,
                  f"job{ctx.job_id}-chgu{n}.overlay.qcow2", limit=60)
    msg = (f"guest {n}: NOT committed into {image} ({why}); its changes are "
           f"kept in {dst} on {ctx.node}; commit later with: "
           f"slurm-charlie commit {dst}")
    log.warning("%s", msg)
    return msg
