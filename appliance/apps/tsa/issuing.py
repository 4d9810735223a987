"""Issuing a token with an asynchronous signer, for every front end (``POST /tsa``, the local
API's ``timestamp`` operation): :func:`respond` turns the request's bytes into the
``TimeStampResp`` reply.

The signer is the caller's (an ``async`` callable taking the :class:`Prepared` token and
returning a DER ECDSA signature): a local key in "period-key" mode (:func:`local_signer`), the
network's threshold signers in "threshold" mode (:func:`network_signer`, the payload of
:mod:`appliance.apps.tsa.threshold`). A signer that raises :class:`SignerUnavailable` has its
text sent in the ``systemFailure`` reply (the presignature stock ran dry, the network did not
answer in time); any other exception gets a generic text. Each token's record goes to
``on_record`` (the secure log's append) and the token is released only once that returned: a
token whose record could not be stored is answered with ``systemFailure``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import Authority, Prepared, Reply, TimeOff, TokenRecord, rejection
from appliance.apps.tsa.rfc3161 import FailureInfo, RequestError
from appliance.protocols.signing import OWN_CHECK

log = logging.getLogger("pst.tsa")

AsyncSigner = Callable[[Prepared], Awaitable[bytes]]
OnRecord = Callable[[TokenRecord], Awaitable[None]]

#: How long a token waits for the network's signature (the DSS service itself gives up after 5 s
#: without a presignature: protocols/dss_signing.py ``REQUEST_TIMEOUT``).
NETWORK_TIMEOUT: Final = 8.0


class SignerUnavailable(Exception):
    """The signer cannot sign now; its text (public, no secret) goes to the client."""


class StaleProposal(SignerUnavailable):
    """The token waited (for a presignature) until its genTime was no longer within the stated
    accuracy of our own clock: :func:`respond` prepares it again (a new genTime and serial), once."""


#: The refusal code (``SigningRefused.code``) of our own check refusing our proposal's genTime:
#: ``own-check`` (protocols/signing.py ``OWN_CHECK``) with :class:`TimeOff`'s code.
STALE_CODE: Final = f"{OWN_CHECK}/{TimeOff.code}"


async def respond(
    authority: Authority, sign: AsyncSigner, data: bytes, on_record: OnRecord | None = None
) -> Reply:
    """The reply to the ``TimeStampReq`` ``data``: a token signed by ``sign`` and recorded by
    ``on_record`` before it is returned, or a rejection saying why."""
    prepared = authority.prepare(data)
    if isinstance(prepared, Reply):
        return prepared
    try:
        try:
            signature = await sign(prepared)
        except StaleProposal as exc:
            log.info("tsa: %s; proposing a new genTime", exc)
            prepared = authority.prepare(data)
            if isinstance(prepared, Reply):
                return prepared
            signature = await sign(prepared)
    except SignerUnavailable as exc:
        log.warning("tsa: not signed: %s", exc)
        return rejection(RequestError(FailureInfo.SYSTEM_FAILURE, f"not signed: {str(exc)[:300]}"))
    except Exception as exc:  # the signer's failure is the authority's, told as systemFailure
        log.error("tsa: signing failed (%s)", type(exc).__name__)
        return rejection(RequestError(FailureInfo.SYSTEM_FAILURE, "signing failed; try again later"))
    reply = authority.finish(prepared, signature)
    if reply.record is None:
        log.error("tsa: a signature that does not verify was returned by the signer")
    elif on_record is not None:
        # A token leaves only once its record is in the secure log: a misdated token
        # cannot stay hidden. No record, no token.
        try:
            await on_record(reply.record)
        except Exception as exc:
            log.error("tsa: token %x not recorded, not released: %s", reply.record.serial, exc)
            text = "the token could not be recorded in the secure log; try again later"
            return rejection(RequestError(FailureInfo.SYSTEM_FAILURE, text))
    return reply


def local_signer(sign: rfc3161.Signer) -> AsyncSigner:
    """An :data:`AsyncSigner` over a synchronous one (a local key: microseconds, no need to yield)."""

    async def signer(prepared: Prepared) -> bytes:
        return sign(prepared.to_sign)

    return signer


def network_signer(
    sign_dss: Callable[[bytes, float], Awaitable[bytes]], *, timeout: float = NETWORK_TIMEOUT
) -> AsyncSigner:
    """An :data:`AsyncSigner` for "threshold" mode: the network signs the token's payload
    (:func:`appliance.apps.tsa.threshold.encode_payload`) with ``sign_dss(payload, timeout)``.
    A refusal or a timeout becomes :class:`SignerUnavailable` with the reason (bounded by
    ``timeout``): no presignature in stock, too few servers, the signers' checks refused it.
    Our own check refusing a genTime that went stale while it waited is :class:`StaleProposal`."""
    import trio

    from appliance.apps.tsa.threshold import encode_payload
    from appliance.protocols.signing import SigningRefused

    async def signer(prepared: Prepared) -> bytes:
        payload = encode_payload(prepared.tst_info_der, prepared.chain.tsa_certificate)
        try:
            return await sign_dss(payload, timeout)
        except trio.TooSlowError:
            raise SignerUnavailable(
                f"the network did not sign within {timeout:g} s; try again later"
            ) from None
        except (SigningRefused, OSError) as exc:
            text = str(exc)
            # Our own check (the coordinator's) refused the genTime: the token waited, in the
            # link to the key-holder or for a presignature, until it was stale. Others' refusals
            # carry no such code and are not retried.
            if isinstance(exc, SigningRefused) and exc.code == STALE_CODE:
                raise StaleProposal(text) from None
            raise SignerUnavailable(f"{text}; try again later") from None

    return signer
