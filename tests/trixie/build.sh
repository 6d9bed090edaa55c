#!/bin/sh
# Build the Debian 13 node for the cgroup v2 lane (make test-trixie) under
# DIR: a debootstrap trixie root disk with Slurm 24.11, munge, Charliecloud,
# MPICH, Open MPI 5, PMIx and the Python the project needs from Debian, its
# kernel (uncompressed for PVH boot) and initramfs.  The checkout is not in
# the image: the lane shares it in read-only (tests/trixie/lane.py).
# Rebuilt only when missing, when NODE_VERSION or the package list changes.  Root, network to
# the Debian mirror the machine already uses.
set -eu
DIR=$1
SB=$2
SRC=$(cd "$(dirname "$0")/../.." && pwd)
NODE_VERSION=5  # raise when the root disk's contents change
mkdir -p "$DIR"
cd "$DIR"
# what `make deps` installs on a Debian 13 host, plus the node's kernel and
# the Python packages the lane uses instead of a venv from PyPI
PKGS=$(make -s --no-print-directory -C "$SRC" print-apt-packages | tr -s ' ' ',')
PKGS=$PKGS,linux-image-amd64,initramfs-tools,procps,psmisc,fuse3
PKGS=$PKGS,python3-jinja2,python3-filelock,python3-cryptography,python3-pytest,python3-setuptools
# a new package in the list makes a new node too
STAMP="$NODE_VERSION $(echo "$PKGS" | sha256sum | cut -c1-16)"
if [ "$(cat node.version 2>/dev/null)" = "$STAMP" ] && [ -e node.qcow2 ] \
        && [ -e vmlinux ] && [ -e initrd.img ]; then
    exit 0
fi
rm -f node.qcow2 vmlinux initrd.img node.version
mirror=$("$SRC/tests/debian-mirror.sh")
rm -rf rootfs
echo "trixie node: debootstrap trixie from $mirror, then apt-get install"
debootstrap --variant=minbase trixie rootfs "$mirror" > debootstrap.log 2>&1 \
    || { tail -20 debootstrap.log; exit 1; }
# apt, not debootstrap, for the list: it resolves virtual packages
# (automake-1.17, container-network-stack) that debootstrap cannot
printf '#!/bin/sh\nexit 101\n' > rootfs/usr/sbin/policy-rc.d  # start no service
chmod 0755 rootfs/usr/sbin/policy-rc.d
mount -t proc proc rootfs/proc
trap 'umount rootfs/proc 2>/dev/null' EXIT
chroot rootfs apt-get update -q >> debootstrap.log 2>&1
if ! DEBIAN_FRONTEND=noninteractive chroot rootfs apt-get install -y -q \
        --no-install-recommends $(echo "$PKGS" | tr ',' ' ') >> debootstrap.log 2>&1; then
    tail -20 debootstrap.log
    exit 1
fi
# the test guest and the stock Debian image of the container tests, built
# as on a Debian 13 host by tests/vm/build_guest.sh, inside the node's root
# (its debootstrap, kernel and MPIs): /opt/charlie-guest is the lane's
# --guest-dir
mkdir -p rootfs/src rootfs/dev
mount --bind "$SRC" rootfs/src
mount --bind /dev rootfs/dev
trap 'umount rootfs/proc rootfs/src rootfs/dev 2>/dev/null' EXIT
printf '#!/bin/sh\nPYTHONPATH=/src PYTHONDONTWRITEBYTECODE=1 exec python3 -m slurm_charlie.cli "$@"\n' \
    > rootfs/usr/local/bin/slurm-charlie
chmod 0755 rootfs/usr/local/bin/slurm-charlie
if ! chroot rootfs sh /src/tests/vm/build_guest.sh /opt/charlie-guest \
        /usr/local/bin/slurm-charlie >> debootstrap.log 2>&1; then
    tail -20 debootstrap.log
    exit 1
fi
rm -rf rootfs/opt/charlie-guest/kernel rootfs/usr/local/bin/slurm-charlie
umount rootfs/proc rootfs/src rootfs/dev
trap - EXIT
rm -f rootfs/usr/sbin/policy-rc.d
# the lane's PID 1: the checkout's share, then its tests/trixie/init.sh (so
# that changes to the lane need no new image)
cat > rootfs/sbin/charlie-lane-init <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
modprobe 9pnet_virtio; modprobe 9p
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 src /src \
    && exec /bin/sh /src/tests/trixie/init.sh
echo "charlie-lane-init: cannot mount the checkout (9p share src)"
echo o > /proc/sysrq-trigger
INIT
chmod 0755 rootfs/sbin/charlie-lane-init
echo charlie-trixie > rootfs/etc/hostname
rm -rf rootfs/var/cache/apt/archives/*.deb rootfs/var/lib/apt/lists/*
mkdir -p rootfs/src rootfs/out
kv=$(ls rootfs/lib/modules | head -n1)
cp "rootfs/boot/initrd.img-$kv" initrd.img
"$SB" vm-kernel "rootfs/boot/vmlinuz-$kv" --out vmlinux
chroot rootfs dpkg-query -W slurmd charliecloud-runtime mpich openmpi-bin python3 \
    linux-image-amd64 > versions.txt
mke2fs -q -t ext4 -L trixie-root -d rootfs node.raw 6G
qemu-img convert -f raw -O qcow2 node.raw node.qcow2.tmp
rm -f node.raw
rm -rf rootfs
mv node.qcow2.tmp node.qcow2
echo "$STAMP" > node.version
cat versions.txt
ls -la vmlinux initrd.img node.qcow2
