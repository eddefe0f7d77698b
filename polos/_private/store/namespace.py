"""The ``Namespace`` handle: what a process keeps for one namespace on one connection (its
JetStream context, names and settings, the handles it opened, what it checked, and the features
above the store built on it), and beneath it the connection's own state (its reply inboxes).

One place instead of a registry per module. The state hangs on the connection object itself, so
it goes when the connection goes: a registry keyed by the connection kept every closed
connection alive, since what it held (an inbox, a bucket handle) holds the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from polos._private.model.aio import Flights
from polos._private.store.names import Names
from polos._private.store.natspy import connection_of
from polos.config import Settings

if TYPE_CHECKING:
    from nats.js.object_store import ObjectStore

    from polos._private.store.read import _DirectReader
    from polos._private.store.writes import _Requester

_F = TypeVar("_F")

# Our attribute on nats-py's ``Client`` (a plain class: instances take attributes).
_STATE = "_polos_connection"


class Connection:
    """One NATS connection's state, whatever the namespace: the inboxes its publishes and
    reads are answered on, and its namespaces by prefix."""

    __slots__ = ("namespaces", "nc", "reader", "replica_lookups", "replicas", "requester")

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.requester: _Requester | None = None  # made by store.writes on first publish
        self.reader: _DirectReader | None = None  # made by store.read on first read
        self.namespaces: dict[str, Namespace] = {}
        # Stream -> (whether it has more than one replica, when that was looked up): a read
        # that must be the leader's is a plain direct get on a stream with one copy.
        self.replicas: dict[str, tuple[bool, float]] = {}
        # One lookup at a time per stream: when the entry expires, the reads waiting share it.
        self.replica_lookups: Flights[bool] = Flights()


def connection(nc: NATS) -> Connection:
    """``nc``'s state, made on first use (on the hot path: one attribute lookup)."""
    found: Connection | None = getattr(nc, _STATE, None)
    if found is None:
        found = Connection(nc)
        setattr(nc, _STATE, found)
    return found


class Namespace:
    """One namespace (prefix) on one connection: obtained with ``namespace``, once per
    (connection, prefix); the first caller's JetStream context and settings are kept."""

    __slots__ = (
        "_features",
        "js",
        "names",
        "nc",
        "payloads",
        "settings",
        "stored_ctl",
        "topology_checked",
    )

    def __init__(
        self, nc: NATS, js: JetStreamContext, names: Names, settings: Settings | None
    ) -> None:
        self.nc = nc
        self.js = js
        self.names = names
        self.settings = settings
        # The payload bucket's handle (``js.object_store`` is a stream-info round trip).
        self.payloads: ObjectStore | None = None
        # ``check_topology`` found everything (or ``ensure_topology`` made it) on this connection.
        self.topology_checked = False
        # The runs stream republishes stored control events on ``Names.stored_ctl_subject``
        # (learnt with the topology; False until then: listeners read the log instead).
        self.stored_ctl = False
        self._features: dict[type, object] = {}

    def feature(self, kind: type[_F], make: Callable[[], _F]) -> _F:
        """The namespace's one ``kind`` (a layer above the store: the slot store, the token
        limiter), made by ``make`` on first use."""
        found = self._features.get(kind)
        if found is None:
            found = self._features[kind] = make()
        return cast(_F, found)


def namespace(
    js: JetStreamContext,
    names: Names,
    settings: Settings | None = None,
    *,
    nc: NATS | None = None,
) -> Namespace:
    """The namespace ``names`` on the connection of ``js`` (``nc``, when the caller has it)."""
    conn = connection(nc if nc is not None else connection_of(js))
    ns = conn.namespaces.get(names.prefix)
    if ns is None:
        ns = conn.namespaces[names.prefix] = Namespace(conn.nc, js, names, settings)
    elif ns.settings is None and settings is not None:
        ns.settings = settings
    return ns


__all__ = ["Connection", "Namespace", "connection", "namespace"]
