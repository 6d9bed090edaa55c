"""Every way into Slurm (docs/portals.rst): sbatch, salloc and srun with the
shim; a host without it; the REST API through the sandbox's slurmrestd
(JWT); an Open OnDemand-style submission; and the accounting record each
charlie job leaves in slurmdbd (MariaDB).  Runs on Slurm 22.05 here and on
24.11 in the Debian 13 lane, where the REST API carries spank_environment.
scrontab is tested in the lane (tests/trixie/test_scrontab.py): Debian 12's
slurm-client has no scrontab."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from helpers.cluster import USER, build_busybox_image
from slurm_charlie import sandbox as sbmod

REST_SPANK = sbmod.slurm_version() >= (23, 2)
UID = pwd.getpwnam(USER).pw_uid


# -- helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(cluster):
    wd = cluster.workdir("paths-image")
    return build_busybox_image(os.path.join(wd, "img"), owner=USER)


@pytest.fixture(scope="module")
def busybox_ref(cluster):
    """The sandbox registry's busybox image, pushed if it is not there yet
    (`make sandbox-up` seeds it; the Debian 13 lane does not)."""
    from helpers.registry import seed
    from slurm_charlie.sandbox import REGISTRY
    cache = os.path.join(os.path.dirname(cluster.sb.guest_dir), "images")
    seed(REGISTRY, cache, os.path.join(cluster.sb.guest_dir, "debian.sqfs"), ("busybox",))
    return f"docker://{REGISTRY}/charlie/busybox:latest"


@pytest.fixture(scope="module")
def noshim(cluster):
    """A login host without slurm-charlie: the user's SLURM_CONF names an
    empty plugstack.conf (the gate in slurmctld is the same)."""
    wd = cluster.workdir("paths-noshim")
    cluster.write(os.path.join(wd, "plugstack.conf"), "# no slurm-charlie here\n", 0o644)
    conf = re.sub(r"(?m)^PlugStackConfig=.*$", f"PlugStackConfig={wd}/plugstack.conf",
                  open(cluster.sb.conf).read())
    return cluster.write(os.path.join(wd, "slurm.conf"), conf, 0o644)


class Rest:
    """The sandbox's slurmrestd as the sandbox user, with a JWT from
    `scontrol token`."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.url = cluster.sb.env()["CHARLIE_SANDBOX_REST"]
        p = cluster.as_user(["scontrol", "token", "lifespan=900"], "/")
        assert p.returncode == 0, p.stderr
        self.token = p.stdout.strip().split("=", 1)[1]
        self.version = "v0.0.42" if REST_SPANK else "v0.0.38"

    def submit(self, wd: str, script: str, env: dict[str, str] | None = None,
               **job) -> tuple[int, dict]:
        env = {"PATH": "/usr/bin:/bin", "HOME": wd, **(env or {})}
        desc = {"name": "rest", "current_working_directory": wd,
                "standard_output": os.path.join(wd, "out"),
                "standard_error": os.path.join(wd, "out"), **job}
        if REST_SPANK:
            body = {"job": {**desc, "script": script,
                            "environment": [f"{k}={v}" for k, v in env.items()]}}
        else:
            body = {"job": {**desc, "environment": env}, "script": script}
        req = urllib.request.Request(
            f"{self.url}/slurm/{self.version}/job/submit", data=json.dumps(body).encode(),
            headers={"X-SLURM-USER-NAME": USER, "X-SLURM-USER-TOKEN": self.token,
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def rest(cluster):
    return Rest(cluster)


def _ctld_log_since(cluster, offset: int) -> str:
    with open(os.path.join(cluster.sb.state, "log", "slurmctld.log"), errors="replace") as f:
        f.seek(offset)
        return f.read()


def _ctld_log_size(cluster) -> int:
    return os.path.getsize(os.path.join(cluster.sb.state, "log", "slurmctld.log"))


def _job_ids(text: str) -> list[str]:
    return re.findall(r"(?:Submitted batch job|Granted job allocation|job) (\d+)", text)


# -- accounting ------------------------------------------------------------------
def test_charlie_jobs_show_in_accounting_with_type_image_and_digest(cluster, image,
                                                                   busybox_ref):
    """sbatch (a registry image, pinned at submit), salloc + srun (a
    directory image), srun alone (type none) and an archive: after each has
    ended, sacct's AdminComment says charlie, the type, the image and its
    digest; a plain job has none; `slurm-charlie jobs` lists them."""
    from slurm_charlie.sandbox import REGISTRY
    wd = cluster.workdir("paths-acct")
    tar = os.path.join(wd, "img.tar")
    subprocess.run(["tar", "-C", image, "-cf", tar, "."], check=True)
    shutil.chown(tar, USER, USER)
    tar_sha = hashlib.sha256(open(tar, "rb").read()).hexdigest()
    p, sb_job = cluster.sbatch(wd, ["-N2", f"--charlie-image={busybox_ref}", "-o", "out",
                                    "--wrap", "srun cat /MARKER"])
    assert p.returncode == 0, (p.stderr, open(os.path.join(wd, "out")).read())
    runs = {}
    for name, argv in (
            ("salloc", ["salloc", "-N1", f"--charlie-image={image}", "srun", "cat", "/MARKER"]),
            ("srun", ["srun", "-N1", "--charlie-type=none", "true"]),
            ("tar", ["srun", "-N1", f"--charlie-image={tar}", "cat", "/MARKER"]),
            ("plain", ["srun", "-N1", "true"])):
        q = cluster.as_user(argv, wd)
        assert q.returncode == 0, (argv, q.stderr)
        jid = re.findall(r"job (\d+)", q.stderr) or []
        if not jid:  # srun prints no id: the user's newest job
            jid = [cluster.run(["squeue", "-h", "-t", "all", "-u", USER, "-o", "%i",
                                "--sort=-i"]).stdout.split()[0]]
        runs[name] = jid[0]
    rec = cluster.admin_comment(sb_job)
    m = re.fullmatch(r"charlie\(type=container image=docker://"
                     + re.escape(REGISTRY) + r"/charlie/busybox@sha256:([0-9a-f]{64}) "
                     r"digest=sha256:([0-9a-f]{64})\)", rec)
    assert m and m.group(1) == m.group(2), rec
    # written once, by the first node, for a two-node job
    assert rec.count("charlie(") == 1
    assert cluster.admin_comment(runs["salloc"]) == \
        f"charlie(type=container image={image} digest=none)"
    assert cluster.admin_comment(runs["srun"]) == "charlie(type=none image=none digest=none)"
    assert cluster.admin_comment(runs["tar"]) == \
        f"charlie(type=container image={tar} digest=sha256:{tar_sha})"
    assert cluster.admin_comment(runs["plain"]) == ""
    ids = [sb_job, runs["salloc"], runs["srun"], runs["tar"], runs["plain"]]
    q = cluster.as_user([cluster.sb.charlie_bin(), "jobs", "--json",
                         *[a for j in ids for a in ("-j", j)]], wd)
    assert q.returncode == 0, q.stderr
    listed = {r["jobid"]: r for r in json.loads(q.stdout)}
    assert set(listed) == set(ids) - {runs["plain"]}, listed
    assert listed[runs["tar"]]["digest"] == f"sha256:{tar_sha}"
    assert listed[sb_job]["type"] == "container" and listed[sb_job]["user"] == USER
    table = cluster.as_user([cluster.sb.charlie_bin(), "jobs", "-j", runs["salloc"]], wd)
    assert table.stdout.splitlines()[1].split()[-1] == image, table.stdout


def test_accounting_keeps_what_an_admin_wrote(cluster, image):
    """The site's own AdminComment stays; ours is added after it."""
    wd = cluster.workdir("paths-admin")
    p = cluster.as_user(["sbatch", "-H", "-N1", f"--charlie-image={image}", "-o", "out",
                         "--wrap", "cat /MARKER"], wd)
    jobid = re.search(r"Submitted batch job (\d+)", p.stdout).group(1)
    assert cluster.run(["scontrol", "update", f"JobId={jobid}",
                        "AdminComment=site: project 42 | billing"]).returncode == 0
    assert cluster.run(["scontrol", "release", jobid]).returncode == 0
    cluster.wait_done(jobid)
    assert cluster.admin_comment(jobid) == \
        f"site: project 42 | billing; charlie(type=container image={image} digest=none)"


def test_a_user_cannot_set_or_overwrite_the_record(cluster, image, rest):
    """AdminComment is Slurm's admins' alone: scontrol and the REST API
    refuse it to the user, and text the user can set (Comment) is not read
    as a record."""
    wd = cluster.workdir("paths-forge")
    p = cluster.as_user(["sbatch", "-N1", f"--charlie-image={image}", "-o", "out",
                         "--comment=charlie(type=vm image=/evil digest=none)", "--wrap",
                         "i=0; while [ ! -e go ] && [ $i -lt 300 ]; do sleep 0.1; "
                         "i=$((i+1)); done"], wd)
    jobid = re.search(r"Submitted batch job (\d+)", p.stdout).group(1)
    genuine = f"charlie(type=container image={image} digest=none)"
    end = time.monotonic() + 30
    while cluster.job(jobid).get("AdminComment") != genuine and time.monotonic() < end:
        time.sleep(0.2)
    try:
        q = cluster.as_user(["scontrol", "update", f"JobId={jobid}",
                             "AdminComment=charlie(type=vm image=/evil digest=none)"], wd)
        assert q.returncode != 0 and "denied" in q.stderr.lower(), q.stderr
        status, body = rest.submit(wd, "#!/bin/sh\ntrue\n",
                                   admin_comment="charlie(type=vm image=/evil digest=none)")
        assert body.get("errors") and not body.get("job_id"), (status, body)
    finally:
        cluster.write(os.path.join(wd, "go"), "")
    cluster.wait_done(jobid)
    assert cluster.admin_comment(jobid) == genuine
    # a plain job with a forged Comment is no charlie job to `jobs`
    p, plain = cluster.sbatch(wd, ["-N1", "-o", "/dev/null", "--comment",
                                   "charlie(type=vm image=/evil digest=none)", "--wrap", "true"])
    cluster.admin_comment(plain)
    q = cluster.as_user([cluster.sb.charlie_bin(), "jobs", "--json", "-j", plain], wd)
    assert json.loads(q.stdout) == [], q.stdout


# -- the gate and the task start --------------------------------------------------
def test_a_host_without_the_shim_cannot_start_a_charlie_job(cluster, noshim):
    """From a login host without slurm-charlie: a batch job whose
    environment asks for charlie is refused at submit by the gate, with the
    fix; an interactive one (whose environment slurmctld never sees) gets
    its allocation but its tasks refuse to start.  Nothing runs on the
    bare host; no node drains."""
    wd = cluster.workdir("paths-noshim-jobs")
    ran = os.path.join(wd, "ran-on-host")
    env = {"SLURM_CONF": noshim, "CHARLIE_IMAGE": "/nonexistent.sqfs"}
    p = cluster.as_user(["sbatch", "-N1", "-o", "/dev/null", "--wrap", f"touch {ran}"], wd, env)
    assert p.returncode != 0, p.stdout
    assert "slurm-charlie: error: this job asks for slurm-charlie (CHARLIE_IMAGE in its " \
        "environment)" in p.stderr and "would run on the bare host" in p.stderr, p.stderr
    assert "hint: submit with sbatch or salloc on a host where slurm-charlie is " \
        "installed" in p.stderr, p.stderr
    for argv in (["srun", "-N1", "touch", ran],
                 ["salloc", "-N1", "srun", "touch", ran]):
        p = cluster.as_user(argv, wd, env)
        assert p.returncode != 0, (argv, p.stderr)
        assert "slurm-charlie: error: CHARLIE_IMAGE is set, but this job was not submitted " \
            "as a charlie job" in p.stderr, (argv, p.stderr)
    # unrelated CHARLIE_* names select nothing
    p = cluster.as_user(["sbatch", "-N1", "-o", "/dev/null", "--wrap", "true"], wd,
                        {"SLURM_CONF": noshim, "CHARLIE_SITE_NOTE": "x"})
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(ran)
    assert set(cluster.wait_nodes_idle().values()) == {"idle"}


# -- REST -----------------------------------------------------------------------------
def test_rest_submissions_either_run_as_asked_or_are_refused(cluster, rest, image):
    """slurmrestd loads no SPANK plugin.  A plain job runs; a job asking for
    charlie through its environment or its script is refused (the REST
    client sees Slurm's error, slurmctld's and slurmrestd's logs our
    message); where the REST API takes spank_environment (23.02+), the
    JSON `slurm-charlie rest-json` prints runs the job in its container,
    and on 22.05 that key is refused by the API itself."""
    wd = cluster.workdir("paths-rest")
    status, body = rest.submit(wd, "#!/bin/sh\nhostname\n")
    assert status == 200 and not body.get("errors"), body
    info = cluster.wait_done(str(body["job_id"]))
    assert info["JobState"] == "COMPLETED", info
    for env, script, what in (
            ({"CHARLIE_IMAGE": image}, "#!/bin/sh\ntouch ran\n", "CHARLIE_IMAGE in its environment"),
            ({}, f"#!/bin/sh\n#SBATCH --charlie-image={image}\ntouch ran\n",
             "--charlie-image in its script")):
        since = _ctld_log_size(cluster)
        status, body = rest.submit(wd, script, env)
        assert body.get("errors") and not body.get("job_id"), (status, body)
        log = _ctld_log_since(cluster, since)
        assert f"slurm-charlie gate: refused a job of uid {UID}: slurm-charlie: " \
            f"error: this job asks for slurm-charlie ({what})" in log, log[-2000:]
    assert not os.path.exists(os.path.join(wd, "ran"))
    q = cluster.as_user([cluster.sb.charlie_bin(), "rest-json", f"--charlie-image={image}"], wd)
    assert q.returncode == 0, q.stderr
    spank = json.loads(q.stdout)["spank_environment"]
    assert spank[:3] == ["CHARLIE=1", f"CHARLIE_IMAGE={image}", "CHARLIE_TYPE=container"]
    # the batch script runs on the host; its srun in the container
    status, body = rest.submit(wd, "#!/bin/sh\nsrun cat /MARKER\n", spank_environment=spank)
    if not REST_SPANK:
        assert status == 400 and any('Unknown key "spank_environment"' in str(e)
                                     for e in body.get("errors", [])), body
        return
    assert status == 200 and not body.get("errors"), body
    jobid = str(body["job_id"])
    info = cluster.wait_done(jobid)
    out = open(os.path.join(wd, "out")).read()
    assert info["JobState"] == "COMPLETED" and "inside-the-image" in out, (info, out)
    assert cluster.admin_comment(jobid) == \
        f"charlie(type=container image={image} digest=none)"


@pytest.mark.parametrize("spank,where,says", [
    (["CHARLIE=1", "CHARLIE_EVIL=1"], "submit",
     "the SPANK value CHARLIE_EVIL is not one slurm-charlie sets"),
    (["CHARLIE=1", "CHARLIE_TYPE=pod"], "submit", "CHARLIE_TYPE: unknown value 'pod'"),
    (["CHARLIE=1", "CHARLIE_CPUS=1e9"], "submit", "CHARLIE_CPUS: not a number"),
    (["CHARLIE=1", "CHARLIE_DIR1=/a", "CHARLIE_DIR5=/e"], "submit",
     "the SPANK value CHARLIE_DIR5 is not one slurm-charlie sets"),
    (["CHARLIE_IMAGE=/x"], "submit", "CHARLIE_* SPANK values without the CHARLIE=1 marker"),
    (["CHARLIE=1", "CHARLIE_TYPE=container", "CHARLIE_IMAGE=relative/img"], "job",
     "not an absolute path on the node"),
    (["CHARLIE=1", "CHARLIE_TYPE=container", "CHARLIE_IMAGE=/etc/shadow"], "job",
     "/etc/shadow"),
], ids=["unknown-name", "bad-choice", "bad-number", "dir5", "no-marker", "relative",
        "root-only-file"])
def test_forged_spank_values_fail_only_that_job(cluster, spank, where, says):
    """SPANK values the user wrote by hand: on 23.02+ a REST request's
    spank_environment, on 22.05 a private plugstack.conf with the real shim
    and a validator of the user's own.  What the gate can see is refused at
    submit with the variable's name; what needs the node is refused by the
    prolog as the job user.  The job fails with the reason; no node
    drains."""
    from helpers.cluster import private_conf
    wd = cluster.workdir("paths-forged")
    since = _ctld_log_size(cluster)
    if REST_SPANK:
        status, body = Rest(cluster).submit(wd, "#!/bin/sh\ntouch ran\n",
                                            spank_environment=spank)
        jobid = str(body["job_id"]) if body.get("job_id") else None
        told = _ctld_log_since(cluster, since)
    else:
        conf = private_conf(cluster, wd, spank)
        p = cluster.as_user(["sbatch", "-N1", "--charlie-type=none", "-o", "out",
                             "--wrap", "touch ran"], wd, {"SLURM_CONF": conf})
        m = re.search(r"Submitted batch job (\d+)", p.stdout)
        jobid, told = (m.group(1) if m else None), p.stderr
    if where == "submit":
        assert jobid is None, jobid
        assert "slurm-charlie: error: " + says in told, told[-2000:]
    else:
        assert jobid is not None, told[-2000:]
        info = cluster.wait_done(jobid)
        out = open(os.path.join(wd, "out")).read()
        assert info["JobState"] != "COMPLETED" and says in out, (info, out)
    assert not os.path.exists(os.path.join(wd, "ran"))
    assert set(cluster.wait_nodes_idle().values()) == {"idle"}


# -- portals --------------------------------------------------------------------------
def test_an_ondemand_style_submission_runs_in_the_container(cluster, image):
    """Open OnDemand runs the real sbatch with --export=NONE and the app's
    native: arguments; its batch script (on the host, docs/faq.rst) starts
    the app's server through srun, which runs in the container, and waits
    for it to answer."""
    wd = cluster.workdir("paths-ood")
    port = 18000 + os.getpid() % 1000
    cluster.write(os.path.join(wd, "script.sh"), f"""#!/bin/sh
PATH=/usr/bin:/bin; export PATH
srun -n1 --export=ALL httpd -f -p 127.0.0.1:{port} -h / &
server=$!
i=0
until busybox wget -q -O - http://127.0.0.1:{port}/MARKER > served 2>/dev/null; do
  i=$((i+1)); [ $i -gt 150 ] && break; sleep 0.2
done
kill $server; wait $server
echo "server ended: $?"
""")
    p, jobid = cluster.sbatch(wd, ["--export=NONE", "-N1", "-J", "ood-jupyter", "-t", "5",
                                   f"--charlie-image={image}", "-o", "out", "script.sh"])
    out = open(os.path.join(wd, "out")).read()
    assert open(os.path.join(wd, "served")).read() == "inside-the-image\n", out
    assert "server ended" in out, out
    assert cluster.admin_comment(jobid) == \
        f"charlie(type=container image={image} digest=none)"
