"""A charlie job's line in Slurm's accounting: the AdminComment of the job
says that it was one, its type, its image and the image's digest, so
`sacct -o AdminComment` (and `slurm-charlie jobs`) show them after the job.

The prolog of the job's first node (guest 0) writes it as root, once per
job, after the image has been resolved and checked (asroot.note_job), so it
records what the node runs, not what the submitter claimed.  Users cannot
set AdminComment (Slurm refuses it to everyone but its admins).  Text other
tools put there is kept: ours is one `charlie(...)` part, replaced when the
prolog runs again and appended otherwise.  Pure text work here.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

from . import images, options

#: what a value may hold unquoted; everything else is %XX (spaces, |, ;, ())
_SAFE = "/:@._-+=,~"
_PART_RE = re.compile(r"charlie\(type=(\S+) image=(\S+) digest=(\S+)\)")
#: longest AdminComment we write (Slurm keeps it in a TEXT column)
MAX_LEN = 4000
#: longest image we record, quoted (a path may be 4096 bytes, quoted thrice that)
MAX_IMAGE = 1024


@dataclasses.dataclass(frozen=True)
class Entry:
    type: str
    image: str
    digest: str


def entry(opts: options.Options) -> Entry:
    """What to record for the options the prolog resolved."""
    image = opts.image or "none"
    digest = "none"
    if images.is_registry_ref(opts.image) and "@sha256:" in image:
        digest = "sha256:" + image.rsplit("@sha256:", 1)[1]
    elif opts.image_digest:
        digest = "sha256:" + options.parse_image_digest(opts.image_digest)[0]
    return Entry(opts.type, image, digest)


def part(e: Entry) -> str:
    q = lambda s: urllib.parse.quote(s, safe=_SAFE) or "none"  # noqa: E731
    image = q(e.image)
    if len(image) > MAX_IMAGE:  # cut where no %XX is split; the end says so
        cut = image[:MAX_IMAGE - 3]
        cut = cut[:cut.rfind("%")] if "%" in cut[-2:] else cut
        image = cut + "..."
    return f"charlie(type={q(e.type)} image={image} digest={q(e.digest)})"


def merge(existing: str | None, e: Entry) -> str:
    """existing AdminComment + our part (an earlier one of ours replaced)."""
    ours = part(e)
    kept = _PART_RE.sub("", existing or "").strip().strip(";").strip()
    text = f"{kept}; {ours}" if kept else ours
    if len(text) > MAX_LEN:  # another tool's text is long: keep ours whole
        text = kept[:MAX_LEN - len(ours) - 5] + "…; " + ours
    return text


def parse(admin_comment: str | None) -> Entry | None:
    """Our part of an AdminComment, or None for a job that was not ours."""
    m = _PART_RE.search(admin_comment or "")
    if not m:
        return None
    u = urllib.parse.unquote
    return Entry(u(m.group(1)), u(m.group(2)), u(m.group(3)))


SACCT_FIELDS = ("JobID", "User", "State", "Start", "End", "NNodes", "AdminComment")


def sacct_argv(since: str, all_users: bool, job_ids: list[str]) -> list[str]:
    from .proc import slurm_tool
    argv = [slurm_tool("sacct"), "-X", "-n", "-P", "--format=" + ",".join(SACCT_FIELDS)]
    if job_ids:
        argv += ["-j", ",".join(job_ids)]
    else:
        argv += ["-S", since]
    if all_users:
        argv.append("--allusers")
    return argv


def rows(sacct_out: str) -> list[dict[str, str]]:
    """sacct -P lines -> charlie jobs only, with type, image and digest."""
    out = []
    n = len(SACCT_FIELDS)
    for line in sacct_out.splitlines():
        fields = line.split("|", n - 1)  # AdminComment last: it may hold '|'
        if len(fields) != n:
            continue
        row = dict(zip(SACCT_FIELDS, fields))
        e = parse(row["AdminComment"])
        if e is None:
            continue
        row.update(type=e.type, image=e.image, digest=e.digest)
        out.append(row)
    return out


def format_rows(found: list[dict[str, str]]) -> str:
    cols = [("JOBID", "JobID"), ("USER", "User"), ("STATE", "State"), ("START", "Start"),
            ("NODES", "NNodes"), ("TYPE", "type"), ("DIGEST", "digest"), ("IMAGE", "image")]
    short = lambda c, v: v[:19] if c == "digest" and v.startswith("sha256:") else v  # noqa: E731
    table = [[h for h, _ in cols]] + [[short(k, r[k]) for _, k in cols] for r in found]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1]
                     for r in table) + "\n"


def jobs_main(since: str, all_users: bool, job_ids: list[str], as_json: bool) -> int:
    import json
    import sys
    from .errors import UserError
    from .proc import run
    for j in job_ids:
        if not re.fullmatch(r"[0-9]+(_[0-9]+)?(\+[0-9]+)?", j):
            raise UserError("jobs", "not a job id", repr(j), hint="give numbers, e.g. 1234")
    p = run(sacct_argv(since, all_users, job_ids), timeout=120, check=False)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        raise UserError("sacct", "failed", err.splitlines()[-1] if err else None,
                        hint="slurm-charlie jobs reads Slurm's accounting: the site "
                        "needs slurmdbd (AccountingStorageType=accounting_storage/slurmdbd)")
    found = rows(p.stdout.decode(errors="replace"))
    if as_json:
        json.dump([{k.lower(): v for k, v in r.items() if k != "AdminComment"}
                   for r in found], sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif found:
        sys.stdout.write(format_rows(found))
    else:
        print("no charlie jobs" + ("" if job_ids else f" since {since}"), file=sys.stderr)
    return 0
