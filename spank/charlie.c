/*
 * slurm-charlie SPANK shim.  Small on purpose: policy lives in Python.
 *
 * local/allocator context (srun, sbatch, salloc; as the user):
 *   registers the --charlie-* options (table generated from options.py),
 *   checks their syntax, runs `slurm-charlie validate --emit` once and hands
 *   each NAME=VALUE line it prints to spank_job_control_setenv(), where the
 *   prolog and epilog find it as SPANK_NAME.
 * remote context (slurmstepd; as the user):
 *   task_init: waits while the background prolog holds its lock on
 *              CHARLIE_SETUP_DIR/<node>/<job>; then
 *              when the prolog left <runtime_root>/<job>/run/error, prints it
 *              to the task's stderr and fails the task; else exports the
 *              lines of <runtime_root>/<job>/run/task.env (CH_* always,
 *              others only where the task has no value) and, for container
 *              jobs, enters the node's container (run/holder); for VM jobs
 *              becomes a relay to the guest (run/guest-tasks).
 *
 * plugstack.conf arguments: bin=PATH (slurm-charlie), runtime_root=PATH
 * (as in the site config, %n = node name), conf=PATH (site config, optional).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "charlie_options.h"

SPANK_PLUGIN(charlie, 1);

#define PFX "slurm-charlie"
#define MAX_VALUES CHARLIE_MAX_DIRS

extern char **environ;

static struct {
    char *bin;
    char *runtime_root;
    char *conf;
} cfg;

static char *values[CHARLIE_NOPTS][MAX_VALUES];
static int counts[CHARLIE_NOPTS];
static int any_given;

static int in_choices(const char *choices, const char *v)
{
    size_t n = strlen(v);
    const char *p = choices;

    while (p && *p) {
        const char *end = strchr(p, '|');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, v, n) == 0)
            return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

static int opt_cb(int val, const char *optarg, int remote)
{
    const struct charlie_opt *o;
    int i;

    if (remote || val < 0 || (size_t)val >= CHARLIE_NOPTS)
        return 0;
    o = &charlie_opts[val];
    /* scrontab parses #SCRON options but never runs init_post_opt: the
     * options would be dropped and the entry run on the bare host */
    if (strcmp(program_invocation_short_name, "scrontab") == 0) {
        slurm_error(PFX ": --%s: scrontab cannot run charlie jobs (it never checks "
                    "their options)", o->name);
        slurm_error(PFX ": hint: let the entry run `sbatch --%s=... script` instead, "
                    "or use sbatch --begin for a one-off", o->name);
        return -1;
    }
    if (optarg && strpbrk(optarg, "\r\n")) {
        slurm_error(PFX ": --%s: value contains a newline", o->name);
        return -1;
    }
    if (o->has_arg == 1 && (optarg == NULL || *optarg == '\0')) {
        slurm_error(PFX ": --%s: needs a value (--%s=%s)", o->name, o->name, o->arginfo);
        return -1;
    }
    if (o->choices && optarg && !in_choices(o->choices, optarg)) {
        slurm_error(PFX ": --%s: unknown value: '%s'", o->name, optarg);
        slurm_error(PFX ": hint: valid values: %s", o->choices);
        return -1;
    }
    /* sbatch may parse its options more than once: the same value again is
     * the same option, not a repetition */
    for (i = 0; i < counts[val]; i++)
        if (values[val][i] && optarg && strcmp(values[val][i], optarg) == 0)
            return 0;
    if (counts[val] >= o->max_count) {
        if (o->max_count == 1) {
            free(values[val][0]);
            counts[val] = 0;
        } else {
            slurm_error(PFX ": --%s: given more than %d times: %s", o->name,
                        o->max_count, optarg ? optarg : "");
            slurm_error(PFX ": hint: pass at most %d directories; put others below one of them",
                        o->max_count);
            return -1;
        }
    }
    values[val][counts[val]++] = optarg ? strdup(optarg) : NULL;
    any_given = 1;
    return 0;
}

