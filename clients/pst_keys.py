"""pst-keys: keeps an application's period certificate from the group's CA current in a directory.

    pst-keys --app web-tunnel --dir /var/lib/pst-keys/web-tunnel \\
             [--name tunnel.example.org ...] [--csr [--key-type p256|ed25519]] \\
             [--reload "systemctl reload stunnel4"] [--socket /run/pst/api.sock] [--once]

The directory holds ``key.pem`` (0600), ``cert.pem`` (the leaf), ``bundle.pem`` (leaf and the
group root) and ``renew.json`` (when to renew). Each file is written to a temporary file,
synced and renamed over the old one, so a reader sees the old file or the new one, never a
part. The agent renews at the certificate's half-life (not before the next period: the
server's ``renew_after``), then runs the reload command (``sh -c``, like certbot's deploy
hook, with ``PST_KEYS_DIR`` in its environment). On any failure (server unavailable, refused,
a certificate that does not match its key or does not chain to the bundle's root, a write
that fails) the old files stay as they were and the agent says why, then retries after 5 s,
doubling up to 5 min. ``--once`` renews now (whether due or not), runs the hook and exits:
0 renewed, 1 not renewed (the old files are kept), 2 renewed but the reload command failed.

By default the PServer makes the key pair (P-256) and returns the private key over the local
socket (the paper's §5.4); with ``--csr`` the agent makes the key and sends a certificate
signing request, so the private key never leaves this machine.

It uses ``appliance.api.client`` where the appliance is installed, else the standalone
``pst_client`` (clients/python), and ``cryptography`` in both cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

try:
    from appliance.api.client import PstClient, PstError
except ImportError:  # a machine with the standalone client library only
    from pst_client import PstClient, PstError  # type: ignore[no-redef,unused-ignore]

KEY, CERT, BUNDLE, RENEW = "key.pem", "cert.pem", "bundle.pem", "renew.json"
RETRY_FIRST = 5.0
RETRY_MAX = 300.0
#: Longest sleep between two looks at the files (a clock jump, a file removed by hand).
CHECK_EVERY = 3600.0
HOOK_TIMEOUT = 120.0


class AgentError(Exception):
    """A certificate was not obtained or not written; the message says why."""


@dataclass(frozen=True)
class Current:
    """The certificate in the directory, as far as the agent is concerned."""

    not_before: float
    not_after: float
    renew_after: float
    serial: int


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` by ``data`` (mode ``mode``): a temporary file, synced, renamed, the
    directory synced. On failure the old file is untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _same_key(a: Any, b: Any) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(
        a.public_bytes(serialization.Encoding.DER, spki) == b.public_bytes(serialization.Encoding.DER, spki)
    )


def check_issued(cert_pem: bytes, bundle_pem: bytes, key_pem: bytes, now: float) -> x509.Certificate:
    """The leaf, once it is for ``key_pem``, chains to the bundle's root and is valid at ``now``;
    else :class:`AgentError`."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
        chain = x509.load_pem_x509_certificates(bundle_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except ValueError as exc:
        raise AgentError(f"the server's answer is unreadable: {exc}") from None
    if not _same_key(leaf.public_key(), key.public_key()):
        raise AgentError("the certificate is not for the private key")
    if len(chain) < 2 or chain[0] != leaf:
        raise AgentError("the bundle is not the leaf followed by the group root")
    try:
        leaf.verify_directly_issued_by(chain[-1])
    except Exception as exc:  # InvalidSignature, ValueError, TypeError (another key type)
        raise AgentError(f"the certificate is not issued by the bundle's root: {exc}") from None
    if not leaf.not_valid_before_utc.timestamp() - 60 <= now < leaf.not_valid_after_utc.timestamp():
        raise AgentError("the certificate is not valid now (is this machine's clock right?)")
    return leaf


class Agent:
    """Keeps ``directory``'s key, certificate and bundle current for application ``app``."""

    def __init__(
        self,
        directory: Path,
        app: str,
        connect: Callable[[], Any],
        *,
        names: Sequence[str] | None = None,
        csr: bool = False,
        key_type: str = "p256",
        reload: str | None = None,
        clock: Callable[[], float] = time.time,
        say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
    ) -> None:
        self.directory = directory
        self.app = app
        self.connect = connect
        self.names = list(names) if names else None
        self.csr = csr
        self.key_type = key_type
        self.reload = reload
        self.clock = clock
        self.say = say

    def current(self) -> Current | None:
        """The certificate in the directory if the key, certificate and bundle are there and go
        together; None (and why) otherwise."""
        try:
            cert_pem = (self.directory / CERT).read_bytes()
            bundle_pem = (self.directory / BUNDLE).read_bytes()
            key_pem = (self.directory / KEY).read_bytes()
        except FileNotFoundError:
            return None
        try:
            leaf = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, None)
            if not _same_key(leaf.public_key(), key.public_key()) or not bundle_pem.startswith(cert_pem):
                self.say(f"pst-keys: {self.directory}: the files do not go together; renewing")
                return None
        except ValueError as exc:
            self.say(f"pst-keys: {self.directory}: unreadable ({exc}); renewing")
            return None
        start, end = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
        renew = start + (end - start) / 2
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            saved = json.loads((self.directory / RENEW).read_text())
            if saved.get("serial") == leaf.serial_number:
                renew = min(end, max(renew, float(saved["renew_after"])))
        return Current(start, end, renew, leaf.serial_number)

    def due(self) -> float:
        """Seconds until the certificate should be renewed (0: now)."""
        current = self.current()
        if current is None:
            return 0.0
        return max(0.0, current.renew_after - self.clock())

    def _key(self) -> Any:
        if self.key_type == "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
        return ec.generate_private_key(ec.SECP256R1())

    def obtain(self) -> tuple[bytes, bytes, bytes, int]:
        """(key PEM, leaf PEM, bundle PEM, renew_after) from the server; :class:`AgentError`."""
        try:
            with self.connect() as client:
                client.register(self.app)
                if self.csr:
                    key = self._key()
                    request = x509.CertificateSigningRequestBuilder().subject_name(
                        x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, self.app)])
                    )
                    algorithm = None if self.key_type == "ed25519" else hashes.SHA256()
                    csr = request.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)
                    issued = client.certificate(csr=csr, names=self.names)
                    key_pem = key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                else:
                    issued = client.certificate(names=self.names)
                    if issued.key is None:
                        raise AgentError("the server returned no key")
                    key_pem = issued.key
        except PstError as exc:
            if exc.code == "connection":
                raise AgentError(f"cannot reach the server: {exc.message}") from None
            raise AgentError(f"the server gave no certificate: {exc}") from None
        except OSError as exc:
            raise AgentError(f"cannot reach the server: {exc}") from None
        check_issued(issued.certificate, issued.bundle, key_pem, self.clock())
        return key_pem, issued.certificate, issued.bundle, issued.renew_after

    def renew(self) -> Current:
        """Obtain a certificate and replace the files; :class:`AgentError` leaves the old ones."""
        key_pem, cert_pem, bundle_pem, renew_after = self.obtain()
        leaf = x509.load_pem_x509_certificate(cert_pem)
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            # The key first: a reader that finds the new certificate finds its key too.
            atomic_write(self.directory / KEY, key_pem, 0o600)
            atomic_write(self.directory / CERT, cert_pem, 0o644)
            atomic_write(self.directory / BUNDLE, bundle_pem, 0o644)
            record = {"serial": leaf.serial_number, "renew_after": renew_after}
            atomic_write(self.directory / RENEW, json.dumps(record).encode(), 0o644)
        except OSError as exc:
            raise AgentError(f"cannot write {self.directory}: {exc}") from None
        self.say(
            f"pst-keys: {self.app}: new certificate, serial {leaf.serial_number:x}, valid until "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
        current = self.current()
        assert current is not None
        return current

    def run_hook(self) -> bool:
        """Run the reload command; False (and why) if it failed."""
        if not self.reload:
            return True
        env = dict(os.environ, PST_KEYS_DIR=str(self.directory), PST_KEYS_APP=self.app)
        try:
            done = subprocess.run(["/bin/sh", "-c", self.reload], env=env, timeout=HOOK_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.say(f"pst-keys: the reload command failed: {exc}")
            return False
        if done.returncode != 0:
            self.say(f"pst-keys: the reload command exited with status {done.returncode}")
            return False
        return True

    def once(self) -> int:
        """Renew now and run the hook: 0, 1 (not renewed: old files kept), 2 (hook failed)."""
        try:
            self.renew()
        except AgentError as exc:
            self.say(f"pst-keys: {self.app}: not renewed, the old files are kept: {exc}")
            return 1
        return 0 if self.run_hook() else 2

    def step(self, failures: int) -> tuple[float, int]:
        """One look: renew if due. (seconds to sleep, failures so far)."""
        wait = self.due()
        if wait > 0:
            return min(wait, CHECK_EVERY), failures
        try:
            self.renew()
        except AgentError as exc:
            delay = min(RETRY_MAX, RETRY_FIRST * 2**failures)
            self.say(
                f"pst-keys: {self.app}: not renewed (retry in {delay:g} s), the old files are kept: {exc}"
            )
            return delay, failures + 1
        self.run_hook()
        return min(self.due(), CHECK_EVERY), 0

    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        failures = 0
        while True:
            wait, failures = self.step(failures)
            sleep(max(wait, 0.5))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pst-keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", required=True, help="the application's registered name ([ca.apps.NAME])")
    parser.add_argument("--dir", required=True, type=Path, help="where key.pem, cert.pem, bundle.pem go")
    parser.add_argument("--name", action="append", dest="names", help="a name for the certificate (repeat)")
    parser.add_argument("--csr", action="store_true", help="make the key here and send a CSR")
    parser.add_argument("--key-type", choices=("p256", "ed25519"), default="p256", help="with --csr")
    parser.add_argument(
        "--reload",
        default=os.environ.get("PST_KEYS_RELOAD") or None,
        help="command run (sh -c) after each renewal (default: $PST_KEYS_RELOAD)",
    )
    parser.add_argument("--socket", default=os.environ.get("PST_API_SOCKET", "/run/pst/api.sock"))
    parser.add_argument("--once", action="store_true", help="renew now, run the reload command, exit")
    args = parser.parse_args(argv)
    agent = Agent(
        args.dir,
        args.app,
        lambda: PstClient(args.socket, quota_wait=30.0),
        names=args.names,
        csr=args.csr,
        key_type=args.key_type,
        reload=args.reload,
    )
    if args.once:
        return agent.once()
    try:
        agent.run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
