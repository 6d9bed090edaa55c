"""The sandbox's accounting and REST services, as a site runs them (and the
sandbox's helpers for running its programs and daemons):
MariaDB (its own data directory in the sandbox's state, TCP on 127.0.0.1
only, a random password), slurmdbd on it, and slurmrestd with JWT
authentication.  Started by `sandbox up` before slurmctld, stopped by
`sandbox down` with the rest (their pid files are in run/).  Developer
code, never run for a job (tests/unit/test_house.py: NOT_ROOT).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from typing import Callable

DB_PORT = 6833          # MariaDB, 127.0.0.1 only
DBD_PORT = 6819 + 100   # slurmdbd (not 6819: a site's own may run here)
REST_PORT = 6820 + 100  # slurmrestd
REST_USER = "chrest"    # slurmrestd refuses root and SlurmUser
DB_NAME = "slurm_acct_db"
ACCOUNT = "charlie"
NEEDED = ("mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmrestd", "sacctmgr")


def _run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, **kw)


def _spawn(argv: list[str], log: str, pidfile: str, **kw) -> int:
    """A program that stays in the foreground, as a daemon of the sandbox:
    its own session, output to log, its pid in pidfile."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, **kw)
    with open(pidfile, "w") as f:
        f.write(f"{proc.pid}\n")
    return proc.pid


