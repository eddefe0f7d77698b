"""Bad input: a hand-written corpus plus hypothesis-generated commands, subjects and history events,
sent to a running orchestrator and worker on a real nats-server.

The invariant for every input: the sender gets an answer (ok, or an error saying why) and every
refused input has a dead-letter entry carrying the same reason; no service loop dies; and a valid
command sent after all the garbage still runs to completion.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import hypothesis.strategies as st
import nats.errors
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from polos import WorkflowContext, workflow
from polos import history as ev
from polos._private.store import REPLY_HEADER, Names, read_subject


@workflow
async def fuzz_target(ctx: WorkflowContext, numbers: list[int]) -> int:
    return await ctx.step.run("sum", lambda: sum(numbers))


# ----------------------------------------------------------------------------- inputs

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Subject tokens a NATS client can publish (no whitespace, no empty tokens) but that are often
# illegal as Polos names: dots split them, unicode, '$', wildcards' neighbours, 200-char tokens.
TOKENS = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=" .*>\t\r\n"
    ),
    min_size=1,
    max_size=40,
) | st.just("x" * 200)
START_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "input": JSON_VALUES,
        "run_id": JSON_VALUES | TOKENS,
        "queue": JSON_VALUES,
        "concurrency_key": JSON_VALUES,
        "extra": JSON_VALUES,
    },
)
PAYLOADS = (
    st.binary(max_size=200)
    | JSON_VALUES.map(orjson.dumps)
    | START_FIELDS.map(orjson.dumps)
    | st.text(max_size=50).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
VERBS = st.sampled_from(["start", "resume", "cancel", "event", "explode", "START", ""]) | TOKENS


def _subject_tail(verb: str, tokens: list[str]) -> str:
    return ".".join(t for t in [verb, *tokens] if t)


def generated_commands(n: int) -> list[tuple[str, bytes]]:
    """``n`` (subject tail after ``<prefix>.cmd.``, payload) pairs drawn by hypothesis."""
    found: list[tuple[str, bytes]] = []

    @hsettings(
        max_examples=n,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        VERBS,
        st.lists(TOKENS | st.sampled_from(["fuzz_target", "nope", "r1", "k"]), max_size=3),
        PAYLOADS,
    )
    def draw(verb: str, tokens: list[str], payload: bytes) -> None:
        tail = _subject_tail(verb, tokens)
        if tail:
            found.append((tail, payload))

    draw()
    return found


# A corpus of the classic mistakes, each with a part of the reason the sender must see.
CORPUS: list[tuple[str, bytes, str | None]] = [
    ("start.fuzz_target", b"{not json", "malformed JSON"),
    ("start.fuzz_target", b"\xff\xfe\x00", "malformed JSON"),
    ("start.fuzz_target", b"[1, 2]", "must be a JSON object"),
    ("start.fuzz_target", b'"just a string"', "must be a JSON object"),
    ("start.fuzz_target", b"null", "must be a JSON object"),
    ("start.fuzz_target", b'{"inputs": [1]}', "unknown field(s) inputs"),
    ("start.fuzz_target", b'{"input": [1], "run_id": 7}', "run_id must be"),
    ("start.fuzz_target", b'{"input": [1], "run_id": "a b"}', "run_id must be"),
    ("start.fuzz_target", b'{"input": [1], "run_id": ""}', "run_id must be"),
    ("start.fuzz_target", orjson.dumps({"input": [1], "run_id": "x" * 129}), "run_id must be"),
    ("start.fuzz_target", b'{"input": [1], "queue": 5}', "queue must be a string"),
    ("start.fuzz_target", b'{"input": [1], "concurrency_key": []}', "concurrency_key must be"),
    ("start.fuzz_target", b'{"input": [1], "input": 2}', None),  # duplicate key: last wins
    (
        "start.fuzz_target",
        b'{"input": 123456789012345678901234567890}',
        None,
    ),  # orjson reads it as a float
    ("start.fuzz_$target", b"{}", "is not valid"),
    ("start.ünïcode", b"{}", None),  # unicode letters are legal in names and subjects
    ("start." + "w" * 200, b"{}", "is not valid"),
    ("start", b"{}", "unknown command subject"),
    ("start.fuzz_target.extra", b"{}", "unknown command subject"),
    ("explode.now", b"{}", "unknown command subject"),
    ("resume", b"{}", None),  # a resume with no run or key: refused, with an answer
    ("resume.no_such_run.approval", b'{"approved": true}', None),
    ("resume.no_such_run.approval", b"{not json", None),
    ("cancel.no_such_run", b"{}", None),
    ("cancel", b"[]", None),
    ("start.nobody_serves_this", b'{"input": 1}', None),  # accepted: queued until a worker comes
]


# ----------------------------------------------------------------------------- harness


async def _send_all(env: Any, inputs: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Publish every input with its own reply inbox; return the answers in order."""
    nc, js, p = env.client.nc, env.client.js, env.settings.prefix
    answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
    loop = asyncio.get_running_loop()
    base = nc.new_inbox()

    async def on_reply(msg: Any) -> None:
        fut = answers.get(msg.subject)
        if fut is not None and not fut.done():
            fut.set_result(orjson.loads(msg.data))

    sub = await nc.subscribe(f"{base}.*", cb=on_reply)
    try:
        for i, (tail, payload) in enumerate(inputs):
            inbox = f"{base}.{i}"
            answers[inbox] = loop.create_future()
            await js.publish(f"{p}.cmd.{tail}", payload, headers={REPLY_HEADER: inbox})
        out = []
        for i, (tail, payload) in enumerate(inputs):
            try:
                out.append(await asyncio.wait_for(answers[f"{base}.{i}"], 10))
            except TimeoutError:
                raise AssertionError(f"no answer to cmd.{tail!r} {payload[:80]!r}") from None
        return out
    finally:
        await sub.unsubscribe()


