/* MPI ping-pong between ranks 0 and 1: half round-trip latency for 8 bytes
 * and bandwidth for 1 MiB messages.  Prints one line per size. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static double run(int rank, char *buf, int size, int iters) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t = MPI_Wtime();
    for (int i = 0; i < iters; i++) {
        if (rank == 0) {
            MPI_Send(buf, size, MPI_BYTE, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(buf, size, MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            MPI_Recv(buf, size, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, size, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
        }
    }
    return (MPI_Wtime() - t) / iters / 2;
}

int main(int argc, char **argv) {
    int rank, big = 1 << 20;
    char *buf = calloc(1, big);
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    run(rank, buf, 8, 200);  /* warm up */
    double lat = run(rank, buf, 8, 2000);
    run(rank, buf, big, 10);
    double bw = big / run(rank, buf, big, 200);
    if (rank == 0)
        printf("PINGPONG latency_us %.3f bandwidth_MBps %.1f\n", lat * 1e6, bw / 1e6);
    MPI_Finalize();
    free(buf);
    return 0;
}