static int parse_args(int ac, char **av)
{
    int i;

    for (i = 0; i < ac; i++) {
        if (strncmp(av[i], "bin=", 4) == 0)
            cfg.bin = av[i] + 4;
        else if (strncmp(av[i], "runtime_root=", 13) == 0)
            cfg.runtime_root = av[i] + 13;
        else if (strncmp(av[i], "conf=", 5) == 0)
            cfg.conf = av[i] + 5;
        else {
            slurm_error(PFX ": plugstack.conf: unknown argument: %s", av[i]);
            slurm_error(PFX ": hint: valid arguments: bin= runtime_root= conf=");
            return -1;
        }
    }
    if (cfg.bin == NULL || cfg.runtime_root == NULL) {
        slurm_error(PFX ": plugstack.conf: bin= and runtime_root= are required");
        slurm_error(PFX ": hint: run `slurm-charlie install-hooks` for the line to use");
        return -1;
    }
    return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    struct spank_option opt;
    spank_context_t ctx = spank_context();
    size_t i;

    if (ctx == S_CTX_SLURMD || ctx == S_CTX_JOB_SCRIPT)
        return 0;
    if (parse_args(ac, av) < 0)
        return -1;
    for (i = 0; i < CHARLIE_NOPTS; i++) {
        memset(&opt, 0, sizeof(opt));
        opt.name = (char *)charlie_opts[i].name;
        opt.arginfo = (char *)charlie_opts[i].arginfo;
        opt.usage = (char *)charlie_opts[i].usage;
        opt.has_arg = charlie_opts[i].has_arg;
        opt.val = (int)i;
        opt.cb = opt_cb;
        if (spank_option_register(sp, &opt) != ESPANK_SUCCESS) {
            slurm_error(PFX ": cannot register option --%s", opt.name);
            return -1;
        }
    }
    return 0;
}

/* Does "CHARLIE_X=..." name one of our options (CHARLIE_TMP_SIZE for
 * --charlie-tmp-size)?  Other CHARLIE_* variables are someone else's. */
static int is_option_var(const char *e)
{
    size_t i, j;

    for (i = 0; i < CHARLIE_NOPTS; i++) {
        const char *n = charlie_opts[i].name + 8;  /* after "charlie-" */
        for (j = 0; n[j]; j++)
            if (e[8 + j] != (n[j] == '-' ? '_' : toupper((unsigned char)n[j])))
                break;
        if (n[j] == '\0' && e[8 + j] == '=')
            return 1;
    }
    return 0;
}

/* Edit distance (insert, delete, substitute, swap two neighbours) between
 * two short names; anything above 2 is reported as 3. */
static int distance(const char *a, size_t la, const char *b, size_t lb)
{
    int d[40][40];
    size_t i, j;

    if (la >= 40 || lb >= 40)
        return 3;
    for (i = 0; i <= la; i++)
        d[i][0] = (int)i;
    for (j = 0; j <= lb; j++)
        d[0][j] = (int)j;
    for (i = 1; i <= la; i++)
        for (j = 1; j <= lb; j++) {
            int best = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            if (d[i - 1][j] + 1 < best)
                best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best)
                best = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    return d[la][lb] > 2 ? 3 : d[la][lb];
}

/* A CHARLIE_* variable in the submitting environment that is not an option
 * but nearly one (CHARLIE_IMGAE): the job would silently run without what
 * it asked for, so the submission fails and names the right variable. */
static int misspelt_var(void)
{
    char want[64];
    char **e;
    size_t i, j, len;

    for (e = environ; e && *e; e++) {
        if (strncmp(*e, "CHARLIE_", 8) != 0 || is_option_var(*e))
            continue;
        len = strcspn(*e + 8, "=");
        if (len < 3)
            continue;
        for (i = 0; i < CHARLIE_NOPTS; i++) {
            const char *n = charlie_opts[i].name + 8;
            for (j = 0; n[j] && j < sizeof(want) - 1; j++)
                want[j] = n[j] == '-' ? '_' : (char)toupper((unsigned char)n[j]);
            want[j] = '\0';
            if (distance(*e + 8, len, want, j) <= (j > 4 ? 2 : 1)) {
                slurm_error(PFX ": %.*s is not a slurm-charlie variable", (int)(len + 8), *e);
                slurm_error(PFX ": hint: did you mean CHARLIE_%s? (or unset %.*s: "
                            "CHARLIE_* names belong to slurm-charlie)", want,
                            (int)(len + 8), *e);
                return 1;
            }
        }
    }
    return 0;
}

/* The name of the first option variable in the task's environment
 * (CHARLIE_IMAGE=...), written to buf; 0 when there is none. */
static int task_asks_charlie(spank_t sp, char *buf, size_t size)
{
    char value[16];
    size_t i, j;

    for (i = 0; i < CHARLIE_NOPTS; i++) {
        const char *n = charlie_opts[i].name + 8;  /* after "charlie-" */
        if (8 + strlen(n) >= size)
            continue;
        memcpy(buf, "CHARLIE_", 8);
        for (j = 0; n[j]; j++)
            buf[8 + j] = n[j] == '-' ? '_' : (char)toupper((unsigned char)n[j]);
        buf[8 + j] = '\0';
        if (spank_getenv(sp, buf, value, sizeof(value)) != ESPANK_ENV_NOEXIST)
            return 1;
    }
    return 0;
}

static int env_has_charlie(void)
{
    char **e;

    for (e = environ; e && *e; e++)
        if (strncmp(*e, "CHARLIE_", 8) == 0 && is_option_var(*e))
            return 1;
    return 0;
}

/* Run the validator; hand every NAME=VALUE line it prints to Slurm. */
static int run_validator(spank_t sp)
{
    char *argv[4 + CHARLIE_NOPTS * MAX_VALUES];
    char *owned[CHARLIE_NOPTS * MAX_VALUES];
    int nowned = 0, argc = 0, pfd[2] = { -1, -1 }, status = 0, rv = -1;
    size_t i, len = 0, cap = 4096;
    char *out = NULL, *line, *save = NULL;
    pid_t pid;
    ssize_t n;
    int j;

    argv[argc++] = cfg.bin;
    argv[argc++] = "validate";
    argv[argc++] = "--emit";
    for (i = 0; i < CHARLIE_NOPTS; i++) {
        for (j = 0; j < counts[i]; j++) {
            char *w;
            if (values[i][j])
                n = asprintf(&w, "--%s=%s", charlie_opts[i].name, values[i][j]);
            else
                n = asprintf(&w, "--%s", charlie_opts[i].name);
            if (n < 0)
                goto fail;
            owned[nowned++] = argv[argc++] = w;
        }
    }
    argv[argc] = NULL;

    if ((out = malloc(cap)) == NULL || pipe(pfd) < 0)
        goto fail;
    pid = fork();
    if (pid < 0) {
        slurm_error(PFX ": fork: %m");
        goto fail;
    }
    if (pid == 0) {
        dup2(pfd[1], STDOUT_FILENO);
        close(pfd[0]);
        close(pfd[1]);
        if (cfg.conf)
            setenv("SLURM_CHARLIE_CONF", cfg.conf, 1);
        execv(cfg.bin, argv);
        fprintf(stderr, PFX ": error: cannot run the validator %s: %s\n"
                PFX ": hint: check bin= in plugstack.conf (slurm-charlie install-hooks)\n",
                cfg.bin, strerror(errno));
        _exit(127);
    }
    close(pfd[1]);
    pfd[1] = -1;
    while ((n = read(pfd[0], out + len, cap - len - 1)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        len += (size_t)n;
        if (cap - len < 2) {
            char *bigger = realloc(out, cap * 2);
            if (bigger == NULL)
                break;
            out = bigger;
            cap *= 2;
        }
    }
    out[len] = '\0';
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        goto fail;  /* the validator printed why */
    for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *eq = strchr(line, '=');
        if (eq == NULL || strncmp(line, "CHARLIE", 7) != 0)
            continue;
        *eq = '\0';
        if (spank_job_control_setenv(sp, line, eq + 1, 1) != ESPANK_SUCCESS) {
            slurm_error(PFX ": cannot pass %s to the job", line);
            goto fail;
        }
    }
    rv = 0;
fail:
    if (pfd[0] >= 0)
        close(pfd[0]);
    if (pfd[1] >= 0)
        close(pfd[1]);
    for (j = 0; j < nowned; j++)
        free(owned[j]);
    free(out);
    return rv;
}

