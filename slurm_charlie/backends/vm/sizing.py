"""How big the guest may be: its memory from the job's allocation (or
--charlie-mem), and the bounds it must stay in (CPUs, memory, disks)."""

from __future__ import annotations

import os

from ...errors import NodeFault, UserError
from ...options import parse_size_mib
from ...proc import run, slurm_tool
from ..base import Context


def parse_job_memory(scontrol_line: str, cpus: int) -> int | None:
    """MiB per node the job asked for, from `scontrol -o show job`
    (MinMemoryNode, or MinMemoryCPU x this node's CPUs); None when not set.
    Sizes are read by the same parser as the options' (options.parse_size_mib)."""
    fields = dict(kv.split("=", 1) for kv in scontrol_line.split() if "=" in kv)
    for key, factor in (("MinMemoryNode", 1), ("MinMemoryCPU", cpus)):
        value = fields.get(key, "")
        if not value:
            continue
        try:
            return parse_size_mib(key, value) * factor
        except UserError:  # 0 (not set) or something Slurm did not mean as a size
            continue
    return None


def job_memory(ctx: Context) -> int | None:
    """MiB the job has on this node (its --mem/--mem-per-cpu), None when it
    asked for none."""
    try:
        p = run([slurm_tool("scontrol"), "-o", "show", "job", ctx.job_id], timeout=30, check=False)
    except NodeFault:
        return None
    return parse_job_memory(p.stdout.decode(errors="replace"), ctx.cpus) \
        if p.returncode == 0 else None


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
