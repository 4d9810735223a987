#!/bin/sh
# A TPM 2.0 simulator (swtpm) for development: `pst rom provision` and the boot path talk to it
# through the tcti printed below. Its state (the NV index holding Vstart) lives in STATE_DIR and
# survives restarts, like a real TPM's NV memory. Ctrl-C stops it.
#
#   firmware-sim/swtpm-dev.sh [STATE_DIR] [PORT]      (defaults: ./.swtpm-dev, 2321; control on PORT+1)
set -eu
state=${1:-./.swtpm-dev}
port=${2:-2321}
command -v swtpm >/dev/null || { echo "swtpm is not installed: apt-get install swtpm swtpm-tools" >&2; exit 1; }
mkdir -p "$state"
echo "swtpm on 127.0.0.1:$port, state in $state. In the server's config:"
echo "  [rom]"
echo "  backend = \"tpm\""
echo "  tcti = \"swtpm:host=127.0.0.1,port=$port\""
exec swtpm socket --tpm2 \
  --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
  --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
  --tpmstate "dir=$state" \
  --flags not-need-init,startup-clear