/* Inside an allocation, srun receives the job's options again from the
 * SLURM_SPANK__SLURM_SPANK_OPTION_charlie_* variables sbatch/salloc exported.
 * Returns 1 when every option srun saw came from there. */
static int only_inherited(void)
{
    char name[128], *p;
    const char *env;
    size_t i;

    for (i = 0; i < CHARLIE_NOPTS; i++) {
        if (counts[i] == 0)
            continue;
        snprintf(name, sizeof(name), "SLURM_SPANK__SLURM_SPANK_OPTION_charlie_%s",
                 charlie_opts[i].name);
        for (p = name; *p; p++)
            if (*p == '-')
                *p = '_';
        env = getenv(name);
        if (env == NULL)
            return 0;
        if (values[i][counts[i] - 1] && strcmp(env, values[i][counts[i] - 1]) != 0)
            return 0;
    }
    return 1;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();

    (void)ac;
    (void)av;
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR)
        return 0;
    if (ctx == S_CTX_LOCAL && getenv("SLURM_JOB_ID") != NULL) {
        /* a step inside an existing allocation: the job's charlie settings
         * were fixed when it was allocated */
        if (any_given && !only_inherited()) {
            slurm_error(PFX ": --charlie-* options belong to the allocation "
                        "(sbatch/salloc), not to a step inside it");
            slurm_error(PFX ": hint: give them to sbatch or salloc; steps "
                        "join what the job set up");
            return -1;
        }
        return 0;
    }
    if (misspelt_var())
        return -1;
    if (!any_given && !env_has_charlie())
        return 0;
    return run_validator(sp);
}

/* <runtime_root with %n = node>/<job>/run/<name> */
static int job_file(spank_t sp, const char *name, char *buf, size_t size)
{
    char node[256] = "";
    uint32_t job = 0;
    const char *p;
    size_t o = 0, nl;
    int n;

    if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
        return -1;
    if (spank_getenv(sp, "SLURMD_NODENAME", node, sizeof(node)) != ESPANK_SUCCESS) {
        if (gethostname(node, sizeof(node)) < 0)
            return -1;
        node[strcspn(node, ".")] = '\0';
    }
    nl = strlen(node);
    for (p = cfg.runtime_root; *p; p++) {
        if (p[0] == '%' && p[1] == 'n') {
            if (o + nl >= size)
                return -1;
            memcpy(buf + o, node, nl);
            o += nl;
            p++;
        } else {
            if (o + 1 >= size)
                return -1;
            buf[o++] = *p;
        }
    }
    n = snprintf(buf + o, size - o, "/%u/" CHARLIE_RUN_DIR "/%s", job, name);
    return (n < 0 || (size_t)n >= size - o) ? -1 : 0;
}

static int is_batch_step(spank_t sp)
{
    uint32_t step = 0;

    return spank_get_item(sp, S_JOB_STEPID, &step) == ESPANK_SUCCESS &&
           step == SLURM_BATCH_SCRIPT;
}

