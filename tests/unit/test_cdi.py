"""The CDI spec reader (slurm_charlie/cdi.py): every field SPEC.md 1.1.0
allows is read, anything else names the spec file and the place in it, and
hooks are understood, never run."""

import json
import os
import stat

import pytest

from slurm_charlie import cdi
from slurm_charlie.errors import UserError

NVIDIA_YAML = """\
---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
      hostPath: /dev/nvidia0
- name: GPU-4c3d9b2e-1111-2222-3333-444455556666
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia1
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
  deviceNodes:
  - path: /dev/nvidiactl
  - path: /dev/nvidia-uvm
    type: c
    major: 511
    minor: 0
    fileMode: 0666
    permissions: rw
  hooks:
  - hookName: createContainer
    path: /usr/bin/nvidia-cdi-hook
    args: [nvidia-cdi-hook, create-symlinks, --link, "libcuda.so.1::/usr/lib/x86_64-linux-gnu/libcuda.so"]
    env: [NVIDIA_CTK_DEBUG=false]
  - hookName: createContainer
    path: /usr/bin/nvidia-cdi-hook
    args: [nvidia-cdi-hook, update-ldcache, --folder, /usr/lib/x86_64-linux-gnu]
  - hookName: createContainer
    path: /usr/bin/nvidia-ctk
    args: [nvidia-ctk, hook, enable-cuda-compat, --host-driver-version=550.54.15]
  - hookName: createContainer
    path: /usr/bin/nvidia-cdi-hook
    args: [nvidia-cdi-hook, disable-device-node-modification]
  mounts:
  - hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
    containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
    options: [ro, nosuid, nodev, bind]
"""


def spec(devices=None, edits=None, version="0.3.0", kind="example.com/gpu", **top):
    doc = {"cdiVersion": version, "kind": kind,
           "devices": devices if devices is not None else
           [{"name": "a", "containerEdits": {"deviceNodes": [{"path": "/dev/fake0"}]}}]}
    if edits is not None:
        doc["containerEdits"] = edits
    doc.update(top)
    return json.dumps(doc)


def refused(text, *words, path="/etc/cdi/x.json"):
    with pytest.raises(UserError) as e:
        cdi.parse(text, path)
    line = e.value.line()
    assert line.startswith(f"CDI spec {path}: "), line
    for w in words:
        assert w in line, line
    assert e.value.hint, "every refusal says what to do"
    return line


def test_an_nvidia_style_yaml_spec_is_read_whole():
    s = cdi.parse(NVIDIA_YAML, "/etc/cdi/nvidia.yaml")
    assert s.kind == "nvidia.com/gpu" and s.version == "0.5.0"
    assert list(s.devices) == ["0", "GPU-4c3d9b2e-1111-2222-3333-444455556666"]
    assert s.devices["0"].device_nodes[0].source == "/dev/nvidia0"
    uvm = s.edits.device_nodes[1]
    assert (uvm.type, uvm.major, uvm.minor, uvm.file_mode, uvm.permissions) == \
        ("c", 511, 0, 0o666, "rw")
    assert s.edits.env == ("NVIDIA_VISIBLE_DEVICES=void",)
    assert s.edits.mounts[0].options == ("ro", "nosuid", "nodev", "bind")
    plan = cdi.plan_hooks(s.edits, s.path)
    assert plan.symlinks == (("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so"),)
    assert plan.ldcache == ("/usr/lib/x86_64-linux-gnu",)
    assert plan.cuda_compat == "550.54.15"


def test_json_and_yaml_of_the_same_spec_read_the_same():
    import yaml
    doc = yaml.safe_load(NVIDIA_YAML)
    a = cdi.parse(NVIDIA_YAML, "/etc/cdi/n.yaml")
    b = cdi.parse(json.dumps(doc), "/etc/cdi/n.yaml".replace("yaml", "json"))
    assert (a.kind, a.version, a.devices, a.edits) == (b.kind, b.version, b.devices, b.edits)


@pytest.mark.parametrize("version", cdi.VERSIONS + ("v0.6.0",))
def test_every_released_version_is_read(version):
    assert cdi.parse(spec(version=version), "/etc/cdi/x.json").version == version.lstrip("v")


