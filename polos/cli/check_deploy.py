"""``polos check-deploy MODULE``: would the runs in flight survive a deploy of this code?

Every run the index shows waiting or running is replayed, dry, on the workflows MODULE defines
(loaded as ``polos worker MODULE`` loads them): no step runs, nothing is appended
(``polos._private.run.check``). Each run that would fail is listed with the step and what its
history holds there against what the new code asks for; the exit code is 1 when any would.
"""

from __future__ import annotations

import argparse
from typing import Any

import pydantic

from polos._private.ops import output
from polos._private.ops.commands import command, dumps, table
from polos._private.ops.runtime import load_workflows
from polos._private.run.check import Verdict, dry_replay
from polos._private.run.execution import RunExecution
from polos._private.store import load_state
from polos.cli.core import client_for
from polos.converter import from_json
from polos.workflow import WorkflowContext

# What "in flight" means in the run index: the runs a worker with the new code will replay.
IN_FLIGHT = ("suspended", "running", "queued")


def _add_check_deploy(p: argparse.ArgumentParser) -> None:
    p.add_argument("module", help="module name or .py file of the new code (as `polos worker`)")
    p.add_argument("--workflow", help="only the runs of this workflow")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds one run's replay may take (default 30)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per run")


def _cells(v: Verdict) -> list[output.Cell]:
    verdict = output.styled("ok", "green") if v.ok else output.styled("FAILS", "bold red")
    return [
        v.run_id,
        v.workflow,
        output.status(v.status),
        verdict,
        v.step or "-",
        v.recorded or "-",
        v.new or "-",
        v.reason,
    ]


@command(
    "check-deploy",
    "replay the runs in flight on new code (dry: nothing runs or is written); "
    "exit 1 if any would fail with NonDeterminismError",
)(_add_check_deploy)
async def cmd_check_deploy(args: argparse.Namespace) -> int:
    try:
        workflows = {wf.name: wf for wf in load_workflows(args.module)}
    except ImportError as exc:
        output.error(str(exc))
        return 2
    client = await client_for(args)
    verdicts: list[Verdict] = []
    skipped: dict[str, int] = {}
    try:
        runs = await client.list_runs(status=list(IN_FLIGHT), workflow=args.workflow, limit=10**9)
        for info in sorted(runs, key=lambda r: r.created_at or 0):
            wf = workflows.get(info.workflow or "")
            if wf is None:
                skipped[info.workflow or "?"] = skipped.get(info.workflow or "?", 0) + 1
                continue
            # The index is a projection; the history is the truth (the run may have ended).
            state = await load_state(client.nc, client.names, info.run_id)
            if state.requested is None or state.done:
                continue
            requested = state.requested
            try:
                value = from_json(requested.input, wf.input_type) if wf.takes_input else None
            except pydantic.ValidationError as exc:
                verdicts.append(
                    Verdict(
                        run_id=state.run_id,
                        workflow=wf.name,
                        status=state.status,
                        ok=False,
                        reason=f"its input no longer validates: {exc.error_count()} error(s), "
                        f"{exc.errors()[0]['msg']}",
                    )
                )
                continue

            async def invoke(exe: RunExecution, wf: Any = wf, value: Any = value) -> Any:
                return await wf(WorkflowContext(exe), value)

            verdicts.append(
                await dry_replay(
                    js=client.js,
                    nc=client.nc,
                    names=client.names,
                    settings=client.settings,
                    workflow=wf,
                    state=state,
                    invoke=invoke,
                    timeout=args.timeout,
                )
            )
    finally:
        await client.close()
    failing = [v for v in verdicts if not v.ok]
    if args.json:
        for v in verdicts:
            print(dumps(v.__dict__))
        return 1 if failing else 0
    if verdicts:
        print(
            table(
                [_cells(v) for v in verdicts],
                ["RUN", "WORKFLOW", "STATUS", "VERDICT", "STEP", "RECORDED", "NEW CODE", "WHY"],
                wrap=["WHY"],
            )
        )
    summary = (
        f"{len(verdicts)} run(s) in flight checked against {args.module}: "
        f"{len(failing)} would fail, {len(verdicts) - len(failing)} replay cleanly"
    )
    if skipped:
        summary += "; not defined there (not checked): " + ", ".join(
            f"{name} ({n})" for name, n in sorted(skipped.items())
        )
    print(summary)
    return 1 if failing else 0
