#!/usr/bin/env python3
"""Check slurm-charlie's GPU container path on a real GPU host, by hand.

Needs only the host's GPU driver: no Slurm, no vendor container tools, no
network, no root (run it as an ordinary user; it uses unprivileged user
namespaces, as jobs do).  From the kit this directory becomes
(`make gpu-host-kit`, docs/admin.rst "GPUs"), on the GPU host:

    python3 check.py            # Python 3.11 or later

It makes the CDI spec from the driver as `slurm-charlie gpu-spec` does,
builds a small image (busybox, glibc, ldconfig and a probe that loads
libcuda.so.1 by its soname and lists the devices CUDA shows), starts the
image the way a job's container starts (slurm-charlie's overlay script
and ch-run; the kit carries a ch-run when the host has none), and prints:

    PASS|FAIL spec: ...            the spec made from the driver
    PASS|FAIL devices: ...         the probe sees the driver's GPUs, by UUID
    PASS|FAIL library: ...         libcuda.so.1 came from the bound path
    PASS|FAIL without edits: ...   the same image without the edits sees none

and exits 0 when every line is PASS.  --table, --driver-root, --dev-dir
and --env point it at another driver (the sandbox's fake vendor: see
tests/cluster/test_gpu_jobs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile

KIT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(KIT, "python"))

from slurm_charlie import cdi, cdimount, gpus, gpuspec  # noqa: E402
from slurm_charlie.backends.container import OVERLAY_SCRIPT  # noqa: E402
from slurm_charlie.errors import CharlieError  # noqa: E402

PROBE = "/usr/bin/charlie-gpu-probe"


def build_image(path: str) -> None:
    """busybox, the probe and its libraries (the kit's image/ tree),
    glibc's ldconfig, and the files ch-run binds over."""
    shutil.copytree(os.path.join(KIT, "image"), path, symlinks=True)
    bb = os.path.join(path, "bin", "busybox")
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if not os.path.lexists(os.path.join(path, "bin", a)):
            os.symlink("busybox", os.path.join(path, "bin", a))
    for d in ("dev", "proc", "sys", "tmp", "home", "mnt", "etc"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    for f in ("passwd", "group", "hosts", "resolv.conf"):
        open(os.path.join(path, "etc", f), "a").close()


def ch_run(kits: bool = False) -> list[str]:
    """The host's ch-run, else (or with kits) the kit's through the kit's
    loader."""
    found = shutil.which("ch-run")
    if found and not kits:
        return [found]
    lib = os.path.join(KIT, "ch-run", "lib")
    return [os.path.join(lib, "ld-linux-x86-64.so.2"), "--library-path", lib,
            os.path.join(KIT, "ch-run", "ch-run")]


def run_probe(work: str, image: str, plan: cdimount.Plan, env: dict[str, str],
              name: str, kits: bool) -> subprocess.CompletedProcess:
    o = os.path.join(work, f"overlay-{name}")
    command = (f"{PROBE}; echo probe-exit=$?; "
               "grep -F ' - ' /proc/self/mountinfo | grep -F libcuda || true")
    argv = ["unshare", "--user", "--map-root-user", "--mount", "/bin/sh", "-c",
            OVERLAY_SCRIPT, "sh", o, image, "", plan.text(), "--",
            *ch_run(kits), f"--uid={os.getuid()}", f"--gid={os.getgid()}",
            os.path.join(o, "merged"), "--", "/bin/sh", "-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                               "USER": pwd.getpwuid(os.getuid()).pw_name,
                               "HOME": os.environ.get("HOME", "/"), **env},
                          stdin=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default="/proc/driver/nvidia/gpus",
                    help="the driver's table of GPUs")
    ap.add_argument("--driver-root", default="/", help="where the driver's files are")
    ap.add_argument("--dev-dir", default="/dev", help="where the GPUs' device nodes are "
                    "(nvidiaMINOR)")
    ap.add_argument("--kind", default="nvidia.com/gpu")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a variable the spec gives (the fake vendor's device table)")
    ap.add_argument("--kit-ch-run", action="store_true", help="use the kit's ch-run even "
                    "where the host has one")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    results: list[tuple[bool, str]] = []

    def say(ok: bool, what: str) -> None:
        results.append((ok, what))
        print(("PASS " if ok else "FAIL ") + what, flush=True)

    try:
        table = gpus.read_table(args.table)
        devices = [(uuid, os.path.join(args.dev_dir, f"nvidia{minor}"))
                   for minor, (uuid, _) in sorted(table.items())]
        if not devices:
            raise CharlieError(args.table, "no GPU in the driver's table")
        spec, skipped = gpuspec.generate(args.kind, devices, args.driver_root, args.table,
                                         tuple(args.env))
        path = "<generated>"
        parsed = cdi.parse(json.dumps(spec), path)
        edits = parsed.edits
        for uuid, _ in devices:
            edits = edits + parsed.devices[uuid]
        cdi.check_sources(edits, path)
        plan = cdimount.plan(edits, path)
    except CharlieError as e:
        say(False, f"spec: {e.line()}" + (f" (hint: {e.hint})" if e.hint else ""))
        return 1
    mounts = spec["containerEdits"]["mounts"]
    say(True, f"spec: {len(devices)} GPU(s), driver {gpuspec.driver_version(args.table)}, "
        f"{len(mounts)} mount(s)" + (f", left out: {'; '.join(skipped)}" if skipped else ""))
    cuda = next(m["containerPath"] for m in mounts
                if os.path.basename(m["containerPath"]).startswith("libcuda.so"))
    want_lib = os.path.join(os.path.dirname(cuda), "libcuda.so.1")
    work = tempfile.mkdtemp(prefix="charlie-gpu-check.")
    try:
        image = os.path.join(work, "image")
        build_image(image)
        env = dict(item.split("=", 1) for item in edits.env)
        p = run_probe(work, image, plan, env, "with", args.kit_ch_run)
        seen = re.findall(r"\(UUID: (GPU-[0-9a-f-]+)\)", p.stdout)
        want = sorted(u for u, _ in devices)
        say(sorted(seen) == want and "probe-exit=0" in p.stdout,
            f"devices: the probe sees {', '.join(seen) or 'none'}; the driver has "
            f"{', '.join(want)}" + ("" if "probe-exit=0" in p.stdout else
                                   f" [{(p.stderr.strip() or p.stdout.strip())[-300:]}]"))
        lib = (re.findall(r"^library (\S+)", p.stdout, re.M) or ["none"])[0]
        bound = any(line.split()[4] == cuda for line in p.stdout.splitlines()
                    if " - " in line and len(line.split()) > 5)
        say(lib == want_lib and bound,
            f"library: loaded {lib} (want {want_lib}); {cuda} is "
            + ("a bind mount from the host" if bound else "not bound"))
        p = run_probe(work, image, cdimount.Plan(), {}, "without", args.kit_ch_run)
        say("probe-exit=1" in p.stdout and "cannot load libcuda.so.1" in p.stderr,
            "without edits: " + ("no libcuda.so.1, no device" if "cannot load" in p.stderr
                                 else f"the probe said {p.stdout.strip()[-200:]!r}"))
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            subprocess.run(["rm", "-rf", work], check=False)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
