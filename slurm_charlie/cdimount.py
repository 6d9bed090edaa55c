"""A container job's CDI edits, made in its container.

ch-run (0.31, Debian's) has no CDI of its own, and its ``-b`` cannot do
what a spec asks: it binds read-write, and makes a missing destination as a
directory, so a library cannot be bound where the image has no file.  So
the holder's overlay script (backends/container.py) makes the edits itself,
as the job user in the holder's own user and mount namespaces, before it
execs ch-run on the merged tree (ch-run carries submounts along):

1. in the overlay's upper layer, before the overlay is mounted: the mount
   points the image lacks (empty files or directories, at the path the
   image's own links lead to, never through them out of the image), the
   spec's symbolic links (create-symlinks), and /etc when the loader's
   cache is to be rebuilt;
2. after: each mount bound from the host and made read-only, nosuid and
   nodev (noexec kept where the host has it);
3. the image's own ``ldconfig`` run chrooted in the merged tree for the
   spec's folders (update-ldcache; first the image's CUDA compat folder when
   enable-cuda-compat finds newer compat libraries there).  It writes the
   image's /etc/ld.so.cache in the overlay, and makes the soname links.

Nothing is written to the image, nothing from the spec is run, and root
only plans: every step above runs as the job user.  This module turns the
resolved, checked edits (cdi.Registry.resolve(check=True)) into that plan:
one line per step, tab-separated, for the script to read.
"""

from __future__ import annotations

import dataclasses
import os
import stat

from . import cdi
from .errors import UserError

#: container paths a spec may not mount onto: ch-run mounts the host's own
#: there after us (so the mount would be hidden), or they are slurm-charlie's
RESERVED = ("/dev", "/proc", "/sys", "/ch")
COMPAT_DIR = "/usr/local/cuda/compat"  # where CUDA images keep forward-compat libraries


@dataclasses.dataclass(frozen=True)
class Plan:
    binds: tuple[tuple[str, str, str], ...] = ()   # (host path, container path, options)
    links: tuple[tuple[str, str], ...] = ()        # (target, link in the container)
    ldcache: tuple[str, ...] = ()                  # folders for the loader's cache
    cuda_compat: str = ""                          # host driver version, or ""

    def __add__(self, other: "Plan") -> "Plan":
        seen = {c for _, c, _ in self.binds}
        return Plan(self.binds + tuple(b for b in other.binds if b[1] not in seen),
                    self.links + other.links,
                    self.ldcache + tuple(f for f in other.ldcache if f not in self.ldcache),
                    self.cuda_compat or other.cuda_compat)

    def __bool__(self) -> bool:
        return bool(self.binds or self.links or self.ldcache)

    def text(self) -> str:
        """The script's input: one step per line, fields split by tabs."""
        lines = [f"b\t{h}\t{c}\t{o}" for h, c, o in self.binds]
        lines += [f"l\t{t}\t{ln}" for t, ln in self.links]
        lines += [f"c\t{f}" for f in self.ldcache]
        if self.cuda_compat:
            lines.append(f"x\t{self.cuda_compat}")
        return "\n".join(lines)


def _fail(path: str, what: str, why: str) -> UserError:
    return UserError(f"CDI spec {path}", f"{what}: {why}", hint=(
        "slurm-charlie shows a container the host's /dev and binds the spec's files "
        "itself; fix the spec (or regenerate it: slurm-charlie gpu-spec)"))


def _clean(path: str, spec: str, what: str) -> str:
    if not path.startswith("/") or any(c in path for c in "\t\n\r\0"):
        raise _fail(spec, what, f"{path!r} is not an absolute path on one line")
    return os.path.normpath(path)


def _reserved(path: str) -> bool:
    return path == "/" or any(path == r or path.startswith(r + "/") for r in RESERVED)


