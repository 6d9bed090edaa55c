#!/bin/sh
# PID 1 of the Debian 13 lane node (the image's /sbin/charlie-lane-init
# mounted the checkout at /src and runs this): a cgroup v2 only node
# without systemd.  Mounts, the results share (out), then
# tests/trixie/lane.py; powers off after.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
for m in fuse overlay vxlan bridge veth tun nf_tables squashfs loop; do
    modprobe "$m" 2>/dev/null
done
mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out
hostname charlie-trixie
# the name must resolve: slurmctld looks up srun's host at every job's end
# and, when that fails, waits 10 s while steps' completion messages time
# out and nodes drain (`sandbox up` refuses a machine without it)
grep -qw charlie-trixie /etc/hosts || echo "127.0.1.1 charlie-trixie" >> /etc/hosts
ip link set lo up
ulimit -n 65536
python3 /src/tests/trixie/lane.py > /out/lane.log 2>&1
echo "$?" > /out/lane.rc
sync
echo o > /proc/sysrq-trigger
sleep 60
