"""The option table: parsing, syntax checks, env variables, the hand-off."""

import os

import pytest

from slurm_charlie import options
from slurm_charlie.errors import UserError
from slurm_charlie.options import Options


def build(argv, env=None):
    return options.build(options.merge(options.parse_argv(argv),
                                       options.parse_user_env(env or {})))


GOOD = [
    ([], Options()),
    (["--charlie-image=/i.qcow2"], Options(image="/i.qcow2")),
    (["--charlie-type=vm"], Options(type="vm")),
    (["--charlie-dir=a", "--charlie-dir=b"], Options(dir=("a", "b"))),
    (["--charlie-commit"], Options(commit=0)),
    (["--charlie-commit=2"], Options(commit=2)),
    (["--charlie-interactive"], Options(interactive=True)),
    (["--charlie-write"], Options(write=True)),
    (["--charlie-cpus=4"], Options(cpus=4)),
    (["--charlie-mem=4G"], Options(mem=4096)),
    (["--charlie-mem=512"], Options(mem=512)),
    (["--charlie-tmp-size=1T"], Options(tmp_size=1024 * 1024)),
    (["--charlie-tmp-size=2048K"], Options(tmp_size=2)),
]


@pytest.mark.parametrize("argv,expected", GOOD)
def test_parse_good(argv, expected):
    assert build(argv) == expected


BAD = [
    (["--charlie-type=docker"], "--charlie-type: unknown value: 'docker'"),
    (["--charlie-dir=" + d for d in "abcde"], "--charlie-dir: given 5 times, at most 4"),
    (["--charlie-image=/a", "--charlie-image=/b"], "--charlie-image: given more than once"),
    (["--charlie-image"], "--charlie-image: needs a value"),
    (["--charlie-commit=x"], "--charlie-commit: not a guest number"),
    (["--charlie-commit=-1"], "--charlie-commit: not a guest number"),
    (["--charlie-cpus=0"], "--charlie-cpus: not a positive whole number"),
    (["--charlie-mem=lots"], "--charlie-mem: not a size"),
    (["--charlie-image=/a\nb"], "--charlie-image: value contains a newline"),
    (["--charlie-dir=/a\0b"], "--charlie-dir: value contains a NUL byte"),
    (["--charlie-bogus=1"], "--charlie-bogus: unknown option"),
    (["--image=x"], "option: not a --charlie-* option"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_parse_bad(argv, message):
    with pytest.raises(UserError) as e:
        build(argv)
    assert message in e.value.line()


def test_unknown_option_lists_valid_ones():
    with pytest.raises(UserError) as e:
        build(["--charlie-imge=/x"])
    assert "--charlie-image" in e.value.hint and "--charlie-tmp-size" in e.value.hint


def test_env_variables():
    env = {"CHARLIE_IMAGE": "/img", "CHARLIE_DIR": "/a:/b", "CHARLIE_WRITE": "yes",
           "CHARLIE_INTERACTIVE": "0", "CHARLIE_COMMIT": ""}
    assert build([], env) == Options(image="/img", dir=("/a", "/b"), write=True,
                                     commit=0)


def test_command_line_wins_over_env():
    assert build(["--charlie-dir=/c"], {"CHARLIE_DIR": "/a:/b"}).dir == ("/c",)


def test_env_flag_garbage():
    with pytest.raises(UserError, match="CHARLIE_WRITE: not a yes/no value"):
        build([], {"CHARLIE_WRITE": "maybe"})


def test_handoff_round_trip():
    opts = Options(image="/i.qcow2", type="vm", dir=("/a", "/b"), job="/j.sh",
                   commit=1, cpus=2, mem=1024, tmp_size=100)
    env = {"SPANK_" + k: v for k, v in options.to_env(opts)}
    assert env["SPANK_CHARLIE"] == "1"
    assert options.from_env(env) == opts


def test_not_a_charlie_job():
    assert options.from_env({"SPANK_CHARLIE_IMAGE": "/x"}) is None


def test_every_option_has_env_and_help():
    for o in options.OPTIONS:
        assert o.env == "CHARLIE_" + o.name.upper().replace("-", "_")
        assert o.help and "\n" not in o.help
        assert (o.arginfo is None) == (o.has_arg == 0)


def test_image_digest_travels_and_is_checked():
    """The validator's digest of an archive image reaches the prolog; a
    malformed one, or one without an image, fails the job (never a node)."""
    st = os.stat(__file__)
    digest = options.image_digest("0f" * 32, st)
    opts = Options(image="/i.tar.gz", type="container", image_digest=digest)
    env = {"SPANK_" + k: v for k, v in options.to_env(opts)}
    assert env["SPANK_CHARLIE_IMAGE_DIGEST"] == digest
    assert options.from_env(env) == opts
    assert options.parse_image_digest(digest) == ("0f" * 32, options.file_identity(st))
    for bad in ("sha256:" + "0f" * 32, "sha256:" + "0F" * 32 + "@1:2:3:4", "x" * 5000,
                "sha256:" + "0f" * 32 + "@1:2:3:4\n", "sha256:" + "0f" * 32 + "@٣:2:3:4"):
        with pytest.raises(UserError, match="CHARLIE_IMAGE_DIGEST: not an image digest"):
            options.from_env({**env, "SPANK_CHARLIE_IMAGE_DIGEST": bad})
    no_image = {k: v for k, v in env.items() if k != "SPANK_CHARLIE_IMAGE"}
    with pytest.raises(UserError, match="given without an image"):
        options.from_env(no_image)
    # users cannot hand one in through their environment: the validator makes it
    assert "image_digest" not in options.parse_user_env(
        {"CHARLIE_IMAGE": "/i.tar.gz", "CHARLIE_IMAGE_DIGEST": digest})
