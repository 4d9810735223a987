"""The announcement key in the TPM: a P-256 signing key that never leaves it (issue 8).

Theory of operation. The key is a *primary* key of the owner hierarchy: TPM2_CreatePrimary
with a fixed template derives it from the hierarchy's seed, so the same template gives the same
key every time, in every process, after a wiped disk; nothing is stored outside the TPM. The
template (:func:`template`):

* objectAttributes = fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign: the
  TPM made the private key, will not duplicate it (not to another TPM, not under another
  parent), and uses it only to sign, with the key's empty authorization value;
* ECC NIST P-256, scheme ECDSA with SHA-256, no KDF, nameAlg SHA-256;
* ``unique.ecc.x`` = SHA-256("pst/announcement-key/v1" || label || server id): a different
  key per appliance label and server id on one TPM.

The owner hierarchy may get an authorization value after provisioning (the ROM's NV index needs
one: docs/security.md). CreatePrimary then needs it too, so :meth:`TpmAnnouncementKey.persist`,
run at provisioning while the owner authorization is still empty, also makes the key a
*persistent* object at ``handle`` (TPM2_EvictControl). Later the key is used from that handle,
after checking that its public area is exactly the template's (attributes and curve) and its
public key is the one the template derives; where no persistent object exists the key is derived
again. Either way the private key is the TPM's and never on the disk.
"""

from __future__ import annotations

import hashlib
import os

from appliance.boot.rom import RomError
from appliance.crypto import annkey

os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_RC,
    TPM2_RH,
    TPM2_ST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
    TSS2_Exception,
)


class AnnouncementKeyError(RomError, annkey.SigningUnavailable):
    """The announcement key cannot be used (the TPM is unreachable, refuses, or holds another key)."""


ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)
LABEL = b"pst/announcement-key/v1"
#: Default persistent handle of server i's announcement key: DEFAULT_HANDLE + i (owner range).
DEFAULT_HANDLE = 0x81018100


def unique(label: str, server: int) -> bytes:
    return hashlib.sha256(LABEL + b"\0" + label.encode() + b"\0" + server.to_bytes(4, "big")).digest()


def template(label: str, server: int) -> TPM2B_PUBLIC:
    """The fixed template of server ``server``'s announcement key."""
    public = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=ATTRIBUTES, nameAlg="sha256")
    area = public.publicArea
    area.parameters.eccDetail.curveID = TPM2_ECC.NIST_P256
    area.parameters.eccDetail.scheme.scheme = TPM2_ALG.ECDSA
    area.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    area.parameters.eccDetail.kdf.scheme = TPM2_ALG.NULL
    area.unique.ecc.x = unique(label, server)
    area.unique.ecc.y = b""
    return public


def _public_bytes(public: TPM2B_PUBLIC) -> bytes:
    point = public.publicArea.unique.ecc
    return annkey.public_from_xy(bytes(point.x), bytes(point.y))


def check_public_area(public: TPM2B_PUBLIC) -> list[str]:
    """What is wrong with a key's public area for an announcement key (empty if nothing)."""
    area = public.publicArea
    problems = []
    attrs = TPMA_OBJECT(area.objectAttributes)
    if attrs != ATTRIBUTES:
        problems.append(f"its attributes are {attrs}, not {ATTRIBUTES}")
    if area.type != TPM2_ALG.ECC or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        problems.append("it is not a NIST P-256 key")
    elif area.parameters.eccDetail.scheme.scheme not in (TPM2_ALG.ECDSA, TPM2_ALG.NULL):
        problems.append("its scheme is not ECDSA")
    return problems


