# slurm-charlie guest boot script: PID 1 of every guest, run by busybox sh
# after the initrd mounted the root disk and this directory (/ch/opt).
# Everything it needs comes from /ch/meta (same on all guests) and the
# kernel command line (charlie.guest=N).  Logs go to the console, which the
# host keeps as out/N_console.out.
BB=/run/charlie/bin
/run/charlie/bin/busybox --install -s $BB
export PATH=$BB:/usr/sbin:/usr/bin:/sbin:/bin
JOBPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
START=$(cut -d' ' -f1 /proc/uptime 2>/dev/null)

log() { echo "$(date +%FT%T) charlie: $*"; }

mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
exec </dev/console >/dev/console 2>&1

GUEST=
for arg in $(cat /proc/cmdline); do
    case $arg in charlie.guest=*) GUEST=${arg#charlie.guest=} ;; esac
done
SYNC=/ch/meta/sync
OUT=/run/charlie/out

powerdown() {  # clean shutdown; the host commits only after it
    log "shutting down"
    trap '' TERM USR1 USR2
    kill -TERM -1 2>/dev/null
    sleep 1
    kill -KILL -1 2>/dev/null
    sync
    # every share and disk mounted below /ch (meta and sync aside) and /home;
    # the list of /ch mount points lives in meta.py, not here
    for m in $(awk '$2 ~ "^/ch/" && $2 != "/ch/meta" || $2 == "/home" {print $2}' /proc/mounts); do
        [ "$m" = "$SYNC" ] || [ "$m" = "$OUT" ] || umount $m
    done
    mount -o remount,ro / || log "cannot remount / read-only"
    sync
    echo "clean $(date +%s)" > $SYNC/$GUEST.down
    umount $OUT $SYNC 2>/dev/null
    poweroff -f
}
trap powerdown TERM USR2

mount9p() {  # tag dir [ro]
    mkdir -p "$2" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144${3:+,$3} "$1" "$2"
}
log "guest $GUEST boot script starting"
mount9p meta /ch/meta ro || { log "FATAL: cannot mount meta"; poweroff -f; }
if [ -z "$GUEST" ]; then
    # booted by the image's own boot loader: no charlie.guest=N on the kernel
    # command line; the job network card's MAC says which guest this is
    for d in /sys/class/net/*; do
        g=$(awk -v m="$(cat $d/address 2>/dev/null)" '$2 == m {print $1}' /ch/meta/guest-macs)
        [ -n "$g" ] && GUEST=${g#chgu}
    done
    [ -n "$GUEST" ] || { log "FATAL: cannot tell which guest this is"; poweroff -f; }
fi
NAME=chgu$GUEST
mount9p sync $SYNC || { log "FATAL: cannot mount meta/sync"; poweroff -f; }
mkdir -p $OUT
mount9p out $OUT || log "cannot mount the output share"
. /ch/meta/env
i=1
while eval "d=\${CH_DATA$i:-}"; [ -n "$d" ]; do  # as many as meta/env names
    mount9p data$i /ch/data$i || log "cannot mount /ch/data$i"
    i=$((i + 1))
done

# /ch/tmp: the tmp disk (second virtio disk), formatted at first boot
mkdir -p /ch/tmp
if ! mount -t ext2 /dev/vdb /ch/tmp 2>/dev/null; then
    mke2fs -q -m 0 /dev/vdb >/dev/null && mount -t ext2 /dev/vdb /ch/tmp \
        || log "cannot set up /ch/tmp on /dev/vdb"
fi
chmod 1777 /ch/tmp

# names, never stale: everything from meta at every boot (docs/vm.rst)
hostname $NAME
echo $NAME > /etc/hostname 2>/dev/null
rm -f /etc/hosts /etc/resolv.conf   # symlinks in some images
install -m 644 /ch/meta/hosts /etc/hosts
install -m 644 /ch/meta/resolv.conf /etc/resolv.conf
# guest names come from /etc/hosts (minimal images may lack nsswitch.conf)
grep -q '^hosts:.*files' /etc/nsswitch.conf 2>/dev/null \
    || echo "hosts: files dns" >> /etc/nsswitch.conf
ip link set lo up
set -- $(grep "^$NAME " /ch/meta/guest-macs)
MAC=$2
ADDR=$3
IFACE=
for d in /sys/class/net/*; do
    [ "$(cat $d/address 2>/dev/null)" = "$MAC" ] && IFACE=${d##*/}
