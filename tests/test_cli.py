"""The pst command without running servers: --dir or --config, offline verification, ports, logs.

Commands that need running servers are in test_cluster.py (and test_api*.py for `pst api`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.api import app_digest_payload
from appliance.cli import _open_log, main
from appliance.host.nodes import Node, serves
from appliance.node.cluster import init_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four servers initialized, none running (ports never bound: nothing starts)."""
    root = tmp_path_factory.mktemp("cli") / "c"
    init_cluster(root, n=4, t=1, period_seconds=600, round_ms=80, base_port=30000, progress=lambda _: None)
    return root


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["status", "alerts", "pubkey", "sign", "verify"])
def test_dir_and_config_are_one_or_the_other(capsys: pytest.CaptureFixture[str], command: str) -> None:
    files = ["f"] if command == "sign" else ["f", "f.sig"] if command == "verify" else []
    code, _, err = run(capsys, command, *files)
    assert code == 2 and "--dir" in err and "--config" in err and "required" in err
    code, _, err = run(capsys, command, "--dir", "d", "--config", "c.toml", *files)
    assert code == 2 and "not allowed with argument" in err


def test_a_missing_config_or_an_empty_directory_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "status", "--config", str(tmp_path / "server.toml"))
    assert code == 2 and out == ""
    assert err == f"pst status: {tmp_path / 'server.toml'}: no such config file\n"
    code, out, err = run(capsys, "alerts", "--dir", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path}: holds no cluster" in err
    code, _, err = run(capsys, "api", "registrations", "list", "--dir", str(tmp_path), "--node", "3")
    assert code == 2 and "holds no cluster" in err


def test_config_names_one_server_of_the_same_state(capsys: pytest.CaptureFixture[str], cluster: Path) -> None:
    config = cluster / "node-3" / "config.toml"
    node = Node.of_config(config)
    assert (node.server, node.state_dir) == (3, cluster / "node-3" / "state")
    code, out, _ = run(capsys, "status", "--config", str(config), "--json")
    assert code == 1  # not running
    assert '"server": 3' in out and '"running": false' in out and '"server": 1' not in out
    code, by_config, _ = run(capsys, "pubkey", "--config", str(config), "--pem")
    assert code == 0 and by_config.startswith("-----BEGIN PUBLIC KEY-----")
    code, by_dir, _ = run(capsys, "pubkey", "--dir", str(cluster), "--pem")
    assert code == 0 and by_dir == by_config
    code, out, _ = run(capsys, "alerts", "--config", str(config))
    assert code == 0 and out == "no alerts\n"