/* Copy <job>/run/<name> to the task's stderr; 1 if it existed. */
static int show_job_file(spank_t sp, const char *name)
{
    char path[PATH_MAX], buf[4096];
    size_t n;
    FILE *f;

    if (job_file(sp, name, path, sizeof(path)) < 0 || (f = fopen(path, "re")) == NULL)
        return 0;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
        fwrite(buf, 1, n, stderr);
    fclose(f);
    fflush(stderr);
    return 1;
}

/* Start time (field 22 of /proc/PID/stat) of pid, 0 when unknown. */
static unsigned long long proc_starttime(long pid)
{
    char path[64], buf[1024], *p;
    unsigned long long start = 0;
    size_t n;
    FILE *f;
    int field;

    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    if ((f = fopen(path, "re")) == NULL)
        return 0;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    if ((p = strrchr(buf, ')')) == NULL)
        return 0;
    /* after ") " comes field 3 (state); starttime is field 22 */
    for (field = 2, p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    if (sscanf(p, "%llu", &start) != 1)
        return 0;
    return start;
}

/* Join the container holder's user and mount namespaces (run/holder:
 * "PID STARTTIME MNTNS").  Returns 0 when there is no holder and none is
 * needed; a container job (needed) never runs a task on the host instead. */
static int join_holder(spank_t sp, int needed)
{
    char path[PATH_MAX], cwd[PATH_MAX], nspath[64];
    unsigned long long start = 0, mntns = 0;
    int userfd = -1, mntfd = -1, rv = -1;
    struct stat st;
    long pid = 0;
    FILE *f;

    /* the batch script stays on the host, so that it can call srun */
    if (is_batch_step(sp))
        return 0;
    if (job_file(sp, CHARLIE_RUN_HOLDER, path, sizeof(path)) < 0 ||
        (f = fopen(path, "re")) == NULL) {
        uint32_t step = 0;
        if (!needed || (spank_get_item(sp, S_JOB_STEPID, &step) == ESPANK_SUCCESS &&
                        step == SLURM_EXTERN_CONT))
            return 0;
        fprintf(stderr, PFX ": error: container: the job's container record %s "
                "cannot be read (%s); the task is not run outside the container\n"
                PFX ": hint: the node's slurm-charlie log says what its prolog did\n",
                path, strerror(errno));
        return -1;
    }
    if (fscanf(f, "%ld %llu %llu", &pid, &start, &mntns) != 3 || pid <= 1) {
        fclose(f);
        fprintf(stderr, PFX ": error: container: bad holder record: %s\n", path);
        return -1;
    }
    fclose(f);
    if (proc_starttime(pid) != start) {
        fprintf(stderr, PFX ": error: container: the job's container (pid %ld) "
                "is gone\n", pid);
        return -1;
    }
    snprintf(nspath, sizeof(nspath), "/proc/%ld/ns/user", pid);
    userfd = open(nspath, O_RDONLY | O_CLOEXEC);
    snprintf(nspath, sizeof(nspath), "/proc/%ld/ns/mnt", pid);
    mntfd = open(nspath, O_RDONLY | O_CLOEXEC);
    if (userfd < 0 || mntfd < 0 || fstat(mntfd, &st) < 0 ||
        (unsigned long long)st.st_ino != mntns || proc_starttime(pid) != start) {
        fprintf(stderr, PFX ": error: container: cannot open the namespaces of "
                "pid %ld: %s\n", pid, strerror(errno));
        goto fail;
    }
    if (getcwd(cwd, sizeof(cwd)) == NULL)
        strcpy(cwd, "/");
    if (setns(userfd, CLONE_NEWUSER) < 0 || setns(mntfd, CLONE_NEWNS) < 0) {
        fprintf(stderr, PFX ": error: container: setns: %s\n", strerror(errno));
        goto fail;
    }
    if (chdir(cwd) < 0 && chdir("/") < 0) {
        fprintf(stderr, PFX ": error: container: chdir /: %s\n", strerror(errno));
        goto fail;
    }
    rv = 0;
fail:
    if (userfd >= 0)
        close(userfd);
    if (mntfd >= 0)
        close(mntfd);
    return rv;
}

/* VM batch mode (run/guest-wait exists): the batch step becomes
 * `slurm-charlie guest-wait JOBDIR`, which shows guest 0's job output and
 * exits with its exit code.  Returns only on failure. */
static int guest_wait(spank_t sp)
{
    char path[PATH_MAX], *cut, **env = NULL;
    char *argv[4];

    if (job_file(sp, CHARLIE_RUN_GUEST_WAIT, path, sizeof(path)) < 0 ||
        access(path, F_OK) < 0)
        return 0;
    cut = strstr(path, "/" CHARLIE_RUN_DIR "/" CHARLIE_RUN_GUEST_WAIT);
    if (cut == NULL)
        return -1;
    *cut = '\0';
    fflush(NULL);
    /* the task's environment (SLURM_JOB_ID, node list ...), not slurmstepd's:
     * guest-wait starts an srun step inside the job */
    if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || env == NULL)
        env = environ;
    argv[0] = cfg.bin;
    argv[1] = "guest-wait";
    argv[2] = path;
    argv[3] = NULL;
    execve(cfg.bin, argv, env);
    fprintf(stderr, PFX ": error: cannot run %s guest-wait: %s\n", cfg.bin,
            strerror(errno));
    return -1;
}

