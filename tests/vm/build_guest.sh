#!/bin/sh
# Build the test guest under DIR (make guest): Debian's kernel, slurm-charlie's
# initrd, and a qcow2 root disk (debootstrap minbase + python3 for the task
# agent + MPICH for srun --mpi=pmi2 + Open MPI for mpirun over ssh + OpenSSH
# + the test programs, built for both MPIs: NAME and NAME.mpich).  Open MPI
# keeps its ob1/TCP path between guests (docs/developer.rst).  Each part is
# rebuilt only when missing or when GUEST_VERSION changes.  Root, network to
# the Debian mirror the machine already uses.
set -eu
DIR=$1
SB=$2
SRC=$(cd "$(dirname "$0")/.." && pwd)
GUEST_VERSION=4  # raise when the root disk's contents change
mkdir -p "$DIR"
cd "$DIR"
if [ "$(cat guest.version 2>/dev/null)" != "$GUEST_VERSION" ] || [ ! -e debian.sqfs ]; then
    rm -f guest.qcow2 guest-boot.qcow2
fi
. /etc/os-release
mirror=$("$SRC/debian-mirror.sh")

if [ ! -e vmlinuz ]; then
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    echo "guest kernel: $pkg"
    rm -rf kernel ./*.deb
    apt-get download -q "$pkg" 2>&1 | grep -v unsandboxed || true
    dpkg-deb -x ./"$pkg"_*.deb kernel
    # Debian 13's kernel packages ship /usr/lib/modules (merged /usr)
    if [ ! -e kernel/lib/modules ] && [ -d kernel/usr/lib/modules ]; then
        mkdir -p kernel/lib && ln -s ../usr/lib/modules kernel/lib/modules
    fi
    kv=$(ls kernel/lib/modules)
    depmod -b kernel "$kv"
    rm -f ./*.deb
    cp "kernel/boot/vmlinuz-$kv" vmlinuz.tmp && mv vmlinuz.tmp vmlinuz
fi
if [ ! -e initrd.img ] || [ "$SRC/../slurm_charlie/guest/initrd-init" -nt initrd.img ] \
        || [ "$SRC/../slurm_charlie/vmbuild.py" -nt initrd.img ]; then
    "$SB" vm-initrd --modules kernel/lib/modules/* --out initrd.img
fi
# the same kernel uncompressed: QEMU boots it through its PVH entry and the
# guest skips ~3 s of decompression per boot under tcg (docs/vm.rst)
if [ ! -e vmlinux ] || [ vmlinuz -nt vmlinux ] \
        || [ "$SRC/../slurm_charlie/vmbuild.py" -nt vmlinux ]; then
    "$SB" vm-kernel vmlinuz --out vmlinux
fi
if [ ! -e guest.qcow2 ]; then
    rm -rf rootfs
    echo "guest root: debootstrap $VERSION_CODENAME from $mirror"
    debootstrap --variant=minbase \
        --include=openmpi-bin,mpich,python3,openssh-server,openssh-client,iproute2,iputils-ping,procps \
        "$VERSION_CODENAME" rootfs "$mirror" > debootstrap.log 2>&1 \
        || { tail -20 debootstrap.log; exit 1; }
    rm -f rootfs/etc/ssh/ssh_host_*   # guests get the job's key from meta
    # TCP between guests (ob1), never UCX; no warnings about missing devices
    cat >> rootfs/etc/openmpi/openmpi-mca-params.conf <<'MCA'
pml = ob1
btl = tcp,self,vader
osc = ^ucx
btl_tcp_if_include = eth0
oob_tcp_if_include = eth0
MCA
    rm -rf rootfs/var/cache/apt/archives/*.deb rootfs/var/lib/apt/lists/*
    for c in "$SRC"/helpers/src/mpi_allreduce.c "$SRC"/helpers/src/pingpong.c; do
        mpicc.openmpi -O2 -o "rootfs/usr/local/bin/$(basename "$c" .c)" "$c"
        mpicc.mpich -O2 -o "rootfs/usr/local/bin/$(basename "$c" .c).mpich" "$c"
    done
    mkdir -p rootfs/ch/meta rootfs/ch/opt rootfs/ch/tmp rootfs/ch/data1 \
        rootfs/ch/data2 rootfs/ch/data3 rootfs/ch/data4
    rm -f guest.raw
    # no 64bit/metadata_csum: extlinux (guest-boot.qcow2 below) reads the fs
    # the same Debian as a container image (squashfs): a real-world image
    # with Open MPI and MPICH for the container tests (srun --mpi=pmix)
    rm -f debian.sqfs
    mksquashfs rootfs debian.sqfs -quiet -no-progress -comp gzip >/dev/null
    chmod 644 debian.sqfs
    mke2fs -q -t ext4 -O ^64bit,^metadata_csum -L charlie-root -d rootfs guest.raw 1536M
    qemu-img convert -f raw -O qcow2 guest.raw guest.qcow2.tmp
    rm -f guest.raw
    rm -rf rootfs
    mv guest.qcow2.tmp guest.qcow2
    echo "$GUEST_VERSION" > guest.version
fi
# the same guest booting through its own boot loader (extlinux on the whole
# disk, a kernel and slurm-charlie's initrd inside the image): vm.kernel unset
if [ ! -e guest-boot.qcow2 ] || [ initrd.img -nt guest-boot.qcow2 ]; then
    rm -f boot.raw
    qemu-img convert -f qcow2 -O raw guest.qcow2 boot.raw
    mkdir -p mnt
    mount -o loop boot.raw mnt
    trap 'umount mnt 2>/dev/null; rm -f boot.raw' EXIT
    mkdir -p mnt/boot/extlinux
    cp vmlinuz mnt/boot/vmlinuz
    cp initrd.img mnt/boot/initrd.img
    cat > mnt/boot/extlinux/extlinux.conf <<'CONF'
DEFAULT charlie
PROMPT 0
TIMEOUT 1
LABEL charlie
  KERNEL /boot/vmlinuz
  INITRD /boot/initrd.img
  APPEND root=/dev/vda rw console=ttyS0
CONF
    extlinux --install mnt/boot/extlinux >/dev/null
    umount mnt
    trap - EXIT
    qemu-img convert -f raw -O qcow2 boot.raw guest-boot.qcow2.tmp
    rm -f boot.raw
    mv guest-boot.qcow2.tmp guest-boot.qcow2
fi
ls -la vmlinuz vmlinux initrd.img guest.qcow2 guest-boot.qcow2
