"""The sandbox as the cluster, adversarial and VM suites (and the churn and
benchmark scripts) drive it: real slurmctld, slurmd x3, munge, the shim and
the hooks.  If the sandbox is not up this is a failure, not a skip: `make
test` brings it up first."""

import os
import re
import shutil
import subprocess
import time

import pytest

from slurm_charlie import sandbox as sbmod

USER = sbmod.USER

#: prepended to the user's own programs (``python -c``) in the adversarial
#: tests: cmdlines() yields (pid, argv) of the processes on the machine,
#: from /proc, skipping the pids in ``skip`` and those gone meanwhile
PROC_CMDLINES = r"""
import os
def cmdlines(skip=()):
    for d in os.listdir("/proc"):
        if not d.isdigit() or d in skip:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        yield d, cmd
"""


class Cluster:
    def __init__(self, sb: sbmod.Sandbox) -> None:
        self.sb = sb
        self.env = {**os.environ, **sb.env()}
        self.home = os.path.expanduser(f"~{USER}")

    # -- running things -------------------------------------------------------
    def run(self, argv, check=False, **kw):
        kw.setdefault("env", self.env)
        return subprocess.run(argv, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=check, **kw)

    def as_user(self, argv, cwd, env=None, timeout=120):
        """Run argv as the sandbox user in cwd with SLURM_CONF set."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        cmd = ["runuser", "-u", USER, "--", "env", f"SLURM_CONF={self.sb.conf}",
               f"HOME={self.home}", "PATH=/usr/local/bin:/usr/bin:/bin", *extra,
               "sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def workdir(self, name: str) -> str:
        path = os.path.join(self.home, "charlie-tests", name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        for p in (os.path.dirname(path), path):
            shutil.chown(p, USER, USER)
        return path

    def write(self, path: str, text: str, mode: int = 0o755) -> str:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        shutil.chown(path, USER, USER)
        return path

    def sbatch(self, cwd, args, env=None, timeout=120):
        """Submit as the user and wait until the job has ended, its epilogs
        too; returns (proc, jobid or None), proc.returncode being what
        `sbatch --wait` gives: the job's exit status, 1 when a signal ended
        it (sbatch.c, _job_wait).  Not `sbatch --wait` itself: it looks after
        2, 10, 42, 74 s (its sleep grows 4x while under MinJobAge/2), so a
        VM job of 12 s cost a test 42 s; this looks every 0.2 s."""
        p = self.as_user(["sbatch", "--no-requeue", *args], cwd, env, 60)
        m = re.search(r"Submitted batch job (\d+)", p.stdout)
        if p.returncode != 0 or not m:
            return p, (m.group(1) if m else None)
        info = self.wait_done(m.group(1), timeout)
        status, signal = (int(x) for x in info["ExitCode"].split(":"))
        p.returncode = 1 if signal else status
        return p, m.group(1)

    def job(self, jobid: str) -> dict:
        out = self.run(["scontrol", "-o", "show", "job", jobid]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_done(self, jobid: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(jobid)
            if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING",
                                            "COMPLETING", None):
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {jobid} not done after {timeout} s: {self.job(jobid)}")

    def admin_comment(self, jobid: str, timeout: float = 30) -> str:
        """The job's AdminComment as slurmdbd has it, once the job's end is
        there (slurmctld sends its records to slurmdbd in the background)."""
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            last = self.run(["sacct", "-X", "-n", "-P", "-j", jobid,
                             "-o", "State,AdminComment"]).stdout.strip()
            state = last.split("|", 1)[0]
            if state and state not in ("PENDING", "RUNNING") and "|" in last:
                return last.split("|", 1)[1]
            time.sleep(0.3)
        raise AssertionError(f"job {jobid} not ended in sacct after {timeout} s: {last!r}")

    def wait_nodes_idle(self, timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            states = self.sb.node_states()
            if all(s == "idle" for s in states.values()):
                return states
            time.sleep(0.2)
        # still not idle: a drained node's reason goes into the test's message
        return self.sb.node_states(reasons=True)

    def resume_until_stable(self, node: str, quiet: float = 3, timeout: float = 90) -> None:
        """Resume node and keep it resumed.  After a failed prolog, slurmd
        also reports the failure when it next registers and slurmctld then
        drains the node again ("Prolog error"); that can come after a quick
        resume, so resume until the node has stayed up for `quiet` seconds."""
        end = time.monotonic() + timeout
        up_since = None
        while time.monotonic() < end:
            state = self.sb.node_states().get(node, "")
            if "drain" in state or "down" in state:
                self.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"])
                up_since = None
            elif up_since is None:
                up_since = time.monotonic()
            elif time.monotonic() - up_since >= quiet:
                return
            time.sleep(0.3)
        raise AssertionError(f"{node} does not stay in service: {self.sb.node_states()}")

    def job_dirs(self) -> list[str]:
        root = os.path.join(self.sb.state, "runtime")
        return [os.path.join(root, n, j) for n in os.listdir(root)
                if os.path.isdir(os.path.join(root, n))
                for j in os.listdir(os.path.join(root, n)) if j.isdigit()]

    def user_processes(self, timeout: float = 10) -> list[str]:
        """Processes of the sandbox user still there after timeout seconds
        (tasks that are exiting get that long to go)."""
        uid = int(self.run(["id", "-u", USER]).stdout)
        end = time.monotonic() + timeout
        while True:
            out = []
            for d in os.listdir("/proc"):
                try:
                    if d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid:
                        cmd = open(f"/proc/{d}/cmdline").read().replace("\0", " ")
                        state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
                        if state != "Z":  # nothing reaps orphans here: see docs/sandbox.rst
                            out.append(f"{d} [{state}] {cmd}")
                except OSError:
                    pass
            if not out or time.monotonic() > end:
                return out
            time.sleep(0.2)


def holder_job(cluster: "Cluster", wd: str, img: str, *args: str,
               task: str = "echo inside $(cat /MARKER)") -> tuple[str, str]:
    """A one-node job on node1 with img (and args) whose task must run in
    the image; (job id, node1's slurm-charlie log once the job has ended)."""
    p, jobid = cluster.sbatch(wd, ["-N1", "-w", "node1", f"--charlie-image={img}", *args,
                                   "-o", "out", "--wrap", f"srun sh -c '{task}'"])
    out = open(os.path.join(wd, "out")).read()
    assert p.returncode == 0 and "inside inside-the-image" in out, out
    cluster.wait_done(jobid)
    with open(os.path.join(cluster.sb.state, "log", "charlie-node1.log")) as f:
        return jobid, f.read()


def holder_sh_image(path: str, command: str, owner: str = USER,
                    mount_points: bool = True) -> str:
    """A busybox image whose /bin/sh (its author's) starts command in the
    background when it is the holder's shell; a task's shell does not (a
    task is in Slurm's step, which Slurm ends itself)."""
    img = build_busybox_image(path, mount_points=mount_points, owner=owner)
    sh = os.path.join(img, "bin", "sh")
    os.unlink(sh)
    with open(sh, "w") as f:
        f.write('#!/bin/busybox sh\ncase "$2" in *.holder*)\n'
                f"{command} </dev/null >/dev/null 2>&1 &;;\nesac\n"
                'exec /bin/busybox sh "$@"\n')
    os.chmod(sh, 0o755)
    shutil.chown(sh, owner, owner)
    return img


def build_busybox_image(path: str, mount_points: bool = True, shell: bool = True,
                        owner: str | None = None) -> str:
    """A minimal Charliecloud image directory: static busybox, the files
    ch-run needs, a /MARKER file, and (optionally) /ch/meta, /ch/data1-4."""
    shutil.rmtree(path, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "tmp", "home", "etc", "mnt", "usr/bin"):
        os.makedirs(os.path.join(path, d))
    if mount_points:
        for d in ("meta", "data1", "data2", "data3", "data4"):
            os.makedirs(os.path.join(path, "ch", d))
    shutil.copy("/bin/busybox", os.path.join(path, "bin", "busybox"))
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True,
                             text=True, check=True).stdout.split()
    for a in applets:
        if a == "sh" and not shell:
            continue
        link = os.path.join(path, "bin", a)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    for f in ("passwd", "group", "hosts", "resolv.conf"):
        open(os.path.join(path, "etc", f), "w").close()
    with open(os.path.join(path, "MARKER"), "w") as f:
        f.write("inside-the-image\n")
    subprocess.run(["chmod", "-R", "a+rX,go-w", path], check=True)
    if owner:
        subprocess.run(["chown", "-R", f"{owner}:", path], check=True)
    return path


