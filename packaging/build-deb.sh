#!/bin/sh
# Build dist/pst-appliance_<version>_<arch>.deb with dpkg-deb (no debhelper, no source package).
#
# The package carries the project wheel and the wheels of its runtime dependencies pinned by
# requirements.lock, so that postinst builds /opt/pst-appliance/venv with
# `pip install --no-index` (offline). Wheels of the dependencies are cached under
# build/deb-wheels/<hash of the pins> (build/ is in .gitignore); a second build only rebuilds
# the project wheel. See packaging/README.md.
#
# Usage: packaging/build-deb.sh [--out DIR]      (default DIR: dist)
# Env:   PYTHON  the interpreter whose pip builds the wheels (default .venv/bin/python); it
#              must be the CPython minor version the target's python3 has (3.11 for bookworm).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/dist"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        *) echo "build-deb.sh: unknown argument $1 (usage: build-deb.sh [--out DIR])" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PIP="$PYTHON -m pip --disable-pip-version-check --quiet"
NAME=pst-appliance
PREFIX=/opt/pst-appliance

for tool in dpkg-deb dpkg readelf flock; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool is missing (apt-get install dpkg binutils)" >&2; exit 1; }
done
[ -x "$PYTHON" ] || { echo "build-deb.sh: no interpreter at $PYTHON (run make venv)" >&2; exit 1; }
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYNEXT=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')

