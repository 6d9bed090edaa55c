#!/bin/bash
# `make demo`: run a 3-node charlie job on the sandbox as the unprivileged
# sandbox user and show what every node saw.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# the project's venv (make venv); the Debian 13 lane passes its own
venv=${CHARLIE_DEMO_VENV:-$here/../../.venv}
eval "$("$venv/bin/slurm-charlie" sandbox env)"
user=chuser
work=$(getent passwd "$user" | cut -d: -f6)/charlie-demo
rm -rf "$work"
mkdir -p "$work/results"
cp "$here/hello-meta.sh" "$work/"
cat > "$work/show-meta.sh" <<'JOB'
#!/bin/sh
echo "== job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (CPUs per node: $SLURM_JOB_CPUS_PER_NODE)"
srun -N3 -n3 --ntasks-per-node=1 sh -c '
  printf "%s: CH_GUEST_ID=%s CH_GUEST_COUNT=%s meta/hosts sha256=%.16s meta/hostfile=[%s]\n   CH_META=%s CH_DATA1=%s\n" \
    "$(hostname)" "$CH_GUEST_ID" "$CH_GUEST_COUNT" "$(sha256sum < "$CH_META/hosts")" \
    "$(tr "\n" " " < "$CH_META/hostfile" | sed "s/ $//")" "$CH_META" "$CH_DATA1" > "out.$(hostname)"'
cat out.node1 out.node2 out.node3
rm -f out.node*
JOB
chmod +x "$work"/*.sh
chown -R "$user:" "$work"
echo "\$ sbatch -N3 -n4 --charlie-dir=results --wait -o demo.out show-meta.sh   (as $user)"
runuser -u "$user" -- env SLURM_CONF="$SLURM_CONF" sh -c \
  "cd '$work' && sbatch -N3 -n4 --charlie-dir=results --wait -o demo.out show-meta.sh"
cat "$work/demo.out"
echo
echo "\$ sbatch -N3 --charlie-image=/nonexistent.qcow2 show-meta.sh   (a mistake, refused at submit)"
runuser -u "$user" -- env SLURM_CONF="$SLURM_CONF" sh -c \
  "cd '$work' && sbatch -N3 --charlie-image=/nonexistent.qcow2 show-meta.sh" || true

echo
echo "== MPI in containers: building a small MPICH image (busybox + an allreduce program)"
PYTHONPATH="$here/../../tests" "$venv/bin/python" - "$work/mpi-image" <<'PY'
import sys
from helpers.cluster import build_mpi_image
build_mpi_image(sys.argv[1])
PY
cat > "$work/mpi-job.sh" <<'JOB'
#!/bin/sh
echo "batch script on the host: $(hostname), SLURM_MPI_TYPE=$SLURM_MPI_TYPE"
srun sh -c 'echo "$(hostname): $(cat /MARKER), CH_META=$CH_META"' | sort
srun /usr/bin/mpi_allreduce | sort -n -k2
JOB
chmod +x "$work/mpi-job.sh"
chown -R "$user:" "$work"
echo "\$ sbatch -N3 --ntasks-per-node=2 --charlie-image=mpi-image --wait -o mpi.out mpi-job.sh   (as $user)"
runuser -u "$user" -- env SLURM_CONF="$SLURM_CONF" sh -c \
  "cd '$work' && sbatch -N3 --ntasks-per-node=2 --charlie-image=mpi-image --wait -o mpi.out mpi-job.sh"
cat "$work/mpi.out"

if [ "${CHARLIE_DEMO_VM:-yes}" = no ]; then
    echo
    echo "== VM jobs left out (CHARLIE_DEMO_VM=no)"
    exit 0
fi
echo
echo "== The virtual-cluster tutorial's mpihello in VMs: one QEMU guest per node (tcg here)"
guest_dir=$(sed -n 's/.*"guest_dir": *"\([^"]*\)".*/\1/p' "$SLURM_CHARLIE_SANDBOX/sandbox.json")
cp "$guest_dir/guest.qcow2" "$work/image.qcow2"
cp "$here/mpihello.sh" "$work/"
mkdir -p "$work/data"
chown -R "$user:" "$work"
echo "\$ sbatch -N3 --charlie-image=image.qcow2 --charlie-job=mpihello.sh --charlie-dir=data --wait -o vm.out --wrap true   (as $user)"
runuser -u "$user" -- env SLURM_CONF="$SLURM_CONF" sh -c \
  "cd '$work' && sbatch -N3 --charlie-image=image.qcow2 --charlie-job=mpihello.sh --charlie-dir=data --wait -o vm.out --wrap true"
cat "$work/vm.out"

echo
echo "== srun in VMs: the batch script on the host, every task in its node's guest"
cp "$here/vm-srun.sh" "$work/"
chown -R "$user:" "$work"
echo "\$ sbatch -N3 --ntasks-per-node=2 --charlie-image=image.qcow2 --charlie-dir=data --wait -o vm-srun.out vm-srun.sh   (as $user)"
runuser -u "$user" -- env SLURM_CONF="$SLURM_CONF" sh -c \
  "cd '$work' && sbatch -N3 --ntasks-per-node=2 --charlie-image=image.qcow2 --charlie-dir=data --wait -o vm-srun.out vm-srun.sh"
sort "$work/vm-srun.out"
