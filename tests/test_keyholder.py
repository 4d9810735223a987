"""The key-holder (issue 4 §3) against real processes: who holds which secret, and for how long.

A real 4-server cluster (t=1) on loopback. We read the processes' memory through /proc/PID/mem
(we run as root, or with CAP_SYS_PTRACE) and look for the exact bytes of a server's share
of the group key and of its period signing key:

* the network-facing process (``pst serve``) never holds them, nor does the zygote;
* the key-holder child does (the positive control: the scan can find them);
* after the next refresh, the previous period's share and key are in no process of the
  server and in no file of its state directory;
* the child runs with RLIMIT_CORE=0, undumpable, with its memory locked;
* kill -9 of the key-holder child: the zygote starts another one and the server signs again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import pst, running_cluster

from appliance.node.store import decode_private

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/mem"), reason="needs Linux /proc/PID/mem to read process memory"
)


def _status(node: Path) -> dict[str, object]:
    try:
        return dict(json.loads((node / "state" / "public" / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def _child_pid(node: Path) -> int | None:
    kh = _status(node).get("keyholder")
    return kh.get("pid") if isinstance(kh, dict) else None  # type: ignore[return-value]


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def _memory(pid: int) -> Iterator[bytes]:
    """Every readable mapping of process ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) r", line)
            if not m or "[vvar]" in line or "[vsyscall]" in line:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except OSError:
                continue


def _found_in_memory(pid: int, needles: dict[str, bytes]) -> set[str]:
    return {name for chunk in _memory(pid) for name, needle in needles.items() if needle in chunk}


def _secrets(node: Path) -> tuple[int, dict[str, bytes]]:
    """The period and the byte forms of its share of the group key and its period key seed."""
    private = decode_private((node / "state" / "private" / "period.cbor").read_bytes())
    share = private.shares["scert"].value
    return private.period, {
        "share (32 bytes, little-endian)": share.to_bytes(32, "little"),
        "share (32 bytes, big-endian)": share.to_bytes(32, "big"),
        "period signing seed": private.signing_seed,
        "period encryption seed": private.encryption_seed,
    }


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_cluster(tmp_path_factory.mktemp("kh") / "c", n=4, period=6, round_ms=100) as root:
        _wait(lambda: _status(root / "node-1").get("last_refresh"), 30, "the first refresh of server 1")
        yield root


def _fresh_child(node: Path, previous: int | None) -> tuple[int, int, dict[str, bytes]]:
    """Wait for a key-holder child other than ``previous`` to be up; its pid, period, secrets.

    Taken right after a refresh, so that most of the period is left for the scans.
    """
    found: list[tuple[int, int, dict[str, bytes]]] = []

    def ready() -> bool:
        child = _child_pid(node)
        if child is None or child == previous or not Path(f"/proc/{child}").exists():
            return False
        period, secrets = _secrets(node)
        if _status(node).get("period") != period:
            return False
        found.append((child, period, secrets))
        return True

    _wait(ready, 30, "a new key-holder child")
    return found[-1]


def test_shares_and_period_keys_live_only_in_the_key_holder(cluster: Path) -> None:
    node = cluster / "node-1"
    serve = int((node / "server.pid").read_text())
    child, period, secrets = _fresh_child(node, _child_pid(node))
    assert child != serve
    zygote = _ppid(child)
    assert _ppid(zygote) == serve, "the key-holder is a grandchild of pst serve (through the zygote)"

    # Positive control: the scan finds the period keys in the key-holder child.
    assert "period signing seed" in _found_in_memory(child, secrets)
    # The network-facing process and the zygote hold none of them.
    assert _found_in_memory(serve, secrets) == set(), "pst serve holds secret bytes"
    assert _found_in_memory(zygote, secrets) == set(), "the zygote holds secret bytes"

    # The next refresh: a new child, and the old period's secrets are gone everywhere.
    _wait(
        lambda: _secrets(node)[0] > period and _child_pid(node) not in (None, child), 30, "the next refresh"
    )
    new_child = _child_pid(node)
    assert new_child is not None
    _wait(lambda: not Path(f"/proc/{child}").exists(), 10, "the old key-holder to exit")
    for pid, who in ((serve, "pst serve"), (zygote, "the zygote"), (new_child, "the new key-holder")):
        assert _found_in_memory(pid, secrets) == set(), f"{who} still holds period {period}'s secrets"
    for path in (node / "state").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [name for name, needle in secrets.items() if needle in data]
            assert not leaked, f"{path} still holds period {period}'s {leaked}"


def test_key_holder_is_hardened(cluster: Path) -> None:
    node = cluster / "node-1"
    child = _child_pid(node)
    assert child is not None
    kh = _status(node)["keyholder"]
    assert isinstance(kh, dict)
    assert kh["dumpable"] is False and kh["core_limit"] == 0 and kh["mlock"] == "all"
    limits = Path(f"/proc/{child}/limits").read_text()
    assert re.search(r"Max core file size\s+0\s+0", limits), limits
    locked = re.search(r"VmLck:\s+(\d+) kB", Path(f"/proc/{child}/status").read_text())
    assert locked and int(locked.group(1)) > 0


