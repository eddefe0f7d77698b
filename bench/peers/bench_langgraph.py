"""LangGraph with its SQLite checkpointer: the 10-step no-op workflow, measured by common.py.

Run in LangGraph's own venv (see README.md):
``/tmp/peers/langgraph/bin/python bench/peers/bench_langgraph.py``.

The workflow is a graph of ten nodes in a row; each node appends its stamp to the state. The
graph is compiled with ``AsyncSqliteSaver`` (langgraph-checkpoint-sqlite) on a file and run
with ``ainvoke`` under a thread id per run, in the application's process, LangGraph's defaults
otherwise: ``durability="async"`` (a step's checkpoint is written while the next step runs, and
is on disk when ``ainvoke`` returns) and the saver's ``journal_mode=WAL`` with SQLite's default
``synchronous=FULL`` (every checkpoint commit fsyncs the WAL). ``--durability sync`` is the
equal-durability setting: each step's checkpoint is committed before the next step starts.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import operator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import common
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph


class State(TypedDict):
    stamps: Annotated[list[float], operator.add]


async def node(state: State) -> dict[str, list[float]]:
    return {"stamps": [common.stamp()]}


class LangGraphPeer(common.Peer):
    name = "LangGraph"
    version = (
        f"{importlib.metadata.version('langgraph')} + checkpoint-sqlite "
        f"{importlib.metadata.version('langgraph-checkpoint-sqlite')}"
    )

    def __init__(self, durability: str) -> None:
        self.mode = durability
        self.durability = "SQLite file (WAL, synchronous=FULL): fsync per checkpoint commit; " + (
            "durability='async' (the default): a step's checkpoint is written while the "
            "next step runs"
            if durability == "async"
            else "durability='sync': a step's checkpoint is committed before the next starts"
        )

    async def setup(self, tmp: Path) -> None:
        self._saver_cm = AsyncSqliteSaver.from_conn_string(str(tmp / "checkpoints.sqlite"))
        saver = await self._saver_cm.__aenter__()
        g = StateGraph(State)
        names = [f"s{i}" for i in range(common.STEPS)]
        for n in names:
            g.add_node(n, node)
        for a, b in zip([START, *names], [*names, END], strict=True):
            g.add_edge(a, b)
        self.graph = g.compile(checkpointer=saver)

    async def teardown(self) -> None:
        await self._saver_cm.__aexit__(None, None, None)

    async def start(self, run_id: str) -> Any:
        config = {"configurable": {"thread_id": run_id}}
        return asyncio.ensure_future(
            self.graph.ainvoke({"stamps": []}, config, durability=self.mode)
        )

    async def wait(self, handle: Any) -> Any:
        return (await handle)["stamps"]


def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--durability",
        choices=("async", "sync"),
        default="async",
        help="LangGraph's durability mode (default: async, LangGraph's default)",
    )


if __name__ == "__main__":
    common.main(
        lambda a: LangGraphPeer(a.durability),
        extra,
        lambda a: f"durability={a.durability}" + (" (default)" if a.durability == "async" else ""),
    )