class TpmAnnouncementKey:
    """Server ``server``'s announcement key in the TPM reached through ``tcti``."""

    def __init__(self, tcti: str, server: int, *, label: str = "pst", handle: int | None = None) -> None:
        if server < 1:
            raise ValueError("server ids start at 1")
        self.tcti = tcti
        self.server = server
        self.label = label
        self.handle = DEFAULT_HANDLE + server if handle is None else handle
        self._public: bytes | None = None

    @property
    def _where(self) -> str:
        return f"announcement key of server {self.server} (TPM tcti {self.tcti})"

    def _open(self) -> ESAPI:
        try:
            return ESAPI(self.tcti)
        except (TSS2_Exception, RuntimeError, ValueError) as exc:
            raise AnnouncementKeyError(
                f"cannot reach the TPM through tcti {self.tcti!r}: {exc}; check rom.tcti in the config"
            ) from None

    def _persistent(self, esapi: ESAPI) -> ESYS_TR | None:
        try:
            return esapi.tr_from_tpmpublic(self.handle)
        except TSS2_Exception as exc:
            if exc.error == TPM2_RC.HANDLE:
                return None
            raise AnnouncementKeyError(
                f"{self._where}: cannot look up handle 0x{self.handle:08x}: {exc}"
            ) from None

    def _derive(self, esapi: ESAPI) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        try:
            handle, public, _data, _digest, _ticket = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template(self.label, self.server), ESYS_TR.OWNER
            )
        except TSS2_Exception as exc:
            hint = (
                "; the owner hierarchy has an authorization value: run `pst rom provision` before "
                "setting it, so that the key is also kept at a persistent handle"
                if exc.error in (TPM2_RC.BAD_AUTH, TPM2_RC.AUTH_FAIL) or "AUTH" in str(exc).upper()
                else ""
            )
            raise AnnouncementKeyError(f"{self._where}: TPM2_CreatePrimary failed: {exc}{hint}") from None
        return handle, public

    def _key(self, esapi: ESAPI) -> tuple[ESYS_TR, bool]:
        """(handle, transient?): the persistent key if there is one (checked), else derived."""
        found = self._persistent(esapi)
        if found is None:
            handle, public = self._derive(esapi)
            self._remember(_public_bytes(public))
            return handle, True
        public, _name, _qname = esapi.read_public(found)
        problems = check_public_area(public)
        if problems:
            raise AnnouncementKeyError(
                f"{self._where}: refusing the key at handle 0x{self.handle:08x}: {'; '.join(problems)}"
            )
        self._remember(_public_bytes(public))
        return found, False

    def _remember(self, public: bytes) -> None:
        if self._public is not None and self._public != public:
            raise AnnouncementKeyError(f"{self._where}: the TPM now holds another key than before")
        self._public = public

    @property
    def public(self) -> bytes:
        return self.public_key()

    def public_key(self) -> bytes:
        """The SEC1 uncompressed public key (65 bytes)."""
        if self._public is None:
            with self._open() as esapi:
                handle, transient = self._key(esapi)
                if transient:
                    esapi.flush_context(handle)
        assert self._public is not None
        return self._public

    def sign(self, data: bytes) -> bytes:
        """A DER ECDSA-SHA256 signature of ``data`` made by the TPM."""
        digest = hashlib.sha256(data).digest()
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._open() as esapi:
            handle, transient = self._key(esapi)
            try:
                sig = esapi.sign(handle, digest, scheme, ticket)
            except TSS2_Exception as exc:
                raise AnnouncementKeyError(f"{self._where}: TPM2_Sign failed: {exc}") from None
            finally:
                if transient:
                    esapi.flush_context(handle)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return annkey.der_signature(r, s)

    def persist(self) -> str:
        """Keep the derived key at its persistent handle (needs the owner hierarchy's authorization,
        empty at provisioning). Idempotent: a key already there is checked and kept."""
        with self._open() as esapi:
            if self._persistent(esapi) is not None:
                self._key(esapi)
                derived, public = self._derive(esapi)
                esapi.flush_context(derived)
                if _public_bytes(public) != self._public:
                    raise AnnouncementKeyError(
                        f"{self._where}: handle 0x{self.handle:08x} holds another key than the template "
                        f"derives; remove it (`tpm2_evictcontrol -c 0x{self.handle:08x}`) or choose "
                        "another handle"
                    )
                return f"{self._where}: already kept at persistent handle 0x{self.handle:08x}"
            derived, public = self._derive(esapi)
            self._remember(_public_bytes(public))
            try:
                esapi.evict_control(ESYS_TR.OWNER, derived, self.handle)
            except TSS2_Exception as exc:
                raise AnnouncementKeyError(f"{self._where}: TPM2_EvictControl failed: {exc}") from None
            finally:
                esapi.flush_context(derived)
        return f"{self._where}: kept at persistent handle 0x{self.handle:08x}"