/* VM job (run/guest-tasks, the node's task multiplexer, exists): the task
 * becomes `slurm-charlie task-relay SOCKET ARGV...`, which runs ARGV in the
 * node's guest with the task's environment, stdio, PMI_FD, signals and exit
 * status.  Not the batch script, not the extern step, and not a task whose
 * environment says CHARLIE_ON_HOST=1.  Returns only on failure. */
static int guest_task(spank_t sp)
{
    char path[PATH_MAX], flag[8];
    char **env = NULL, **targv = NULL, **argv;
    uint32_t step = 0;
    int targc = 0, i;

    if (is_batch_step(sp) ||
        spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS ||
        step == SLURM_EXTERN_CONT)
        return 0;
    if (job_file(sp, CHARLIE_RUN_GUEST_TASKS, path, sizeof(path)) < 0 ||
        access(path, F_OK) < 0)
        return 0;
    if (spank_getenv(sp, CHARLIE_ON_HOST_VAR, flag, sizeof(flag)) == ESPANK_SUCCESS &&
        strcmp(flag, "1") == 0)
        return 0;
    if (spank_get_item(sp, S_JOB_ARGV, &targc, &targv) != ESPANK_SUCCESS || targc < 1) {
        fprintf(stderr, PFX ": error: no command for the guest\n");
        return -1;
    }
    if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || env == NULL)
        env = environ;
    if ((argv = calloc((size_t)targc + 4, sizeof(*argv))) == NULL)
        return -1;
    argv[0] = cfg.bin;
    argv[1] = "task-relay";
    argv[2] = path;
    for (i = 0; i < targc; i++)
        argv[3 + i] = targv[i];
    fflush(NULL);
    execve(cfg.bin, argv, env);
    fprintf(stderr, PFX ": error: cannot run %s task-relay: %s\n", cfg.bin, strerror(errno));
    free(argv);
    return -1;
}

/* The prolog may leave the node's preparation to a process of its own,
 * which holds a lock on CHARLIE_SETUP_DIR/<node>/<job> until it has ended,
 * having written run/task.env or run/error: wait while it runs.  Returns at
 * once when there is no such file (a plain job, or a prolog that prepared
 * the node itself). */
