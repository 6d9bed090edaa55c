"""Registry images: --charlie-image=docker://[REGISTRY/]NAME[:TAG|@DIGEST].

At submit the reference is pinned to its digest (`skopeo inspect`, as the
user, with the user's own registry credentials), so every node runs the same
image even if the tag moves.  On the nodes the first node of the job pulls it
once (`skopeo copy` to an OCI layout, `umoci unpack --rootless`), adds the
/ch mount points and makes a squashfs of it in the user's registry cache
(container.registry_cache, on a filesystem every node sees); the other nodes
wait for that file.  Later jobs find it by digest.  The squashfs is then
mounted like any squashfs image.  Everything here runs as the job user.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

from .errors import CharlieError, UserError
from .images import REGISTRY_PREFIX as PREFIX
from .files import tree_size
from .unpack import mount_points_in
from .proc import log, run, run_watched

_NAME = r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
_REF = re.compile(r"^(?:(?P<registry>[a-zA-Z0-9.-]+(?::[0-9]+)?)/)?"
                  rf"(?P<name>{_NAME})"
                  r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
                  r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
HINT = ("write it as docker://[REGISTRY/]NAME[:TAG], e.g. "
        "docker://registry.example.org:5000/busybox:latest")


def parse(ref: str) -> dict[str, str | None]:
    m = _REF.match(ref[len(PREFIX):])
    if not m or "//" in ref[len(PREFIX):]:
        raise UserError("--charlie-image", "not a registry image reference", ref, hint=HINT)
    parts = m.groupdict()
    if parts["registry"] and "." not in parts["registry"] and ":" not in parts["registry"] \
            and parts["registry"] != "localhost":
        # docker's rule: a first component without '.' or ':' is part of the name
        parts["name"] = f"{parts['registry']}/{parts['name']}"
        parts["registry"] = None
        if not re.fullmatch(_NAME, parts["name"] or ""):
            raise UserError("--charlie-image", "not a registry image reference", ref,
                            hint=HINT)
    return parts


def _tls(registry: str | None, insecure: list[str]) -> list[str]:
    """skopeo's TLS flag: off for a registry container.registry_insecure
    lists as HOST:PORT, or as HOST (every port of it)."""
    if registry and (registry in insecure or registry.rsplit(":", 1)[0] in insecure):
        return ["--tls-verify=false"]
    return []


def _skopeo_error(p) -> str:
    """skopeo's reason, once: the msg of its last log line, its quotes
    unescaped (it logs `msg="Error parsing image name \\"docker://...\\""`)."""
    lines = [ln for ln in p.stderr.decode(errors="replace").strip().splitlines() if ln]
    text = lines[-1] if lines else f"skopeo exited with {p.returncode}"
    m = re.match(r'^time="[^"]*" level=\w+ msg="(.*)"$', text)
    if m:
        text = m.group(1).replace('\\"', '"')
    return text[-300:]


#: what skopeo says when the registry wants credentials it did not get or
#: did not accept: "unauthorized" (Debian 12's skopeo 1.9) and
#: "authentication required" (Debian 13's)
_LOGIN = re.compile(r"unauthorized|authentication required", re.I)


def pin(ref: str, insecure: list[str], timeout: float = 60) -> str:
    """The reference with its digest (at submit, as the user)."""
    parts = parse(ref)
    # the manifest only (--raw): its sha256 is the digest, and no layer or
    # config blob is fetched at submit
    p = run(["skopeo", "inspect", "--raw", *_tls(parts["registry"], insecure), ref],
            timeout=timeout, check=False)
    if p.returncode != 0:
        why = _skopeo_error(p)
        if _LOGIN.search(why):
            registry = parts["registry"] or "docker.io"
            raise UserError("--charlie-image", f"the registry {registry} wants a login "
                            f"(skopeo: {why})", ref,
                            hint="log in as yourself where the nodes can read it: "
                            "skopeo login --authfile ~/.config/containers/auth.json "
                            f"{registry} (again if the password changed)")
        raise UserError("--charlie-image", f"cannot find the image in its registry "
                        f"(skopeo: {why})", ref,
                        hint="check the name and tag; for a private registry log in "
                        "first (skopeo login REGISTRY), the job uses your credentials")
    if not p.stdout.strip().startswith(b"{"):
        raise UserError("--charlie-image", "the registry gave no manifest", ref)
    digest = parts["digest"] or "sha256:" + hashlib.sha256(p.stdout).hexdigest()
    base = ref[len(PREFIX):].split("@")[0]
    if parts["tag"]:
        base = base[: -len(parts["tag"]) - 1]
    return f"{PREFIX}{base}@{digest}"


def cache_file(cache_dir: str, pinned: str) -> str:
    digest = parse(pinned)["digest"]
    if not digest:
        raise UserError("--charlie-image", "not pinned to a digest", pinned)
    return os.path.join(cache_dir, digest.split(":", 1)[1] + ".sqfs")


def _total(pinned: str, insecure: list[str]) -> int | None:
    """The image's compressed size from its manifest (None for an index of
    platforms, or when the registry does not say)."""
    p = run(["skopeo", "inspect", "--raw", *_tls(parse(pinned)["registry"], insecure), pinned],
            timeout=60, check=False)
    try:
        m = json.loads(p.stdout)
        return sum(int(x["size"]) for x in [m["config"], *m["layers"]])
    except (ValueError, KeyError, TypeError):
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.1f} MB"


class Progress:
    """The pull's progress, for a person waiting on it: rewritten in
    PATH (next to the cache file, `cat` it while the job is in CF), logged
    on the node every LOG_EVERY s, summed up in the job's output."""

    LOG_EVERY = 10.0

    def __init__(self, path: str, image: str, total: int | None) -> None:
        self.path, self.image, self.total = path, image, total
        self.start = self.mark = time.monotonic()
        self.logged = self.start
        self.times: dict[str, float] = {}
        self.fetched = 0
        self._write("starting")

    def _write(self, what: str) -> None:
        line = f"{self.image}: {what}, {time.monotonic() - self.start:.0f} s so far\n"
        try:
            with open(self.path + ".tmp", "w") as f:
                f.write(line)
            os.replace(self.path + ".tmp", self.path)
        except OSError:
            pass
        if time.monotonic() - self.logged >= self.LOG_EVERY:
            self.logged = time.monotonic()
            log.info("pull %s", line.strip())

    def fetching(self, _t: float, got: int) -> None:
        of = f" of {_mb(self.total)}" if self.total else ""
        self._write(f"fetched {_mb(got)}{of}")

    def working(self, what: str) -> None:
        self._write(what)

    def phase(self, name: str, fetched: int | None = None) -> None:
        now = time.monotonic()
        self.times[name] = now - self.mark
        self.mark = now
        if fetched is not None:
            self.fetched = fetched

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items())
        return f"{_mb(self.fetched)} fetched; {parts}"

    def done(self) -> None:
        for p in (self.path, self.path + ".tmp"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def fetch(pinned: str, cache_dir: str, pull: bool, insecure: list[str],
          timeout: float) -> dict[str, object]:
    """As the job user: the squashfs of the pinned image in cache_dir.  The
    puller (the job's first node) pulls and converts it unless another job
    already did; the others wait for it.  Returns {"path", "pulled", "seconds"}."""
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    final = cache_file(cache_dir, pinned)
    start = time.monotonic()
    if os.path.exists(final):
        return {"path": final, "pulled": False, "seconds": 0.0}
    failed = final + ".failed"  # the puller's reason, for the nodes waiting on it
    if not pull:
        began = time.time()
        while time.monotonic() - start < timeout:
            if os.path.exists(final):
                return {"path": final, "pulled": False,
                        "seconds": round(time.monotonic() - start, 2)}
            try:
                if os.stat(failed).st_mtime >= began - 60:
                    with open(failed) as f:
                        why = f.read(500).strip()
                    raise UserError("--charlie-image", f"the job's first node could not "
                                    f"pull the image: {why}", pinned)
            except FileNotFoundError:
                pass
            time.sleep(0.2)
        try:
            with open(final + ".progress") as f:
                where = "; its pull: " + f.read(300).strip()
        except OSError:
            where = ""
        raise UserError("--charlie-image", f"the job's first node did not provide the "
                        f"image within {timeout:g} s{where}", final,
                        hint="container.registry_cache must be on a filesystem every "
                        "node sees (the first node's error says more)")
    import filelock
    with filelock.FileLock(final + ".lock", timeout=timeout):
        if os.path.exists(final):
            return {"path": final, "pulled": False, "seconds": 0.0}
        if os.path.exists(failed):
            os.unlink(failed)
        tmp = tempfile.mkdtemp(prefix=".pull-", dir=cache_dir)
        progress = Progress(final + ".progress", pinned, _total(pinned, insecure))
        try:
            parts = parse(pinned)
            p = run_watched(["skopeo", "copy", *_tls(parts["registry"], insecure), pinned,
                             f"oci:{tmp}/oci:image"], timeout,
                            lambda t: progress.fetching(t, tree_size(f"{tmp}/oci")))
            if p.returncode != 0:
                raise UserError("--charlie-image", f"pull failed: {_skopeo_error(p)}", pinned)
            progress.phase("fetch", tree_size(f"{tmp}/oci"))
            p = run_watched(["umoci", "unpack", "--rootless", "--image", f"{tmp}/oci:image",
                             f"{tmp}/bundle"], timeout, lambda t: progress.working("unpacking"))
            if p.returncode != 0:
                raise UserError("--charlie-image", "cannot unpack the pulled image: "
                                + p.stderr.decode(errors="replace").strip()[-300:], pinned)
            progress.phase("unpack")
            root = os.path.join(tmp, "bundle", "rootfs")
            mount_points_in(root, pinned)
            # owned by root as in the registry (a rootless unpack gave every
            # file to the user): in a user namespace root is the job user.
            # zstd level 3: as small as gzip, 15x faster to make (1 s against
            # 13.5 s for a 350 MB Debian with MPI here); squashfuse and
            # ch-run read it
            p = run_watched(["mksquashfs", root, f"{tmp}/image.sqfs", "-quiet", "-no-progress",
                             "-no-xattrs", "-all-root", "-comp", "zstd",
                             "-Xcompression-level", "3"], timeout,
                            lambda t: progress.working("making the squashfs"))
            if p.returncode != 0:
                raise UserError("--charlie-image", "cannot make a squashfs of the image: "
                                + p.stderr.decode(errors="replace").strip()[-300:], pinned)
            progress.phase("squashfs")
            os.chmod(f"{tmp}/image.sqfs", 0o600)
            os.rename(f"{tmp}/image.sqfs", final)
        except CharlieError as e:  # a refusal, or a step that timed out or is missing
            with open(failed, "w") as f:
                f.write(e.line() + "\n")
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            progress.done()
    return {"path": final, "pulled": True, "seconds": round(time.monotonic() - start, 2),
            "summary": progress.summary()}
