"""Everything root does for a job: a closed list of typed operations.

Like OpenSSH's privilege-separation monitor, root's side is a fixed set of
requests; everything else (parsing user data, reading user paths,
templating) runs as the job user through proc.call_as (the mirror of this
package is ``asuser``).  Code outside this package reaches root's rooms only
through the names in ``OPERATIONS`` (``asroot.spawn(...)``); asking for
any other name is an AttributeError.  tests/unit/test_house.py fails when
code outside it chowns, kills, unlinks or mkdirs in root's trees, writes
cgroup files or runs ``ip``/``nft``, and when a caller uses a name that is
not listed here.  docs/root-operations.rst is generated from this table
(``slurm-charlie gen root-ops-rst``) and checked stale by the unit tests.

Rooms: records (root's own record of a job), jobdir (the job directory and
root's other directories), procs (spawn, wait, signal, stop), cgroup (the
job's cgroups), vfio (a VM job's GPUs), node (drain, accounting), fuse (stalled FUSE
connections), jobnet (the job network), background (the
prolog's lock file and its background child), warm (the node's warm hook
server).

Names are resolved when first used, so that the prolog hook, which must
import almost nothing before it forks, pays only for what it touches.
"""

from __future__ import annotations

#: name -> (room, name in the room, what root does).  The closed list.
OPERATIONS: dict[str, tuple[str, str, str]] = {
    # root's records
    "Records": ("records", "Records", "read, write, remove and list root's own record of a "
                "job in <runtime_root>/.root (root's, 0700); the epilog acts on it alone"),
    "JobRecord": ("records", "JobRecord", "type: what root started for a job (schema-checked "
                  "when read)"),
    "ProcRecord": ("records", "ProcRecord", "type: a process root started: pid, start time, "
                   "owner, program, mount namespace"),
    # the job directory
    "create_job_dir": ("jobdir", "create_job_dir", "make <runtime_root>/<job>, owned by the job "
                       "user, 0700, after removing whatever an earlier job of that id left"),
    "remove_job_dir": ("jobdir", "remove_job_dir", "remove <runtime_root>/<job> iteratively, "
                       "fd-relative, following no link, opening nothing that can block"),
    "create_user_dir": ("jobdir", "create_user_dir", "make <base>/<uid> (kept overlays, the "
                        "image cache), owned by the user, 0700"),
    "open_root": ("jobdir", "open_root", "make (root's, 0755) and open runtime_root or the "
                  "image cache, refusing a link or a directory others can write"),
    "remove_old_kept": ("jobdir", "remove_old_kept", "remove kept overlays older than "
                        "reconcile.kept_max_days (regular files, no link followed)"),
    "keep_node_file": ("jobdir", "keep_node_file", "write <runtime_root>/<dir>/<file> "
                       "(root's, 0644; the directory root's, 0755, no link followed): "
                       "what root keeps for the node, e.g. gpu.generate's CDI spec"),
    "open_out_as_root": ("jobdir", "open_out_as_root", "open out/NAME of the job directory for "
                         "appending (no link followed, regular file, owned by root or the user)"),
    "open_log_as_root": ("jobdir", "open_log_as_root", "the same for out/charlie.log"),
    # processes
    "spawn": ("procs", "spawn", "start a program as the job user (its groups, no way back), "
              "recorded before it runs (the gate)"),
    "spawn_in_netns": ("procs", "spawn_in_netns", "the same inside a network namespace root "
                       "made (ip netns exec, setpriv)"),
    "wait_until_ready": ("procs", "wait_until_ready", "wait for a spawned process to be ready; "
                         "kill and reap it when it exits, stays stopped or times out"),
    "READY": ("procs", "READY", "outcome of wait_until_ready"),
    "EXITED": ("procs", "EXITED", "outcome of wait_until_ready"),
    "STOPPED": ("procs", "STOPPED", "outcome of wait_until_ready"),
    "TIMED_OUT": ("procs", "TIMED_OUT", "outcome of wait_until_ready"),
    "matches": ("procs", "matches", "check that a pid is still the process root recorded "
                "(start time, every uid, program)"),
    "alive": ("procs", "alive", "check that a recorded process still runs"),
    "signal_process": ("procs", "signal_process", "signal a recorded process through a pidfd, "
                       "only if it still matches its record"),
    "stop_process": ("procs", "stop_process", "end a recorded process (signal, wait, SIGKILL); "
                     "node fault when it survives SIGKILL"),
    "kill_user_processes": ("procs", "kill_user_processes", "SIGKILL the job user's processes a "
                            "selector picks, each through a pidfd after checking its owner"),
    "abort_stalled_fuse": ("fuse", "abort_stalled", "abort the job user's FUSE connections "
                           "that processes root is ending see and that have requests "
                           "waiting (fusectl), so that SIGKILL can end them"),
    # the job's cgroups
    "cgroup_layout": ("cgroup", "layout", "which cgroup layout Slurm uses on the node (v1 or "
                      "v2, from cgroup.conf and the mounts) and its tree (read only)"),
    "slurm_cgroup_conf": ("cgroup", "slurm_cgroup_conf", "Slurm's cgroup.conf beside "
                          "$SLURM_CONF (read only)"),
    "cgroup_filesystem": ("cgroup", "filesystem", "what is mounted at the cgroup mount point: "
                          "v1, hybrid, v2 or none (read only)"),
    "job_cgroups": ("cgroup", "job_cgroups", "the job's cgroup directories in Slurm's tree "
                    "(read only)"),
    "cgroup_tree_of": ("cgroup", "cgroup_tree_of", "whose Slurm tree a process's cgroup path "
                       "is in (read only)"),
    "join_job_cgroup": ("cgroup", "join_job_cgroup", "move a recorded process into the job's "
                        "cgroup (v1: step_extern/task_N; v2: job_J/charlie) under Slurm's "
                        "lock; set the job's memory limit there"),
    "cgroup_usage": ("cgroup", "cgroup_usage", "CPU time and peak memory of what root placed "
                     "in the job's cgroup (read only)"),
    "kill_in_job_cgroup": ("cgroup", "kill_in_job_cgroup", "end the job's processes still in "
                           "the cgroups root placed it in (v2: cgroup.kill; v1: SIGKILL by "
                           "pidfd to the job user's processes there)"),
    "leave_job_cgroup": ("cgroup", "leave_job_cgroup", "remove the cgroups root made for the "
                         "job, and the job's when empty"),
    "stale_job_cgroups": ("cgroup", "stale_job_cgroups", "list job cgroups root made for jobs "
                          "that no longer run (read only)"),
    # a VM job's GPUs (VFIO)
    "VfioDevice": ("vfio", "Device", "type: a PCI device taken for a guest and the driver "
                   "it goes back to"),
    "vfio_plan": ("vfio", "plan", "the devices a VM job's GPUs take along, their IOMMU "
                  "groups checked (read only)"),
    "vfio_busy": ("vfio", "busy", "which processes have the GPUs' device nodes open (read "
                  "only)"),
    "vfio_take": ("vfio", "take", "bind the job's GPUs (and their slot's other functions) "
                  "to vfio-pci by driver_override, and give their /dev/vfio/N to the job "
                  "user"),
    "vfio_give_back": ("vfio", "give_back", "bind them back to the driver they had and make "
                       "/dev/vfio/N root's again; node fault for a GPU that does not come "
                       "back"),
    "vfio_set_memlock": ("vfio", "set_memlock", "raise the guest's QEMU's locked-memory "
                         "limit to its memory (VFIO pins it), before QEMU runs"),
    # the node
    "drain": ("node", "drain", "take the node out of service (scontrol) with a reason that "
              "says what to fix"),
    "note_job": ("node", "note_job", "add the job's charlie(type, image, digest) part to its "
                 "AdminComment (squeue --json, scontrol update), keeping other text; job's "
                 "first node only"),
    # the job network
    "create_job_network": ("jobnet", "create", "make the job's VXLAN, bridge, TAP and nftables "
                           "rules, and the ssh relay's namespace"),
    "open_tap": ("jobnet", "open_tap", "open the job's TAP device for QEMU"),
    "open_vhost": ("jobnet", "open_vhost", "open /dev/vhost-net for QEMU"),
    "remove_job_network": ("jobnet", "remove", "remove the job's devices, rules and namespace "
                           "by the job's names"),
    "jobs_with_network": ("jobnet", "jobs_with_devices", "job ids that have devices or rules "
                          "on this node (read only)"),
    "job_network_tools_missing": ("jobnet", "missing_tools", "which of ip, bridge, nft are "
                                  "not installed (read only)"),
    "node_addresses": ("jobnet", "node_addresses", "the job's nodes' addresses on the VXLAN "
                       "underlay (read only)"),
    # the background prolog
    "detach_prolog": ("background", "detach", "make /run/slurm-charlie/<node>/<job> (root's), "
                      "lock it and fork the node's preparation into the background"),
    "stop_prolog": ("background", "stop", "kill the job's background prolog if it still runs "
                    "(pid, start time, owner root, pidfd) and wait for it"),
    "remove_prolog_lock": ("background", "remove", "remove the job's lock file"),
    "prolog_locks": ("background", "job_ids", "job ids that have a lock file on this node "
                     "(read only)"),
    "prolog_lock_unusable": ("background", "unusable", "why the lock directory cannot be used "
                             "(read only)"),
    # the warm hook server
    "warm_prolog": ("warm", "prolog", "hand the background prolog to the node's warm server "
                    "(with the job's lock file)"),
    "warm_epilog": ("warm", "epilog", "hand the epilog to the node's warm server (root's "
                    "socket, 0600, peer uid 0 and same namespaces checked); its exit code"),
    "start_warm": ("warm", "start", "start the node's warm server: a root process with the "
                   "hook code imported that forks a child per prolog and epilog"),
    "serve_warm": ("warm", "serve", "be the node's warm server: hold its lock, listen on "
                   "its socket and fork a child per hook's request"),
    "warm_running": ("warm", "running", "the node's warm server's pid and start time while "
                     "it holds its lock (read only)"),
    "stop_warm": ("warm", "stop", "end the node's warm server (SIGTERM, then SIGKILL through "
                  "a pidfd); the children it forked are left to their hooks"),
    "SETUP_DIR": ("background", "SETUP_DIR", "name: root's directory of the lock files"),
    "prolog_lock_path": ("background", "path", "name: a job's lock file on this node"),
}


def __getattr__(name: str) -> object:
    try:
        room, attr, _ = OPERATIONS[name]
    except KeyError:
        raise AttributeError(f"{name!r} is not one of root's operations "
                             "(slurm_charlie/asroot/__init__.py: OPERATIONS)") from None
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{room}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(OPERATIONS)
