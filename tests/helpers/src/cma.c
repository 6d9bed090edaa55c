/* Two tasks on one node: task 0 publishes its pid and a buffer address in
 * DIR/cma.<job>, task 1 reads the buffer with process_vm_readv. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    static char buf[64] = "secret-from-task-0";
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    const char *id = getenv("SLURM_LOCALID"), *job = getenv("SLURM_JOB_ID");
    char path[512], tmp[520];
    snprintf(path, sizeof path, "%s/cma.%s", dir, job ? job : "x");
    if (id && strcmp(id, "0") == 0) {
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        FILE *f = fopen(tmp, "w");
        if (!f) { perror(tmp); return 2; }
        fprintf(f, "%d %p\n", getpid(), (void *)buf);
        fclose(f);
        rename(tmp, path);
        sleep(3);
        return 0;
    }
    int pid = 0; void *addr = NULL; FILE *f = NULL;
    for (int i = 0; i < 100 && !(f = fopen(path, "r")); i++) usleep(50000);
    if (!f || fscanf(f, "%d %p", &pid, &addr) != 2) { fprintf(stderr, "no peer\n"); return 2; }
    char got[64] = "";
    struct iovec l = { got, sizeof got }, r = { addr, sizeof got };
    ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
    if (n < 0) { printf("CMA FAILED: %s\n", strerror(errno)); return 1; }
    printf("CMA OK: %s\n", got);
    return 0;
}
