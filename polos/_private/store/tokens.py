"""Subject tokens and JetStream timestamps: any text as one reversible subject token (topics,
step keys), and the server's RFC 3339 times as epoch seconds."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from polos._private.store.names import Names

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESC = re.compile(r"=([0-9A-F]{2})")


def encode_token(text: str) -> str:
    """One subject token (and KV key token) for any text, reversibly: letters, digits, '_' and
    '-' stay, every other byte of the UTF-8 text becomes ``=XX`` (hex). ``pickup/42`` ->
    ``pickup=2F42``."""
    if not text:
        raise ValueError("an empty name cannot be a subject token")
    out: list[str] = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_token(token: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(token):
        m = _ESC.match(token, i)
        if m:
            raw.append(int(m.group(1), 16))
            i = m.end()
        else:
            raw.extend(token[i].encode())
            i += 1
    return raw.decode("utf-8")


def topic_tokens(topic: str) -> str:
    """The subject tokens of a topic: split on '.', each part encoded (``encode_token``)."""
    if not isinstance(topic, str) or not topic:
        raise ValueError("an event topic must be a non-empty string")
    parts = topic.split(".")
    if any(not p for p in parts):
        raise ValueError(f"event topic {topic!r} has an empty part between dots")
    return ".".join(encode_token(p) for p in parts)


def topic_from_subject(names: Names, subject: str) -> str:
    head = f"{names.prefix}.event."
    if not subject.startswith(head):
        raise ValueError(f"{subject!r} is not an event subject")
    return ".".join(decode_token(t) for t in subject[len(head) :].split("."))


def event_subject(names: Names, topic: str) -> str:
    return names.event_subject(topic_tokens(topic))


def resume_subject(names: Names, run_id: str, key: str) -> str:
    return names.resume_subject(run_id, encode_token(key))


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(stamp: str | None) -> float:
    """A JetStream timestamp (RFC 3339, nanoseconds) as epoch seconds."""
    if not stamp:
        return time.time()
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", stamp)
    if not m:
        return time.time()
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.timestamp() + frac


__all__ = [
    "decode_token",
    "encode_token",
    "event_subject",
    "iso_time",
    "parse_time",
    "resume_subject",
    "topic_from_subject",
    "topic_tokens",
]