async def _dead_letters(env: Any) -> list[dict[str, Any]]:
    names = Names(env.settings.prefix)
    msgs = await read_subject(env.client.nc, names.dlq_stream, f"{names.prefix}.dlq.>")
    return [orjson.loads(m.data) for m in msgs]


def _services_alive(env: Any) -> None:
    for svc in (env.orchestrator, env.worker):
        for loop in svc._loops:
            assert loop._main is not None and not loop._main.done(), f"{loop._name} died"


async def _valid_run_still_works(env: Any) -> None:
    handle = await env.client.start(fuzz_target, [1, 2, 3])
    assert await handle.result(timeout=15) == 6


def _check(
    inputs: list[tuple[str, bytes]], answers: list[dict[str, Any]], letters: list[dict[str, Any]]
) -> tuple[int, int]:
    reasons: dict[str, int] = {}
    for d in letters:
        if d["source"] == "cmd":
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    refused = accepted = 0
    for (tail, payload), answer in zip(inputs, answers, strict=True):
        assert isinstance(answer.get("ok"), bool), (tail, payload, answer)
        if answer["ok"]:
            accepted += 1
            continue
        refused += 1
        assert answer.get("error"), (tail, payload, answer)
        assert reasons.get(answer["error"], 0) > 0, (
            f"refused without dead letter: {tail!r} {answer}"
        )
    return refused, accepted


# ----------------------------------------------------------------------------- tests


async def test_corpus_of_bad_commands_each_answered_and_dead_lettered(env_factory: Any) -> None:
    env = await env_factory([fuzz_target])
    inputs = [(t, p) for t, p, _ in CORPUS]
    answers = await _send_all(env, inputs)
    for (tail, payload, reason), answer in zip(CORPUS, answers, strict=True):
        if reason is not None:
            assert answer["ok"] is False, (tail, payload, answer)
            assert reason in answer["error"], (tail, payload, answer)
    letters = await _dead_letters(env)
    refused, accepted = _check(inputs, answers, letters)
    _services_alive(env)
    await _valid_run_still_works(env)
    print(
        f"\ncorpus: {len(inputs)} inputs, {refused} refused with a dead letter, "
        f"{accepted} accepted; lost 0"
    )


