"""make test-trixie: boot the Debian 13 lane node (tests/trixie/build.sh)
under QEMU and run the lane inside it (tests/trixie/lane.py): Slurm 24.11,
cgroup v2 only, the project's sandbox with three slurmd.  Prints the
lane's own summary here on the host and exits with its result.

    python3 tests/trixie/run.py NODE_DIR [PYTEST ARGS ...]

The node's disk is used with -snapshot: the cached image never changes.
Software emulation (tcg): KVM hangs on these machines."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the whole lane, boot to power-off; a hung lane fails, it never blocks CI
TIMEOUT = int(os.environ.get("CHARLIE_TRIXIE_TIMEOUT", "1800"))


def summary(junit: str) -> tuple[dict[str, int], list[str]]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    if not os.path.exists(junit):
        return counts, failed
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def main(argv: list[str]) -> int:
    node_dir, pytest_args = os.path.abspath(argv[0]), argv[1:]
    out = tempfile.mkdtemp(prefix="charlie-trixie.")
    os.chmod(out, 0o755)
    if pytest_args:
        with open(os.path.join(out, "pytest-args"), "w") as f:
            f.write("\n".join(pytest_args) + "\n")
    with open(os.path.join(out, "budget"), "w") as f:
        f.write(f"{TIMEOUT}\n")  # lane.py interrupts its tests before it runs out
    console = os.path.join(out, "console.log")
    cmd = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
           "-no-reboot", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "6G",
           "-kernel", os.path.join(node_dir, "vmlinux"),
           "-initrd", os.path.join(node_dir, "initrd.img"),
           "-append", "root=/dev/vda rw console=ttyS0 init=/sbin/charlie-lane-init "
           "quiet panic=-1",
           "-drive", f"file={os.path.join(node_dir, 'node.qcow2')},format=qcow2,"
           "if=virtio,snapshot=on",
           "-virtfs", f"local,path={SRC},mount_tag=src,security_model=none,readonly=on",
           "-virtfs", f"local,path={out},mount_tag=out,security_model=none",
           "-serial", f"file:{console}"]
    t0 = time.monotonic()
    print(f"trixie lane: booting the Debian 13 node (tcg), results in {out}", flush=True)
    try:
        qemu = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
        qrc = qemu.returncode
    except subprocess.TimeoutExpired:
        qrc = "timeout"
    took = time.monotonic() - t0
    log = os.path.join(out, "lane.log")
    if os.path.exists(log):
        sys.stdout.write(open(log, errors="replace").read())
    try:
        rc = int(open(os.path.join(out, "lane.rc")).read())
    except (OSError, ValueError):
        rc = None
    counts, failed = summary(os.path.join(out, "junit.xml"))
    faillog = os.path.join(out, "failures.log")
    if rc is None and os.path.exists(faillog):
        # no summary from pytest: what each failed test reported as it failed
        print("trixie lane: the failures so far (failures.log):")
        print(open(faillog, errors="replace").read()[-30000:])
    lines = [f"trixie lane FAILED: {name}" for name in failed]
    for line in lines:
        print(line, flush=True)
    if rc is None:
        print(f"trixie lane: the node did not finish (QEMU: {qrc}); console tail:")
        print("".join(open(console, errors="replace").readlines()[-30:]))
    lines.append(f"trixie lane: {counts['passed']} passed, {counts['failed']} failed, "
                 f"{counts['skipped']} skipped in {took:.0f} s (rc={rc}; logs in {out})")
    print(lines[-1], flush=True)
    if os.environ.get("CHARLIE_TRIXIE_SUMMARY"):
        # make test repeats it after the host's suite, where CI's log ends
        with open(os.environ["CHARLIE_TRIXIE_SUMMARY"], "w") as f:
            f.write("\n".join(lines) + "\n")
    ok = rc == 0 and counts["passed"] > 0 and not counts["failed"]
    if ok and not os.environ.get("CHARLIE_TRIXIE_KEEP"):
        shutil.rmtree(out, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