@pytest.mark.parametrize("version", ["1.2.0", "0.0.1", "0.2.0", "2", "", "latest"])
def test_an_unknown_version_is_refused_with_what_is_read(version):
    refused(spec(version=version), "cdiVersion", "1.1.0")


@pytest.mark.parametrize("where,doc", [
    ("unknown field 'vendorExtra'", {"vendorExtra": 1}),
    ("devices[0]: unknown field 'nameShort'",
     {"devices": [{"name": "a", "nameShort": ["b"], "containerEdits": {}}]}),
    ("containerEdits: unknown field 'devices'", {"containerEdits": {"devices": []}}),
    ("containerEdits.deviceNodes[0]: unknown field 'hostpath'",
     {"containerEdits": {"deviceNodes": [{"path": "/dev/x", "hostpath": "/dev/y"}]}}),
    ("containerEdits.mounts[0]: unknown field 'readonly'",
     {"containerEdits": {"mounts": [{"hostPath": "/a", "containerPath": "/b",
                                     "readonly": True}]}}),
    ("containerEdits.hooks[0]: unknown field 'when'",
     {"containerEdits": {"hooks": [{"hookName": "createContainer",
                                    "path": "/usr/bin/nvidia-cdi-hook", "when": "now"}]}}),
])
def test_an_unknown_field_is_refused_with_its_place(where, doc):
    text = json.loads(spec())
    text.update(doc)
    refused(json.dumps(text), where, "known here:")


@pytest.mark.parametrize("field,version,needs", [
    ({"containerEdits": {"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/y"}]}},
     "0.4.0", "0.5.0"),
    ({"annotations": {"a": "b"}}, "0.5.0", "0.6.0"),
    ({"containerEdits": {"additionalGids": [44]}}, "0.6.0", "0.7.0"),
    ({"containerEdits": {"netDevices": [{"hostInterfaceName": "eth1", "name": "e"}]}},
     "1.0.0", "1.1.0"),
    ({"containerEdits": {"mounts": [{"hostPath": "/a", "containerPath": "/b",
                                     "type": "bind"}]}}, "0.3.0", "0.4.0"),
    ({"devices": [{"name": "0", "containerEdits": {}}]}, "0.4.0", "0.5.0"),
    ({"kind": "example.com/gpu.v2"}, "0.5.0", "0.6.0"),
])
def test_a_field_newer_than_the_specs_version_is_refused(field, version, needs):
    doc = json.loads(spec(version=version))
    doc.update(field)
    refused(json.dumps(doc), "cdiVersion", f"need {needs} or later")
    doc["cdiVersion"] = needs
    assert cdi.minimum_version(cdi.parse(json.dumps(doc), "/etc/cdi/x.json")) == needs


@pytest.mark.parametrize("kind", ["gpu", "example.com/gpu/x", "example.com/", "/gpu",
                                  "Example.com/gpu", "example.com/-gpu"])
def test_a_bad_kind_is_refused(kind):
    refused(spec(kind=kind), "kind")


@pytest.mark.parametrize("doc,words", [
    ({"devices": []}, ("devices", "at least one")),
    ({"devices": [{"name": "a", "containerEdits": {}}, {"name": "a", "containerEdits": {}}]},
     ("named twice",)),
    ({"devices": [{"name": "a b", "containerEdits": {}}]}, ("not a device name",)),
    ({"devices": [{"name": "a"}]}, ("required field 'containerEdits'",)),
    ({"containerEdits": {"deviceNodes": [{"path": "dev/x"}]}}, ("not an absolute path",)),
    ({"containerEdits": {"deviceNodes": [{"path": "/dev/x", "major": "195"}]}},
     ("major", "not a whole number")),
    ({"containerEdits": {"deviceNodes": [{"path": "/dev/x", "uid": -1}]}}, ("out of range",)),
    ({"containerEdits": {"deviceNodes": [{"path": "/dev/x", "type": "x"}]}},
     ("not a device type",)),
    ({"containerEdits": {"deviceNodes": [{"path": "/dev/x", "permissions": "rwx"}]}},
     ("permissions",)),
    ({"containerEdits": {"env": ["NOEQUALS"]}}, ("not NAME=VALUE",)),
    ({"containerEdits": {"env": ["A=1\nCH_TYPE=none"]}}, ("not NAME=VALUE",)),
    ({"containerEdits": {"env": ["A=" + "x" * 4097]}}, ("not NAME=VALUE",)),
    ({"containerEdits": {"env": "A=1"}}, ("not a list",)),
    ({"containerEdits": {"mounts": [{"hostPath": "/a"}]}}, ("required field 'containerPath'",)),
    ({"containerEdits": {"mounts": [{"hostPath": "/a\u0000b", "containerPath": "/b"}]}},
     ("NUL",)),
])
def test_a_malformed_spec_says_what_and_where(doc, words):
    text = json.loads(spec())
    text.update(doc)
    refused(json.dumps(text), *words)