# One build at a time per tree: the caches below are shared (e.g. by parallel test runs).
mkdir -p "$ROOT/build"
exec 9>"$ROOT/build/.deb.lock"
flock 9

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pst-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. The project wheel (always rebuilt: it is the code under test) and its version. The
#    build-system requirements of pyproject.toml live in a cached venv, which saves pip's
#    isolated build environment (about 10 s) on every build.
BUILDREQ=$("$PYTHON" -c 'import sys, tomllib; print(" ".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$ROOT/pyproject.toml")
BUILDENV="$ROOT/build/deb-buildenv/$(echo "$BUILDREQ $PYVER" | sha256sum | cut -c1-16)"
if [ ! -e "$BUILDENV/.complete" ]; then
    rm -rf "$BUILDENV"
    "$PYTHON" -m venv "$BUILDENV"
    # shellcheck disable=SC2086 # one word per requirement
    "$BUILDENV/bin/python" -m pip --disable-pip-version-check --quiet install $BUILDREQ
    touch "$BUILDENV/.complete"
fi
"$BUILDENV/bin/python" -m pip --disable-pip-version-check --quiet wheel --no-deps --no-build-isolation \
    --wheel-dir "$WORK/project" "$ROOT"
WHEEL=$(ls "$WORK"/project/*.whl)
VERSION=$(basename "$WHEEL" | cut -d- -f2)
# PEP 440 pre-releases sort before the release in Debian only with a tilde: 1.0rc1 -> 1.0~rc1.
DEBVERSION=$(echo "$VERSION" | sed -E 's/(\.?)(a|b|rc|dev)([0-9]+)/~\2\3/')
ARCH=$(dpkg --print-architecture)

# 2. The runtime closure pinned by the lock, and its wheels (cached by the pins' hash).
"$PYTHON" "$ROOT/packaging/runtime_pins.py" "$ROOT/requirements.lock" "$WHEEL" > "$WORK/pins.txt"
KEY=$( (cat "$WORK/pins.txt"; echo "python$PYVER $ARCH") | sha256sum | cut -c1-16)
CACHE="$ROOT/build/deb-wheels/$KEY"
if [ ! -e "$CACHE/.complete" ]; then
    rm -rf "$CACHE"
    mkdir -p "$CACHE"
    $PIP wheel --no-deps --wheel-dir "$CACHE" -r "$WORK/pins.txt"
    touch "$CACHE/.complete"
fi

# 3. The tree of the package.
STAGE="$WORK/stage"
mkdir -p "$STAGE/DEBIAN" "$STAGE$PREFIX/wheels" "$STAGE/lib/systemd/system" "$STAGE/etc/pst" \
    "$STAGE/usr/bin" "$STAGE/usr/share/doc/$NAME/examples"
cp "$CACHE"/*.whl "$WHEEL" "$STAGE$PREFIX/wheels/"
# requirements.txt: every wheel by name, version and SHA-256, so pip installs exactly these.
(
    cd "$STAGE$PREFIX/wheels"
    for whl in *.whl; do
        dist=$(echo "$whl" | cut -d- -f1)
        ver=$(echo "$whl" | cut -d- -f2)
        echo "$dist==$ver --hash=sha256:$(sha256sum "$whl" | cut -d' ' -f1)"
    done
) > "$STAGE$PREFIX/requirements.txt"
install -m 0644 "$ROOT/systemd/pst-server.service" "$STAGE/lib/systemd/system/"
install -m 0644 "$ROOT/systemd/pst-keys@.service" "$STAGE/lib/systemd/system/"
mkdir -p "$STAGE$PREFIX/clients"
install -m 0755 "$ROOT/clients/pst-keys" "$ROOT/clients/pst_keys.py" "$STAGE$PREFIX/clients/"
ln -s "$PREFIX/clients/pst-keys" "$STAGE/usr/bin/pst-keys"
install -m 0644 "$ROOT/packaging/server.toml" "$STAGE/etc/pst/server.toml"
ln -s "$PREFIX/venv/bin/pst" "$STAGE/usr/bin/pst"
install -m 0644 "$ROOT/README.md" "$STAGE/usr/share/doc/$NAME/README.md"
install -m 0644 "$ROOT/systemd/README.md" "$STAGE/usr/share/doc/$NAME/README.systemd.md"
install -m 0644 "$ROOT/packaging/README.md" "$STAGE/usr/share/doc/$NAME/README.packaging.md"
for conf in "$ROOT"/systemd/pst-server.service.d/*.conf; do
    install -m 0644 "$conf" "$STAGE/usr/share/doc/$NAME/examples/"
done
for script in postinst prerm postrm; do
    install -m 0755 "$ROOT/packaging/debian/$script" "$STAGE/DEBIAN/$script"
done
install -m 0644 "$ROOT/packaging/debian/conffiles" "$STAGE/DEBIAN/conffiles"

# 4. Shared libraries that locally built wheels link against (tpm2-pytss: libtss2-*), as
#    Debian packages. manylinux wheels bring their own libraries (in <name>.libs/) and need
#    only glibc, which is essential.
mkdir "$WORK/so"
for whl in "$STAGE$PREFIX"/wheels/*.whl; do
    "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$WORK/so"
done
find "$WORK/so" -name '*.so*' -type f -exec readelf -d {} + 2>/dev/null \
    | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u > "$WORK/needed.txt"
LIBDEPS=""
while read -r lib; do
    [ -z "$(find "$WORK/so" -name "$lib" -print -quit)" ] || continue  # bundled in the wheel
    path=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
    [ -n "$path" ] || { echo "build-deb.sh: no installed library $lib (a wheel links to it)" >&2; exit 1; }
    pkg=$(dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null || true)
    pkg=$(echo "$pkg" | head -n1 | cut -d: -f1)
    [ -n "$pkg" ] || { echo "build-deb.sh: $path ($lib) belongs to no Debian package" >&2; exit 1; }
    case " libc6 $LIBDEPS " in *" $pkg "*) ;; *) LIBDEPS="$LIBDEPS $pkg" ;; esac
done < "$WORK/needed.txt"
DEPENDS="python3 (>= $PYVER), python3 (<< $PYNEXT), python3-venv, adduser"
for pkg in $LIBDEPS; do DEPENDS="$DEPENDS, $pkg"; done

SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<EOF
Package: $NAME
Version: $DEBVERSION
Architecture: $ARCH
Maintainer: PST appliance maintainers <maintainers@pst-appliance.invalid>
Installed-Size: $SIZE
Depends: $DEPENDS
Recommends: systemd
Suggests: tpm2-tools
Section: admin
Priority: optional
Description: Proactive Security Toolkit appliance (PServer)
 A secure-logging and timestamping server whose signing keys are threshold-shared
 among n servers and refreshed every period, so that an attacker must break into
 more than t servers within one period (Barak, Herzberg, Naor, Shai, CCS '99).
 .
 Installs the server into its own virtual environment under /opt/pst-appliance
 (offline, from the wheels in the package), the hardened pst-server.service unit
 (not enabled), the system user pst and a configuration template /etc/pst/server.toml.
EOF

mkdir -p "$OUT"
DEB="$OUT/${NAME}_${DEBVERSION}_${ARCH}.deb"
# gzip, not xz: the payload is wheels, already compressed; xz spends 20 s to gain nothing.
dpkg-deb --root-owner-group -Zgzip -z6 --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