SRC = os.path.join(os.path.dirname(__file__), "src")


def _copy_closure(binary: str, image: str) -> None:
    """Copy binary's shared libraries (and the loader) into image, same paths."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if lib.startswith("/"):
            dst = image + lib
            if not os.path.exists(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy(lib, dst)


def build_mpi_image(path: str) -> str:
    """busybox image plus MPICH programs (/usr/bin/mpi_allreduce,
    /usr/bin/pingpong), a cross-memory-attach probe (/usr/bin/cma) and their
    library closure,
    UCX's transport modules included (they are dlopen'ed, ldd does not see
    them)."""
    build_busybox_image(path)
    bindir = os.path.join(path, "usr", "bin")
    subprocess.run(["mpicc.mpich", "-O2", "-o", os.path.join(bindir, "mpi_allreduce"),
                    os.path.join(SRC, "mpi_allreduce.c")], check=True)
    subprocess.run(["mpicc.mpich", "-O2", "-o", os.path.join(bindir, "pingpong"),
                    os.path.join(SRC, "pingpong.c")], check=True)
    subprocess.run(["gcc", "-O2", "-o", os.path.join(bindir, "cma"),
                    os.path.join(SRC, "cma.c")], check=True)
    for prog in ("mpi_allreduce", "pingpong", "cma"):
        _copy_closure(os.path.join(bindir, prog), path)
    ucx = "/usr/lib/x86_64-linux-gnu/ucx"
    if os.path.isdir(ucx):
        shutil.copytree(ucx, path + ucx, symlinks=True, dirs_exist_ok=True)
        for mod in os.listdir(ucx):
            if mod.endswith(".so.0"):
                _copy_closure(os.path.join(ucx, mod), path)
    subprocess.run(["chmod", "-R", "a+rX,go-w", path], check=True)
    return path


def build_gpu_image(path: str, probe: str, ldconfig: bool = True) -> str:
    """busybox image with what a CUDA program needs from an image: glibc
    (the probe's library closure, probe itself left out: a GPU job gets it
    from the vendor's spec as /usr/bin/nvidia-smi) and, unless told not
    to, glibc's ldconfig with /etc/ld.so.conf naming the library folder."""
    build_busybox_image(path)
    _copy_closure(probe, path)
    if ldconfig:
        os.makedirs(os.path.join(path, "sbin"), exist_ok=True)
        shutil.copy("/sbin/ldconfig", os.path.join(path, "sbin", "ldconfig"))
        with open(os.path.join(path, "etc", "ld.so.conf"), "w") as f:
            f.write("/usr/lib/x86_64-linux-gnu\n")
    subprocess.run(["chmod", "-R", "a+rX,go-w", path], check=True)
    return path


def private_conf(cluster: Cluster, wd: str, validator_lines: list[str]) -> str:
    """The user's own SLURM_CONF with the real shim but a validator of their
    own, which hands slurmctld and the prolog whatever it likes."""
    fake = cluster.write(os.path.join(wd, "validator"), "#!/bin/sh\n" + "".join(
        f"echo '{line}'\n" for line in validator_lines))
    plug = open(os.path.join(cluster.sb.state, "etc", "plugstack.conf")).read()
    plug = re.sub(r"bin=\S+", f"bin={fake}", plug)
    cluster.write(os.path.join(wd, "plugstack.conf"), plug, 0o644)
    conf = open(cluster.sb.conf).read()
    conf = re.sub(r"(?m)^PlugStackConfig=.*$",
                  f"PlugStackConfig={wd}/plugstack.conf", conf)
    return cluster.write(os.path.join(wd, "slurm.conf"), conf, 0o644)


def make_cluster() -> Cluster:
    sb = sbmod.Sandbox()
    if not os.path.exists(sb.conf) or sb.status() != 0:
        pytest.fail("the sandbox is not up: run `make test` (or "
                    "`slurm-charlie sandbox up`) first", pytrace=False)
    c = Cluster(sb)
    for node, state in sb.node_states().items():
        if "drain" in state or "down" in state:  # left by an aborted run
            c.resume_until_stable(node)
    c.wait_nodes_idle()
    return c
