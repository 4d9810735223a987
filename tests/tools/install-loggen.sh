#!/bin/sh
# Install syslog-ng's load generator `loggen` into a virtual environment, without installing
# syslog-ng: Debian's syslog-ng-core conflicts with rsyslog (installing it removes rsyslog, which
# the tests also use), but loggen runs from the extracted package.
#
#   tests/tools/install-loggen.sh VENV
#
# downloads syslog-ng-core with apt (the candidate version for this machine's architecture, as
# apt picks it), copies loggen, its two libraries and its plugins into VENV/loggen/usr, and writes
# VENV/bin/loggen, a wrapper that points loggen at them (SYSLOGNG_PREFIX, LD_LIBRARY_PATH).
# Nothing else of syslog-ng is copied. Run by `make deps`; it does nothing if the wrapper runs.
set -eu
venv=${1:?usage: $0 VENV}
wrapper="$venv/bin/loggen"
if [ -x "$wrapper" ] && "$wrapper" --help >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt downloads as its unprivileged _apt user when it can write the directory (else it warns).
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown _apt "$work"
fi
if ! (cd "$work" && apt-get download -q syslog-ng-core >/dev/null 2>&1); then
    echo "install-loggen: updating apt's package lists to find syslog-ng-core"
    $SUDO apt-get update -q
    (cd "$work" && apt-get download -q syslog-ng-core) || {
        echo "install-loggen: apt-get download syslog-ng-core failed: no loggen" >&2
        exit 1
    }
fi
deb=$(ls "$work"/syslog-ng-core_*.deb)
echo "install-loggen: loggen from $(basename "$deb")"
dpkg-deb -x "$deb" "$work/x"
src="$work/x/usr"
[ -x "$src/bin/loggen" ] || { echo "install-loggen: $(basename "$deb") has no usr/bin/loggen" >&2; exit 1; }
dest="$venv/loggen/usr"
rm -rf "$venv/loggen"
mkdir -p "$dest/bin" "$dest/lib/syslog-ng" "$venv/bin"
cp "$src/bin/loggen" "$dest/bin/"
# The libraries loggen and its plugins link (libloggen_helper, libloggen_plugin), links resolved,
# and the plugin directory (lib/syslog-ng/<version>/loggen).
cp -L "$src"/lib/syslog-ng/libloggen_*.so.* "$dest/lib/syslog-ng/"
for plugins in "$src"/lib/syslog-ng/*/loggen; do
    version=$(basename "$(dirname "$plugins")")
    mkdir -p "$dest/lib/syslog-ng/$version"
    cp -RL "$plugins" "$dest/lib/syslog-ng/$version/"
done
missing=$(LD_LIBRARY_PATH="$dest/lib/syslog-ng" ldd "$dest/bin/loggen" "$dest"/lib/syslog-ng/*/loggen/*.so \
    | grep "not found" | sort -u || true)
if [ -n "$missing" ]; then
    echo "install-loggen: loggen needs libraries this machine lacks:" >&2
    echo "$missing" >&2
    exit 1
fi
cat >"$wrapper.tmp" <<EOF
#!/bin/sh
# loggen from Debian's $(basename "$deb"), extracted by tests/tools/install-loggen.sh (not installed:
# syslog-ng-core conflicts with rsyslog).
usr=\$(dirname -- "\$(readlink -f -- "\$0")")/../loggen/usr
SYSLOGNG_PREFIX=\$usr
LD_LIBRARY_PATH=\$usr/lib/syslog-ng\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export SYSLOGNG_PREFIX LD_LIBRARY_PATH
exec "\$usr/bin/loggen" "\$@"
EOF
chmod 755 "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
"$wrapper" --help-all | grep -q -- "--active-connections" || {
    echo "install-loggen: $wrapper does not run" >&2
    exit 1
}
echo "install-loggen: $wrapper"
