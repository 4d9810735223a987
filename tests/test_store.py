"""The state directory: round trips, crash-safe writes, corrupt files reported and treated as absent."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.host.files import atomic_write, erase
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT, Constants
from appliance.sim.setup import make_network


@pytest.fixture
def network() -> dict[int, object]:
    return dict(make_network(Constants(n=4, t=1, period_length=10.0, delta=0.1), 3))


def test_state_round_trips(tmp_path: Path, network: dict[int, object]) -> None:
    setup = network[2]
    store = StateDir(tmp_path / "s2")
    store.save(setup.public, setup.private)  # type: ignore[attr-defined]
    loaded = store.load()
    assert loaded.problems == []
    assert loaded.public.m == setup.public.m  # type: ignore[attr-defined]
    assert loaded.public.key_table == setup.public.key_table  # type: ignore[attr-defined]
    assert loaded.public.sharings[SCERT] == setup.public.sharings[SCERT]  # type: ignore[attr-defined]
    assert loaded.private is not None
    assert loaded.private.shares[SCERT].value == setup.private.shares[SCERT].value  # type: ignore[attr-defined]
    assert stat.S_IMODE(os.stat(tmp_path / "s2" / "private").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "s2" / "private" / "period.cbor").st_mode) == 0o600


@pytest.mark.parametrize(
    "name", ["public/M.cbor", "public/keytable.cbor", "public/sharings.cbor", "private/period.cbor"]
)
def test_corrupt_file_is_reported_and_treated_as_absent(
    tmp_path: Path, network: dict[int, object], name: str
) -> None:
    setup = network[1]
    store = StateDir(tmp_path)
    store.save(setup.public, setup.private)  # type: ignore[attr-defined]
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) - 3]))
    loaded = store.load()
    assert any(name.split("/")[1] in p for p in loaded.problems), loaded.problems


def test_missing_files_are_reported(tmp_path: Path) -> None:
    loaded = StateDir(tmp_path / "empty").load()
    assert loaded.private is None and loaded.public.m is None
    assert len(loaded.problems) == 4 and all("missing" in p for p in loaded.problems)


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_erase_leaves_no_bytes_behind(tmp_path: Path, network: dict[int, object]) -> None:
    setup = network[1]
    store = StateDir(tmp_path)
    store.save(setup.public, setup.private)  # type: ignore[attr-defined]
    share = setup.private.shares[SCERT].value.to_bytes(64, "big")  # type: ignore[attr-defined]
    assert share in (tmp_path / "private" / "period.cbor").read_bytes()
    store.erase_private()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert share not in path.read_bytes()


def test_erase_of_a_missing_file_is_quiet(tmp_path: Path) -> None:
    erase(tmp_path / "nothing")


def test_what_a_crashed_private_write_left_is_erased_when_the_state_is_loaded(tmp_path: Path) -> None:
    """A crash between linking the old content aside and erasing it, or during a write, leaves
    files named .<name>.old-<pid> / .<name>.tmp-<pid>; a starting key-holder's load erases them
    (any other reader leaves them: they may be a running server's write in progress)."""

    state = StateDir(tmp_path / "state")
    state.init()
    atomic_write(state.private_dir / "period.cbor", b"new", private=True)
    atomic_write(state.private_dir / "period.cbor", b"newer", private=True)
    assert sorted(p.name for p in state.private_dir.iterdir()) == ["period.cbor"]  # the old one erased
    left = [state.private_dir / ".period.cbor.old-123", state.private_dir / "pending" / ".1-keys.tmp-9"]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"old secret")
    StateDir(tmp_path / "state").load()  # pst status, pst verify: read only
    assert all(p.exists() for p in left)
    loaded = StateDir(tmp_path / "state").load(erase_crash_leftovers=True)
    assert not any(p.exists() for p in left)
    assert sum("left by an interrupted write; erased" in p for p in loaded.problems) == 2


def _unusable(path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make private/period.cbor unusable in one of the ways seen; the reason load() should give."""
    if how == "garbage":
        path.write_bytes(b"\xff" * 40)
        return "private state: "
    if how == "directory":
        path.unlink()
        path.mkdir()
        return "not a regular file"
    # Mode 000 under a non-root user: the tests run as root, who reads it anyway, so the
    # read itself is made to fail as it would.
    path.chmod(0)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return "unreadable (Permission denied)"


@pytest.mark.parametrize("how", ["garbage", "directory", "mode 000"])
def test_an_unusable_private_state_is_reported_apart_and_can_be_set_aside(
    tmp_path: Path, network: dict[int, object], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = network[1]
    store = StateDir(tmp_path)
    store.save(setup.public, setup.private)  # type: ignore[attr-defined]
    path = tmp_path / "private" / "period.cbor"
    why = _unusable(path, how, monkeypatch)
    assert (store.private_problem() or "").startswith(f"{path}: {why}")
    assert path.exists() and store.set_aside() == []  # pst check's look changes nothing
    loaded = store.load()
    assert loaded.private is None and loaded.public.m is not None
    assert loaded.private_unusable is not None and loaded.private_unusable.startswith(f"{path}: {why}")
    moved = store.set_aside_private(1234.5)
    assert moved == tmp_path / "private" / "period.cbor.unusable-1234" and not path.exists()
    assert store.set_aside() == [moved]
    assert store.load().private_unusable is None  # absent now: recovering, no second alert
    monkeypatch.undo()
    store.save(setup.public, setup.private)  # type: ignore[attr-defined]
    assert store.load().private is not None  # the next refresh's shares are saved as usual


def test_a_missing_private_state_is_not_unusable(tmp_path: Path, network: dict[int, object]) -> None:
    setup = network[1]
    store = StateDir(tmp_path)
    store.save(setup.public, None)  # type: ignore[attr-defined]
    assert store.load().private_unusable is None and store.private_problem() is None


@given(
    repair=st.dictionaries(st.integers(1, 16), st.binary(max_size=200), max_size=4),
    share=st.integers(0, (1 << 252) - 1),
)
@settings(max_examples=50, deadline=None)
def test_private_state_keeps_a_repair_in_progress(repair: dict[int, bytes], share: int) -> None:
    """A same-period repair survives a restart: the partial share and the complaints round-trip,
    and a state without a repair encodes as before (no "repair" key)."""
    from appliance.crypto.secret import SecretScalar
    from appliance.node.store import decode_private, encode_private
    from appliance.protocols.refresh import PrivateData

    p = PrivateData(2, b"s" * 32, b"e" * 32, {SCERT: SecretScalar(share, 1 << 252)}, {3: {SCERT: 7}}, repair)
    data = encode_private(p)
    back = decode_private(data)
    assert back.repair == repair and back.rpoints == {3: {SCERT: 7}}
    assert back.shares[SCERT].value == share
    assert (b"repair" in data) == bool(repair)


def test_private_state_refuses_a_malformed_repair() -> None:
    from appliance.crypto import encoding
    from appliance.crypto.errors import DecodeError
    from appliance.node.store import decode_private

    base = {"period": 1, "signing_seed": b"s" * 32, "encryption_seed": b"e" * 32, "shares": {}, "rpoints": {}}
    for bad in ({"x": b""}, {1: "complaint"}, [1]):
        with pytest.raises(DecodeError):
            decode_private(encoding.encode({**base, "repair": bad}))
