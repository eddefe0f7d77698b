-- The Polos views over the Parquet export: one source for `polos sql`, `polos_analytics.connect`
-- and the duckdb CLI (docs/observability.md).
--
-- In the duckdb CLI, name the export directory, then read this file:
--
--   SET VARIABLE polos_export_dir = '/abs/path/to/.polos/exports';
--   .read /path/to/site-packages/polos_analytics/views.sql
--
-- or let Polos print it with the paths filled in: `polos sql --print-views > polos.sql`,
-- then `duckdb -init polos.sql`. Every table directory must hold a Parquet file (an exporter
-- writes a `_schema.parquet` into each); `--print-views` stands in an empty table for one
-- that has none.

-- The raw tables: every Parquet file of a table directory, through a glob, so files exported
-- later show up in the next query (temp files of an export in progress, ".<name>.tmp", do not
-- match it). union_by_name lets files of an older schema sit beside newer ones.
CREATE OR REPLACE VIEW raw_history AS
SELECT * FROM read_parquet(getvariable('polos_export_dir') || '/history/*.parquet', union_by_name = true);

CREATE OR REPLACE VIEW raw_external_events AS
SELECT * FROM read_parquet(getvariable('polos_export_dir') || '/external_events/*.parquet', union_by_name = true);

CREATE OR REPLACE VIEW raw_dead_letters AS
SELECT * FROM read_parquet(getvariable('polos_export_dir') || '/dead_letters/*.parquet', union_by_name = true);

CREATE OR REPLACE VIEW raw_commands AS
SELECT * FROM read_parquet(getvariable('polos_export_dir') || '/commands/*.parquet', union_by_name = true);

-- The views.
CREATE OR REPLACE VIEW events AS
SELECT seq, stored_at, recorded_at, run_id, type, workflow, key, kind, name, attempt, attempts,
       worker_id, started_at, duration_ms, parent_run_id, root_run_id,
       input::JSON AS input, output::JSON AS output, error::JSON AS error, meta::JSON AS meta,
       body::JSON AS body, subject
FROM raw_history;

-- Each run with its parent and its root (the run a client started), from its RunRequested.
CREATE OR REPLACE VIEW run_tree AS
WITH req AS (
  SELECT run_id, any_value(workflow) AS workflow, any_value(parent_run_id) AS parent_run_id,
         coalesce(any_value(root_run_id), run_id) AS root_run_id
  FROM raw_history
  WHERE type = 'RunRequested' AND run_id IS NOT NULL
  GROUP BY run_id
)
SELECT r.run_id, r.workflow, r.parent_run_id, r.root_run_id,
       coalesce(t.workflow, r.workflow) AS root_workflow
FROM req r LEFT JOIN req t ON t.run_id = r.root_run_id;

-- Every (run, ancestor) pair, the run itself included: what rolls a child's cost up the tree.
CREATE OR REPLACE VIEW run_ancestors AS
WITH RECURSIVE up(run_id, ancestor) AS (
  SELECT run_id, run_id FROM run_tree
  UNION
  SELECT up.run_id, t.parent_run_id
  FROM up JOIN run_tree t ON t.run_id = up.ancestor
  WHERE t.parent_run_id IS NOT NULL
)
SELECT run_id, ancestor FROM up;