static void wait_for_setup(spank_t sp)
{
    char path[PATH_MAX], env[PATH_MAX], err[PATH_MAX], node[256] = "";
    useconds_t nap = 1000;
    uint32_t job = 0;
    int fd, n;

    if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS ||
        spank_getenv(sp, "SLURMD_NODENAME", node, sizeof(node)) != ESPANK_SUCCESS ||
        strchr(node, '/') != NULL)
        return;
    n = snprintf(path, sizeof(path), CHARLIE_SETUP_DIR "/%s/%u", node, job);
    if (n < 0 || (size_t)n >= sizeof(path) ||
        job_file(sp, CHARLIE_RUN_TASK_ENV, env, sizeof(env)) < 0 ||
        job_file(sp, CHARLIE_RUN_ERROR, err, sizeof(err)) < 0)
        return;
    if ((fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)) < 0)
        return;
    /* the lock is free once that process has ended, however it ended */
    while (access(env, F_OK) < 0 && access(err, F_OK) < 0 &&
           flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK) {
        usleep(nap);
        if (nap < 20000)
            nap *= 2;
    }
    close(fd);
}

/* Runs in every task (the batch script too), as the user, after slurmstepd
 * has set the task's environment (so SLURMD_NODENAME is this node's). */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    char path[PATH_MAX], line[8192];
    FILE *f;
    int rv = 0, container = 0;

    (void)ac;
    (void)av;
    if (spank_remote(sp) != 1)
        return 0;
    wait_for_setup(sp);
    /* the prolog found a problem with the job: tell the user and fail */
    if (show_job_file(sp, CHARLIE_RUN_ERROR))
        return -1;
    /* warnings the prolog found (e.g. about an unpacked image) go to the
     * batch script's stderr, once */
    if (is_batch_step(sp))
        show_job_file(sp, CHARLIE_RUN_NOTICE);
    if (job_file(sp, CHARLIE_RUN_TASK_ENV, path, sizeof(path)) < 0 ||
        (f = fopen(path, "re")) == NULL) {
        char marker[8], marker_name[64];
        /* a charlie job whose prolog did not finish here must not run as if
         * it were a plain job */
        if (spank_getenv(sp, "SLURM_SPANK_CHARLIE", marker, sizeof(marker)) == ESPANK_SUCCESS) {
            fprintf(stderr, PFX ": error: this node was not prepared for the job "
                    "(%s missing)\n" PFX ": hint: the node's slurm-charlie log says "
                    "why\n", path);
            return -1;
        }
        /* it asks for charlie but came by a path that never checked its
         * options (slurmrestd, a login host without the shim, a step whose
         * variables were set after the allocation): not on the bare host */
        if (task_asks_charlie(sp, marker_name, sizeof(marker_name))) {
            fprintf(stderr, PFX ": error: %s is set, but this job was not submitted as a "
                    "charlie job (it came by the REST API, from a host without "
                    "slurm-charlie, or the variable was set inside the allocation); "
                    "refusing to run it on the bare host\n"
                    PFX ": hint: submit with sbatch or salloc where slurm-charlie is "
                    "installed, or unset %s\n", marker_name, marker_name);
            return -1;
        }
        return 0;  /* not a charlie job */
    }
    while (fgets(line, sizeof(line), f)) {
        char *eq = strchr(line, '=');
        line[strcspn(line, "\n")] = '\0';
        if (eq == NULL || eq == line || strspn(line, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                "abcdefghijklmnopqrstuvwxyz0123456789_") != (size_t)(eq - line))
            continue;
        *eq = '\0';
        if (strcmp(line, "CH_TYPE") == 0 && strcmp(eq + 1, "container") == 0)
            container = 1;
        /* CH_* are ours and always set; anything else is a default (site
         * container.env, SLURM_MPI_TYPE) that the task's own value beats */
        if (spank_setenv(sp, line, eq + 1, strncmp(line, "CH_", 3) == 0) != ESPANK_SUCCESS &&
            strncmp(line, "CH_", 3) == 0) {
            slurm_error(PFX ": cannot set %s for the task", line);
            rv = -1;
        }
    }
    fclose(f);
    if (rv == 0 && join_holder(sp, container) < 0)
        rv = -1;
    if (rv == 0 && is_batch_step(sp))
        rv = guest_wait(sp);
    if (rv == 0)
        rv = guest_task(sp);
    return rv;
}
