"""Site config: defaults, refusal of unknown keys and wrong types, the
example file, and the runtime_root safety rule."""

import os
import tempfile

import pytest

from slurm_charlie import config
from slurm_charlie.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_defaults_when_empty():
    cfg = config.parse("")
    assert cfg["runtime_root"] == "/var/spool/slurm-charlie"
    assert set(cfg.sources.values()) == {"default"}


def test_values_and_sources():
    cfg = config.parse('runtime_root = "/x/%n"\n[vm]\naccel = "tcg"\n', "f.toml")
    assert cfg.runtime_root("node7") == "/x/node7"
    assert cfg["vm.accel"] == "tcg" and cfg.sources["vm.accel"] == "f.toml"
    assert cfg.sources["vm.qemu"] == "default"


@pytest.mark.parametrize("text,message", [
    ("bogus = 1", "unknown key: bogus"),
    ("[vm]\nacel = 'kvm'", "unknown key: vm.acel"),
    ("[fpga]\nx = 1", "unknown section: [fpga]"),
    ("runtime_root = 5", "runtime_root: wrong type, want str"),
    ("syslog = 'yes'", "syslog: wrong type, want bool"),
    ("[timeouts]\nboot = true", "timeouts.boot: wrong type, want int"),
    ("[timeouts]\nboot = -1", "timeouts.boot: must not be negative"),
    ("image_roots = '/data'", "image_roots: wrong type, want list of strings"),
    ("[vm]\naccel = 'hvf'", "vm.accel: not one of kvm, tcg"),
    ("runtime_root = 'relative'", "runtime_root: must be an absolute path"),
    ("runtime_root = ", "not valid TOML"),
])
def test_bad_config(text, message):
    with pytest.raises(ConfigError) as e:
        config.parse(text, "site.toml")
    assert message in e.value.line()
    assert e.value.line().startswith("site.toml: ")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        config.parse("bogus = 1")
    assert "runtime_root" in e.value.hint and "vm.accel" in e.value.hint


def test_explicit_missing_file():
    with pytest.raises(ConfigError, match="site config not found"):
        config.load(environ={config.ENV_VAR: "/nonexistent/charlie.toml"})


def test_example_parses_to_defaults():
    uncommented = "\n".join(
        l[1:] if l.startswith("#") and "=" in l and not l.startswith("# ") else l
        for l in config.render_example().splitlines())
    cfg = config.parse(uncommented)
    assert dict(cfg.values) == {k.name: k.default for k in config.DEFAULTS}
    assert set(cfg.sources.values()) == {"<string>"}


def test_example_file_in_docs_is_current():
    with open(os.path.join(ROOT, "docs", "charlie.toml.example")) as f:
        assert f.read() == config.render_example(), \
            "docs/charlie.toml.example is stale: run `make docs-gen`"


def test_runtime_root_safe(tmp_path):
    config.check_root_safe("/var/spool/slurm-charlie/does/not/exist")


@pytest.mark.parametrize("path", ["/tmp/charlie-root", "/var/tmp/x/y", "/dev/shm/x"])
def test_runtime_root_in_world_writable(path):
    with pytest.raises(ConfigError, match="inside a path an ordinary user can write"):
        config.check_root_safe(path)


@pytest.mark.root  # chowns a directory to another user
def test_runtime_root_owned_by_user():
    base = tempfile.mkdtemp(dir="/run")
    try:
        os.chown(base, 65534, 65534)
        with pytest.raises(ConfigError, match="ordinary user can write"):
            config.check_root_safe(base + "/root")
    finally:
        os.rmdir(base)


@pytest.mark.root  # the safety check wants root-owned parents
def test_runtime_root_symlink_and_file():
    base = tempfile.mkdtemp(dir="/run")
    try:
        os.chmod(base, 0o755)
        os.symlink("/var", base + "/link")
        with pytest.raises(ConfigError, match="symbolic link"):
            config.check_root_safe(base + "/link/x")
        open(base + "/file", "w").close()
        with pytest.raises(ConfigError, match="not a directory"):
            config.check_root_safe(base + "/file/x")
    finally:
        for n in ("link", "file"):
            if os.path.lexists(base + "/" + n):
                os.unlink(base + "/" + n)
        os.rmdir(base)