CREATE OR REPLACE VIEW runs AS
WITH base AS (
SELECT run_id,
       any_value(workflow) FILTER (WHERE type = 'RunRequested') AS workflow,
       CASE
         WHEN bool_or(type = 'RunCompleted') THEN 'completed'
         WHEN bool_or(type = 'RunFailed') THEN 'failed'
         WHEN bool_or(type = 'RunCancelled') THEN 'cancelled'
         ELSE arg_max(CASE type WHEN 'RunSuspended' THEN 'suspended'
                                WHEN 'RunClaimed' THEN 'running'
                                ELSE 'queued' END, seq)
              FILTER (WHERE type IN ('RunRequested', 'RunClaimed', 'RunSuspended', 'RunWoken'))
       END AS status,
       min(recorded_at) FILTER (WHERE type = 'RunRequested') AS created_at,
       max(recorded_at) FILTER (WHERE type IN ('RunCompleted', 'RunFailed', 'RunCancelled')) AS ended_at,
       date_diff('microsecond',
                 min(recorded_at) FILTER (WHERE type = 'RunRequested'),
                 max(recorded_at) FILTER (WHERE type IN ('RunCompleted', 'RunFailed', 'RunCancelled'))
       ) / 1000.0 AS duration_ms,
       coalesce(max(attempt) FILTER (WHERE type = 'RunClaimed'), 0) AS attempts,
       count(DISTINCT worker_id) FILTER (WHERE type = 'RunClaimed') AS workers,
       count(*) FILTER (WHERE type IN ('StepCompleted', 'StepFailed')
                           OR (type = 'RunWoken' AND kind IS NOT NULL)) AS steps,
       count(*) FILTER (WHERE type = 'RunSuspended') AS suspensions,
       any_value(parent_run_id) FILTER (WHERE type = 'RunRequested') AS parent_run_id,
       coalesce(any_value(root_run_id) FILTER (WHERE type = 'RunRequested'), run_id) AS root_run_id,
       any_value(input::JSON) FILTER (WHERE type = 'RunRequested') AS input,
       any_value(output::JSON) FILTER (WHERE type = 'RunCompleted') AS output,
       any_value(error::JSON) FILTER (WHERE type = 'RunFailed') AS error,
       count(*) AS events,
       max(seq) AS last_seq
FROM raw_history
WHERE run_id IS NOT NULL
GROUP BY run_id
),
llm AS (
  SELECT run_id,
         TRY_CAST(meta::JSON->'usage'->>'total_tokens' AS BIGINT) AS total_tokens,
         TRY_CAST(meta::JSON->>'cost_usd' AS DOUBLE) AS cost_usd
  FROM raw_history
  WHERE type = 'StepCompleted' AND kind = 'llm'
),
tree AS (
  -- The LLM calls of each run and of every run under it (child workflows, agents).
  -- (A run whose request is not on the log counts its own calls only.)
  SELECT coalesce(a.ancestor, l.run_id) AS run_id, count(*) AS llm_calls,
         sum(l.total_tokens)::BIGINT AS total_tokens, sum(l.cost_usd) AS cost_usd
  FROM llm l LEFT JOIN run_ancestors a ON a.run_id = l.run_id
  GROUP BY ALL
)
SELECT b.*, t.root_workflow,
       coalesce(c.llm_calls, 0) AS llm_calls,
       coalesce(c.total_tokens, 0)::BIGINT AS total_tokens,
       coalesce(c.cost_usd, 0.0) AS cost_usd
FROM base b
LEFT JOIN run_tree t USING (run_id)
LEFT JOIN tree c USING (run_id);

-- A wake that carries the awaited step's outcome (a resume, an event, children's results)
-- is that step's record, so it is a step row too.
CREATE OR REPLACE VIEW steps AS
SELECT run_id, seq, recorded_at AS ended_at, coalesce(key, body::JSON->>'step') AS key,
       kind, name,
       CASE type WHEN 'StepFailed' THEN 'failed' ELSE 'completed' END AS status,
       attempts, started_at, duration_ms,
       output::JSON AS output, error::JSON AS error, meta::JSON AS meta
FROM raw_history
WHERE type IN ('StepCompleted', 'StepFailed') OR (type = 'RunWoken' AND kind IS NOT NULL);

