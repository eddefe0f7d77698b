"""The history read as it was before the benchmark's optimisation (one subscription and one
``next_msg`` task per message per read, nats-py's header parser), kept only to measure the
change side by side."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from polos._private.store import StoredMsg, natspy


async def read_subject_per_sub(
    nc: NATS, stream: str, subject_filter: str, *, start_seq: int = 1, timeout: float = 5.0
) -> list[StoredMsg]:
    out: list[StoredMsg] = []
    seq = start_seq
    while True:
        req: dict[str, Any] = {"next_by_subj": subject_filter, "batch": 1000, "seq": seq}
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(req), reply=inbox)
            more = False
            while True:
                msg = await sub.next_msg(timeout)
                hdrs = msg.headers or {}
                status = hdrs.get("Status")
                if status:
                    if status == "204":
                        more = int(hdrs.get("Nats-Num-Pending", "0") or 0) > 0
                    elif status != "404":
                        raise RuntimeError(f"direct get on {stream}: {status} {hdrs}")
                    break
                s = int(hdrs["Nats-Sequence"])
                out.append(
                    StoredMsg(
                        seq=s,
                        subject=hdrs.get("Nats-Subject", ""),
                        data=msg.data,
                        time=hdrs.get("Nats-Time-Stamp"),
                        headers=hdrs,
                    )
                )
                seq = s + 1
        finally:
            await sub.unsubscribe()
        if not more:
            return out


def original_header_parser() -> contextlib.AbstractContextManager[None]:
    """nats-py's own header parser for the duration (Polos installs a faster, equivalent one)."""
    return natspy.nats_own_header_parser()
