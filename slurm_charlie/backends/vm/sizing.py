"""How big the guest may be: its memory from the job's allocation (or
--charlie-mem), and the bounds it must stay in (CPUs, memory, disks)."""

from __future__ import annotations

import json
import os

from ...errors import NodeFault, UserError
from ...log import log
from ...proc import run, slurm_tool
from ..base import Context


def _slurm_number(value) -> int | None:
    """A number as Slurm's JSON gives it: a plain integer (22.05's
    openapi/v0.0.38) or {"set", "infinite", "number"} (the data parsers of
    23.02 and later); None for null, unset, infinite, 0 or anything else."""
    if isinstance(value, dict):
        if value.get("set") is not True or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def job_memory_of(record: dict, cpus: int) -> int | None:
    """MiB per node the job asked for, from its JSON record (memory_per_node,
    or memory_per_cpu x this node's CPUs: Slurm sets one of the two); None
    when it asked for none."""
    for key, factor in (("memory_per_node", 1), ("memory_per_cpu", cpus)):
        mib = _slurm_number(record.get(key))
        if mib:
            return mib * factor
    return None


def job_record(job_id: str, text: bytes) -> dict | None:
    """The job's record in Slurm's JSON (a {"jobs": [...]} document),
    picked by its job_id; None when it is not there or not JSON."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    for job in jobs if isinstance(jobs, list) else ():
        if isinstance(job, dict) and str(job.get("job_id")) == job_id:
            return job
    return None


def job_memory(ctx: Context) -> int | None:
    """MiB the job has on this node (its --mem/--mem-per-cpu), None when it
    asked for none; a UserError when Slurm cannot say.  Read field by name from Slurm's
    JSON, never from the text of `scontrol -o show job`: that line also
    carries what the user shapes (job name, comment, paths), and a name
    such as "x MinMemoryNode=1024" was read as the job's memory.
    `scontrol --json show job J` where Slurm has it (23.02 and later);
    22.05's scontrol has no --json, its squeue has (every job, unfiltered)."""
    record = None
    for argv in ([slurm_tool("scontrol"), "--json", "show", "job", ctx.job_id],
                 [slurm_tool("squeue"), "--json"]):
        try:
            p = run(argv, timeout=60, check=False)
        except NodeFault as e:
            log.warning("the job's memory request: %s", e.line())
            continue
        record = job_record(ctx.job_id, p.stdout) if p.returncode == 0 else None
        if record is not None:
            break
    if record is None:
        # closed: a guest sized without the job's request could take more
        # than Slurm granted, and what the user names could be what makes
        # Slurm's answer unreadable
        raise UserError("guest memory", "Slurm gave no readable record of the job "
                        "(scontrol --json show job, squeue --json), so the job's memory "
                        "on this node is unknown", ctx.job_id,
                        hint="submit again; if it happens again, tell your admin that "
                        "Slurm's JSON output (squeue --json) fails on the node")
    return job_memory_of(record, ctx.cpus)


def guest_memory(ctx: Context) -> tuple[int, str, int | None]:
    """(MiB, where from, the job's MiB on the node or None): --charlie-mem,
    else the job's memory request minus vm.memory_overhead_mib, else
    vm.memory_mib."""
    cfg = ctx.cfg
    asked = job_memory(ctx)
    if ctx.opts.mem:
        return ctx.opts.mem, "--charlie-mem", asked
    if asked:
        return max(128, asked - cfg["vm.memory_overhead_mib"]), \
            f"the job's {asked} MiB minus vm.memory_overhead_mib", asked
    return cfg["vm.memory_mib"], "vm.memory_mib", None


def _node_memory_mib() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


def check_bounds(ctx: Context, mem: int, job_mib: int | None, tmp_mib: int) -> None:
    """The guest stays inside the job's allocation on this node: CPUs <= the
    job's CPUs here, memory + QEMU's share <= the job's memory here (or the
    node's memory when the job asked for none), tmp disk <= the site bound."""
    cfg = ctx.cfg
    cpus = ctx.opts.cpus or ctx.cpus
    if cpus > ctx.cpus:
        raise UserError("--charlie-cpus", f"{cpus} guest CPUs, but the job has "
                        f"{ctx.cpus} CPUs on {ctx.node}", cpus,
                        hint="ask Slurm for more (-c/--cpus-per-task, --ntasks-per-node) "
                        "or give a smaller --charlie-cpus")
    need = mem + cfg["vm.memory_overhead_mib"]
    have, what = (job_mib, "the job's memory") if job_mib else \
        (_node_memory_mib(), "the node's memory")
    if need > have:
        raise UserError("--charlie-mem" if ctx.opts.mem else "guest memory",
                        f"{mem} MiB guest memory + {cfg['vm.memory_overhead_mib']} MiB "
                        f"for QEMU exceed {what} on {ctx.node} ({have} MiB)", mem,
                        hint="ask Slurm for more memory (--mem) or give a smaller "
                        "--charlie-mem")
    limit = cfg["vm.disk_max_mib"]
    if limit and tmp_mib > limit:
        raise UserError("--charlie-tmp-size", f"{tmp_mib} MiB is more than this site "
                        f"allows ({limit} MiB, vm.disk_max_mib)", tmp_mib,
                        hint="give a smaller --charlie-tmp-size")


def check_disk_space(ctx: Context, tmp_mib: int, image_mib: int) -> None:
    """The guest's disks can grow to tmp + the image's virtual size: that
    must fit the site bound and the free space of the runtime root."""
    limit = ctx.cfg["vm.disk_max_mib"]
    total = tmp_mib + image_mib
    if limit and total > limit:
        raise UserError("vm disks", f"/ch/tmp ({tmp_mib} MiB) and the image's virtual "
                        f"size ({image_mib} MiB) exceed this site's bound "
                        f"({limit} MiB, vm.disk_max_mib)", ctx.opts.image,
                        hint="give a smaller --charlie-tmp-size or use a smaller image")
    fd = os.open(ctx.paths.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstatvfs(fd)
    finally:
        os.close(fd)
    free = st.f_bavail * st.f_frsize >> 20
    if total > free:
        raise UserError("vm disks", f"/ch/tmp ({tmp_mib} MiB) and the image's virtual "
                        f"size ({image_mib} MiB) could outgrow the {free} MiB free on "
                        f"{ctx.node}", ctx.opts.image,
                        hint="give a smaller --charlie-tmp-size, or ask the site for "
                        "nodes with more local disk")
