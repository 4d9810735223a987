"""appliance.boot.watch: inotify watches that say whether the environment changed since a check.

A tree of directories and files stands for an environment. Every kind of change a scenario F
attacker could make is seen (write, append, truncate, new file, deletion, rename in and out,
mode, owner, timestamps, a new directory, a change in a new directory's parent), and reading
is not a change. Once changed, a watch stays changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.boot.bootstrap import Layout
from appliance.boot.watch import CodeWatch, directories


def _tree(root: Path) -> Path:
    (root / "env" / "lib" / "site-packages" / "pkg" / "sub").mkdir(parents=True)
    (root / "env" / "bin").mkdir()
    (root / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "env" / "lib" / "site-packages" / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "env" / "lib" / "site-packages" / "pkg" / "sub" / "mod.py").write_text("y = 2\n")
    (root / "env" / "bin" / "python").symlink_to("/usr/bin/python3")
    (root / "elsewhere").mkdir()
    return root / "env"


def _mod(env: Path) -> Path:
    return env / "lib" / "site-packages" / "pkg" / "sub" / "mod.py"


def _rename_in(env: Path) -> None:
    made = env.parent / "elsewhere" / "x.py"
    made.write_text("")
    made.rename(_mod(env))


CHANGES: dict[str, Callable[[Path], object]] = {
    "write in place": lambda env: _mod(env).write_text("y = 3\n"),
    "append": lambda env: _mod(env).open("a").write("z = 4\n"),
    "truncate": lambda env: os.truncate(_mod(env), 0),
    "new file": lambda env: (env / "lib" / "site-packages" / "evil.pth").write_text("import evil\n"),
    "delete": lambda env: _mod(env).unlink(),
    "rename away": lambda env: _mod(env).rename(env.parent / "elsewhere" / "mod.py"),
    "rename in": lambda env: _rename_in(env),
    "chmod": lambda env: _mod(env).chmod(0o777),
    "utime": lambda env: os.utime(_mod(env), (0, 0)),
    "new directory": lambda env: (env / "lib" / "site-packages" / "newpkg").mkdir(),
    "symlink replaced": lambda env: (env / "bin" / "python").unlink(),
    "config": lambda env: (env / "pyvenv.cfg").write_text("home = /tmp\n"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_to_the_environment_is_seen(tmp_path: Path, change: str) -> None:
    env = _tree(tmp_path)
    watch = CodeWatch.over(Layout(env=env, package=env / "lib" / "site-packages" / "pkg"))
    assert watch.watched == len(directories(Layout(env=env, package=env))) and not watch.changed()
    CHANGES[change](env)
    assert watch.changed()
    assert watch.changed(), "a watch that saw a change stays changed"


def test_reading_is_not_a_change_and_a_directory_outside_is_not_watched(tmp_path: Path) -> None:
    env = _tree(tmp_path)
    watch = CodeWatch.over(Layout(env=env, package=env / "lib" / "site-packages" / "pkg"))
    for path in env.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.read_bytes()
    os.listdir(env / "lib")
    (tmp_path / "elsewhere" / "other.py").write_text("unrelated\n")
    assert not watch.changed()
    watch.close()
    assert watch.changed(), "a closed watch proves nothing"


def test_a_package_outside_the_environment_is_watched_too(tmp_path: Path) -> None:
    env = _tree(tmp_path)
    package = tmp_path / "elsewhere" / "appliance"
    package.mkdir()
    (package / "__init__.py").write_text("")
    watch = CodeWatch.over(Layout(env=env, package=package))
    assert not watch.changed()
    (package / "__init__.py").write_text("import os\n")
    assert watch.changed()
