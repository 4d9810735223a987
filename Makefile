# The two commands: `make demo` runs the appliance, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests use (real parts, not mocks). tpm2-pytss builds from source against
# libtss2-dev (pkg-config, gcc, Python headers); swtpm is the TPM the ROM tests talk to.
DEB_PACKAGES := openssl gcc pkg-config python3-dev libtss2-dev swtpm swtpm-tools
# systemd-analyze checks the unit; `make deb` needs readelf (binutils), and its install test
# needs what the package depends on (python3-venv, adduser).
DEB_PACKAGES += systemd binutils python3-venv adduser
# The disk erasure test makes an ext4 image on a loop device.
DEB_PACKAGES += e2fsprogs mount util-linux
# The browser test of the status page drives Debian's chromium with its chromedriver (selenium).
DEB_PACKAGES += chromium chromium-driver
# The log's interop test checks our signed notes, tiles and proofs with Go's sumdb/note and tlog.
DEB_PACKAGES += golang-go golang-golang-x-mod-dev
# The log's ingest tests forward with rsyslog (omfwd over TCP, omrelp), run in the foreground
# with their own configuration (the tests do not use the system's rsyslog service).
DEB_PACKAGES += rsyslog rsyslog-relp
# The timestamping tests post openssl-made queries with curl.
DEB_PACKAGES += curl
# ... and over TLS (omfwd's gtls stream driver, omrelp's tls="on").
DEB_PACKAGES += rsyslog-gnutls
# Period certificates for tunnel software: stunnel in server and client mode with mutual TLS.
DEB_PACKAGES += stunnel4
# ... and a stunnel whose clock is a day ahead (libfaketime) to see an expired certificate refused.
DEB_PACKAGES += faketime
STAMP := $(VENV)/.installed

.PHONY: test demo demo-crypto lint typecheck pytest bench deps debs venv loggen deb clean

test: deps lint typecheck pytest

deps: debs venv loggen

# Debian packages first: the venv builds wheels against them.
debs:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock | debs
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# syslog-ng's load generator, extracted from Debian's syslog-ng-core into .venv/loggen with a
# wrapper .venv/bin/loggen (not installed: syslog-ng-core conflicts with rsyslog). It is in the
# venv before any test makes a cluster, so the servers' code manifests include it.
# The script does nothing when the wrapper already runs.
loggen: | debs venv
	tests/tools/install-loggen.sh $(VENV)

lint: venv
	$(BIN)/ruff check appliance tests bench packaging
	$(BIN)/ruff format --check appliance tests bench packaging

typecheck: venv
	$(BIN)/mypy --strict appliance

pytest: venv
	$(BIN)/pytest -q --durations=25

demo: deps
	$(BIN)/pst demo

demo-crypto: deps
	$(BIN)/pst demo --crypto

# The Debian package dist/pst-appliance_<version>_<arch>.deb (packaging/README.md).
deb: deps
	packaging/build-deb.sh

bench: venv
	$(BIN)/python bench/crypto.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist
