"""The network's constants C refuse any n and t with n < 3t+1, with one line that says why.

Safety of the asynchronous refresh needs it: its quorums of ceil((n+t+1)/2) signed votes can be
formed by the honest servers alone and always share an honest server only when n >= 3t+1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.host import config as node_config
from appliance.protocols.state import ConfigError, Constants, check_size, max_threshold


def constants(n: int, t: int) -> Constants:
    return Constants(n=n, t=t, period_length=30.0, delta=0.1)


@pytest.mark.parametrize(("n", "t"), [(4, 1), (5, 1), (6, 1), (7, 2), (10, 3)])
def test_n_at_least_3t_plus_1_is_accepted(n: int, t: int) -> None:
    c = constants(n, t)
    assert (c.n, c.t) == (n, t)
    assert Constants.from_obj(encoding.decode(c.encode())) == c


@pytest.mark.parametrize(
    ("n", "t", "advice"),
    [
        (5, 2, "(with n=5, use t=1)"),
        (3, 1, "(at least 4 servers are needed for t=1)"),
        (6, 2, "(with n=6, use t=1)"),
        (9, 3, "(with n=9, use t=2)"),
        (2, 1, "(at least 4 servers are needed for t=1)"),
    ],
)
def test_n_below_3t_plus_1_is_refused_with_one_line_that_says_why(n: int, t: int, advice: str) -> None:
    with pytest.raises(ConfigError) as info:
        constants(n, t)
    message = str(info.value)
    assert "3t+1" in message and f"= {3 * t + 1}" in message and message.endswith(advice)
    assert f"n={n} servers cannot tolerate t={t}" in message
    assert "\n" not in message


def test_the_message_for_five_servers_and_t_2() -> None:
    with pytest.raises(ConfigError) as info:
        check_size(5, 2)
    assert str(info.value) == (
        "n=5 servers cannot tolerate t=2: safety under any message timing needs n >= 3t+1 = 7 "
        "(with n=5, use t=1)"
    )


def test_max_threshold() -> None:
    assert [max_threshold(n) for n in range(1, 12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    for n in range(4, 30):
        check_size(n, max_threshold(n))
        with pytest.raises(ConfigError):
            check_size(n, max_threshold(n) + 1)


def test_stored_constants_with_a_refused_size_do_not_decode() -> None:
    obj = constants(7, 2).to_obj()
    obj["n"], obj["peers"] = 5, {}
    with pytest.raises(DecodeError, match=r"constants C: n=5 servers cannot tolerate t=2: .*3t\+1"):
        Constants.from_obj(obj)


def _config(path: Path, n: int, t: int) -> Path:
    peers = "\n".join(f'{i} = "127.0.0.1:{7100 + i}"' for i in range(1, n + 1))
    path.write_text(
        f"""[server]
id = 1
listen = "127.0.0.1:7101"
state_dir = "{path.parent / "state"}"
api_socket = "{path.parent / "api.sock"}"

[rom]
backend = "simulated"
path = "{path.parent / "rom"}"

[network]
n = {n}
t = {t}
period_seconds = 30
round_ms = 100
genesis = 1764000000.0

[network.peers]
{peers}
"""
    )
    return path


def test_the_config_loader_refuses_five_servers_with_t_2_naming_the_file(tmp_path: Path) -> None:
    path = _config(tmp_path / "server.toml", 5, 2)
    with pytest.raises(ConfigError) as info:
        node_config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: [network]: n=5 servers cannot tolerate t=2")
    assert "3t+1 = 7" in message and "use t=1" in message and "\n" not in message
    ok = node_config.load(_config(tmp_path / "ok.toml", 5, 1))
    assert (ok.constants.n, ok.constants.t) == (5, 1)


def _pst() -> list[str]:
    beside = Path(sys.executable).parent / "pst"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "appliance.cli"]


@pytest.mark.parametrize("extra", [(), ("--network-ceremony",)])
def test_pst_cluster_init_refuses_five_servers_with_t_2_on_one_line(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    root = tmp_path / "c"
    args = ["cluster", "init", *extra, "--nodes", "5", "--threshold", "2", "--dir", str(root)]
    out = subprocess.run([*_pst(), *args], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("pst cluster init: n=5 servers cannot tolerate t=2")
    assert "3t+1 = 7" in out.stderr and "use t=1" in out.stderr
    assert not root.exists()  # refused before anything was written
