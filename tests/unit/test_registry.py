"""Registry references (slurm_charlie/registry.py): parsing and the cache
file name; the pull itself runs against the sandbox's registry in
tests/cluster/test_container.py."""

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
