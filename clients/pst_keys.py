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

Over HTTP (``--url``, for a host without a PServer of its own), the agent enrolls with an
enrollment credential instead of a local registration (docs/ca.md, "Over HTTP"):

    pst-keys --app web-tunnel --dir DIR --url https://pst1.example.org:7180 [--url ...] \
             --enroll-cert enroll.pem (--enroll-key enroll.key | --enroll-sign CMD) \
             [--cafile root-of-the-https-service.pem] [--csr] ...

It fetches a challenge (``GET /ca/enroll/challenge``), signs the challenge, the credential, the
CSR and the names with the enrollment key (``--enroll-key``, a PEM file; or ``--enroll-sign``:
a command, run with ``sh -c``, that reads what to sign on stdin and writes the signature on
stdout, e.g. ``openssl dgst -sha256 -sign KEY`` or a TPM's or HSM's tool, so the key need not
be a file), and posts it (``POST /ca/enroll``). Several ``--url``: each is tried in turn.

It uses ``appliance.api.client`` where the appliance is installed, else the standalone
``pst_client`` (clients/python), and ``cryptography`` in both cases; the HTTP mode needs only
the standard library besides.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


#: What the enrollment key signs (appliance.api._enroll.enroll_payload; docs/ca.md).
ENROLL_DOMAIN = "pst/enroll/v1"
HTTP_TIMEOUT = 30.0


def enroll_payload(
    server: int, challenge: bytes, app: str, credential: bytes, csr: bytes | None, names: Sequence[str] | None
) -> bytes:
    """The lines the enrollment key signs for ``server`` (``credential`` and ``csr`` as sent)."""
    lines = [
        ENROLL_DOMAIN,
        f"server={server}",
        f"challenge={challenge.hex()}",
        f"app={app}",
        f"credential={hashlib.sha256(credential).hexdigest()}",
        f"csr={hashlib.sha256(csr).hexdigest() if csr is not None else '-'}",
        f"names={','.join(names) if names is not None else '-'}",
    ]
    return "".join(line + "\n" for line in lines).encode("ascii")


@dataclass(frozen=True)
class Issued:
    """A certificate from the HTTP endpoint (the fields of the socket client's answer)."""

    certificate: bytes
    bundle: bytes
    renew_after: int
    key: bytes | None


