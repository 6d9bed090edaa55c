#!/bin/sh
# A VM job without --charlie-job: this script runs on the host, every srun
# task in its node's guest (docs/vm.rst, "srun in a VM job").
cd data                     # a --charlie-dir share: /ch/data1 in the guests
srun hostname               # chgu0, chgu1, chgu2
srun --mpi=pmi2 /usr/local/bin/mpi_allreduce.mpich