done
if [ -n "$IFACE" ]; then
    ip addr flush dev $IFACE
    ip addr add $ADDR dev $IFACE
    ip link set $IFACE up
    # every other guest's MAC is known: permanent neighbour entries, so no
    # guest ever broadcasts an ARP request for another (1000 guests: 0
    # broadcasts instead of a million)
    while read -r gname gmac gaddr; do
        [ "$gname" = "$NAME" ] || ip neigh replace "${gaddr%/*}" lladdr "$gmac" \
            dev $IFACE nud permanent
    done < /ch/meta/guest-macs
    log "network: $IFACE $MAC $ADDR, $(($(wc -l < /ch/meta/guest-macs) - 1)) neighbours"
    echo "$IFACE" > /run/charlie/job-iface   # the task agent points UCX at it
else
    log "no network interface with MAC $MAC"
fi
# second NIC (if any): QEMU user-mode, only for ssh from the host node
for d in /sys/class/net/*; do
    if [ "$(cat $d/address 2>/dev/null)" = "52:56:00:00:00:02" ]; then
        ip addr flush dev ${d##*/}
        ip addr add 10.0.2.15/24 dev ${d##*/}
        ip link set ${d##*/} up
        log "host ssh link: ${d##*/} 10.0.2.15"
    fi
done

# the job user: same name, uid, gid and groups as on the host (docs/vm.rst)
read -r UNAME UID_ GID_ GNAME < /ch/meta/user
drop_user() {  # drop entries with name or id $2 from file $1 (fields 1, 3)
    awk -F: -v n="$2" -v i="$3" '$1 != n && $3 != i' "$1" > "$1.charlie" && cat "$1.charlie" > "$1"
    rm -f "$1.charlie"
}
HOME_=/home/$UNAME
drop_user /etc/passwd "$UNAME" "$UID_"
[ -f /etc/shadow ] && drop_user /etc/shadow "$UNAME" "-"
drop_user /etc/group "$GNAME" "$GID_"
SH=/bin/sh
[ -x /bin/bash ] && SH=/bin/bash
echo "$UNAME:x:$UID_:$GID_::$HOME_:$SH" >> /etc/passwd
[ -f /etc/shadow ] && echo "$UNAME:*:19000:0:99999:7:::" >> /etc/shadow
echo "$GNAME:x:$GID_:" >> /etc/group
tail -n +2 /ch/meta/user | while read -r gid gname; do
    if grep -q "^[^:]*:[^:]*:$gid:" /etc/group; then
        sed -i "/^[^:]*:[^:]*:$gid:/ s/\$/,$UNAME/; s/:,/:/" /etc/group
    else
        drop_user /etc/group "$gname" "-"
        echo "$gname:x:$gid:$UNAME" >> /etc/group
    fi
done
mkdir -p $HOME_
[ "$(stat -c %u $HOME_)" = "$UID_" ] || chown -R "$UID_:$GID_" $HOME_

# ssh: per-job keys from meta; every guest trusts the job's key.  The keys
# stay in /run (a tmpfs): a --charlie-commit must not save the job's private
# key into the image.  Only the ssh client's pointer to them goes to /etc.
if [ -d /ch/meta/ssh ]; then
    K=/run/charlie/ssh
    mkdir -p $K /run/sshd /etc/ssh/ssh_config.d
    cp /ch/meta/ssh/id_ed25519 /ch/meta/ssh/id_ed25519.pub $K/
    cp /ch/meta/ssh/id_ed25519.pub $K/authorized_keys
    chown -R "$UID_:$GID_" $K
    chmod 700 $K
    chmod 600 $K/id_ed25519 $K/authorized_keys
    printf 'IdentityFile %s/id_ed25519\nIdentityFile ~/.ssh/id_ed25519\n' $K \
        > /etc/ssh/ssh_config.d/50-slurm-charlie.conf
    # job keys that earlier versions copied into the home directory
    if grep -qs "slurm-charlie-job-" $HOME_/.ssh/id_ed25519.pub; then
        rm -f $HOME_/.ssh/id_ed25519 $HOME_/.ssh/id_ed25519.pub
    fi
    cp /ch/meta/ssh/known_hosts /etc/ssh/ssh_known_hosts
    install -m 600 /ch/meta/ssh/id_ed25519 /run/charlie/ssh_host_ed25519_key
    if [ -x /usr/sbin/sshd ]; then
        /usr/sbin/sshd -o HostKey=/run/charlie/ssh_host_ed25519_key \
            -o PidFile=/run/charlie/sshd.pid -o UsePAM=no \
            -o AuthorizedKeysFile=$K/authorized_keys \
            -o PasswordAuthentication=no -o PermitRootLogin=no \
            || log "sshd did not start"
    else
        log "no /usr/sbin/sshd in the image: guests cannot ssh to each other"
    fi
fi

# ACPI power button (QMP system_powerdown from the host's epilog)
for e in /sys/class/input/event*; do
    case "$(cat $e/device/name 2>/dev/null)" in
        *"Power Button"*)
            (head -c 1 /dev/input/${e##*/} >/dev/null && kill -TERM 1) & ;;
    esac
done

# site and image hooks (docs/admin.rst, /etc/charlie/boot.d)
for f in /etc/charlie/boot.d/*.sh; do
    [ -f "$f" ] && { log "running $f"; sh "$f" || log "$f failed"; }
done

# a root shell on the serial console (slurm-charlie console), respawned;
# the guest is the job user's own machine
(while :; do
    setsid cttyhack sh -c 'cd /root 2>/dev/null; exec sh -l' </dev/ttyS0 >/dev/ttyS0 2>&1
    sleep 1
done) &

# srun tasks (docs/vm.rst): the agent on the virtio-serial port; the image
# needs python3 (3.9 or later) for it.  What happened goes to sync/N.agent,
# which the host shows a task when there is no agent.
if python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    python3 /ch/opt/agent.py "$GUEST" &
    echo "started" > $SYNC/$GUEST.agent
else
    echo "the image has no python3 3.9 or later: srun cannot run tasks in guest $GUEST; install python3 in the image" > $SYNC/$GUEST.agent
    log "no python3 (3.9 or later) in the image: srun cannot run tasks here"
fi

NOW=$(cut -d' ' -f1 /proc/uptime)
echo "$NOW" > $SYNC/$GUEST.ready
log "guest $GUEST ready (${NOW}s after kernel start)"

run_job() {
    # the barrier: the batch step waits (one srun over the job's nodes) until
    # every node's preparation saw its guest ready, then leaves sync/go in
    # every node's job directory (a second srun: O(N) in total)
    n=0
    until [ -e $SYNC/go ]; do
        n=$((n + 1))
        [ $n -gt 6000 ] && { log "no go from the batch step after 600 s; starting"; break; }
        sleep 0.1
    done
    log "running the job script as $UNAME"
    cd /ch/data1 2>/dev/null || cd $HOME_
    env -i PATH=$JOBPATH HOME=$HOME_ USER=$UNAME LOGNAME=$UNAME SHELL=$SH TERM=dumb \
        CH_GUEST_ID=$GUEST $(sed "s/'//g" /ch/meta/env) \
        su -s /bin/sh "$UNAME" -c /ch/meta/jobscript \
        > $OUT/${GUEST}_job.out 2> $OUT/${GUEST}_job.err
    rc=$?
    echo $rc > $SYNC/$GUEST.jobdone
    log "user job complete with exit code $rc; wrote $GUEST.jobdone"
}

case "$CH_MODE" in
    batch) run_job & ;;
    *) log "interactive mode: waiting" ;;
esac
while :; do
    [ -e $SYNC/poweroff ] && powerdown
    sleep 1 &
    wait $!
done
