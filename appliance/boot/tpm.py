"""Vstart in a TPM 2.0 NV index, written once and then write-locked for good.

Theory of operation. Provisioning defines an ordinary NV index of exactly
:data:`~appliance.boot.rom.IMAGE_SIZE` bytes with

* TPMA_NV_WRITEDEFINE: TPM2_NV_WriteLock sets TPMA_NV_WRITELOCKED, and with WRITEDEFINE that
  lock is never cleared, not by TPM2_Startup, not by a reboot; nothing can write the index again;
* TPMA_NV_WRITEALL: the image is written in one piece or not at all;
* TPMA_NV_AUTHREAD and TPMA_NV_AUTHWRITE with an empty authorization value: Vstart is public,
  and the write is allowed exactly once, between the definition and the lock;
* TPMA_NV_NO_DA: reads do not count towards the dictionary-attack lockout.

It then writes the image and locks the index. ``read_vstart`` reads the public area first and
refuses an index that is not written and write-locked with WRITEDEFINE, has another size, or
can be written under a policy or by the platform; only then does it read the data.

What the TPM does not prevent: anyone holding the owner authorization can undefine the index
(TPM2_NV_UndefineSpace) and define a new one. The operator sets an owner authorization after
provisioning (``tpm2_changeauth -c owner``) and keeps it off the machine; docs/security.md says so.
"""

from __future__ import annotations

import os
from typing import Any

from appliance.boot.rom import IMAGE_SIZE, RomError, decode_image, encode_image

# libtss2 logs every TPM error to stderr; ours carry the same facts. Set TSS2_LOG to see them.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import (
    ESAPI,
    TPM2_ALG,
    TPM2_NT,
    TPM2_RC,
    TPM2B_NV_PUBLIC,
    TPMA_NV,
    TPMS_NV_PUBLIC,
    TSS2_Exception,
)

ATTRIBUTES = TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.WRITEDEFINE | TPMA_NV.WRITEALL | TPMA_NV.NO_DA
# An index holding Vstart must have all of these once provisioned ...
REQUIRED = TPMA_NV.WRITEDEFINE | TPMA_NV.WRITELOCKED | TPMA_NV.WRITTEN
# ... and none of these: ways to write it that the write lock would not stop, or locks that a
# reboot lifts, or a read lock that would stop the boot path.
FORBIDDEN = TPMA_NV.POLICYWRITE | TPMA_NV.PPWRITE | TPMA_NV.WRITE_STCLEAR | TPMA_NV.GLOBALLOCK


class TpmRom:
    """Vstart in the NV index ``nv_index`` of the TPM reached through ``tcti``."""

    kind = "tpm"

    def __init__(self, nv_index: int, tcti: str) -> None:
        self.nv_index = nv_index
        self.tcti = tcti

    @property
    def _where(self) -> str:
        return f"TPM NV index 0x{self.nv_index:08x} (tcti {self.tcti})"

    def _open(self) -> ESAPI:
        try:
            return ESAPI(self.tcti)
        except (TSS2_Exception, RuntimeError, ValueError) as exc:
            raise RomError(
                f"cannot reach the TPM through tcti {self.tcti!r}: {exc}; check rom.tcti in the config "
                "(a running swtpm or /dev/tpmrm0 and permission to open it)"
            ) from None

    def _public(self, esapi: ESAPI) -> tuple[Any, Any] | None:
        """(ESYS_TR, TPMS_NV_PUBLIC) of the index, or None if it is not defined."""
        try:
            handle = esapi.tr_from_tpmpublic(self.nv_index)
        except TSS2_Exception as exc:
            if exc.error == TPM2_RC.HANDLE:
                return None
            raise RomError(f"{self._where}: cannot look the index up: {exc}") from None
        public, _name = esapi.nv_read_public(handle)
        return handle, public.nvPublic

    def provision(self, vstart: bytes) -> str:
        image = encode_image(vstart)
        with self._open() as esapi:
            found = self._public(esapi)
            if found is not None:
                _handle, public = found
                attrs = TPMA_NV(public.attributes)
                if attrs & TPMA_NV.WRITELOCKED:
                    raise RomError(
                        f"{self._where}: ROM already provisioned and write-locked; it is write-once "
                        "(`pst rom show` prints the Vstart it holds)"
                    )
                raise RomError(
                    f"{self._where}: the index exists but is not write-locked (attributes {attrs}); "
                    "an interrupted provisioning or another program's index. Check with "
                    f"`tpm2_nvreadpublic 0x{self.nv_index:08x}`, remove it with "
                    f"`tpm2_nvundefine 0x{self.nv_index:08x}` if it is ours, or choose another rom.nv_index"
                )
            public_info = TPM2B_NV_PUBLIC(
                nvPublic=TPMS_NV_PUBLIC(
                    nvIndex=self.nv_index,
                    nameAlg=TPM2_ALG.SHA256,
                    attributes=ATTRIBUTES,
                    dataSize=IMAGE_SIZE,
                )
            )
            try:
                handle = esapi.nv_define_space(b"", public_info)
                esapi.nv_write(handle, image)
                esapi.nv_write_lock(handle)
            except TSS2_Exception as exc:
                raise RomError(
                    f"{self._where}: provisioning failed: {exc}; if the owner hierarchy has an "
                    "authorization value, provision before setting it"
                ) from None
        if self.read_vstart() != vstart:
            raise RomError(f"{self._where}: read back a different Vstart after provisioning")
        return (
            f"{self._where}: Vstart written and the index write-locked for good. Now set an owner "
            "authorization (`tpm2_changeauth -c owner`) so that nobody can undefine the index"
        )

    def read_vstart(self) -> bytes:
        with self._open() as esapi:
            found = self._public(esapi)
            if found is None:
                raise RomError(f"{self._where}: no such index; provision it with `pst rom provision`")
            handle, public = found
            attrs = TPMA_NV(public.attributes)
            problems = []
            if attrs.nt != TPM2_NT.ORDINARY:
                problems.append(f"it is not an ordinary index (type {attrs.nt})")
            if public.dataSize != IMAGE_SIZE:
                problems.append(f"its size is {public.dataSize} bytes, not {IMAGE_SIZE}")
            missing = TPMA_NV(REQUIRED & ~attrs)
            if missing:
                problems.append(f"it lacks {missing} (written, write-locked for good)")
            extra = TPMA_NV(FORBIDDEN & attrs)
            if extra:
                problems.append(f"it has {extra}")
            if not attrs & TPMA_NV.AUTHREAD or attrs & TPMA_NV.READLOCKED:
                problems.append("it cannot be read with its empty authorization (AUTHREAD, not read-locked)")
            if problems:
                raise RomError(
                    f"{self._where}: refusing it as a ROM: {'; '.join(problems)}. Provision a fresh index "
                    "with `pst rom provision` (another rom.nv_index if this one is taken)"
                )
            try:
                data = bytes(esapi.nv_read(handle, IMAGE_SIZE))
            except TSS2_Exception as exc:
                raise RomError(f"{self._where}: cannot read the index: {exc}") from None
        return decode_image(data, self._where)

    def describe(self) -> str:
        index = f"0x{self.nv_index:08x}"
        return f"TPM 2.0 NV index {index} (tcti {self.tcti}), written once and write-locked for good"
