"""The one catalogue of names of a namespace (prefix): every stream, KV bucket, object store,
subject and durable consumer, and the functions that make subjects.

Subjects are public API (other languages speak them), so nothing outside this module spells
one. ``topology.TOPOLOGY`` says how each stream and bucket is configured and who may use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from polos import history as ev

RUN_KINDS = ev.HISTORY_KINDS
_DELTA_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def valid_token(value: str) -> bool:
    """True if ``value`` can be one subject token (run ids, workflow names)."""
    return bool(value) and len(value) <= 128 and all(c.isalnum() or c in "_-" for c in value)


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket (how the JetStream API names it)."""
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    """The stream behind an object store."""
    return f"OBJ_{bucket}"


@dataclass(frozen=True)
class Names:
    """Every stream, subject, bucket and consumer name of one namespace (prefix)."""

    prefix: str

    @property
    def upper(self) -> str:
        return self.prefix.upper().replace("-", "_")

    # ------------------------------------------------------------------ streams

    @property
    def cmd_stream(self) -> str:
        return f"{self.upper}_CMD"

    @property
    def runs_stream(self) -> str:
        return f"{self.upper}_RUNS"

    @property
    def tasks_stream(self) -> str:
        return f"{self.upper}_TASKS"

    @property
    def events_stream(self) -> str:
        return f"{self.upper}_EVENTS"

    @property
    def dlq_stream(self) -> str:
        return f"{self.upper}_DLQ"

    @property
    def timers_stream(self) -> str:
        return f"{self.upper}_TIMERS"

    @property
    def admit_stream(self) -> str:
        """Runs waiting for admission to a queue (services/orchestrator/admission.py)."""
        return f"{self.upper}_ADMIT"

    # ------------------------------------------------------------------ KV buckets

    @property
    def runs_bucket(self) -> str:
        """The run index (one entry per run, written by the orchestrator)."""
        return f"{self.prefix}_runs"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}_workers"

    @property
    def workflows_bucket(self) -> str:
        return f"{self.prefix}_workflows"

    @property
    def waits_bucket(self) -> str:
        return f"{self.prefix}_waits"

    @property
    def slots_bucket(self) -> str:
        """Concurrency slots and LLM rate buckets (polos/_private/limits.py)."""
        return f"{self.prefix}_slots"

    @property
    def queues_bucket(self) -> str:
        """Queue and rate-limit configuration."""
        return f"{self.prefix}_queues"

    @property
    def memory_bucket(self) -> str:
        """Agents' shared memory (polos/_private/agents/memory.py)."""
        return f"{self.prefix}_memory"

    @property
    def sessions_bucket(self) -> str:
        """Agents' conversation history per session (polos/_private/agents/sessions.py)."""
        return f"{self.prefix}_sessions"

    @property
    def telemetry_bucket(self) -> str:
        """The span followers' positions (a projection: delete it to re-emit)."""
        return f"{self.prefix}_telemetry"

    @property
    def snapshots_bucket(self) -> str:
        """Replay snapshots of runs' folded state, a cache (polos/_private/store/snapshots.py)."""
        return f"{self.prefix}_snapshots"

    # ------------------------------------------------------------------ object stores

    @property
    def payloads_bucket(self) -> str:
        """Event fields too large for one message (polos/_private/store/payloads.py)."""
        return f"{self.prefix}_payloads"

    # ------------------------------------------------------------------ durable consumers

    orchestrator_cmd_consumer = "orchestrator_cmd"
    orchestrator_ctl_consumer = "orchestrator_ctl"
    orchestrator_events_consumer = "orchestrator_events"
    scheduler_consumer = "scheduler_fire"

    @staticmethod
    def worker_consumer(workflow: str) -> str:
        """The durable every worker serving ``workflow`` pulls its tasks from."""
        return f"wf_{workflow}"

    # ------------------------------------------------------------------ commands

    def start_subject(self, workflow: str) -> str:
        return f"{self.prefix}.cmd.start.{workflow}"

    def trigger_subject(self, workflow: str) -> str:
        """An event trigger's batch whose timeout is over (the scheduler to the orchestrator)."""
        return f"{self.prefix}.cmd.trigger.{workflow}"

    def cancel_subject(self, run_id: str) -> str:
        return f"{self.prefix}.cmd.cancel.{run_id}"

    def resume_subject(self, run_id: str, key: str) -> str:
        return f"{self.prefix}.cmd.resume.{run_id}.{key}"

    def child_subject(self, parent_run_id: str, run_id: str) -> str:
        """A child run's request, under its parent: a cancelled parent finds every child it
        ever requested here, recorded in its history or not."""
        return f"{self.prefix}.cmd.child.{parent_run_id}.{run_id}"

    def child_filter(self, parent_run_id: str) -> str:
        return f"{self.prefix}.cmd.child.{parent_run_id}.*"

    @property
    def cmd_filter(self) -> str:
        return f"{self.prefix}.cmd.>"

    # ------------------------------------------------------------------ run histories

    def run_subject(self, run_id: str, kind: str) -> str:
        return f"{self.prefix}.run.{run_id}.{kind}"

    def run_filter(self, run_id: str) -> str:
        """All of one run's history subjects: the fence covers exactly these."""
        return f"{self.prefix}.run.{run_id}.*"

    @property
    def runs_subjects(self) -> list[str]:
        """What the runs stream stores: only the known kinds, so reading a run kind by kind
        cannot miss anything the fence counts."""
        return [f"{self.prefix}.run.*.{kind}" for kind in RUN_KINDS]

    @property
    def ctl_filter(self) -> str:
        return f"{self.prefix}.run.*.ctl"

    @property
    def step_filter(self) -> str:
        return f"{self.prefix}.run.*.step"

    def stored_ctl_subject(self, run_id: str) -> str:
        """Core NATS (no stream): the runs stream republishes each control event here once it
        is stored, so a listener hears only what the log holds (a fenced-out writer's event
        reaches ``<prefix>.run.<id>.ctl`` subscribers too, though the stream refused it)."""
        return f"{self.prefix}.stored.{run_id}.ctl"

    @property
    def stored_ctl_filter(self) -> str:
        return f"{self.prefix}.stored.*.ctl"

    # ------------------------------------------------------------------ tasks, events, dead letters

    def task_subject(self, workflow: str) -> str:
        return f"{self.prefix}.task.{workflow}"

    @property
    def tasks_filter(self) -> str:
        return f"{self.prefix}.task.>"

    def event_subject(self, topic_tokens: str) -> str:
        return f"{self.prefix}.event.{topic_tokens}"

    @property
    def events_filter(self) -> str:
        return f"{self.prefix}.event.>"

    def dlq_subject(self, source: str) -> str:
        return f"{self.prefix}.dlq.{source}"

    @property
    def dlq_filter(self) -> str:
        return f"{self.prefix}.dlq.>"

    # ------------------------------------------------------------------ time and waiting

    def timer_subject(self, run_id: str, seq: int) -> str:
        """Where a run's timer waits (a message schedule held by the server)."""
        return f"{self.prefix}.timer.at.{run_id}.{seq}"

    def timer_fire_subject(self, run_id: str, seq: int) -> str:
        return f"{self.prefix}.timer.fire.{run_id}.{seq}"

    def cron_subject(self, key: str) -> str:
        return f"{self.prefix}.timer.cron.{key}"

    def cron_fire_subject(self, key: str) -> str:
        return f"{self.prefix}.timer.fire.cron.{key}"

    @property
    def timers_filter(self) -> str:
        return f"{self.prefix}.timer.>"

    @property
    def timer_fire_filter(self) -> str:
        return f"{self.prefix}.timer.fire.>"

    @property
    def cron_filter(self) -> str:
        """The keyed cron schedules (a client creates and deletes its own)."""
        return f"{self.prefix}.timer.cron.>"

    # ------------------------------------------------------------------ admission

    def admit_subject(self, queue: str, key_tok: str) -> str:
        """Where a run waiting for admission to ``queue`` under one concurrency key is kept."""
        return f"{self.prefix}.admit.{queue}.{key_tok}"

    def admit_filter(self, queue: str | None = None) -> str:
        return f"{self.prefix}.admit.{queue}.*" if queue else f"{self.prefix}.admit.>"

    # ------------------------------------------------------------------ core NATS (no stream)

    def cancel_signal_subject(self, run_id: str) -> str:
        """Core NATS (no stream): tells the worker holding a run to interrupt it."""
        return f"{self.prefix}.signal.cancel.{run_id}"

    @property
    def signal_filter(self) -> str:
        return f"{self.prefix}.signal.>"

    def delta_subject(self, run_id: str, step_key: str) -> str:
        """Core NATS (no stream): an LLM step's live text deltas,
        ``<prefix>.stream.<run_id>.<step>`` (the step key made one subject token)."""
        return f"{self.prefix}.stream.{run_id}.{_DELTA_UNSAFE.sub('_', step_key)}"

    @property
    def deltas_filter(self) -> str:
        """Every run's live deltas; one run's are ``<prefix>.stream.<run_id>.>``."""
        return f"{self.prefix}.stream.>"


__all__ = ["RUN_KINDS", "Names", "kv_stream", "object_stream", "valid_token"]