class HttpEnroller:
    """The agent's connection over HTTP: ``certificate`` enrolls at the first server of ``urls``
    that answers (a 4xx refusal is final: the next server would refuse it too)."""

    def __init__(
        self,
        urls: Sequence[str],
        credential: bytes,
        sign: Callable[[bytes], bytes],
        *,
        cafile: str | None = None,
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.credential = credential
        self.sign = sign
        self.context = ssl.create_default_context(cafile=cafile)
        self.app = ""

    def __enter__(self) -> HttpEnroller:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def register(self, app: str) -> None:
        self.app = app

    def _call(self, url: str, data: bytes | None = None) -> dict[str, Any]:
        headers = {"accept": "application/json"}
        if data is not None:
            headers["content-type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=self.context) as answer:
                doc = json.loads(answer.read(1 << 20))
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read(1 << 16))["error"]
                why = f"{err['status']} {err['code']}: {err['message']}"
            except (ValueError, KeyError, TypeError, OSError):
                why = f"HTTP {exc.code}"
            if 400 <= exc.code < 500 and exc.code != 429:
                raise AgentError(f"{url} refused: {why}") from None
            raise OSError(f"{url}: {why}") from None
        except (urllib.error.URLError, ValueError) as exc:
            raise OSError(f"{url}: {exc}") from None
        if not isinstance(doc, dict):
            raise OSError(f"{url}: not a JSON object")
        return doc

    def certificate(self, csr: bytes | None = None, names: Sequence[str] | None = None) -> Issued:
        failures = []
        for url in self.urls:
            try:
                return self._enroll(url, csr, names)
            except OSError as exc:
                failures.append(str(exc))
        raise AgentError("no server answered: " + "; ".join(failures))

    def _enroll(self, url: str, csr: bytes | None, names: Sequence[str] | None) -> Issued:
        got = self._call(url + "/ca/enroll/challenge")
        try:
            server = int(got["server"])
            challenge = base64.b64decode(got["challenge"], validate=True)
        except (KeyError, ValueError, TypeError) as exc:
            raise OSError(f"{url}: a bad challenge ({exc})") from None
        names = list(names) if names else None
        payload = enroll_payload(server, challenge, self.app, self.credential, csr, names)
        try:
            signature = self.sign(payload)
        except (OSError, ValueError) as exc:
            raise AgentError(f"the enrollment key did not sign: {exc}") from None
        body: dict[str, Any] = {
            "app": self.app,
            "challenge": base64.b64encode(challenge).decode(),
            "credential": self.credential.decode("ascii"),
            "signature": base64.b64encode(signature).decode(),
        }
        if csr is not None:
            body["csr"] = csr.decode("ascii")
        if names is not None:
            body["names"] = names
        doc = self._call(url + "/ca/enroll", json.dumps(body).encode())
        try:
            key = doc.get("key")
            return Issued(
                doc["certificate"].encode(),
                doc["bundle"].encode(),
                int(doc["renew_after"]),
                key.encode() if isinstance(key, str) else None,
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise OSError(f"{url}: an answer without a certificate ({exc})") from None


def key_signer(path: Path) -> Callable[[bytes], bytes]:
    """Sign with the enrollment key in the PEM file ``path`` (P-256: ECDSA SHA-256; Ed25519)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise AgentError(f"{path}: cannot read the enrollment key: {exc}") from None

    def sign(payload: bytes) -> bytes:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(payload)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(payload, ec.ECDSA(hashes.SHA256()))
        raise ValueError("the enrollment key must be P-256 or Ed25519")

    return sign


def command_signer(command: str) -> Callable[[bytes], bytes]:
    """Sign with ``sh -c COMMAND``: the payload on its stdin, the signature on its stdout."""

    def sign(payload: bytes) -> bytes:
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", command], input=payload, capture_output=True, timeout=60, check=False
            )
        except subprocess.TimeoutExpired:
            raise OSError("the signing command did not finish in 60 s") from None
        if done.returncode != 0 or not done.stdout:
            raise OSError(
                f"the signing command exited with status {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()[:200]}"
            )
        return done.stdout

    return sign


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
    parser.add_argument(
        "--url", action="append", dest="urls", help="a server's HTTP service: enroll over HTTP (repeat)"
    )
    parser.add_argument("--enroll-cert", type=Path, help="with --url: the enrollment credential (PEM)")
    parser.add_argument("--enroll-key", type=Path, help="with --url: the enrollment key (PEM)")
    parser.add_argument(
        "--enroll-sign", help="with --url: a command (sh -c) signing stdin with the enrollment key"
    )
    parser.add_argument("--cafile", help="with --url: the CA of the servers' HTTPS certificates")
    parser.add_argument("--once", action="store_true", help="renew now, run the reload command, exit")
    args = parser.parse_args(argv)
    connect: Callable[[], Any]
    if args.urls:
        if args.enroll_cert is None or (args.enroll_key is None) == (args.enroll_sign is None):
            parser.error("--url needs --enroll-cert and one of --enroll-key and --enroll-sign")
        try:
            credential = args.enroll_cert.read_bytes()
            sign = key_signer(args.enroll_key) if args.enroll_key else command_signer(args.enroll_sign)
        except (OSError, AgentError) as exc:
            print(f"pst-keys: {exc}", file=sys.stderr)
            return 1
        enroller = HttpEnroller(args.urls, credential, sign, cafile=args.cafile)

        def connect() -> Any:
            return enroller

    else:

        def connect() -> Any:
            return PstClient(args.socket, quota_wait=30.0)

    agent = Agent(
        args.dir,
        args.app,
        connect,
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
