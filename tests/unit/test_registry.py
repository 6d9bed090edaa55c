"""Registry references (slurm_charlie/registry.py): parsing and the cache
file name; the pull itself runs against the sandbox's registry in
tests/cluster/test_container.py."""

import os

import pytest

from slurm_charlie import registry
from slurm_charlie.errors import UserError

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("ref,registry_,name,tag,digest", [
    ("docker://busybox", None, "busybox", None, None),
    ("docker://busybox:1.36", None, "busybox", "1.36", None),
    ("docker://library/busybox:latest", None, "library/busybox", "latest", None),
    ("docker://10.211.77.1:5000/charlie/busybox:latest", "10.211.77.1:5000",
     "charlie/busybox", "latest", None),
    ("docker://localhost/x", "localhost", "x", None, None),
    (f"docker://reg.example.org/a/b@{D}", "reg.example.org", "a/b", None, D),
])
def test_references(ref, registry_, name, tag, digest):
    p = registry.parse(ref)
    assert (p["registry"], p["name"], p["tag"], p["digest"]) == (registry_, name, tag, digest)


@pytest.mark.parametrize("ref", ["docker://", "docker://Bad Name", "docker://a//b",
                                 "docker://UPPER/case", "docker://x:tag:more",
                                 "docker://x@sha256:short"])
def test_bad_references(ref):
    with pytest.raises(UserError) as e:
        registry.parse(ref)
    assert "not a registry image reference" in e.value.line()
    assert "docker://[REGISTRY/]NAME[:TAG]" in (e.value.hint or "")


def test_cache_file_is_named_by_digest(tmp_path):
    assert registry.cache_file(str(tmp_path), f"docker://r.org/x@{D}") == \
        str(tmp_path / ("ab" * 32 + ".sqfs"))
    with pytest.raises(UserError):
        registry.cache_file(str(tmp_path), "docker://r.org/x:latest")


def test_long_steps_report_progress(tmp_path, monkeypatch):
    """run_watched calls back while a step runs and keeps its output; the
    pull's progress file says what is happening and goes at the end; the
    summary names each phase."""
    from slurm_charlie.errors import NodeFault
    from slurm_charlie.proc import run_watched
    ticks = []
    p = run_watched(["sh", "-c", "echo out; echo err >&2; sleep 0.5; exit 3"], 30,
                    ticks.append, every=0.1)
    assert (p.returncode, p.stdout, p.stderr) == (3, b"out\n", b"err\n")
    assert len(ticks) >= 2 and ticks == sorted(ticks)
    with pytest.raises(NodeFault, match="did not finish within 0.3 s"):
        run_watched(["sleep", "5"], 0.3, lambda t: None, every=0.1)
    path = str(tmp_path / "x.sqfs.progress")
    progress = registry.Progress(path, "docker://r.org/x@" + D, 50_000_000)
    assert "starting" in open(path).read()
    (tmp_path / "blob").write_bytes(b"x" * 2_000_000)
    progress.fetching(1.0, registry.tree_size(str(tmp_path)))
    assert "fetched 2.0 MB of 50 MB" in open(path).read()
    progress.phase("fetch", 2_000_000)
    progress.working("unpacking")
    assert "unpacking" in open(path).read()
    progress.phase("unpack")
    assert progress.summary().startswith("2.0 MB fetched; fetch ")
    assert ", unpack " in progress.summary()
    progress.done()
    assert not os.path.exists(path)


def test_a_pull_that_times_out_tells_the_waiting_nodes(tmp_path, monkeypatch):
    """The puller's step hits its deadline (a huge image, a slow registry):
    the marker the other nodes watch says why, so they fail at once instead
    of waiting out their own limit."""
    from slurm_charlie.errors import CharlieError, NodeFault

    def slow(argv, timeout, tick, every=2.0):
        raise NodeFault(argv[0], f"did not finish within {timeout} s")
    monkeypatch.setattr(registry, "run_watched", slow)
    monkeypatch.setattr(registry, "_total", lambda pinned, insecure: None)
    pinned = f"docker://r.org/x@{D}"
    with pytest.raises(CharlieError, match="did not finish within 5 s"):
        registry.fetch(pinned, str(tmp_path), True, [], 5)
    with pytest.raises(UserError, match="could not pull the image: .*did not finish"):
        registry.fetch(pinned, str(tmp_path), False, [], 5)


@pytest.mark.parametrize("said,login", [
    # skopeo 1.9 (Debian 12) and a later one (Debian 13, seen in the lane)
    ('time="2026-12-06T18:58:01Z" level=fatal msg="Error parsing image name '
     '\\"docker://r:5001/charlie/busybox:latest\\": reading manifest latest in '
     'r:5001/charlie/busybox: unauthorized: authentication required"', True),
    ('time="2026-12-06T18:58:01Z" level=fatal msg="Error parsing image name '
     '\\"docker://r:5001/charlie/busybox:latest\\": reading manifest latest in '
     'r:5001/charlie/busybox: authentication required"', True),
    ('time="2026-12-06T18:58:01Z" level=fatal msg="Error parsing image name '
     '\\"docker://r:5001/charlie/busybox:nope\\": reading manifest nope in '
     'r:5001/charlie/busybox: manifest unknown"', False),
])
def test_registry_refusals_read_once_and_name_the_login(monkeypatch, said, login):
    """pin() as the submit check runs it, skopeo faked: its reason quoted
    once (no \\" left), and a refused login told apart from a missing tag."""
    class Done:
        returncode, stdout, stderr = 1, b"", said.encode() + b"\n"
    monkeypatch.setattr(registry, "run", lambda *a, **kw: Done())
    with pytest.raises(UserError) as e:
        registry.pin("docker://r:5001/charlie/busybox:latest", [])
    text = str(e.value)
    assert '\\"' not in text and '"docker://r:5001/charlie/busybox:' in text
    if login:
        assert "the registry r:5001 wants a login (skopeo: Error parsing" in text
        assert ("skopeo login --authfile ~/.config/containers/auth.json r:5001"
                in e.value.hint)
    else:
        assert "cannot find the image in its registry (skopeo: Error parsing" in text
        assert "manifest unknown" in text
