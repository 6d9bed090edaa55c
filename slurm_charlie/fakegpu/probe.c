/* A GPU probe in the manner of `nvidia-smi -L`, for the sandbox's fake
 * vendor (installed there as nvidia-smi) and for the real-host check
 * (tests/gpu-host-check): it loads libcuda.so.1 the way CUDA programs do
 * (by its soname, through the loader's cache), says which file the loader
 * took, and lists the devices the driver shows this process:
 *
 *   library /usr/lib/x86_64-linux-gnu/libcuda.so.1
 *   driver 12040
 *   GPU 0: NAME (UUID: GPU-...)
 *   devices 1
 *
 * Exit status: 0 with at least one device, 2 with none, 1 when the
 * library cannot be loaded or a call fails.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>

typedef int (*init_f)(unsigned int);
typedef int (*count_f)(int *);
typedef int (*get_f)(int *, int);
typedef int (*uuid_f)(unsigned char *, int);
typedef int (*name_f)(char *, int, int);
typedef int (*version_f)(int *);

static void *need(void *lib, const char *name)
{
    void *f = dlsym(lib, name);
    if (f == NULL)
        fprintf(stderr, "probe: libcuda.so.1 has no %s\n", name);
    return f;
}

int main(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    struct link_map *map = NULL;
    init_f init;
    count_f count;
    get_f get;
    uuid_f uuid;
    name_f name;
    version_f version;
    int n = 0, rc, v = 0, i;

    if (lib == NULL) {
        fprintf(stderr, "probe: cannot load libcuda.so.1: %s\n", dlerror());
        return 1;
    }
    if (dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map != NULL)
        printf("library %s\n", map->l_name);
    init = (init_f)need(lib, "cuInit");
    count = (count_f)need(lib, "cuDeviceGetCount");
    get = (get_f)need(lib, "cuDeviceGet");
    uuid = (uuid_f)need(lib, "cuDeviceGetUuid");
    name = (name_f)need(lib, "cuDeviceGetName");
    version = (version_f)need(lib, "cuDriverGetVersion");
    if (!init || !count || !get || !uuid || !name || !version)
        return 1;
    if (version(&v) == 0)
        printf("driver %d\n", v);
    rc = init(0);
    if (rc == 100) {            /* CUDA_ERROR_NO_DEVICE */
        printf("devices 0\n");
        return 2;
    }
    if (rc != 0 || count(&n) != 0) {
        fprintf(stderr, "probe: cuInit/cuDeviceGetCount failed (CUresult %d)\n", rc);
        return 1;
    }
    for (i = 0; i < n; i++) {
        unsigned char u[16];
        char text[256] = "";
        int dev;
        if (get(&dev, i) != 0 || uuid(u, dev) != 0) {
            fprintf(stderr, "probe: device %d: no UUID\n", i);
            return 1;
        }
        if (name(text, sizeof text, dev) != 0)
            text[0] = 0;
        printf("GPU %d: %s (UUID: GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
               "%02x%02x%02x%02x%02x%02x)\n", i, text, u[0], u[1], u[2], u[3], u[4], u[5],
               u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    }
    printf("devices %d\n", n);
    return n ? 0 : 2;
}