def test_status_says_behind_when_a_whole_period_passed_with_no_refresh(
    capsys: pytest.CaptureFixture[str], cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import time

    from appliance.host import config as node_config

    config = cluster / "node-2" / "config.toml"
    status = cluster / "node-2" / "state" / "public" / "status.json"
    status.write_text(json.dumps({"server": 2, "period": 0, "status": "operational"}))
    try:
        c = node_config.load(config).constants
        monkeypatch.setattr(time, "time", lambda: c.period_start(1) + 1)  # period 0's table, refresh 1 runs
        code, out, _ = run(capsys, "status", "--config", str(config), "--json")
        assert json.loads(out)[0]["status"] == "operational"
        monkeypatch.setattr(time, "time", lambda: c.period_start(3) + 1)  # periods 1 and 2 never decided
        code, out, _ = run(capsys, "status", "--config", str(config), "--json")
        row = json.loads(out)[0]
        assert code == 1 and (row["status"], row["periods_missed"]) == ("behind", 2)
        code, out, _ = run(capsys, "status", "--config", str(config))
        assert " behind " in out
    finally:
        status.unlink()


def test_verify_with_a_pem_key_works_offline(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """No server and no state directory: the group key from a file, the application payload of docs/api.md."""
    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "group.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    doc = tmp_path / "report.pdf"
    doc.write_bytes(b"%PDF- a report\n" * 1000)
    signature = key.sign(app_digest_payload("my-app", hashlib.sha512(doc.read_bytes()).digest()))
    sig = tmp_path / "report.sig"
    sig.write_text(signature.hex() + "\n")  # what pst sign prints

    code, out, _ = run(capsys, "verify", "--pubkey", str(pem), "--app", "my-app", str(doc), str(sig))
    assert code == 0 and out.startswith("OK: signed by the group key")
    assert '{"dom": "pst/app-signed/v1", "app": "my-app", "sha512": SHA-512 of' in out
    hex_key = tmp_path / "group.hex"
    hex_key.write_text(key.public_key().public_bytes_raw().hex() + "\n")  # what pst pubkey prints
    assert run(capsys, "verify", "--pubkey", str(hex_key), "--app", "my-app", str(doc), str(sig))[0] == 0

    code, out, _ = run(capsys, "verify", "--pubkey", str(pem), "--app", "other-app", str(doc), str(sig))
    assert code == 1 and out.startswith("INVALID") and '"app": "other-app"' in out
    doc.write_bytes(b"changed")
    code, out, _ = run(capsys, "verify", "--pubkey", str(pem), "--app", "my-app", str(doc), str(sig))
    assert code == 1 and out.startswith("INVALID")


def test_verify_refuses_a_key_file_that_is_not_the_group_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    doc, sig = tmp_path / "doc", tmp_path / "doc.sig"
    doc.write_bytes(b"x")
    sig.write_bytes(bytes(64))
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    cases = {
        ec: "not an Ed25519 public key (the group key is one)",
        garbage: "not a readable PEM public key",
        doc: "expected the group public key as PEM (pst pubkey --pem) or 64 hex digits (pst pubkey)",
        tmp_path / "missing.pem": "No such file or directory",
    }
    for path, why in cases.items():
        code, out, err = run(capsys, "verify", "--pubkey", str(path), str(doc), str(sig))
        assert (code, out) == (2, "") and err == f"pst verify: {path}: {why}\n"


@pytest.mark.parametrize("base", ["0", "-3", "65232", "70000"])
def test_cluster_init_refuses_ports_out_of_range_before_writing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, base: str
) -> None:
    root = tmp_path / "c"
    code, _, err = run(capsys, "cluster", "init", "--nodes", "4", "--dir", str(root), "--base-port", base)
    assert code == 2 and not root.exists()
    assert err == (
        f"pst cluster init: --base-port {base}: the servers listen on base+1..base+4, their status "
        "pages on base+101..base+104, their syslog on base+201.. and RELP up to base+304, so it must "
        "be in 1..65231 (ports go up to 65535)\n"
    )


def test_cluster_down_on_a_stopped_cluster_says_so(capsys: pytest.CaptureFixture[str], cluster: Path) -> None:
    code, out, err = run(capsys, "cluster", "down", "--dir", str(cluster))
    assert (code, err) == (0, "")
    assert out == f"no server of the cluster in {cluster} is running: nothing to stop\n"


def test_server_log_is_private_even_if_it_existed(tmp_path: Path) -> None:
    old = tmp_path / "server.log"
    old.write_text("an earlier run\n")
    old.chmod(0o644)
    fd = _open_log(old)
    try:
        os.write(fd, b"appended\n")
    finally:
        os.close(fd)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert old.read_text() == "an earlier run\nappended\n"
    fd = _open_log(tmp_path / "new.log")
    os.close(fd)
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600


def test_a_pid_counts_only_for_pst_serve_of_that_very_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    assert not serves(os.getpid(), config)  # pytest is no pst serve
    assert not serves(2**22 + 1, config)  # no such process


def test_check_warns_about_an_unusable_private_state(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, t=1, period_seconds=600, round_ms=80, base_port=30200, progress=lambda _: None)
    config = root / "node-1" / "config.toml"
    period = root / "node-1" / "state" / "private" / "period.cbor"
    code, out, _ = run(capsys, "check", "--config", str(config))
    assert code == 0 and f"ok    private state: {period} reads and decodes" in out
    period.write_bytes(b"\x00garbage")
    code, out, _ = run(capsys, "check", "--config", str(config))
    assert code == 0 and out.endswith("server 1 may boot, with 1 warning(s)\n")
    assert f"WARN  private state: {period}: private state: " in out
    assert "pst serve will set it aside and start recovering" in out


def test_sign_asks_again_while_a_refresh_completes(monkeypatch: pytest.MonkeyPatch, cluster: Path) -> None:
    """Between a refresh's decision and its signed KeyTable every server answers unavailable."""
    from appliance.api import client as client_mod
    from appliance.cli import _sign_digest
    from appliance.host.nodes import cluster_nodes

    asked: list[str] = []

    class Client:
        def __init__(self, socket: str) -> None:
            self.socket = socket

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def register(self, app: str, unique_id: bytes) -> None:
            pass

        def sign_digest(self, digest: bytes) -> bytes:
            asked.append(Path(self.socket).parent.name)
            if len(asked) < 3:
                raise client_mod.PstError("unavailable", "this server is not operational")
            return b"s" * 64

    monkeypatch.setattr(client_mod, "PstClient", Client)
    nodes = cluster_nodes(cluster)[:2]
    assert _sign_digest(nodes, "app", bytes(64)) == b"s" * 64
    assert asked == ["node-1", "node-2", "node-1"]

    def refused(self: Client, digest: bytes) -> bytes:
        raise client_mod.PstError("not-permitted", "the name belongs to another user")

    monkeypatch.setattr(Client, "sign_digest", refused)
    with pytest.raises(client_mod.PstError, match="not-permitted"):  # no retry for other errors
        _sign_digest(nodes, "app", bytes(64))
