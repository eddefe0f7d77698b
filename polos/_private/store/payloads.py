"""Large payloads: event fields too big for one NATS message live in the JetStream Object Store.

An event whose encoding would not fit in one message (the server's ``max_payload`` less room
for headers) is appended as a *stub*: the same event with every large field set to ``null``, a
``"$refs": {field: object name}`` map, and the ``Polos-Payload`` header. Each large field's JSON
encoding is one object in the ``<prefix>_payloads`` bucket, named ``<run_id>/<sha256>`` so a
retried append stores nothing twice and a run's objects can be found (and removed) by run id.

A large object field whose bulk is a few large members moves member by member instead
(``"$refs": {"output.data": ...}``, the member set to ``null``).

Readers that need the values (``read_history``, so replay and ``RunState``) resolve stubs
transparently. Readers that only look at the kind of an event (the orchestrator's index, a
client waiting for the end) can decode the stub as it is: its type and small fields are real.

Commands and external events too big for a message carry a reference instead of the value: a
start's ``input_ref`` and a resume's ``data_ref`` (objects ``<run_id>/...``), an external
event's ``Polos-Payload-Ref`` header (objects ``event:<id>``). See docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from typing import TYPE_CHECKING, Any

import nats.js.errors
import orjson

from polos._private.model.values import EVENT_TYPE_HEADER
from polos._private.store.lag import reread_until
from polos._private.store.namespace import namespace

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext
    from nats.js.object_store import ObjectStore

    from polos._private.store.names import Names

HEADER = "Polos-Payload"
# An external event whose data does not fit in one message: the body is empty and this header
# names the object holding the data's JSON encoding (``put_event_value``).
EVENT_REF = "Polos-Payload-Ref"
# An external event's type (the original's ``EventData.event_type``); the body is its data.
EVENT_TYPE = EVENT_TYPE_HEADER  # the event type of an event, one name (model.values)
EVENT_PREFIX = "event:"
REFS = "$refs"
# Room left in a message for the headers, the stub's small fields and the subject.
HEADROOM = 64 * 1024
# A field this big is moved out when its event does not fit: small fields stay inline so the
# stub still says what happened.
FIELD_THRESHOLD = 1024
# The most of a large object field that stays inline when its large members move out.
_INLINE_REST = 16 * 1024


class PayloadMissingError(RuntimeError):
    """A stub refers to an object that is not in the store (deleted by hand, or a lost bucket)."""


def bucket_name(names: Names) -> str:
    return names.payloads_bucket


def inline_limit(nc: NATS) -> int:
    """The largest encoded event appended as one message on this connection's server."""
    return max(int(nc.max_payload) - HEADROOM, 4096)


async def store(js: JetStreamContext, names: Names) -> ObjectStore:
    """The namespace's payload bucket (a row of the topology the services create)."""
    ns = namespace(js, names)
    if ns.payloads is not None:
        return ns.payloads
    try:
        obs = await js.object_store(bucket_name(names))
    except nats.js.errors.BucketNotFoundError:
        from polos._private.store.topology import missing

        raise missing(names, "payloads_bucket") from None
    ns.payloads = obs
    return obs


