/* slurm-charlie sandbox: a stand-in for a GPU driver's libcuda.so.1.
 *
 * It answers the few CUDA driver calls the sandbox's tests and the probe
 * make (cuInit, cuDeviceGetCount, cuDeviceGet, cuDeviceGetUuid,
 * cuDeviceGetName, cuDriverGetVersion) from the device nodes this process
 * can open.  The fake vendor's CDI spec names every GPU of the node in
 * CHARLIE_SANDBOX_GPUS ("DEVICE=UUID,DEVICE=UUID"); a device is present
 * when open() says ENXIO (allowed by the job's device cgroup, no driver
 * behind it) or succeeds, and absent when it says EPERM (not the job's).
 * CUDA_VISIBLE_DEVICES then picks among the present ones by index or by
 * UUID, as CUDA does.  Nothing here is used outside the sandbox.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct { char bytes[16]; } CUuuid;

enum { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_NOT_INITIALIZED = 3,
       CUDA_ERROR_NO_DEVICE = 100, CUDA_ERROR_INVALID_DEVICE = 101 };

#define MAX_GPUS 64
#define DRIVER_VERSION 12040          /* what cuDriverGetVersion says (CUDA 12.4) */

static int ngpus = -1;                /* -1: cuInit not called yet */
static char uuid_text[MAX_GPUS][41];
static unsigned char uuid_bytes[MAX_GPUS][16];

static int hex(int c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
        : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" -> 16 bytes; 0 on success */
static int parse_uuid(const char *s, unsigned char out[16])
{
    int n = 0;
    if (strncmp(s, "GPU-", 4) != 0)
        return -1;
    for (s += 4; *s && n < 32; s++) {
        if (*s == '-')
            continue;
        if (hex(*s) < 0)
            return -1;
        if (n % 2 == 0)
            out[n / 2] = (unsigned char)(hex(*s) << 4);
        else
            out[n / 2] |= (unsigned char)hex(*s);
        n++;
    }
    return n == 32 && *s == 0 ? 0 : -1;
}

static int present(const char *dev)
{
    int fd = open(dev, O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (fd >= 0) {
        close(fd);
        return 1;
    }
    return errno == ENXIO;
}

static void add(const char *uuid)
{
    if (ngpus < MAX_GPUS && parse_uuid(uuid, uuid_bytes[ngpus]) == 0) {
        snprintf(uuid_text[ngpus], sizeof uuid_text[ngpus], "%s", uuid);
        ngpus++;
    }
}

/* CUDA_VISIBLE_DEVICES: indices into the present GPUs, or UUIDs (prefixes) */
static void select_visible(void)
{
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    char all_text[MAX_GPUS][41], *save = NULL, *item, *copy;
    int n = ngpus;
    if (v == NULL)
        return;
    memcpy(all_text, uuid_text, sizeof all_text);
    ngpus = 0;
    copy = strdup(v);
    for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *end;
        long i = strtol(item, &end, 10);
        if (*item && *end == 0) {
            if (i < 0 || i >= n)
                break;        /* CUDA stops at the first invalid entry */
            add(all_text[i]);
            continue;
        }
        for (i = 0; i < n; i++)
            if (strncmp(all_text[i], item, strlen(item)) == 0)
                break;
        if (i == n)
            break;
        add(all_text[i]);
    }
    free(copy);
}

CUresult cuInit(unsigned int flags)
{
    const char *table = getenv("CHARLIE_SANDBOX_GPUS");
    char *copy, *save = NULL, *item;
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (ngpus >= 0)
        return ngpus ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
    ngpus = 0;
    if (table != NULL) {
        copy = strdup(table);
        for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
            char *eq = strrchr(item, '=');
            if (eq == NULL)
                continue;
            *eq = 0;
            if (present(item))
                add(eq + 1);
        }
        free(copy);
    }
    select_visible();
    return ngpus ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

CUresult cuDriverGetVersion(int *version)
{
    if (version == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *version = DRIVER_VERSION;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count)
{
    if (ngpus < 0)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (count == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *count = ngpus;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    if (ngpus < 0)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (device == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= ngpus)
        return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

/* the checks every per-device call makes, in CUDA's order */
static CUresult check(const void *out, CUdevice device)
{
    if (ngpus < 0)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (out == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    return device < 0 || device >= ngpus ? CUDA_ERROR_INVALID_DEVICE : CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice device)
{
    CUresult rc = check(uuid, device);
    if (rc == CUDA_SUCCESS)
        memcpy(uuid->bytes, uuid_bytes[device], 16);
    return rc;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device)
{
    CUresult rc = check(len > 0 ? name : NULL, device);
    if (rc == CUDA_SUCCESS)
        snprintf(name, (size_t)len, "slurm-charlie sandbox GPU");
    return rc;
}
