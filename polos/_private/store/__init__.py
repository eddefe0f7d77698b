"""The store layer: names, topology, and (later) the rest of the JetStream plumbing.

- ``names``: the one catalogue of a namespace's streams, KV buckets, object stores, subjects and
  durable consumers (``Names``).
- ``topology``: the one table of every stream, bucket and object store with its configuration
  and who may use it; ``ensure_topology`` (service role) creates it, ``check_topology``
  (workers and clients) says in one line what is missing and how to create it. The NATS
  permissions of each role (``polos._private.auth``) are generated from the same table.
"""

from polos._private.store.names import Names, kv_stream, object_stream
from polos._private.store.topology import (
    TOPOLOGY,
    TopologyMissingError,
    check_topology,
    ensure_topology,
)

__all__ = [
    "TOPOLOGY",
    "Names",
    "TopologyMissingError",
    "check_topology",
    "ensure_topology",
    "kv_stream",
    "object_stream",
]