async def test_hypothesis_fuzz_of_command_subjects_and_payloads(env_factory: Any) -> None:
    env = await env_factory([fuzz_target])
    inputs = generated_commands(300)
    # Valid starts mixed into the garbage must all complete: nothing valid is lost.
    valid = [uuid.uuid4().hex for _ in range(10)]
    for i, run_id in enumerate(valid):
        inputs.insert(
            i * 29, ("start.fuzz_target", orjson.dumps({"input": [i, 1], "run_id": run_id}))
        )
    answers = await _send_all(env, inputs)
    letters = await _dead_letters(env)
    refused, accepted = _check(inputs, answers, letters)
    _services_alive(env)
    for i, run_id in enumerate(valid):
        assert await env.client.get_handle(run_id, "fuzz_target").result(timeout=15) == i + 1
    await _valid_run_still_works(env)
    print(
        f"\nfuzz: {len(inputs)} commands tried, {refused} refused with a dead letter, "
        f"{accepted} accepted, {len(valid)} valid runs mixed in all completed; lost 0"
    )


async def test_garbage_in_run_history_is_dead_lettered_not_fatal(env_factory: Any) -> None:
    """Someone with write access publishes junk onto a run's control subject."""
    env = await env_factory([fuzz_target])
    # Write access to histories is a worker's (a client may not append).
    assert env.worker is not None
    js, p = env.worker._js, env.settings.prefix
    garbage: list[bytes] = [
        b"",
        b"{",
        b"[]",
        b'{"t": "NoSuchEvent"}',
        b'{"t": "RunCompleted"}',
        b'{"t": ["RunCompleted"]}',
        b'{"t": "RunClaimed", "run_id": 1}',
        b"\x00\xff" * 10,
    ]

    @hsettings(
        max_examples=40,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(PAYLOADS | JSON_VALUES.map(lambda v: orjson.dumps({"t": "RunSuspended", "x": v})))
    def draw(data: bytes) -> None:
        garbage.append(data)

    draw()
    for data in garbage:
        await js.publish(f"{p}.run.junk{uuid.uuid4().hex[:8]}.ctl", data)
    decodable = sum(1 for d in garbage if _decodes(d))
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        ctl = [d for d in await _dead_letters(env) if d["source"] == "ctl"]
        if len(ctl) >= len(garbage) - decodable or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(ctl) == len(garbage) - decodable
    assert all(d["reason"] for d in ctl)
    _services_alive(env)
    await _valid_run_still_works(env)
    print(
        f"\nhistory garbage: {len(garbage)} messages, {len(ctl)} dead-lettered, "
        f"{decodable} decodable (folded into the index)"
    )


def _decodes(data: bytes) -> bool:
    try:
        ev.decode(data)
        return True
    except ev.EventDecodeError:
        return False


@hsettings(max_examples=400, database=None, deadline=None)
@given(PAYLOADS | JSON_VALUES.map(lambda v: orjson.dumps({"t": "StepCompleted", "key": v})))
def test_event_decoding_never_raises_anything_but_event_decode_error(data: bytes) -> None:
    try:
        event = ev.decode(data)
    except ev.EventDecodeError as exc:
        assert str(exc)
    else:
        assert isinstance(event, ev.Event)


async def test_oversized_and_unpublishable_inputs_get_a_clear_client_error(
    env_factory: Any,
) -> None:
    env = await env_factory([fuzz_target])
    nc, p = env.client.nc, env.settings.prefix
    with pytest.raises(nats.errors.MaxPayloadError):
        await env.client.js.publish(f"{p}.cmd.start.fuzz_target", b"x" * (nc.max_payload + 1))
    for bad in (f"{p}.cmd.start.a b", f"{p}.cmd.start.\r\n"):
        with pytest.raises(nats.errors.BadSubjectError):
            await nc.publish(bad, b"{}")
    _services_alive(env)
    await _valid_run_still_works(env)