CREATE OR REPLACE VIEW llm_calls AS
WITH calls AS (
  SELECT s.run_id, s.seq, s.ended_at, s.key, s.status,
         t.workflow, t.root_run_id, t.root_workflow,
         coalesce(s.meta->>'model', s.name) AS model,
         s.meta->>'agent' AS agent,
         s.meta->>'provider' AS provider,
         s.meta->>'base_url' AS base_url,
         TRY_CAST(s.meta->'usage'->>'prompt_tokens' AS BIGINT) AS prompt_tokens,
         TRY_CAST(s.meta->'usage'->>'completion_tokens' AS BIGINT) AS completion_tokens,
         TRY_CAST(s.meta->'usage'->>'cached_tokens' AS BIGINT) AS cached_tokens,
         TRY_CAST(s.meta->'usage'->>'total_tokens' AS BIGINT) AS total_tokens,
         TRY_CAST(s.meta->>'latency_ms' AS DOUBLE) AS latency_ms,
         TRY_CAST(s.meta->>'cost_usd' AS DOUBLE) AS cost_usd,
         TRY_CAST(s.meta->>'temperature' AS DOUBLE) AS temperature,
         s.meta->>'finish_reason' AS finish_reason,
         s.output->>'content' AS content,
         coalesce(s.meta->'choice'->>'reasoning', s.output->>'reasoning') AS reasoning,
         coalesce(s.output->'tool_calls', '[]'::JSON) AS tool_calls,
         coalesce(json_array_length(s.output->'tool_calls'), 0) AS n_tool_calls,
         coalesce(s.meta->'tools_offered', '[]'::JSON) AS tools_offered,
         coalesce(json_array_length(s.meta->'messages'), 0) AS n_messages,
         s.meta->'messages' AS messages,
         s.meta->'choice' AS choice,
         s.duration_ms, s.attempts, s.error
  FROM steps s
  LEFT JOIN run_tree t USING (run_id)
  WHERE s.kind = 'llm'
),
chosen AS (
  -- The decision record the agent wrote (meta.choice); rebuilt the same way for calls
  -- recorded before it did: every tool called, the offered ones not called, the model's words.
  SELECT *,
         coalesce(from_json(choice->'chosen', '["VARCHAR"]'),
                  list_transform(from_json(tool_calls, '["JSON"]'), lambda x: x->>'name'))
           AS chosen_tools
  FROM calls
)
SELECT * EXCLUDE (choice),
       coalesce(from_json(choice->'alternatives', '["VARCHAR"]'),
                list_filter(from_json(tools_offered, '["VARCHAR"]'),
                            lambda x: NOT list_contains(chosen_tools, x))) AS alternatives,
       CASE WHEN choice IS NOT NULL THEN choice->>'reason'
            ELSE coalesce(nullif(trim(reasoning), ''),
                          CASE WHEN n_tool_calls > 0 THEN nullif(trim(content), '') END)
       END AS reason
FROM chosen;

CREATE OR REPLACE VIEW tool_calls AS
SELECT run_id, seq, ended_at, key, name AS tool, status,
       meta->>'agent' AS agent,
       meta->'arguments' AS arguments,
       output AS result,
       coalesce(meta->>'error', error->>'message') AS error,
       meta->>'decision' AS decision,
       meta->>'tool_call_id' AS tool_call_id,
       duration_ms, attempts
FROM steps
WHERE kind = 'tool';

-- One row per tool call an LLM call chose. The alternatives are the offered tools that call
-- did not choose: a tool called in parallel with this one is a choice, not an alternative.
CREATE OR REPLACE VIEW decisions AS
WITH choices AS (
  SELECT run_id, key AS decision, seq, ended_at, agent, model, tools_offered,
         alternatives, reason, content, reasoning,
         unnest(from_json(tool_calls, '["JSON"]')) AS call
  FROM llm_calls
  WHERE n_tool_calls > 0
)
SELECT c.run_id, c.decision, c.seq, c.ended_at, c.agent, c.model,
       c.call->>'name' AS chosen_tool,
       c.call->>'id' AS tool_call_id,
       c.call->'arguments' AS arguments,
       from_json(c.tools_offered, '["VARCHAR"]') AS tools_offered,
       c.alternatives,
       c.reason,
       c.content, c.reasoning,
       t.key AS tool_step, t.result AS tool_result, t.error AS tool_error,
       t.duration_ms AS tool_duration_ms
FROM choices c
LEFT JOIN tool_calls t
  ON t.run_id = c.run_id AND t.decision = c.decision
 AND t.tool_call_id IS NOT DISTINCT FROM (c.call->>'id');

-- Per (run, agent, model), with the root run and root workflow every figure rolls up to: an
-- agent runs as a child run of the generic workflow polos_agent, so `workflow` alone names
-- that, while `root_workflow` names the workflow that was started (e.g. process_order).
CREATE OR REPLACE VIEW costs AS
SELECT run_id, root_run_id, root_workflow, workflow, agent, model,
       count(*) AS llm_calls,
       sum(prompt_tokens)::BIGINT AS prompt_tokens,
       sum(completion_tokens)::BIGINT AS completion_tokens,
       sum(cached_tokens)::BIGINT AS cached_tokens,
       sum(total_tokens)::BIGINT AS total_tokens,
       sum(cost_usd) AS cost_usd,
       sum(latency_ms) AS llm_ms
FROM llm_calls
GROUP BY ALL;

CREATE OR REPLACE VIEW external_events AS SELECT * FROM raw_external_events;
CREATE OR REPLACE VIEW dead_letters AS SELECT * FROM raw_dead_letters;
CREATE OR REPLACE VIEW commands AS SELECT * FROM raw_commands;
