"""DBOS Transact on SQLite: the 10-step no-op workflow, measured by common.py.

Run in DBOS's own venv (see README.md): ``/tmp/peers/dbos/bin/python bench/peers/bench_dbos.py``.

DBOS is a library: the workflows run in the application's process, which is also the client
(``DBOS.start_workflow_async`` and ``handle.get_result()``), as its documentation shows. Its
system database here is a SQLite file, with DBOS's own settings: SQLite's default rollback
journal and ``synchronous=FULL`` (DBOS sets neither), so every step's commit is fsynced
before the step returns.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path
from typing import Any

import common
from dbos import DBOS, SetWorkflowID


@DBOS.step()
async def noop() -> float:
    return common.stamp()


@DBOS.workflow()
async def steps(n: int) -> list[float]:
    return [await noop() for _ in range(n)]


class DBOSPeer(common.Peer):
    name = "DBOS"
    version = importlib.metadata.version("dbos")
    durability = "SQLite file, default journal, synchronous=FULL: fsync per step commit"

    async def setup(self, tmp: Path) -> None:
        DBOS(
            config={
                "name": "bench",
                "system_database_url": f"sqlite:///{tmp / 'dbos.sqlite'}",
                "log_level": "WARNING",
            }
        )
        DBOS.launch()

    async def teardown(self) -> None:
        DBOS.destroy()

    async def start(self, run_id: str) -> Any:
        with SetWorkflowID(run_id):
            return await DBOS.start_workflow_async(steps, common.STEPS)

    async def wait(self, handle: Any) -> Any:
        return await handle.get_result()


def make(args: argparse.Namespace) -> common.Peer:
    return DBOSPeer()


if __name__ == "__main__":
    common.main(make)
