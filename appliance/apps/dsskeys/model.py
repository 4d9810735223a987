"""Per-application DSS keys (paper §5.3 GenerateDSSKey / GenerateDSASignature; issue 12 §1).

Theory of operation
-------------------
An application's key is a public tweak of a DSS secret of C (:mod:`appliance.crypto.appkeys`):
``appkeys-p256`` for P-256 ECDSA keys, ``appkeys-dsa2048`` for DSA 2048/256 keys. So a key is
refreshed and recovered with that secret at every refresh, and signs from its presignatures.

* **Generating** a key is a store write (:mod:`appliance.apps.store`): the record
  ``dss-key/<name>`` of the application, type ``public-once``, owned by the client that wrote it,
  whose value is :class:`KeyRecord` (the group). The store orders it through its agreement and
  every server applies it, with the rules of :func:`check_key_write` (at most
  :data:`MAX_KEYS` keys per application, a valid name, only a client may create one, write-once).
* Each server's store node writes the keys it holds to a small file, the :class:`Registry`,
  which the key-holder reads (the same trust as the store's read rule: the network-facing
  process keeps the replicated state).
* **Signing** sends the payload :class:`SignRequest` (application, client, key name, group and
  the message) to the base secret's service ``sign/appkeys-<group>``; every signer runs
  :class:`AppKeyCheck`: the key must be in its registry, of that group, and owned by the client
  the request names; a request for someone else's key is refused with an ``app-key-refused``
  alert naming the server that asked. A key not in its registry yet (its store lags) is a
  refusal that accuses nobody (:class:`~appliance.protocols.signing.NotYet`). The signers sign
  SHA-256 of the message under the application's key (the check's ``signed_bytes`` and
  ``key_tweak`` hooks), so ``openssl dgst -sha256 -verify`` accepts the signature.

The base secrets sign nothing but these payloads (their services are ``only_checked``), and
the operator's ``dss_sign`` refuses them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from appliance.crypto import appkeys, encoding
from appliance.crypto.errors import DecodeError, ParameterError
from appliance.crypto.groups import Group
from appliance.protocols._core import AlertKind
from appliance.protocols.signing import MAX_MESSAGE, NotYet
from appliance.protocols.state import APP_KEY_SECRETS

log = logging.getLogger("pst.dsskeys")

DOMAIN: Final = "pst/dss-app-sign/v1"
#: The store data id of key ``name``: ``dss-key/<name>``.
KEY_PREFIX: Final = "dss-key/"
#: group -> the DSS secret of C an application key of that group is a tweak of.
BASE_SECRETS: Final = APP_KEY_SECRETS
#: Keys one application may have (each costs nothing per period, but the registry every server
#: reads before a signature grows with them).
MAX_KEYS: Final = 16
#: Largest message an application signs (the payload around it must fit a signing request).
MAX_APP_MESSAGE: Final = MAX_MESSAGE - 1024
MAX_UID: Final = 64
#: The registry's file in the store's directory (``<state>/serve/store/dss-keys``).
KEY_REGISTRY: Final = "dss-keys"
#: Largest registry file a key-holder reads.
MAX_REGISTRY: Final = 4 * 1024 * 1024


def data_id(name: str) -> str:
    return KEY_PREFIX + name


def key_name(store_id: str) -> str | None:
    """The key name of a store data id under :data:`KEY_PREFIX` (None: not a key's record)."""
    return store_id[len(KEY_PREFIX) :] if store_id.startswith(KEY_PREFIX) else None


def _check_group(group: Any, what: str) -> str:
    if group not in BASE_SECRETS:
        raise DecodeError(f"{what}: group {group!r} is not one of {', '.join(sorted(BASE_SECRETS))}")
    return str(group)


def _check_names(app: Any, name: Any, what: str) -> None:
    try:
        appkeys.check_name("the application name", app)
        appkeys.check_name("the key name", name)
    except ParameterError as exc:
        raise DecodeError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class KeyRecord:
    """The value of a key's store record."""

    group: str

    def encode(self) -> bytes:
        return encoding.encode({"dom": DOMAIN, "group": self.group})

    @classmethod
    def decode(cls, data: bytes) -> KeyRecord:
        what = "DSS key record"
        f = encoding.expect_map(
            encoding.decode(data, max_size=256, what=what), {"dom": str, "group": str}, what
        )
        if f["dom"] != DOMAIN:
            raise DecodeError(f"{what}: not a key record ({f['dom'][:40]!r})")
        return cls(_check_group(f["group"], what))


@dataclass(frozen=True)
class SignRequest:
    """What the base secret's signers are asked to sign: ``message`` under key ``key`` of
    application ``app``, for its client ``uid`` (vouched for by the server that asks)."""

    app: str
    uid: bytes
    key: str
    group: str
    message: bytes

    def encode(self) -> bytes:
        return encoding.encode(
            {
                "dom": DOMAIN,
                "app": self.app,
                "uid": self.uid,
                "key": self.key,
                "group": self.group,
                "m": self.message,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> SignRequest:
        what = "DSS application signing request"
        f = encoding.expect_map(
            encoding.decode(data, max_size=MAX_MESSAGE, what=what),
            {"dom": str, "app": str, "uid": bytes, "key": str, "group": str, "m": bytes},
            what,
        )
        if f["dom"] != DOMAIN:
            raise DecodeError(f"{what}: another domain ({f['dom'][:40]!r})")
        _check_names(f["app"], f["key"], what)
        if not 1 <= len(f["uid"]) <= MAX_UID:
            raise DecodeError(f"{what}: the client's unique id must have 1 to {MAX_UID} bytes")
        if len(f["m"]) > MAX_APP_MESSAGE:
            raise DecodeError(f"{what}: message larger than {MAX_APP_MESSAGE} bytes")
        return cls(f["app"], f["uid"], f["key"], _check_group(f["group"], what), f["m"])


@dataclass(frozen=True)
class Entry:
    owner: bytes
    group: str


class _Record(Protocol):
    @property
    def app(self) -> str: ...
    @property
    def data_id(self) -> str: ...
    @property
    def owner(self) -> bytes: ...
    @property
    def value(self) -> bytes: ...


@dataclass(frozen=True)
class Registry:
    """Every application key a server's store holds: (app, name) -> owner and group."""

    keys: dict[tuple[str, str], Entry]

    @classmethod
    def from_records(cls, records: Iterable[_Record]) -> Registry:
        keys: dict[tuple[str, str], Entry] = {}
        for r in records:
            name = key_name(r.data_id)
            if name is None:
                continue
            try:
                keys[(r.app, name)] = Entry(r.owner, KeyRecord.decode(r.value).group)
            except DecodeError:
                continue  # the store's rule admits none; an older state's odd record is no key
        return cls(keys)

    def encode(self) -> bytes:
        items = [[app, name, e.owner, e.group] for (app, name), e in sorted(self.keys.items())]
        return encoding.encode({"dom": DOMAIN, "keys": items})

    @classmethod
    def decode(cls, data: bytes) -> Registry:
        what = "DSS key registry"
        f = encoding.expect_map(
            encoding.decode(data, max_size=MAX_REGISTRY, what=what), {"dom": str, "keys": list}, what
        )
        if f["dom"] != DOMAIN:
            raise DecodeError(f"{what}: another domain")
        keys: dict[tuple[str, str], Entry] = {}
        for item in f["keys"]:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[2], bytes)):
                raise DecodeError(f"{what}: each key is [app, name, owner, group]")
            app, name, owner, group = item
            _check_names(app, name, what)
            keys[(app, name)] = Entry(owner, _check_group(group, what))
        return cls(keys)


class RegistryFile:
    """The registry as the store node last wrote it, read again only when the file changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._registry = Registry({})

    def lookup(self, app: str, name: str) -> Entry | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            # An unreadable registry is this server's own problem: it knows no key (a refusal
            # that accuses nobody) until the store node writes the file again.
            try:
                if st.st_size > MAX_REGISTRY:
                    raise DecodeError(f"larger than {MAX_REGISTRY} bytes")
                self._registry = Registry.decode(self.path.read_bytes())
            except (OSError, DecodeError) as exc:
                log.warning("dss keys: %s unreadable (%s): no application key is known", self.path, exc)
                self._registry = Registry({})
            self._stamp = stamp
        return self._registry.keys.get((app, name))


def check_key_write(app: str, name: str, value: bytes, keys_of_app: int) -> str | None:
    """The store's rule for a key's record (creation by a client, public-once: the store checks
    those): why it is refused, or None."""
    try:
        appkeys.check_name("the key name", name)
        KeyRecord.decode(value)
    except (ParameterError, DecodeError) as exc:
        return str(exc)
    if keys_of_app >= MAX_KEYS:
        return f"application {app!r} has {keys_of_app} DSS keys, the most it may have"
    return None


class AppKeyCheck:
    """Every signer's check on a :class:`SignRequest` for the base secret of ``group``."""

    alert = AlertKind.APP_KEY_REFUSED

    def __init__(self, group: str, lookup: Callable[[str, str], Entry | None]) -> None:
        self.group = group
        self.lookup = lookup

    @property
    def name(self) -> str:
        return f"signature with an application's {self.group} key"

    def claims(self, message: bytes) -> bool:
        try:
            obj = encoding.decode(message, max_size=MAX_MESSAGE, what="message")
        except DecodeError:
            return False
        return isinstance(obj, dict) and obj.get("dom") == DOMAIN

    def check(self, message: bytes) -> str | None:
        return self.check_from(message, 0)

    def check_from(self, message: bytes, server: int) -> str | None:
        try:
            req = SignRequest.decode(message)
        except DecodeError as exc:
            return str(exc)
        if req.group != self.group:
            return f"a {req.group} key asked of the {self.group} base secret"
        entry = self.lookup(req.app, req.key)
        if entry is None:
            return NotYet(f"no key {req.key!r} of application {req.app!r} in this server's store (yet)")
        if entry.group != req.group:
            return f"key {req.key!r} of application {req.app!r} is a {entry.group} key, not {req.group}"
        if entry.owner != req.uid:
            return (
                f"key {req.key!r} of application {req.app!r} belongs to another client than "
                f"{req.app!r}/{req.uid.hex()[:32]}"
            )
        return None

    def signed_bytes(self, message: bytes) -> bytes:
        return SignRequest.decode(message).message

    def key_tweak(self, message: bytes, group: Group[Any], base_public: Any) -> int:
        req = SignRequest.decode(message)
        return appkeys.tweak(group, base_public, req.app, req.key)
