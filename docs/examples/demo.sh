#!/bin/bash
# `make demo`: run a 3-node charlie job on the sandbox as the unprivileged
# sandbox user and show what every node saw.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
eval "$("$here/../../.venv/bin/slurm-charlie" sandbox env)"
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