def test_keys_given_twice_are_refused_in_json_and_yaml():
    refused('{"cdiVersion": "0.3.0", "kind": "a.com/b", "kind": "c.com/d", "devices": []}',
            "twice")
    refused("cdiVersion: 0.3.0\nkind: a.com/b\nkind: c.com/d\ndevices: []\n", "twice",
            path="/etc/cdi/x.yaml")


@pytest.mark.parametrize("text,path", [("{", "/etc/cdi/x.json"), ("[1, 2", "/etc/cdi/x.yaml"),
                                       ("[]", "/etc/cdi/x.json")])
def test_what_is_not_a_spec_document_is_refused(text, path):
    refused(text, path=path)


HOOK = {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook"}


@pytest.mark.parametrize("hook,words", [
    ({"hookName": "createContainer", "path": "/usr/local/bin/site-hook", "args": ["x"]},
     ("unknown hook program /usr/local/bin/site-hook",)),
    ({**HOOK, "args": ["nvidia-cdi-hook", "update-firmware"]},
     ("unknown hook nvidia-cdi-hook update-firmware",)),
    ({**HOOK, "hookName": "beforeEverything", "args": ["nvidia-cdi-hook", "update-ldcache"]},
     ("unknown hookName",)),
    ({**HOOK, "args": ["nvidia-cdi-hook", "create-symlinks", "--link", "a"]},
     ("TARGET::/ABSOLUTE/LINK",)),
    ({**HOOK, "args": ["nvidia-cdi-hook", "create-symlinks", "--link", "a::relative"]},
     ("TARGET::/ABSOLUTE/LINK",)),
    ({**HOOK, "args": ["nvidia-cdi-hook", "update-ldcache", "--rebuild-everything"]},
     ("unknown argument",)),
    ({**HOOK, "args": ["nvidia-cdi-hook", "update-ldcache", "--folder"]}, ("needs a value",)),
    ({**HOOK, "args": ["nvidia-cdi-hook", "chmod", "--mode", "u+s", "--path", "/dev/x"]},
     ("octal mode",)),
    ({**HOOK, "args": []}, ("unknown hook program",)),
])
def test_a_hook_we_do_not_know_is_refused_never_run(hook, words):
    doc = json.loads(spec())
    doc["devices"][0]["containerEdits"]["hooks"] = [hook]
    line = refused(json.dumps(doc), "devices[0].containerEdits.hooks[0]", *words)
    assert "cannot" not in line


def test_known_hooks_become_a_plan():
    hooks = [{**HOOK, "args": ["nvidia-cdi-hook", "create-symlinks", "--link", "a.so.1::/l/a.so",
                               "--link=../b.so::/l/gbm/b.so"]},
             {**HOOK, "args": ["nvidia-cdi-hook", "chmod", "--mode", "755", "--path", "/dev/dri"]},
             {**HOOK, "path": "/usr/bin/nvidia-ctk",
              "args": ["nvidia-ctk", "hook", "update-ldcache", "--folder", "/l", "--folder=/m"]}]
    s = cdi.parse(spec(edits={"hooks": hooks}), "/etc/cdi/x.json")
    plan = cdi.plan_hooks(s.edits, s.path)
    assert plan == cdi.HookPlan(symlinks=(("a.so.1", "/l/a.so"), ("../b.so", "/l/gbm/b.so")),
                                ldcache=("/l", "/m"), chmods=(("755", "/dev/dri"),))


# --- files and directories ----------------------------------------------------

def write(path, text, mode=0o644, uid=0):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    os.chown(path, uid, 0)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def root_tmp():
    """A directory only root controls all the way up (pytest's tmp_path is
    under /tmp, which anyone may write: no spec there is trusted)."""
    import pathlib
    import shutil
    import tempfile
    d = tempfile.mkdtemp(dir="/run", prefix="charlie-test-cdi.")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d)


