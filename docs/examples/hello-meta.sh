#!/bin/sh
# A meta-only charlie job: every node gets meta/ and the CH_* variables.
echo "batch script on $(hostname), guest $CH_GUEST_ID of $CH_GUEST_COUNT"
srun sh -c 'echo "$(hostname): guest $CH_GUEST_ID, meta in $CH_META, data in $CH_DATA1"'
echo "--- $CH_META/hostfile"
cat "$CH_META/hostfile"
