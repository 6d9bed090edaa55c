"""scrontab and charlie options, on Slurm 24.11 (the Debian 13 lane:
Debian 12's slurm-client has no scrontab).  scrontab parses #SCRON
options but never runs the shim's option check, so a charlie entry would
run on the bare host; the shim refuses it while scrontab parses it, and a
host without the shim does not know the options at all."""

import os
import re


def _crontab(cluster, wd, text):
    return cluster.write(os.path.join(wd, "crontab"), text, 0o644)


def test_scrontab_with_charlie_options_is_refused(cluster):
    wd = cluster.workdir("scron")
    tab = _crontab(cluster, wd, "#SCRON --charlie-image=/nonexistent.sqfs\n"
                                "*/30 * * * * touch ran\n")
    p = cluster.as_user(["scrontab", tab], wd)
    assert p.returncode != 0, p.stdout + p.stderr
    said = p.stdout + p.stderr
    assert "slurm-charlie: --charlie-image: scrontab cannot run charlie jobs" in said, said
    assert "hint: let the entry run `sbatch --charlie-image=... script` instead" in said, said
    listed = cluster.as_user(["scrontab", "-l"], wd)
    assert "charlie" not in listed.stdout, listed.stdout
    # from a host without slurm-charlie, scrontab does not know the option
    conf = re.sub(r"(?m)^PlugStackConfig=.*$", f"PlugStackConfig={wd}/none.conf",
                  open(cluster.sb.conf).read())
    cluster.write(os.path.join(wd, "none.conf"), "# no slurm-charlie\n", 0o644)
    cluster.write(os.path.join(wd, "slurm.conf"), conf, 0o644)
    p = cluster.as_user(["scrontab", tab], wd, {"SLURM_CONF": os.path.join(wd, "slurm.conf")})
    assert p.returncode != 0 and "charlie-image" in p.stdout + p.stderr, p.stdout + p.stderr
    assert "charlie" not in cluster.as_user(["scrontab", "-l"], wd).stdout


def test_a_plain_scrontab_entry_still_goes_in(cluster):
    """The shim and the gate leave scrontab alone without charlie options."""
    wd = cluster.workdir("scron-plain")
    tab = _crontab(cluster, wd, "#SCRON -t 1\n*/30 * * * * true\n")
    try:
        p = cluster.as_user(["scrontab", tab], wd)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "*/30 * * * * true" in cluster.as_user(["scrontab", "-l"], wd).stdout
    finally:
        cluster.as_user(["scrontab", "-r"], wd)
