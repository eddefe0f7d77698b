"""Serving a module's workflows until SIGTERM/SIGINT: ``polos worker MODULE`` and
``python -m polos_services.worker MODULE`` (one implementation)."""

from __future__ import annotations

import argparse

from polos._private.ops.commands import settings_for
from polos._private.ops.runtime import load_workflows, run_until_signal
from polos.devllm import serve_this_process
from polos.worker import Worker


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("module", help="module name or .py file that defines @workflow functions")
    p.add_argument("--max-concurrent-runs", type=int, default=200)
    p.add_argument("--worker-id")
    p.add_argument("--dev-llm", action="store_true",
                   help="agents talk to the Polos dev LLM, a scripted OpenAI-compatible test "
                        "server started in this process (not a model: it calls each offered "
                        "tool once, then answers from the output schema)")


async def serve_worker(args: argparse.Namespace) -> int:
    devllm = None
    if args.dev_llm:
        devllm = await serve_this_process()
    worker = Worker(
        load_workflows(args.module),
        settings=settings_for(args, role="worker"),
        max_concurrent_runs=args.max_concurrent_runs,
        worker_id=args.worker_id,
    )
    try:
        # Stops on SIGINT/SIGTERM, or with the error when the server refuses the credentials.
        await run_until_signal(worker, on_started=lambda: print(
            f"worker {worker.id} serving: {', '.join(worker.workflows)}", flush=True))
    finally:
        if devllm is not None:
            await devllm.stop()
    return 0


__all__ = ["add_worker_args", "serve_worker"]