def _options(host: str, asked: tuple[str, ...]) -> str:
    """The bind's flags: always ro, nosuid, nodev; noexec where the spec
    asks or the host's mount has it (a remount may not drop it)."""
    flags = ["ro", "nosuid", "nodev"]
    try:
        noexec = bool(os.statvfs(host).f_flag & os.ST_NOEXEC)
    except OSError:
        noexec = False
    if noexec or "noexec" in asked:
        flags.append("noexec")
    return ",".join(flags)


def plan_all(parts: list[tuple[str, cdi.Edits]]) -> Plan:
    """The plan for edits from several specs (Registry.resolve_parts)."""
    out = Plan()
    for spec, edits in parts:
        out = out + plan(edits, spec)
    return out


def plan(edits: cdi.Edits, spec: str = "CDI") -> Plan:
    """The steps for edits (already checked: root's sources, known hooks,
    bind mounts only); a UserError for what a container here cannot get."""
    for node in edits.device_nodes:
        path = _clean(node.path, spec, "deviceNodes path")
        if node.host_path and os.path.normpath(node.host_path) != path:
            raise _fail(spec, f"device node {node.path}", f"its hostPath {node.host_path} "
                        "differs: a container here sees the host's /dev as it is and "
                        "device nodes are never made in it")
        try:
            st = os.stat(path)
        except OSError as e:
            raise _fail(spec, f"device node {path}", e.strerror or "missing") from None
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise _fail(spec, f"device node {path}", "not a device node")
    if edits.additional_gids:
        raise _fail(spec, "additionalGids", "a container here has only the job user's "
                    "own groups")
    binds, seen = [], set()
    for m in edits.mounts:
        dst = _clean(m.container_path, spec, "mount containerPath")
        src = _clean(m.host_path, spec, "mount hostPath")
        if _reserved(dst):
            raise _fail(spec, f"mount {m.host_path}", f"onto {dst}: ch-run shows the "
                        "host's /dev, /proc and /sys there, and /ch is slurm-charlie's")
        if dst in seen:
            continue
        seen.add(dst)
        binds.append((src, dst, _options(src, m.options)))
    hooks = cdi.plan_hooks(edits, spec)
    links = []
    for target, link in hooks.symlinks:
        if any(c in target + link for c in "\t\n\r\0"):
            raise _fail(spec, "create-symlinks", f"{link!r} is not on one line")
        if _reserved(link):
            raise _fail(spec, "create-symlinks", f"{link}: under a path slurm-charlie "
                        "or ch-run mounts")
        links.append((target, link))
    for mode, path in hooks.chmods:
        if not (path == "/dev" or path.startswith("/dev/")):
            raise _fail(spec, "chmod hook", f"{path}: only paths in /dev are known "
                        "(the host's, as they are)")
    folders = []
    for f in hooks.ldcache:
        f = _clean(f, spec, "update-ldcache --folder")
        if " " in f:
            raise _fail(spec, "update-ldcache --folder", f"{f!r}: a folder with a space")
        if f not in folders:
            folders.append(f)
    return Plan(tuple(binds), tuple(links), tuple(folders), hooks.cuda_compat or "")


