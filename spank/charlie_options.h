/* Generated from slurm_charlie/options.py by `slurm-charlie gen header`.
 * Do not edit: change the Python table and regenerate (make -C spank header). */
#ifndef CHARLIE_OPTIONS_H
#define CHARLIE_OPTIONS_H

#define CHARLIE_MAX_DIRS 4

/* <runtime_root>/<job>/run/: files the prolog leaves for the shim
 * (slurm_charlie/layout.py, SHIM_FILES) */
#define CHARLIE_RUN_DIR "run"
#define CHARLIE_RUN_TASK_ENV "task.env"
#define CHARLIE_RUN_ERROR "error"
#define CHARLIE_RUN_NOTICE "notice"
#define CHARLIE_RUN_GUEST_WAIT "guest-wait"
#define CHARLIE_RUN_GUEST_TASKS "guest-tasks"
#define CHARLIE_RUN_HOLDER "holder"
/* <dir>/<node>/<job>: locked (flock) while the background prolog prepares
 * the node (slurm_charlie/asroot/background.py); task_init waits for it */
#define CHARLIE_SETUP_DIR "/run/slurm-charlie"
/* in a task's environment, =1: a VM job's task stays on the host */
#define CHARLIE_ON_HOST_VAR "CHARLIE_ON_HOST"

struct charlie_opt {
    const char *name;      /* without --, as registered with Slurm */
    const char *arginfo;
    const char *usage;
    int has_arg;           /* 0 flag, 1 value, 2 optional value */
    int max_count;
    const char *choices;   /* "a|b|c" or NULL */
};

static const struct charlie_opt charlie_opts[] = {
    { "charlie-image", "PATH", "VM image (qcow2/raw) or container image (dir, tarball, squashfs, or docker://[REGISTRY/]NAME[:TAG] from a registry)", 1, 1, NULL },
    { "charlie-type", "TYPE", "auto|container|vm|none: what to start (auto: from the image)", 1, 1, "auto|container|vm|none" },
    { "charlie-dir", "DIR", "host directory shown as /ch/dataN (repeat, up to 4); sets CH_DATAn", 1, 4, NULL },
    { "charlie-job", "SCRIPT", "VM batch mode: run SCRIPT on every guest at boot; the job's output and exit code are guest 0's", 1, 1, NULL },
    { "charlie-interactive", NULL, "boot the guests and wait; do not run a job script", 0, 1, NULL },
    { "charlie-commit", "GUEST", "at job end save guest GUEST's (default 0) root changes into the image", 2, 1, NULL },
    { "charlie-write", NULL, "container image writable (ch-run -w)", 0, 1, NULL },
    { "charlie-uid", "UID", "container: run as this user id inside (e.g. 0), mapped to you", 1, 1, NULL },
    { "charlie-gid", "GID", "container: run with this group id inside, mapped to your group", 1, 1, NULL },
    { "charlie-cpus", "N", "VM CPUs per guest, at most the job's CPUs on that node (the default)", 1, 1, NULL },
    { "charlie-mem", "SIZE", "VM memory per guest, e.g. 4G; with QEMU's share at most the job's memory on the node (default: the job's --mem less QEMU's share)", 1, 1, NULL },
    { "charlie-tmp-size", "SIZE", "size of each guest's /ch/tmp disk, e.g. 2G (default: site config)", 1, 1, NULL },
};

#define CHARLIE_NOPTS (sizeof(charlie_opts) / sizeof(charlie_opts[0]))

#endif