@needs_root
@pytest.mark.parametrize("how,words", [
    ("user's", ("not trusted", "owned by uid 1000")),
    ("group-writable", ("not trusted", "writable by others")),
    ("link", ("cannot open",)),
    ("fifo", ("not a regular file",)),
    ("huge", ("larger than 4 MiB",)),
    ("latin1", ("not UTF-8",)),
])
def test_a_spec_root_should_not_trust_is_refused(tmp_path, how, words):
    p = str(tmp_path / "x.json")
    if how == "user's":
        write(p, spec(), uid=1000)
    elif how == "group-writable":
        write(p, spec(), 0o664)
    elif how == "link":
        write(str(tmp_path / "real.json"), spec())
        os.symlink(str(tmp_path / "real.json"), p)
    elif how == "fifo":
        os.mkfifo(p)
    elif how == "huge":
        write(p, " " * (cdi.MAX_SPEC_BYTES + 1) + spec())
    else:
        with open(p, "wb") as f:
            f.write(b'{"cdiVersion": "0.3.0", "kind": "a.com/b\xe9"}')
    with pytest.raises(UserError) as e:
        cdi.read_spec(p)
    for w in words:
        assert w in e.value.line(), e.value.line()


@needs_root
def test_directories_later_ones_win_and_broken_specs_refuse_every_request(root_tmp):
    etc, run = root_tmp / "etc", root_tmp / "run"
    etc.mkdir(), run.mkdir()
    dev = lambda n, p: {"name": n, "containerEdits": {"deviceNodes": [{"path": p}]}}  # noqa: E731
    write(str(etc / "gpu.json"), spec([dev("a", "/dev/old"), dev("b", "/dev/b")],
                                      edits={"env": ["SPEC=etc"]}))
    write(str(run / "gpu.yaml"), "cdiVersion: 0.3.0\nkind: example.com/gpu\n"
          "containerEdits: {env: [SPEC=run]}\n"
          "devices:\n- {name: a, containerEdits: {deviceNodes: [{path: /dev/new}]}}\n")
    write(str(run / "README"), "not a spec")
    reg = cdi.load_dirs([str(etc), str(run), str(root_tmp / "absent")])
    assert reg.broken == []
    got = reg.resolve(["example.com/gpu=a", "example.com/gpu=b", "example.com/gpu=a"])
    assert [n.path for n in got.device_nodes] == ["/dev/new", "/dev/b"]
    assert got.env == ("SPEC=run", "SPEC=etc")  # each spec's own edits once
    assert reg.resolve([]) == cdi.Edits()
    with pytest.raises(UserError, match="no device 'c' of kind example.com/gpu") as e:
        reg.resolve(["example.com/gpu=c"])
    assert e.value.hint == "its devices: a, b"
    with pytest.raises(UserError, match="no spec on this node has devices of kind nvidia.com/gpu") \
            as e:
        reg.resolve(["nvidia.com/gpu=0"])
    assert e.value.hint.startswith("known kinds: example.com/gpu;")
    with pytest.raises(UserError, match="not a qualified device name"):
        reg.resolve(["gpu0"])
    # a second spec of the same device in one directory, and a broken one
    write(str(run / "more.json"), spec([dev("a", "/dev/other")]))
    reg = cdi.load_dirs([str(etc), str(run)])
    with pytest.raises(UserError, match=r"more.json: device example.com/gpu=a is also in"):
        reg.resolve(["example.com/gpu=b"])
    os.unlink(run / "more.json")
    write(str(run / "zz.json"), spec(edits={"oops": 1}))
    reg = cdi.load_dirs([str(etc), str(run)])
    with pytest.raises(UserError, match=r"zz.json: containerEdits: unknown field 'oops'"):
        reg.resolve(["example.com/gpu=b"])
    assert stat.S_ISDIR(os.stat(run).st_mode)


