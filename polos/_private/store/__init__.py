"""The store layer: everything Polos keeps in JetStream, and the only code that talks to it.

- ``names``: the one catalogue of a namespace's streams, KV buckets, object stores, subjects
  and durable consumers (``Names``).
- ``topology``: the one table of every stream, bucket and object store with its configuration
  and who may use it; ``ensure_topology`` (service role) creates it, ``check_topology``
  (workers and clients) says in one line what is missing. Roles' NATS permissions
  (``polos._private.ops.auth``) are generated from the same table.
- ``connection``: connections (fail fast for commands, wait and reconnect for services).
- ``writes``: the cheap awaited publish, and the retrying path for idempotent writes.
- ``appends``: the fenced append into a run's history.
- ``read``: histories, subjects, KV listings, a run's folded state.
- ``consume``: durable consumers and the pull loop.
- ``dlq``: dead letters.
- ``payloads``: fields too large for a message, in the Object Store.
- ``follow``: follow the log without polling (exporter, span follower).
- ``namespace``: the ``Namespace`` handle, what a process keeps per namespace and connection
  (bucket handles, the topology checked, the slot store, the limiter, the reply inboxes).
- ``natspy``: the one place that touches nats-py's private attributes.

What this module exports is the store's documented internal API: the layers above (the run
runtime, limits, agents, the SDK faces, the services) import it from here.
"""

from polos._private.store import natspy as _natspy  # noqa: F401 - installs the header parser
from polos._private.store.appends import FencedOut, append
from polos._private.store.connection import (
    Fatal,
    connect,
    connect_service,
    disconnect,
    display_url,
)
from polos._private.store.consume import PullLoop, ensure_consumer, stream_seq
from polos._private.store.dlq import DLQ_SOURCES, DlqSource, dead_letter
from polos._private.store.names import RUN_KINDS, Names, kv_stream, object_stream, valid_token
from polos._private.store.namespace import Namespace, namespace
from polos._private.store.natspy import connection_of
from polos._private.store.read import (
    STALE_RETRIES,
    KVEntry,
    StaleRead,
    StoredMsg,
    is_live,
    kv_entries,
    kv_entry,
    last_for_subject,
    last_per_subject,
    leader_last,
    leader_next,
    load_run,
    load_run_unless_long,
    load_state,
    load_state_through,
    read_history,
    read_run,
    read_subject,
    read_subject_through,
    reread_until,
    resolve_payload,
)
from polos._private.store.topology import (
    TOPOLOGY,
    TopologyMissingError,
    check_topology,
    ensure_topology,
)
from polos._private.store.writes import (
    EXPECTED_LAST_SUBJECT_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ_SUBJECT,
    MSG_ID,
    REPLY_HEADER,
    WRONG_LAST_SEQUENCE,
    Ack,
    AppendUnavailable,
    is_transient,
    publish,
    retry_transient,
)

__all__ = [
    "DLQ_SOURCES",
    "EXPECTED_LAST_SUBJECT_SEQ",
    "EXPECTED_LAST_SUBJECT_SEQ_SUBJECT",
    "MSG_ID",
    "REPLY_HEADER",
    "RUN_KINDS",
    "STALE_RETRIES",
    "TOPOLOGY",
    "WRONG_LAST_SEQUENCE",
    "Ack",
    "AppendUnavailable",
    "DlqSource",
    "Fatal",
    "FencedOut",
    "KVEntry",
    "Names",
    "Namespace",
    "PullLoop",
    "StaleRead",
    "StoredMsg",
    "TopologyMissingError",
    "append",
    "check_topology",
    "connect",
    "connect_service",
    "connection_of",
    "dead_letter",
    "disconnect",
    "display_url",
    "ensure_consumer",
    "ensure_topology",
    "is_live",
    "is_transient",
    "kv_entries",
    "kv_entry",
    "kv_stream",
    "last_for_subject",
    "last_per_subject",
    "leader_last",
    "leader_next",
    "load_run",
    "load_run_unless_long",
    "load_state",
    "load_state_through",
    "namespace",
    "object_stream",
    "publish",
    "read_history",
    "read_run",
    "read_subject",
    "read_subject_through",
    "reread_until",
    "resolve_payload",
    "retry_transient",
    "stream_seq",
    "valid_token",
]
