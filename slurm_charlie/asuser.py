"""Work the prolog hands to the job user (``proc.call_as``): everything that
reads the user's paths or writes into the job directory.  Nothing here runs
as root; a failure here is the user's (``UserError``)."""

from __future__ import annotations

import os
import shutil
from typing import Any

from . import backends, files, meta, options, state, validate


def link_jobscript(src: str, dst: str) -> str | None:
    """Hard link the --charlie-job script into meta (edits stay visible, as
    docs/vm.rst describes); copy when linking fails.  Returns a warning."""
    try:
        os.unlink(dst)
    except FileNotFoundError:
        pass
    try:
        os.link(src, dst, follow_symlinks=True)
        return None
    except OSError as e:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o755)
        return (f"--charlie-job: hard link failed ({e.strerror}), copied "
                f"instead: {src}; later edits of the script will not be seen "
                "by the job (put it on the same filesystem as the runtime root "
                "to get a link)")


def prepare_as_user(ctx: backends.Context, raw: options.Options,
                    cpus: tuple[int, ...], vm_user: tuple = (),
                    ssh: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs as the job user: re-validate, render meta, write task env."""
    p = ctx.paths
    for d in (p.meta, p.run, p.out, os.path.join(p.meta, meta.SYNC_DIR)):
        os.makedirs(d, mode=0o755 if d.startswith(p.meta) else 0o700, exist_ok=True)
    os.chmod(p.job_dir, 0o700)
    opts = validate.resolve(raw, ctx.cfg, cwd=None, num_nodes=len(ctx.nodes))
    try:  # left by an earlier run of this prolog
        os.unlink(p.error)
    except FileNotFoundError:
        pass
    inp = meta.MetaInput(job_id=ctx.job_id, nodes=ctx.nodes, cpus=cpus,
                         type=opts.type, data_dirs=len(opts.dir),
                         subnet=ctx.cfg["vm.subnet"],
                         nameservers=tuple(ctx.cfg["vm.nameservers"]),
                         mode=("" if opts.type != "vm" else
                               "interactive" if opts.interactive or not opts.job
                               else "batch"),
                         user=vm_user if opts.type == "vm" else (),
                         pmi_fence_release=(ctx.cfg["vm.pmi_fence_release"]
                                            if opts.type == "vm" else None))
    rendered = meta.render(inp)
    if opts.type == "vm" and ssh:
        rendered.update(meta.ssh_files(ssh["public"].encode(), ssh["private"].encode(),
                                    ctx.cfg["vm.subnet"]))
    for name, data in rendered.items():
        path = os.path.join(p.meta, name)
        if data is None:
            os.makedirs(path, mode=0o755, exist_ok=True)
        else:
            # 0644 whatever the user's umask: guests read meta as others
            files.write_file(path, data, 0o600 if name == "ssh/id_ed25519" else 0o644)
    warnings = []
    if opts.job:
        w = link_jobscript(opts.job, os.path.join(p.meta, "jobscript"))
        if w:
            warnings.append(w)
    state.write(p.state, {"job_id": ctx.job_id, "node": ctx.node,
                          "type": opts.type, "phase": "prepared",
                          "guest_id": ctx.guest_id})
    look = backends.get(opts.type).look_as_user(ctx, opts)
    return {"opts": options.to_env(opts), "warnings": warnings, "look": look}


def record_error(path: str, text: str) -> None:
    """As the user: run/error, for the shim to show in every task (run/ may
    not exist yet when the options themselves were refused)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    files.write_file(path, text, 0o600)


def _task_env_lines(pairs: list[tuple[str, str]]) -> bytes:
    # raw NAME=VALUE lines for the shim (values never contain newlines)
    return "".join(f"{k}={v}\n" for k, v in pairs).encode()


def finish_as_user(ctx: backends.Context, task_env: list[tuple[str, str]],
                   started: dict[str, Any], notices: list[str],
                   user_files: list[tuple[str, str]] = ()) -> None:
    if notices:  # the shim copies these to the batch script's stderr
        files.write_file(ctx.paths.notice, "".join(n + "\n" for n in notices).encode(), 0o600)
    else:
        try:  # left by an earlier run of this prolog
            os.unlink(ctx.paths.notice)
        except FileNotFoundError:
            pass
    for name, text in user_files:
        # names are the back end's (layout's run/ files), never the user's
        files.write_file(os.path.join(ctx.paths.run, os.path.basename(name)), text, 0o600)
    files.write_file(ctx.paths.task_env, _task_env_lines(task_env), 0o600)
    state.update(ctx.paths.state, phase="started", backend=started)