class Services:
    def __init__(self, state: str, ctl_addr: str, munge_socket: str,
                 alive: Callable[[str], int | None],
                 wait: Callable[[Callable[[], bool], str, float, str], None],
                 env: Callable[[], dict[str, str]]) -> None:
        self.state = state
        self.addr = ctl_addr
        self.munge_socket = munge_socket
        self._alive, self._wait, self._env = alive, wait, env
        self.datadir = self._p("mariadb")
        # MariaDB drops to its own user at once: its socket, pid and error
        # log live in its data directory, which only it (and root) may enter
        self.socket = os.path.join(self.datadir, "mariadb.sock")
        self.db_log = os.path.join(self.datadir, "mariadb.err")
        self.jwt_key = self._p("etc", "jwt.key")
        self.dbd_conf = self._p("etc", "slurmdbd.conf")

    def _p(self, *parts: str) -> str:
        return os.path.join(self.state, *parts)

    @property
    def rest_url(self) -> str:
        return f"http://{self.addr}:{REST_PORT}"

    def env(self) -> dict[str, str]:
        return {"CHARLIE_SANDBOX_REST": self.rest_url}

    def missing(self) -> list[str]:
        return [p for p in NEEDED if shutil.which(p) is None
                and not os.path.exists(f"/usr/sbin/{p}")]

    # -- files ------------------------------------------------------------
    def slurm_conf_lines(self) -> str:
        return ("# accounting: slurmdbd on MariaDB (docs/sandbox.rst, \"Accounting "
                "and REST\")\n"
                "AccountingStorageType=accounting_storage/slurmdbd\n"
                f"AccountingStorageHost={self.addr}\n"
                f"AccountingStoragePort={DBD_PORT}\n"
                "# for slurmdbd connections Slurm takes munged's socket from here\n"
                f"AccountingStoragePass={self.munge_socket}\n"
                "# the REST API's users authenticate with JWT (scontrol token)\n"
                "AuthAltTypes=auth/jwt\n"
                f"AuthAltParameters=jwt_key={self.jwt_key}\n")

    def _secret(self, path: str, nbytes: int) -> str:
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(nbytes))
        with open(path) as f:
            return f.read().strip()

    def write_files(self) -> None:
        os.makedirs(self._p("etc"), exist_ok=True)
        self._secret(self.jwt_key, 32)
        password = self._secret(self._p("etc", "db.password"), 16)
        text = ("# slurm-charlie sandbox: written by `sandbox up`\n"
                "AuthType=auth/munge\n"
                f"AuthInfo=socket={self.munge_socket}\n"
                "AuthAltTypes=auth/jwt\n"
                f"AuthAltParameters=jwt_key={self.jwt_key}\n"
                "DbdHost=localhost\n"
                f"DbdAddr={self.addr}\n"
                f"DbdPort={DBD_PORT}\n"
                "SlurmUser=root\n"
                "DebugLevel=info\n"
                f"LogFile={self._p('log', 'slurmdbd.log')}\n"
                f"PidFile={self._p('run', 'slurmdbd.pid')}\n"
                "StorageType=accounting_storage/mysql\n"
                "StorageHost=127.0.0.1\n"
                f"StoragePort={DB_PORT}\n"
                "StorageUser=slurm\n"
                f"StoragePass={password}\n"
                f"StorageLoc={DB_NAME}\n")
        fd = os.open(self.dbd_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(self.dbd_conf, 0o600)  # slurmdbd refuses a conf others can read

    # -- MariaDB ------------------------------------------------------------
    def _sql(self, statement: str) -> str:
        return _run(["mariadb", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                     "-N", "-B", "-e", statement]).stdout

    def start_mariadb(self) -> None:
        pidfile = self._p("run", "mariadb.pid")
        if self._alive(pidfile):
            return
        mysql = pwd.getpwnam("mysql")
        log = self.db_log
        if not os.path.isdir(os.path.join(self.datadir, "mysql")):
            os.makedirs(self.datadir, mode=0o700, exist_ok=True)
            os.chown(self.datadir, mysql.pw_uid, mysql.pw_gid)
            r = _run(["mariadb-install-db", "--no-defaults", "--user=mysql",
                      f"--datadir={self.datadir}", "--auth-root-authentication-method=socket",
                      "--skip-test-db", "--skip-name-resolve"], check=False)
            if r.returncode != 0:
                from .errors import NodeFault
                raise NodeFault("mariadb-install-db", f"exited with {r.returncode}",
                                (r.stderr or r.stdout).strip()[-300:])
        # slurmdbd's own advice for its tables (it warns below these)
        _spawn(["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={self.datadir}",
                f"--socket={self.socket}", f"--port={DB_PORT}", "--bind-address=127.0.0.1",
                f"--pid-file={os.path.join(self.datadir, 'mariadb.pid')}", f"--log-error={log}",
                "--skip-name-resolve", "--innodb-buffer-pool-size=128M",
                "--innodb-log-file-size=64M", "--innodb-lock-wait-timeout=900",
                "--max-allowed-packet=16M"], self._p("log", "mariadb.out"), pidfile)

        def up() -> bool:
            return _run(["mariadb", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                         "-e", "SELECT 1"], check=False).returncode == 0
        self._wait(up, "MariaDB", 60, log)
        password = self._secret(self._p("etc", "db.password"), 16)
        # The database exists before slurmdbd first connects, as sites' guides
        # make it.  Without it, slurmdbd 24.11's connect fails, makes the
        # database and connects again on the same handle, and Debian 13's
        # libmariadb3 (11.8) then fails its first query with error 5027
        # ("Number of columns in result (=1) ... (=0)") and slurmdbd stops.
        self._sql(f"CREATE DATABASE IF NOT EXISTS {DB_NAME}; "
                  f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
                  f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
                  f"GRANT ALL ON {DB_NAME}.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")

    # -- slurmdbd -----------------------------------------------------------
    def start_slurmdbd(self) -> None:
        pidfile = self._p("run", "slurmdbd.pid")
        if self._alive(pidfile):
            return
        log = self._p("log", "slurmdbd.log")
        with open(self._p("log", "slurmdbd.out"), "ab") as out:
            subprocess.Popen(["slurmdbd", "-D"], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=out, start_new_session=True,
                             env={**os.environ, "SLURM_CONF": self._p("etc", "slurm.conf")})
        # slurmdbd -D writes its own pid file; it reads slurmdbd.conf next to
        # SLURM_CONF
        self._wait(lambda: bool(self._alive(pidfile)) and self._sacctmgr_ok(),
                   "slurmdbd", 60, log)

    def _sacctmgr_ok(self) -> bool:
        return _run(["sacctmgr", "-n", "-P", "list", "cluster"], check=False,
                    env=self._env()).returncode == 0

    def add_associations(self, cluster: str, users: list[str]) -> None:
        """The cluster, an account and its users, as a site's admin adds them."""
        sm = ["sacctmgr", "-i"]
        have = _run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"],
                    env=self._env()).stdout.split()
        if cluster not in have:
            _run(sm + ["add", "cluster", cluster], env=self._env())
        accounts = _run(["sacctmgr", "-n", "-P", "list", "account", "format=account"],
                        env=self._env()).stdout.split()
        if ACCOUNT not in accounts:
            _run(sm + ["add", "account", ACCOUNT, f"cluster={cluster}",
                       "description=slurm-charlie sandbox", "organization=sandbox"],
                 env=self._env())
        known = _run(["sacctmgr", "-n", "-P", "list", "user", "format=user"],
                     env=self._env()).stdout.split()
        for u in users:
            if u not in known:
                _run(sm + ["add", "user", u, f"account={ACCOUNT}", f"cluster={cluster}"],
                     env=self._env())

    # -- slurmrestd ---------------------------------------------------------
    def ensure_rest_user(self) -> None:
        try:
            pwd.getpwnam(REST_USER)
        except KeyError:
            _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                  "--comment", "slurm-charlie sandbox slurmrestd", REST_USER])

    def start_slurmrestd(self, openapi: list[str]) -> None:
        pidfile = self._p("run", "slurmrestd.pid")
        if self._alive(pidfile):
            return
        self.ensure_rest_user()
        log = self._p("log", "slurmrestd.log")
        # slurmrestd authenticates each request by its JWT (X-SLURM-USER-TOKEN)
        # and talks to slurmctld as that user; it needs no key and no munge
        _spawn(["slurmrestd", "-u", REST_USER, "-a", "rest_auth/jwt",
                "-s", ",".join(openapi), f"{self.addr}:{REST_PORT}"], log, pidfile,
               env={**self._env(), "SLURM_JWT": "daemon"})

        def up() -> bool:
            import urllib.error
            import urllib.request
            try:
                urllib.request.urlopen(f"{self.rest_url}/openapi", timeout=1).close()
                return True
            except urllib.error.HTTPError:
                return True  # it answers
            except OSError:
                return False
        self._wait(up, "slurmrestd", 30, log)
