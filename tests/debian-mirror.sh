#!/bin/sh
# Print the Debian mirror this machine's apt already uses (deb822 .sources
# first, then the one-line sources.list), never the security archive: the
# guest, the Debian 13 node and the other release's Slurm headers come
# from the same place as the host's own packages.
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "debian-mirror.sh: no Debian mirror in /etc/apt/sources.list{,.d/*.sources}" >&2; exit 1; }
echo "$mirror"