async def put_value(js: JetStreamContext, names: Names, run_id: str, encoded: bytes) -> str:
    """Store one JSON-encoded value; return its object name. Storing it again is a no-op."""
    name = f"{run_id}/{hashlib.sha256(encoded).hexdigest()}"
    obs = await store(js, names)
    with contextlib.suppress(nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        info = await obs.get_info(name)
        if info.size == len(encoded) and not info.deleted:
            return name
    await obs.put(name, encoded)
    return name


async def get_value(js: JetStreamContext, names: Names, name: str) -> Any:
    """The value of the payload object ``name``, which a stored message refers to.

    A reference is stored after its object, so an object not found is, on a cluster, most
    likely a replica behind the leader (nats-py reads an object's info by direct get, which any
    replica answers): it is read again over ``STALE_RETRIES`` (about 0.2 s) before it is called
    missing. Only a missing object pays for that."""
    obs = await store(js, names)
    missing: list[Exception] = []

    async def attempt() -> ObjectStore.ObjectResult | None:
        try:
            return await obs.get(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError) as exc:
            missing.append(exc)
            return None

    result, _ = await reread_until(attempt, lambda got: got is not None)
    if result is None:  # not found over the pauses
        raise PayloadMissingError(
            f"payload object {name!r} is missing from bucket {bucket_name(names)!r}"
        ) from missing[-1]
    return orjson.loads(result.data or b"null")


def _large_fields(body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The (ref key, encoding) of every large field. A large object field with large members
    moves member by member (ref key ``field.member``): a wake's ``output`` is
    ``{"data": <the resume's data>, ...}``, and the data alone is the object the resume stored,
    so the wake stores nothing again (same content, same name)."""
    moved: list[tuple[str, bytes]] = []
    for key, value in body.items():
        if key == "t":
            continue
        encoded = orjson.dumps(value)
        if len(encoded) < FIELD_THRESHOLD:
            continue
        if isinstance(value, dict):
            members = [(f"{key}.{k}", orjson.dumps(v)) for k, v in value.items()]
            large = [(ref, enc) for ref, enc in members if len(enc) >= FIELD_THRESHOLD]
            # Only when what stays inline is small: many small members add up too.
            if large and len(encoded) - sum(len(e) for _, e in large) < _INLINE_REST:
                moved.extend(large)
                continue
        moved.append((key, encoded))
    return moved


async def offload(
    js: JetStreamContext, names: Names, run_id: str, body: dict[str, Any], limit: int
) -> bytes:
    """The stub for an encoded-too-big event ``body`` (a dict with the ``t`` tag)."""
    moved = _large_fields(body)
    if not moved:
        raise ValueError(f"event of run {run_id} is too large and has no large field to move")
    stub = dict(body)
    for ref, _ in moved:
        key, _, member = ref.partition(".")
        if member:
            stub[key] = {**stub[key], member: None}
        else:
            stub[key] = None
    stored = await asyncio.gather(*(put_value(js, names, run_id, data) for _, data in moved))
    refs = {ref: name for (ref, _), name in zip(moved, stored, strict=True)}
    stub[REFS] = refs
    encoded = orjson.dumps(stub)
    if len(encoded) > limit:
        raise ValueError(f"event of run {run_id} does not fit in a message even as a stub")
    return encoded


async def resolve(js: JetStreamContext, names: Names, data: bytes) -> bytes:
    """The full encoding of a stub (``data`` unchanged if it is not one)."""
    body = orjson.loads(data)
    refs = body.pop(REFS, None) if isinstance(body, dict) else None
    if not refs:
        return data
    values = await asyncio.gather(*(get_value(js, names, name) for name in refs.values()))
    for ref, value in zip(refs, values, strict=True):
        # Event fields have no dot; a member name may (only the first dot separates).
        key, _, member = ref.partition(".")
        if member:
            body[key][member] = value
        else:
            body[key] = value
    return orjson.dumps(body)


async def put_event_value(js: JetStreamContext, names: Names, encoded: bytes) -> str:
    """Store the JSON encoding of an external event's data; return the object's name, for the
    event's ``Polos-Payload-Ref`` header. Event objects are named ``event:<id>``: no run id
    has a colon, so removing a run's objects (``<run_id>/...``) never touches them."""
    name = f"{EVENT_PREFIX}{uuid.uuid4().hex}"
    obs = await store(js, names)
    await obs.put(name, encoded)
    return name


async def event_value(
    js: JetStreamContext, names: Names, headers: dict[str, str] | None, data: bytes
) -> Any:
    """The data of a stored external event: its body, or the object its header names.
    Raises ``ValueError`` for a body that is not JSON or a reference that is not an event
    object, ``PayloadMissingError`` for an object that is not there."""
    ref = (headers or {}).get(EVENT_REF)
    if ref is None:
        return orjson.loads(data) if data else None
    if not ref.startswith(EVENT_PREFIX) or data:
        raise ValueError(
            f"header {EVENT_REF} must name an object {EVENT_PREFIX}<id> of bucket "
            f"{bucket_name(names)!r}, with an empty body; got {ref!r}"
        )
    return await get_value(js, names, ref)


async def delete_run(js: JetStreamContext, names: Names, run_id: str) -> int:
    """Remove a run's payload objects (retention); returns how many were removed."""
    obs = await store(js, names)
    removed = 0
    try:
        infos = await obs.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        return 0
    for info in infos:
        if info.name.startswith(f"{run_id}/"):
            await obs.delete(info.name)
            removed += 1
    return removed


__all__ = [
    "EVENT_PREFIX",
    "EVENT_REF",
    "EVENT_TYPE",
    "HEADER",
    "PayloadMissingError",
    "bucket_name",
    "delete_run",
    "event_value",
    "get_value",
    "inline_limit",
    "offload",
    "put_event_value",
    "put_value",
    "resolve",
    "store",
]
