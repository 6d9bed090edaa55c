#!/bin/sh
# The virtual-cluster tutorial's job script: every guest runs it at boot;
# guest 0 does the work, the others lend their CPUs.
if [ "$CH_GUEST_ID" != 0 ]; then
    echo "not guest 0; waiting for work"
    exit 0
fi
echo "Are we running on all nodes?"
for g in $(cat /ch/meta/guests); do ssh "$g" hostname; done
echo "Can we do MPI?"
# Open MPI over ssh (the test guest has MPICH too, for srun --mpi=pmi2)
mpirun.openmpi -hostfile /ch/meta/hostfile.openmpi -np "$CH_GUEST_COUNT" /usr/local/bin/mpi_allreduce | sort