def test_killed_key_holder_is_replaced_and_the_server_signs_again(cluster: Path, tmp_path: Path) -> None:
    node = cluster / "node-1"
    child = _child_pid(node)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    _wait(lambda: _child_pid(node) not in (None, child), 20, "a new key-holder")
    doc = tmp_path / "doc.txt"
    doc.write_text("signed after the key-holder was killed\n")
    sig = tmp_path / "doc.sig"
    deadline = time.monotonic() + 30
    while True:
        out = pst("sign", "--dir", str(cluster), "--out", str(sig), str(doc))
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert out.returncode == 0, out.stdout + out.stderr
    check = pst("verify", "--dir", str(cluster), str(doc), str(sig))
    assert check.returncode == 0, check.stdout + check.stderr


def test_pst_sign_takes_a_file_of_any_size_and_verify_its_printed_hex(cluster: Path, tmp_path: Path) -> None:
    """Issue 10: `pst sign` read the whole input before checking the 64 KiB limit, and `pst verify`
    called the hex it printed (with its newline) INVALID. Now a 3 MB file is hashed as it is read
    and the printed hex verifies; a signature file of the wrong size is a clear error."""
    doc = tmp_path / "big.bin"
    doc.write_bytes(os.urandom(3 * 1024 * 1024))
    out = pst("sign", "--dir", str(cluster), str(doc))
    assert out.returncode == 0, out.stdout + out.stderr
    printed = tmp_path / "big.sig"
    printed.write_text(out.stdout)  # 128 hex digits and a newline, as `> file` leaves them
    check = pst("verify", "--dir", str(cluster), str(doc), str(printed))
    assert check.returncode == 0 and check.stdout.startswith("OK:"), check.stdout + check.stderr
    doc.write_bytes(doc.read_bytes()[:-1] + b"x")
    check = pst("verify", "--dir", str(cluster), str(doc), str(printed))
    assert check.returncode == 1 and check.stdout.startswith("INVALID"), check.stdout + check.stderr
    printed.write_text("abcd\n")
    check = pst("verify", "--dir", str(cluster), str(doc), str(printed))
    assert check.returncode == 2 and "expected a signature of 64 bytes, or 128 hex digits" in check.stderr


def test_a_stalled_key_holder_is_an_alert(cluster: Path) -> None:
    """Issue 9 item 4: a key-holder whose loop is held (a costly frame, a bug) stops every protocol
    on its server; the network-facing process notices within seconds and raises an alert."""
    node = cluster / "node-2"
    child = _child_pid(node)
    assert child is not None
    alerts = node / "state" / "serve" / "alerts.jsonl"  # pst serve raises it, in its own file

    def stall_alerts() -> list[dict[str, object]]:
        try:
            lines = alerts.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [a for a in map(json.loads, lines) if a["kind"] == "keyholder-stalled"]

    os.kill(child, signal.SIGSTOP)  # its loop holds: no answer to anything
    try:
        _wait(lambda: stall_alerts(), 40, "the key-holder-stalled alert")
    finally:
        os.kill(child, signal.SIGCONT)
    (alert,) = stall_alerts()
    assert alert["server"] == 2 and f"key-holder child {child} did not answer" in str(alert["detail"])
    _wait(lambda: "answers again" in (node / "server.log").read_text(), 40, "the key-holder to answer again")


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_the_next_child_waits_hardened_and_holds_no_secret_until_it_takes_over(cluster: Path) -> None:
    """The zygote forks the next period's child ahead of time (its memory locking then costs the
    refresh nothing): a standby with locked memory that reads nothing until the current child
    retired. It holds none of the period's secrets meanwhile, and it is the next key-holder."""
    node = cluster / "node-1"
    child, period, secrets = _fresh_child(node, _child_pid(node))
    zygote = _ppid(child)
    standbys: list[int] = []

    def standby_forked() -> bool:
        others = [p for p in _children(zygote) if p != child]
        standbys[:] = others
        return bool(others)

    _wait(standby_forked, 10, "the zygote to fork the next child")
    assert len(standbys) == 1, f"one standby at a time: {standbys}"
    standby = standbys[0]
    locked = re.search(r"VmLck:\s+(\d+) kB", Path(f"/proc/{standby}/status").read_text())
    assert locked and int(locked.group(1)) > 0, "the standby locked its memory before its turn"
    assert _found_in_memory(standby, secrets) == set(), "the standby holds the current period's secrets"
    assert _child_pid(node) == child
    _wait(lambda: _child_pid(node) not in (None, child), 30, "the next refresh")
    assert _child_pid(node) == standby, "the standby became the next period's key-holder"
    assert _secrets(node)[0] > period
