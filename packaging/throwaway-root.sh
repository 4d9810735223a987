#!/bin/sh
# Run a shell command as root in a throwaway copy of this machine's root file system.
#
# Usage (as root): packaging/throwaway-root.sh FILE... -- 'shell command'
#   The FILEs (e.g. the .deb) are copied to /tmp of the throwaway root; the command runs
#   there under chroot with /proc and /dev bound in, an empty /run (so maintainer scripts
#   see no running systemd and start nothing) and a policy-rc.d that forbids starting
#   services. Everything it writes (dpkg database, /etc/passwd, /opt, /var/lib) goes to a
#   tmpfs over an overlay of /, in a private mount namespace: when the command exits, the
#   machine is as it was. Exit status: the command's; 77 when the kernel or the
#   permissions do not allow the overlay (not root, no overlayfs, no mount namespace).
#
# Why not a debootstrap chroot: see packaging/README.md.
set -eu

if [ "${PST_THROWAWAY_INNER:-}" != 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "throwaway-root.sh: needs root (mount namespaces, overlayfs)" >&2; exit 77; }
    command -v unshare >/dev/null || { echo "throwaway-root.sh: unshare (util-linux) is missing" >&2; exit 77; }
    T=$(mktemp -d "${TMPDIR:-/tmp}/pst-root.XXXXXX")
    status=0
    PST_THROWAWAY_INNER=1 PST_THROWAWAY_DIR=$T unshare --mount --propagation private sh "$0" "$@" || status=$?
    rmdir "$T"  # its mounts lived in the namespace only, and died with it
    exit "$status"
fi

FILES=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    FILES="$FILES $1"
    shift
done
[ "${1:-}" = "--" ] && [ $# -eq 2 ] || { echo "usage: throwaway-root.sh FILE... -- 'command'" >&2; exit 2; }
COMMAND=$2

T=$PST_THROWAWAY_DIR
mount -t tmpfs -o mode=0755 pst-upper "$T" || { echo "throwaway-root.sh: cannot mount a tmpfs" >&2; exit 77; }
mkdir "$T/upper" "$T/work" "$T/root"
if ! mount -t overlay pst-root -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/root"; then
    echo "throwaway-root.sh: cannot mount an overlay of / (overlayfs unavailable here)" >&2
    exit 77
fi
R="$T/root"
mount --rbind /proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=0755 pst-run "$R/run"
mount -t tmpfs -o mode=1777 pst-tmp "$R/tmp"
for f in $FILES; do
    cp "$f" "$R/tmp/"
done
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
chmod 0755 "$R/usr/sbin/policy-rc.d"
status=0
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    chroot "$R" /bin/sh -c "$COMMAND" || status=$?
exit "$status"