@needs_root
def test_a_host_path_is_handed_to_a_job_only_when_root_alone_controls_it(root_tmp):
    root = root_tmp / "r"
    (root / "lib").mkdir(parents=True)
    lib = root / "lib" / "libfake.so.1"
    write(str(lib), "ELF")
    os.symlink("libfake.so.1", root / "lib" / "libfake.so")
    os.mknod(str(root / "gpu0"), stat.S_IFCHR | 0o666, os.makedev(195, 0))
    assert cdi.untrusted_source(str(lib)) is None
    assert cdi.untrusted_source(str(root / "lib" / "libfake.so")) is None  # root's link
    assert cdi.untrusted_source(str(root / "gpu0"), device=True) is None
    assert cdi.untrusted_source(str(lib), device=True) == f"{lib}: not a device node"
    assert "No such file" in cdi.untrusted_source(str(root / "absent"))
    os.chmod(lib, 0o664)
    assert cdi.untrusted_source(str(lib)) == f"{lib}: writable by others than root"
    os.chmod(lib, 0o644)
    os.chown(root / "lib", 1000, 1000)
    assert cdi.untrusted_source(str(lib)) == f"{root}/lib: owned by uid 1000, not root"
    os.chown(root / "lib", 0, 0)
    os.chmod(root / "lib", 0o1777)  # sticky /tmp-like: a user can add what they like
    assert "a directory writable by others" in cdi.untrusted_source(str(lib))
    os.chmod(root / "lib", 0o755)
    os.lchown(root / "lib" / "libfake.so", 1000, 1000)
    assert cdi.untrusted_source(str(root / "lib" / "libfake.so")) == \
        f"{root}/lib/libfake.so: a link owned by uid 1000"
    os.unlink(root / "lib" / "libfake.so")
    os.symlink(str(root / "lib" / "loop"), root / "lib" / "loop")
    assert cdi.untrusted_source(str(root / "lib" / "loop")) == "too many links"


@needs_root
@pytest.mark.parametrize("edits,words", [
    ({"deviceNodes": [{"path": "/dev/fake0", "hostPath": "/etc/passwd"}]},
     ("device node /etc/passwd: /etc/passwd: not a device node",)),
    ({"mounts": [{"hostPath": "USERFILE", "containerPath": "/usr/lib/libcuda.so.1"}]},
     ("owned by uid 1000",)),
    ({"mounts": [{"hostPath": "/etc/hostname", "containerPath": "/x", "type": "tmpfs"}]},
     ("not a bind mount", "type tmpfs")),
    ({"mounts": [{"hostPath": "/etc/hostname", "containerPath": "/x",
                  "options": ["bind", "suid"]}]}, ("not a bind mount", "suid")),
    ({"env": ["CH_META=/elsewhere"]}, ("env CH_META", "slurm-charlie's own")),
])
def test_the_prolog_refuses_a_spec_that_would_hand_a_job_what_root_does_not_control(
        root_tmp, edits, words):
    user_file = root_tmp / "libcuda.so.1"
    write(str(user_file), "ELF", uid=1000)
    text = spec(edits=json.loads(json.dumps(edits).replace("USERFILE", str(user_file))),
                version="0.5.0")
    d = root_tmp / "cdi"
    d.mkdir()
    write(str(d / "x.json"), text)
    reg = cdi.load_dirs([str(d)])
    assert reg.resolve(["example.com/gpu=a"]) is not None  # unchecked: read fine
    with pytest.raises(UserError) as e:
        reg.resolve(["example.com/gpu=a"], check=True)
    assert e.value.line().startswith(f"CDI spec {d}/x.json: "), e.value.line()
    for w in words:
        assert w in e.value.line(), e.value.line()


@needs_root
def test_a_spec_directory_others_may_write_is_not_read(root_tmp):
    d = root_tmp / "cdi"
    d.mkdir()
    write(str(d / "x.json"), spec())
    os.chmod(d, 0o777)
    reg = cdi.load_dirs([str(d)])
    assert reg.specs == [] and len(reg.broken) == 1
    with pytest.raises(UserError, match="CDI spec directory .*: not trusted: .*writable by others"):
        reg.resolve(["example.com/gpu=a"])
