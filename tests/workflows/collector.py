"""A workflow that says how the worker process's garbage collector is set (``tune_gc``)."""

from __future__ import annotations

import gc

from polos import WorkflowContext, workflow


@workflow
async def gc_thresholds(ctx: WorkflowContext) -> list[int]:
    return list(gc.get_threshold())
