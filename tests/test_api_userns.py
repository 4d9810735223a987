"""Issue 9 item 3: in a user namespace that maps only root (as systemd's PrivateUsers=yes maps
only root and the service user), every other local user reaches the API as the one overflow uid,
so two users could register and sign under each other's application names. The API now refuses
that uid, and the shipped unit no longer sets PrivateUsers=yes.

The API server runs under `unshare --user --map-root-user` (only uid 0 mapped); clients run as
uids 1601 and 1602 with `setpriv`. Needs root (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SERVER = textwrap.dedent(
    """
    import sys, os, functools
    from pathlib import Path
    import trio
    from nacl.signing import SigningKey
    from appliance.api import app_digest_payload, app_signing_payload, serve_api

    class Backend:
        def __init__(self):
            self.key = SigningKey.generate()
        async def sign(self, app, message):
            return self.key.sign(app_signing_payload(app, message)).signature
        async def sign_digest(self, app, sha512):
            return self.key.sign(app_digest_payload(app, sha512)).signature
        async def get_time(self):
            return {1: 0.0}
        async def status(self):
            return {"server": 1}

    async def main(sock, ready):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_api, sock, Backend()))
            os.chmod(sock, 0o666)  # the test's clients are other users, not members of a group
            Path(ready).write_text(str(os.getuid()))
            await trio.sleep_forever()

    trio.run(main, sys.argv[1], sys.argv[2])
    """
)

CLIENT = textwrap.dedent(
    """
    import sys
    from appliance.api.client import PstClient, PstError
    try:
        with PstClient(sys.argv[1]) as c:
            c.register("payments", "ledger")
            c.sign(b"pay 100 to mallory")
        print("SIGNED")
    except PstError as exc:
        print("REFUSED", exc.code, exc)
    """
)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root, unshare and setpriv (util-linux); CI runs as root")
    d = Path(tempfile.mkdtemp(prefix="pst-userns-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


def _client(sock: Path, script: Path, uid: int | None) -> str:
    cmd = [sys.executable, str(script), str(sock)]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env(), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_users_the_server_cannot_tell_apart_are_refused_not_merged(shared_dir: Path) -> None:
    server_py, client_py = shared_dir / "server.py", shared_dir / "client.py"
    server_py.write_text(SERVER)
    client_py.write_text(CLIENT)
    client_py.chmod(0o644)
    sock, ready = shared_dir / "api.sock", shared_dir / "ready"
    cmd = ["unshare", "--user", "--map-root-user", sys.executable, str(server_py), str(sock), str(ready)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the API server in the user namespace did not start"
            time.sleep(0.05)
        # Two different users: inside the namespace both are the overflow uid. Before the fix
        # both registered and signed as "payments"; now neither is served.
        for uid in (1601, 1602):
            answer = _client(sock, client_py, uid)
            assert answer.startswith("REFUSED not-permitted"), answer
            assert "unmapped" in answer and "PrivateUsers" in answer, answer
        # root is mapped (uid 0 inside): served as before, so the refusal is about the mapping.
        assert _client(sock, client_py, None) == "SIGNED"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