#: the overlay script's part for a plan ($plan): shell functions and the
#: two passes, before and after the overlay is mounted.  Run as the job
#: user, root of its own user namespace, where it cannot reach anything the
#: user could not.
SCRIPT = r'''
tab=$(printf '\t')
LDCONFIG_LIMIT=20
# inimage PATH: PATH in the image with the image's own links followed
# inside it (an absolute link from the image's root, .. never above it);
# fails when a directory on the way is something else in the image
inimage() {
    rest=${1#/} cur= hops=0
    while [ -n "$rest" ]; do
        part=${rest%%/*}
        if [ "$part" = "$rest" ]; then rest=; else rest=${rest#*/}; fi
        case $part in ''|.) continue ;; ..) cur=${cur%/*}; continue ;; esac
        if [ -L "$lower$cur/$part" ]; then
            hops=$((hops + 1))
            [ $hops -le 40 ] || { echo "CDI: too many links at $1 in the image" >&2; return 1; }
            t=$(readlink "$lower$cur/$part")
            case $t in /*) cur= ;; esac
            rest=${t#/}${rest:+/$rest}
        elif [ -n "$rest" ] && [ -e "$lower$cur/$part" ] && [ ! -d "$lower$cur/$part" ]; then
            echo "CDI: the image's $cur/$part is not a directory ($1 goes through it)" >&2
            return 1
        else
            cur=$cur/$part
        fi
    done
    printf '%s\n' "${cur:-/}"
}
# before the overlay: mount points, links and /etc in the upper layer
gpu_prepare() {
    [ -n "$plan" ] || return 0
    while IFS=$tab read -r kind a b c; do
        case $kind in
        b)  r=$(inimage "$b") || exit 1
            mkdir -p "$o/upper${r%/*}"
            if [ -e "$lower$r" ]; then :
            elif [ -d "$a" ]; then mkdir -p "$o/upper$r"
            else : > "$o/upper$r"
            fi ;;
        l)  r=$(inimage "${b%/*}") || exit 1
            n=${b##*/}
            if [ -d "$lower$r/$n" ] && [ ! -L "$lower$r/$n" ]; then
                echo "CDI: link $b not made: the image has a directory there" >&2
            else
                mkdir -p "$o/upper$r" && ln -sfn "$a" "$o/upper$r/$n"
            fi ;;
        c)  r=$(inimage /etc) || exit 1; mkdir -p "$o/upper$r" ;;
        esac
    done <<EOF
$plan
EOF
}
# after: the binds, read-only; then the loader's cache
gpu_apply() {
    [ -n "$plan" ] || return 0
    folders= compat=
    while IFS=$tab read -r kind a b c; do
        case $kind in
        b)  r=$(inimage "$b") || exit 1
            mount --bind "$a" "$o/merged$r" || { echo "CDI: cannot bind $a onto $b" >&2; exit 1; }
            mount -o "remount,bind,$c" "$o/merged$r" ||
                { echo "CDI: cannot make $b $c" >&2; exit 1; } ;;
        c)  folders="${folders:+$folders }$a" ;;
        x)  compat=$a ;;
        esac
    done <<EOF
$plan
EOF
    if [ -n "$compat" ]; then
        # enable-cuda-compat: the image's forward-compat libcuda, when newer
        # than the host's driver, goes first in the loader's cache
        r=$(inimage /usr/local/cuda/compat) || exit 1
        for f in "$lower$r"/libcuda.so.*.*; do
            v=${f##*/libcuda.so.}
            case ${v%%.*} in ''|*[!0-9]*) continue ;; esac
            if [ "${v%%.*}" -gt "${compat%%.*}" ]; then folders="$r${folders:+ $folders}"; break; fi
        done
    fi
    [ -n "$folders" ] || return 0
    chroot=$(command -v chroot || echo /usr/sbin/chroot)  # not on a user's PATH
    why="the image has no /sbin/ldconfig"
    for l in /sbin/ldconfig /usr/sbin/ldconfig; do
        # the image's program, so bounded (it runs before the container is ready)
        # shellcheck disable=SC2086
        out=$(timeout -s KILL $LDCONFIG_LIMIT "$chroot" "$o/merged" "$l" $folders 2>&1) &&
            return 0
        case $? in
        127) ;;  # not there: the next one
        137) why="no answer in $LDCONFIG_LIMIT s"; break ;;
        *) why=$(printf %s "$out" | tr '\n' ' ' | cut -c1-200); break ;;
        esac
    done
    echo "CDI: warning: the image's ldconfig did not update its loader cache for" \
        "$folders ($why);" \
        "programs find the GPU libraries there only in the loader's default folders" \
        "or through LD_LIBRARY_PATH" >&2
}
'''
