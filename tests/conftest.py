"""Seeded simulations run in the background while the rest of the suite runs.

The family tests (tests/test_simulation.py, test_agreement.py, test_annkey_protocol.py) each
replay hundreds of seeds of a scenario. The rest of the suite mostly waits on real clusters and
leaves most of the machine's CPU idle, so at collection time the seeds of every collected family
test go to a process pool whose workers run at the lowest CPU priority (SCHED_IDLE, else nice
19): they use the cores the other tests leave idle and give way at once to everything else. A
family test marked ``@pytest.mark.seeds(runner, family, count)`` then asks the fixture
``seed_failures`` for its results (waiting for the ones not yet done) and asserts there are none.
A failing seed is printed with its scenario; replay it with ``pst sim --scenario NAME --seed N``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import pytest

#: The modules whose ``run_seed((family, seed))`` returns None for a passing seed, else the failure.
RUNNERS = {"scenarios": "appliance.sim.scenarios", "agreement": "appliance.sim.agreement"}

Job = tuple[str, str, int]  # (runner, family, seed count)


def _lowest_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def _run_one(args: tuple[str, str, int]) -> str | None:
    runner, family, seed = args
    run_seed: Callable[[tuple[str, int]], str | None] = importlib.import_module(RUNNERS[runner]).run_seed
    return run_seed((family, seed))


class SeedRunner:
    """Every collected family's seeds, queued at once in the order the tests will ask for them."""

    def __init__(self) -> None:
        self._pool: Pool | None = None
        self._results: dict[Job, AsyncResult[list[str | None]]] = {}

    def submit(self, job: Job) -> None:
        if job in self._results:
            return
        runner, family, count = job
        if runner not in RUNNERS:
            raise pytest.UsageError(f"seeds marker: unknown runner {runner!r} (one of {sorted(RUNNERS)})")
        if self._pool is None:
            self._pool = get_context("fork").Pool(os.cpu_count() or 1, initializer=_lowest_priority)
        tasks = [(runner, family, seed) for seed in range(count)]
        self._results[job] = self._pool.map_async(_run_one, tasks, chunksize=4)

    def failures(self, job: Job) -> list[str]:
        self.submit(job)  # a test run without collection's hook (or a new job) still works
        result = self._results[job]
        if not result.ready():
            # The suite now waits for these seeds and nothing else: the workers run at normal
            # priority until they are in (on a machine busy with other work, idle priority
            # would starve them), then give way again.
            self._set_priority(os.SCHED_OTHER)
            try:
                result.wait()
            finally:
                self._set_priority(os.SCHED_IDLE)
        return [r for r in result.get() if r is not None]

    def _set_priority(self, policy: int) -> None:
        workers = getattr(self._pool, "_pool", [])  # multiprocessing's list of worker processes
        for process in workers:
            # Not Linux, not permitted, or the worker just left: it keeps its priority.
            with contextlib.suppress(AttributeError, OSError):
                os.sched_setscheduler(process.pid, policy, os.sched_param(0))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


_RUNNER = pytest.StashKey[SeedRunner]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "seeds(runner, family, count): a family test whose seeds run in the background (tests/conftest.py)",
    )
    config.stash[_RUNNER] = SeedRunner()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The family tests run last (in their order): their seeds then have the whole suite's idle CPU.
    items.sort(key=lambda item: item.get_closest_marker("seeds") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    # After -k/-m deselection: only the family tests that will run have their seeds queued.
    runner = session.config.stash[_RUNNER]
    for item in session.items:
        marker = item.get_closest_marker("seeds")
        if marker is not None:
            runner.submit(tuple(marker.args))  # type: ignore[arg-type]


def pytest_unconfigure(config: pytest.Config) -> None:
    config.stash[_RUNNER].close()


@pytest.fixture
def seed_failures(request: pytest.FixtureRequest) -> list[str]:
    """The failures of this test's seeds (see the module's doc): empty when every seed passed."""
    marker = request.node.get_closest_marker("seeds")
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid}: seed_failures needs @pytest.mark.seeds(...)")
    job: Any = tuple(marker.args)
    return request.config.stash[_RUNNER].failures(job)
