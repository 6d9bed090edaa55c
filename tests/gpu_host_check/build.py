#!/usr/bin/env python3
"""Build the real-GPU-host check kit (`make gpu-host-kit`): a directory to
copy onto a GPU host and run check.py there (see its docstring).

    OUT/check.py
    OUT/python/slurm_charlie/     the product's Python code (no guest files)
    OUT/image/                    busybox, the probe, its glibc, ldconfig
    OUT/ch-run/                   this machine's ch-run and its libraries,
                                  for hosts without one

Usage: build.py OUT
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))


def closure(binary: str) -> list[str]:
    """The shared libraries (and the loader) binary needs, by ldd."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if lib.startswith("/"):
            libs.append(lib)
    return libs


def build(out: str) -> int:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    shutil.copy(os.path.join(HERE, "check.py"), out)
    shutil.copytree(os.path.join(TOP, "slurm_charlie"), os.path.join(out, "python",
                                                                     "slurm_charlie"),
                    ignore=shutil.ignore_patterns("__pycache__", "guest", "*.pyc"))
    image = os.path.join(out, "image")
    for d in ("bin", "sbin", "usr/bin", "etc"):
        os.makedirs(os.path.join(image, d))
    shutil.copy("/bin/busybox", os.path.join(image, "bin", "busybox"))
    shutil.copy("/sbin/ldconfig", os.path.join(image, "sbin", "ldconfig"))
    probe = os.path.join(image, "usr/bin/charlie-gpu-probe")
    subprocess.run(["cc", "-O2", "-o", probe, os.path.join(TOP, "slurm_charlie", "fakegpu",
                                                           "probe.c"), "-ldl"], check=True)
    for lib in closure(probe):
        dst = image + lib
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(lib, dst)
    with open(os.path.join(image, "etc", "ld.so.conf"), "w") as f:
        f.write("/usr/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n")
    chrun = shutil.which("ch-run")
    if chrun:
        lib = os.path.join(out, "ch-run", "lib")
        os.makedirs(lib)
        shutil.copy(chrun, os.path.join(out, "ch-run", "ch-run"))
        for so in closure(chrun):
            shutil.copy(so, os.path.join(lib, os.path.basename(so)))
    subprocess.run(["chmod", "-R", "a+rX,go-w", out], check=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
               if not os.path.islink(os.path.join(d, f)))
    print(f"{out}: {size / 2**20:.1f} MiB; copy it to a GPU host and run python3 check.py")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(build(sys.argv[1]))
