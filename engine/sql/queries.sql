-- Every query the engine sends, by name. State changes are SQL functions in schema.sql that
-- check their own preconditions; these are the calls. Loaded by engine/db.py.

-- name: schema_version
SELECT engine.schema_version()

-- name: register_functions
SELECT engine.register_functions($1, $2::jsonb, false)

-- name: schema_hash
SELECT value FROM engine.meta WHERE key = 'schema_hash'

-- name: set_schema_hash
INSERT INTO engine.meta (key, value) VALUES ('schema_hash', $1)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: registry
SELECT app_id, function_id, triggers, config FROM engine.functions WHERE active

-- name: registry_version
SELECT value::bigint FROM engine.meta WHERE key = 'registry_version'

-- name: worker_beat
SELECT engine.worker_beat($1::uuid, $2, $3::text[], $4::interval)

-- name: worker_gone
SELECT engine.worker_gone($1::uuid)

-- name: sweep
SELECT engine.sweep($1)

-- name: unserved_runs
SELECT function_id, runs FROM engine.unserved_runs($1)

-- name: function_list
SELECT app_id, function_id, triggers, active, workers, runs, config
FROM engine.function_list($1)

-- name: send_events
SELECT id FROM engine.send_events($1::jsonb, $2, $3) AS id

-- name: send_events_with_key
SELECT id FROM engine.send_events_with_key($1, $2::jsonb, $3) AS id

-- name: create_event_key
SELECT engine.create_event_key($1, $2, $3::text[])

-- name: list_event_keys
SELECT name, prefixes, created_at, revoked_at FROM engine.list_event_keys()

-- name: revoke_event_key
SELECT engine.revoke_event_key($1)

-- name: claim_events
SELECT seq, name, event, traceparent, awaited, registry_version FROM engine.claim_events($1)

-- name: dead_letter
SELECT engine.dead_letter($1::jsonb)

-- name: route_simple
SELECT routed, deferred, id, function_id, event_seq, lease_token, created_at, event, traceparent,
       trace_context
FROM engine.route_simple($1, $2::jsonb, $3::text[], $4, $5, $6::uuid, $7::interval, $8)

-- name: send_and_route
SELECT ids, routed, deferred, id, function_id, event_seq, lease_token, created_at, event,
       traceparent, trace_context
FROM engine.send_and_route($1::jsonb, $2, $3::jsonb, $4::text[], $5, $6, $7::uuid, $8::interval, $9)

-- name: matcher_candidates
SELECT event_seq, run_id, key, kind, expression, trigger FROM engine.matcher_candidates($1::bigint[])

-- name: resolve_matches
SELECT engine.resolve_matches($1::jsonb)

-- name: register_matchers
SELECT key, event_seq, event, resolved
FROM engine.register_matchers($1::uuid, $2::uuid, $3, $4::jsonb, $5::jsonb)

-- name: invoke
SELECT child, skipped
FROM engine.invoke($1::uuid, $2::uuid, $3, $4::jsonb, $5, $6, $7::jsonb, $8, $9::jsonb, $10,
                   $11::jsonb)

-- name: send_step
SELECT result, ids FROM engine.send_step($1::uuid, $2::uuid, $3, $4::jsonb, $5::jsonb, $6)

-- name: due_crons
SELECT function_id, cron, next_at FROM engine.due_crons($1)

-- name: fire_cron
SELECT engine.fire_cron($1, $2, $3, $4, $5, $6::jsonb)

-- name: next_cron
SELECT min(next_at) - engine.now() FROM engine.cron_schedules
WHERE app_id = $1 AND function_id = ANY ($2::text[])

-- name: create_runs
SELECT id, function_id, event_seq, lease_token, created_at, trace_context
FROM engine.create_runs($1::bigint[], $2::jsonb, $3::uuid, $4::interval)

-- name: claim_runs
SELECT id, function_id, lease_token, attempt, log_lines, cancel_requested, traceparent,
       created_at, claimed_at, event, steps, events, state_bytes, taken_over, trace_context,
       log_places
FROM engine.claim_runs($1, $2::text[], $3::uuid, $4::interval, $5, $6, true)

-- name: claim_runs_then_next_due
SELECT id, function_id, lease_token, attempt, log_lines, cancel_requested, traceparent,
       created_at, claimed_at, event, steps, events, state_bytes, taken_over, trace_context,
       log_places, next_due, now
FROM engine.claim_runs_then_next_due($1, $2::text[], $3::uuid, $4::interval, $5, $6, true)

-- name: next_due
SELECT engine.next_due($1, $2::text[]) AS next_due, engine.now() AS now

-- name: checkpoint_step
SELECT engine.checkpoint_step($1::uuid, $2::uuid, $3, $4::jsonb)

-- name: suspend_run
SELECT engine.suspend_run($1::uuid, $2::uuid, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::text[])

-- name: finish_run
SELECT engine.finish_run($1::uuid, $2::uuid, $3, $4, $5::jsonb, $6::jsonb, $7, $8::jsonb)

-- name: start_run_directly
SELECT engine.start_run_directly($1, $2, $3, $4::jsonb, $5::jsonb)

-- name: checkpoint_many
SELECT ord, result FROM engine.checkpoint_many($1::jsonb)

-- name: checkpoint_completed
SELECT engine.checkpoint_completed($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12,
                                   $13::jsonb) AS result

-- name: finish_many
SELECT ord, result FROM engine.finish_many($1::jsonb)

-- A run's end that goes alone, in typed arguments: its steps are the only JSON. A batch of one
-- through finish_many's set form cost the server 0.61 ms against 0.44 (bench/README, session
-- 19).
-- name: finish_alone
SELECT engine.finish_run($1::uuid, $2::uuid, $3, $4, $5::jsonb, $6::jsonb, $7, $8::jsonb, $9,
                         $10::jsonb) AS result

-- name: suspend_many
SELECT ord, result FROM engine.suspend_many($1::jsonb)

-- The same writes for functions declared with Checkpointing(synchronous_commit=False): their
-- transaction commits without waiting for its WAL flush. set_config is read at the commit, so
-- where it sits in the statement does not matter; it lasts until that commit (a pooler's
-- transaction mode keeps it to this transaction too).
-- name: checkpoint_many_relaxed
SELECT ord, result
FROM engine.checkpoint_many($1::jsonb), set_config('synchronous_commit', 'off', true)

-- name: checkpoint_completed_relaxed
SELECT engine.checkpoint_completed($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12,
                                   $13::jsonb) AS result,
       set_config('synchronous_commit', 'off', true)

-- name: finish_many_relaxed
SELECT ord, result
FROM engine.finish_many($1::jsonb), set_config('synchronous_commit', 'off', true)

-- name: finish_alone_relaxed
SELECT engine.finish_run($1::uuid, $2::uuid, $3, $4, $5::jsonb, $6::jsonb, $7, $8::jsonb, $9,
                         $10::jsonb) AS result,
       set_config('synchronous_commit', 'off', true)

-- name: suspend_many_relaxed
SELECT ord, result
FROM engine.suspend_many($1::jsonb), set_config('synchronous_commit', 'off', true)

-- name: checkpoint_steps
SELECT engine.checkpoint_steps($1::uuid, $2::uuid, $3, $4::jsonb)

-- name: replay_histories
-- Runs to replay against the current code (engine/replay_check.py): those in flight and, with a
-- time ($3), those that ended since; in the shape of claim_runs (nothing is claimed).
SELECT r.id, r.function_id, r.status, r.lease_token, r.attempt, r.log_lines, r.cancel_requested,
       r.traceparent, engine.now() AS claimed_at, engine.run_event(r.event_seq) AS event,
       engine.run_steps(r.id) AS steps,
       CASE WHEN r.batch_key IS NOT NULL THEN engine.batch_of(r.id) END AS events,
       0::bigint AS state_bytes, false AS taken_over, r.trace_context, r.log_places
FROM engine.runs r
WHERE r.app_id = $1 AND r.function_id = ANY ($2::text[]) AND r.id > $4::uuid
  AND (r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
       OR (r.status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND r.ended_at >= $3::timestamptz))
ORDER BY r.id
LIMIT $5

-- name: release_orphans
SELECT engine.release_orphans($1, $2::uuid, $3::uuid[])

-- name: heartbeat
SELECT id, cancel_requested, timed_out
FROM engine.heartbeat($1::uuid, $2::interval, $3::uuid[], $4::jsonb)

-- name: cancel_run
SELECT engine.cancel_run($1::uuid, 'cancelled by cancel_run')

-- name: cancel_runs
SELECT engine.cancel_runs($1::uuid[], $2)

-- name: cancellable_runs
SELECT id, event FROM engine.cancellable_runs($1, $2, $3, $4)

-- name: rerun
SELECT engine.rerun($1::uuid, $2)

-- name: get_run
SELECT * FROM engine.run_details WHERE id = $1::uuid

-- name: run_status
SELECT status FROM engine.runs WHERE id = $1::uuid

-- name: list_runs
SELECT * FROM engine.run_details
WHERE ($1::text IS NULL OR app_id = $1) AND ($2::text IS NULL OR function_id = $2)
  AND ($3::text IS NULL OR status = $3)
ORDER BY created_at DESC, id
LIMIT $4

-- name: run_summaries
-- A page of runs newest first, without their steps: the keyset ($7, $8) is where the previous
-- page ended (engine.runs_created_idx). Fetches one more row than the page, to know if more exist.
SELECT r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at, r.started_at,
       r.ended_at, e.id AS event_id, e.name AS event_name
FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
WHERE ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
  AND ($3::text[] IS NULL OR r.status = ANY ($3)) AND ($4::text IS NULL OR e.name = $4)
  AND ($5::timestamptz IS NULL OR r.created_at >= $5)
  AND ($6::timestamptz IS NULL OR r.created_at < $6)
  AND ($7::timestamptz IS NULL OR (r.created_at, r.id) < ($7, $8::uuid))
ORDER BY r.created_at DESC, r.id DESC
LIMIT $9

-- name: ended_run_summaries
-- run_summaries for one finished status ($3 holds exactly one): the condition spelt out lets the
-- planner walk runs_status_created_idx backwards from the keyset, rather than every run newest
-- first past those of other statuses (all of them when none matches).
SELECT r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at, r.started_at,
       r.ended_at, e.id AS event_id, e.name AS event_name
FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
WHERE r.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED') AND r.status = ($3::text[])[1]
  AND ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
  AND ($4::text IS NULL OR e.name = $4)
  AND ($5::timestamptz IS NULL OR r.created_at >= $5)
  AND ($6::timestamptz IS NULL OR r.created_at < $6)
  AND ($7::timestamptz IS NULL OR (r.created_at, r.id) < ($7, $8::uuid))
ORDER BY r.created_at DESC, r.id DESC
LIMIT $9

-- name: event_page
-- Stored events newest first (by seq, the order they were stored): of one name, received in a
-- time range, before the keyset $4; or those with id $5 (a reused id: the newest first).
SELECT e.seq, e.id, e.name, e.data, e.ts, e.v, e.received_at, e.dead_lettered_at, e.error,
       EXISTS (SELECT 1 FROM engine.event_queue q WHERE q.seq = e.seq) AS pending,
       (SELECT count(*) FROM engine.runs r WHERE r.event_seq = e.seq) AS runs
FROM engine.events e
WHERE ($1::text IS NULL OR e.name = $1) AND ($2::timestamptz IS NULL OR e.received_at >= $2)
  AND ($3::timestamptz IS NULL OR e.received_at < $3) AND ($4::bigint IS NULL OR e.seq < $4)
  AND ($5::text IS NULL OR e.id = $5)
ORDER BY e.seq DESC
LIMIT $6

-- name: event_id_known
SELECT EXISTS (SELECT 1 FROM engine.event_ids WHERE id = $1 AND expires_at > engine.now())

-- name: event_pending
SELECT EXISTS (
    SELECT 1 FROM engine.event_queue q JOIN engine.events e ON e.seq = q.seq WHERE e.id = $1
)

-- name: runs_for_event
SELECT d.* FROM engine.run_details d JOIN engine.events e ON e.seq = d.event_seq
WHERE e.id = $1
ORDER BY d.created_at, d.id

-- name: now
SELECT engine.now()

-- name: advance_clock
SELECT engine.advance_clock($1::interval, $2::timestamptz)

-- name: gauges
SELECT engine.gauges($1::interval)

-- name: clock_offset
SELECT offset_by FROM engine.clock WHERE singleton

-- name: restore_clock_offset
UPDATE engine.clock SET offset_by = $1::interval WHERE singleton RETURNING offset_by

-- name: note_executing
SELECT engine.note_executing($1::uuid, $2::uuid, $3, $4::jsonb)

-- name: prune_turn
SELECT engine.prune_turn($1::uuid, $2::interval)

-- name: prune_rest
SELECT engine.prune_rest($1::uuid, $2::interval)

-- name: prune_history
SELECT engine.prune_history($1::interval, $2)

-- name: prune_bookkeeping
SELECT engine.prune_bookkeeping($1::interval, $2)

-- The dashboard's Functions, Workers and Bulk pages (engine/web/overview.py). Reads only, but
-- for the bulk actions and Invoke, which call the state-changing functions above.

-- name: overview_functions
-- The registry with each function's live workers and cron schedules (next_at: the tick the
-- scheduler fires next).
SELECT f.app_id, f.function_id, f.triggers, f.config, f.active,
       (SELECT count(*) FROM engine.workers w
        WHERE w.app_id = f.app_id AND f.function_id = ANY (w.functions)
          AND w.expires_at > now()) AS workers,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('cron', c.cron, 'next_at', c.next_at)
                                  ORDER BY c.cron), '[]')
        FROM engine.cron_schedules c
        WHERE c.app_id = f.app_id AND c.function_id = f.function_id) AS crons
FROM engine.functions f
WHERE $1::text IS NULL OR f.app_id = $1
ORDER BY f.app_id, f.function_id

-- name: overview_unfinished
-- The runs not over, by function, status and why they wait (flow control, or no live worker):
-- exact counts read through the partial indexes of unfinished runs (runs_due_idx and
-- runs_leased_idx, as engine.take_gauges does), so finished runs cost nothing however many.
-- backlog: due and claimed by nobody. $2: the durable time (engine.now() per row, in the
-- grouping, cost 20 µs a run).
SELECT r.app_id, r.function_id, r.status, engine.flow_reason(r, $2) AS flow,
       r.blocked_on, r.waiting_reason = engine.unserved_reason() AS unserved,
       count(*) AS runs, max(r.waiting_reason) AS example,
       count(*) FILTER (WHERE r.status <> 'RUNNING' AND r.due_at <= $2) AS backlog,
       min(r.due_at) FILTER (WHERE r.status <> 'RUNNING' AND r.due_at <= $2) AS oldest_due
FROM engine.runs r
WHERE (r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING') OR r.status = 'RUNNING')
  AND ($1::text IS NULL OR r.app_id = $1)
GROUP BY r.app_id, r.function_id, r.status, flow, r.blocked_on, unserved

-- name: overview_recent
-- Each function's runs created since $2 by status, among its newest $3 at most: a bounded walk
-- of runs_function_idx per function (counting every finished run of a busy function would read
-- them all). oldest: the creation time of the oldest run counted.
SELECT f.app_id, f.function_id, s.status, count(*) AS runs, min(s.created_at) AS oldest
FROM engine.functions f
CROSS JOIN LATERAL (
    SELECT r.status, r.created_at FROM engine.runs r
    WHERE r.app_id = f.app_id AND r.function_id = f.function_id AND r.created_at >= $2
    ORDER BY r.created_at DESC
    LIMIT $3) s
WHERE $1::text IS NULL OR f.app_id = $1
GROUP BY f.app_id, f.function_id, s.status

-- name: overview_workers
-- The workers as their heartbeats left them (alive: not expired; an expired row lasts until the
-- next sweep), and the durable time leases are measured on.
SELECT w.owner, w.app_id, w.functions, w.started_at, w.seen_at, w.expires_at,
       w.expires_at > now() AS alive, engine.now() AS clock
FROM engine.workers w
ORDER BY w.app_id, w.started_at, w.owner

-- name: overview_leases
-- The runs leased to a worker (RUNNING: runs_leased_idx), with the steps executing as the
-- worker's last heartbeat reported them (a report of an earlier execution, before a takeover,
-- is not this one's), and when this execution claimed the run.
SELECT r.id, r.app_id, r.function_id, r.lease_owner, r.lease_token, r.lease_expires_at,
       r.started_at, r.cancel_requested,
       CASE WHEN coalesce((r.executing ->> 'token')::bigint, r.lease_token) = r.lease_token
            THEN engine.executing_steps(r.executing) ELSE '[]' END AS executing,
       (SELECT x.claimed_at FROM engine.run_executions x
        WHERE x.run_id = r.id AND x.lease_token = r.lease_token) AS claimed_at
FROM engine.runs r
WHERE r.status = 'RUNNING'
ORDER BY r.lease_owner, r.lease_expires_at, r.id
LIMIT $1

-- name: bulk_preview
-- How many runs a bulk action's filter matches (the filter of run_summaries), counting at most
-- $7 of them newest first, with how many of those are not over yet.
SELECT count(*) AS runs,
       count(*) FILTER (WHERE m.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING',
                                           'WAITING')) AS not_over
FROM (
    SELECT r.status FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
    WHERE ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
      AND ($3::text[] IS NULL OR r.status = ANY ($3)) AND ($4::text IS NULL OR e.name = $4)
      AND ($5::timestamptz IS NULL OR r.created_at >= $5)
      AND ($6::timestamptz IS NULL OR r.created_at < $6)
    ORDER BY r.created_at DESC, r.id DESC
    LIMIT $7) m

-- name: bulk_preview_ended
-- bulk_preview for one finished status ($3 holds exactly one): through runs_status_created_idx,
-- as ended_run_summaries (a rare status is counted without reading the other runs). The preview
-- queries read a run's event only to filter on its name.
SELECT count(*) AS runs, 0::bigint AS not_over
FROM (
    SELECT 1 FROM engine.runs r
    WHERE r.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED')
      AND r.status = ($3::text[])[1]
      AND ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
      AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM engine.events e
                                         WHERE e.seq = r.event_seq AND e.name = $4))
      AND ($5::timestamptz IS NULL OR r.created_at >= $5)
      AND ($6::timestamptz IS NULL OR r.created_at < $6)
    ORDER BY r.created_at DESC, r.id DESC
    LIMIT $7) m

-- name: bulk_preview_unfinished
-- bulk_preview for runs not over ($3 holds only such statuses): through the partial indexes of
-- unfinished runs, as dashboard_unfinished_runs.
SELECT count(*) AS runs, count(*) AS not_over
FROM (
    SELECT 1 FROM engine.runs r
    WHERE (r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING') OR r.status = 'RUNNING')
      AND r.status = ANY ($3::text[])
      AND ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
      AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM engine.events e
                                         WHERE e.seq = r.event_seq AND e.name = $4))
      AND ($5::timestamptz IS NULL OR r.created_at >= $5)
      AND ($6::timestamptz IS NULL OR r.created_at < $6)
    ORDER BY r.created_at DESC, r.id DESC
    LIMIT $7) m

-- name: bulk_preview_function
-- bulk_preview for one function of a known app ($1 and $2 given): through runs_function_idx,
-- spelt out so that a generic plan uses it too.
SELECT count(*) AS runs,
       count(*) FILTER (WHERE m.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING',
                                           'WAITING')) AS not_over
FROM (
    SELECT r.status FROM engine.runs r
    WHERE r.app_id = $1 AND r.function_id = $2
      AND ($3::text[] IS NULL OR r.status = ANY ($3)) AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM engine.events e
                                         WHERE e.seq = r.event_seq AND e.name = $4))
      AND ($5::timestamptz IS NULL OR r.created_at >= $5)
      AND ($6::timestamptz IS NULL OR r.created_at < $6)
    ORDER BY r.created_at DESC
    LIMIT $7) m

-- name: bulk_unfinished_runs
-- run_summaries for runs not over ($3 holds only such statuses), as dashboard_unfinished_runs
-- without the events: the pages of a bulk action on runs not over.
SELECT r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at, r.started_at,
       r.ended_at, e.id AS event_id, e.name AS event_name
FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
WHERE (r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING') OR r.status = 'RUNNING')
  AND ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
  AND r.status = ANY ($3::text[]) AND ($4::text IS NULL OR e.name = $4)
  AND ($5::timestamptz IS NULL OR r.created_at >= $5)
  AND ($6::timestamptz IS NULL OR r.created_at < $6)
  AND ($7::timestamptz IS NULL OR (r.created_at, r.id) < ($7, $8::uuid))
ORDER BY r.created_at DESC, r.id DESC
LIMIT $9

-- name: rerun_many
SELECT engine.rerun(r, NULL) AS id FROM unnest($1::uuid[]) WITH ORDINALITY AS x (r, n) ORDER BY n

-- name: function_config
SELECT config FROM engine.functions WHERE app_id = $1 AND function_id = $2

-- name: insert_invoked_event
-- The event of a run started from the dashboard's Invoke (no parent run: see engine.invoke).
INSERT INTO engine.events (id, name, data, ts, received_at, traceparent)
VALUES ($1, 'engine/function.invoked', $2::jsonb, engine.now(), engine.now(), $3)
RETURNING seq

-- name: insert_invoked_run
SELECT r.id, r.status, r.waiting_reason
FROM engine.insert_run($1, $2, $3, NULL, NULL, $4, $5::jsonb, engine.now()) r

-- name: dashboard_run_search
-- The dashboard's search by an expression: the next $9 runs newest first (the filters and keyset
-- of run_summaries), of which only those whose event matches the prefilter $10 (a SQL/JSON path
-- predicate that keeps every run the expression matches, engine/web/prefilter.py; NULL: all)
-- come back, with their events for the expression itself (evaluated in Python), and the last
-- run read (where the next batch starts). place: the run's place among the runs read (1, 2...);
-- scanned: how many were read.
SELECT c.* FROM (
    SELECT s.*, coalesce($10::jsonpath IS NULL OR s.event @@ $10::jsonpath, false) AS candidate,
           row_number() OVER (ORDER BY s.created_at DESC, s.id DESC) AS place,
           count(*) OVER () AS scanned
    FROM (
        SELECT r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at,
               r.started_at, r.ended_at, e.id AS event_id, e.name AS event_name,
               jsonb_build_object('id', e.id, 'name', e.name, 'data', e.data, 'ts', e.ts, 'v', e.v)
                   AS event
        FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
        WHERE ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
          AND ($3::text[] IS NULL OR r.status = ANY ($3)) AND ($4::text IS NULL OR e.name = $4)
          AND ($5::timestamptz IS NULL OR r.created_at >= $5)
          AND ($6::timestamptz IS NULL OR r.created_at < $6)
          AND ($7::timestamptz IS NULL OR (r.created_at, r.id) < ($7, $8::uuid))
        ORDER BY r.created_at DESC, r.id DESC
        LIMIT $9
    ) s
) c
WHERE c.candidate OR c.place = c.scanned
ORDER BY c.created_at DESC, c.id DESC

-- name: dashboard_ended_search
-- dashboard_run_search for one finished status (see ended_run_summaries).
SELECT c.* FROM (
    SELECT s.*, coalesce($10::jsonpath IS NULL OR s.event @@ $10::jsonpath, false) AS candidate,
           row_number() OVER (ORDER BY s.created_at DESC, s.id DESC) AS place,
           count(*) OVER () AS scanned
    FROM (
        SELECT r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at,
               r.started_at, r.ended_at, e.id AS event_id, e.name AS event_name,
               jsonb_build_object('id', e.id, 'name', e.name, 'data', e.data, 'ts', e.ts, 'v', e.v)
                   AS event
        FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
        WHERE r.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED')
          AND r.status = ($3::text[])[1]
          AND ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
          AND ($4::text IS NULL OR e.name = $4)
          AND ($5::timestamptz IS NULL OR r.created_at >= $5)
          AND ($6::timestamptz IS NULL OR r.created_at < $6)
          AND ($7::timestamptz IS NULL OR (r.created_at, r.id) < ($7, $8::uuid))
        ORDER BY r.created_at DESC, r.id DESC
        LIMIT $9
    ) s
) c
WHERE c.candidate OR c.place = c.scanned
ORDER BY c.created_at DESC, c.id DESC

-- name: dashboard_unfinished_search
-- dashboard_run_search for runs not over (see dashboard_unfinished_runs).
SELECT c.* FROM (
    SELECT s.*, coalesce($10::jsonpath IS NULL OR s.event @@ $10::jsonpath, false) AS candidate,
           row_number() OVER (ORDER BY s.created_at DESC, s.id DESC) AS place,
           count(*) OVER () AS scanned
    FROM (
        SELECT r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at,
               r.started_at, r.ended_at, e.id AS event_id, e.name AS event_name,
               jsonb_build_object('id', e.id, 'name', e.name, 'data', e.data, 'ts', e.ts, 'v', e.v)
                   AS event
        FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
        WHERE (r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING') OR r.status = 'RUNNING')
          AND ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
          AND r.status = ANY ($3::text[]) AND ($4::text IS NULL OR e.name = $4)
          AND ($5::timestamptz IS NULL OR r.created_at >= $5)
          AND ($6::timestamptz IS NULL OR r.created_at < $6)
          AND ($7::timestamptz IS NULL OR (r.created_at, r.id) < ($7, $8::uuid))
        ORDER BY r.created_at DESC, r.id DESC
        LIMIT $9
    ) s
) c
WHERE c.candidate OR c.place = c.scanned
ORDER BY c.created_at DESC, c.id DESC

-- name: dashboard_function_names
-- The functions the dashboard's filters offer (the registry is small).
SELECT app_id, function_id, active FROM engine.functions ORDER BY function_id, app_id

-- name: dashboard_event_runs
-- The runs each listed event started (by event seq), oldest first, at most $2 in all.
SELECT r.event_seq, r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at,
       r.started_at, r.ended_at
FROM engine.runs r
WHERE r.event_seq = ANY ($1::bigint[])
ORDER BY r.event_seq DESC, r.created_at, r.id
LIMIT $2

-- name: dashboard_events
-- The Events page: event_page's columns, newest first before the keyset $3, of one name ($1),
-- without the engine's own events (engine/...) unless $2.
SELECT e.seq, e.id, e.name, e.data, e.ts, e.v, e.received_at, e.dead_lettered_at, e.error,
       EXISTS (SELECT 1 FROM engine.event_queue q WHERE q.seq = e.seq) AS pending,
       (SELECT count(*) FROM engine.runs r WHERE r.event_seq = e.seq) AS runs
FROM engine.events e
WHERE ($1::text IS NULL OR e.name = $1) AND ($2 OR e.name NOT LIKE 'engine/%')
  AND ($3::bigint IS NULL OR e.seq < $3)
ORDER BY e.seq DESC
LIMIT $4

-- name: testing_due
-- What engine.testing.run_function needs to move durable time for one app: when its next work
-- is due, whether a run of it executes now, whether an event waits to be routed, now, and the
-- status and open waits of the run it drives ($3), read in the same snapshot (a status or steps
-- read before may be stale: the run may have ended since, leaving nothing due, or reached a
-- wait whose mocked event is still to be sent).
SELECT engine.next_due($1, $2::text[]) AS next_due,
       engine.now() AS now,
       (SELECT r.status FROM engine.runs r WHERE r.id = $3::uuid) AS run_status,
       ARRAY(SELECT s.step_key FROM engine.steps s
             WHERE s.run_id = $3::uuid AND s.kind = 'wait' AND s.status = 'WAITING') AS waits,
       EXISTS (SELECT 1 FROM engine.runs r
               WHERE r.app_id = $1 AND r.status = 'RUNNING') AS busy,
       EXISTS (SELECT 1 FROM engine.event_queue q WHERE q.due_at <= engine.now()) AS routing

-- name: dashboard_unfinished_runs
-- dashboard_run_search for runs not over ($3 holds only such statuses): their condition, spelt
-- out, lets the planner read the partial indexes of unfinished runs (runs_due_idx,
-- runs_leased_idx) and sort the few it finds, where a walk of every run newest first would
-- read past the finished ones, all of them when none matches.
SELECT r.id, r.app_id, r.function_id, r.status, r.waiting_reason, r.created_at, r.started_at,
       r.ended_at, e.id AS event_id, e.name AS event_name,
       jsonb_build_object('id', e.id, 'name', e.name, 'data', e.data, 'ts', e.ts, 'v', e.v)
           AS event
FROM engine.runs r JOIN engine.events e ON e.seq = r.event_seq
WHERE (r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING') OR r.status = 'RUNNING')
  AND ($1::text IS NULL OR r.app_id = $1) AND ($2::text IS NULL OR r.function_id = $2)
  AND r.status = ANY ($3::text[]) AND ($4::text IS NULL OR e.name = $4)
  AND ($5::timestamptz IS NULL OR r.created_at >= $5)
  AND ($6::timestamptz IS NULL OR r.created_at < $6)
  AND ($7::timestamptz IS NULL OR (r.created_at, r.id) < ($7, $8::uuid))
ORDER BY r.created_at DESC, r.id DESC
LIMIT $9

-- name: bulk_action_start
-- A bulk action as a job (engine/web/bulk_jobs.py). $1 is the request's idempotency key: posting
-- the same form twice starts one job (the existing one is returned).
INSERT INTO engine.bulk_actions AS b (id, action, filter, expected, created_at, updated_at)
VALUES ($1, $2, $3::jsonb, $4, engine.now(), engine.now())
ON CONFLICT (id) DO UPDATE SET id = b.id
RETURNING b.id, (xmax = 0) AS created

-- name: bulk_action_take
-- The job to advance by one batch, locked until the batch commits; nothing when it is over or
-- another process holds it (its batch is in flight).
SELECT id, action, filter, after_at, after_id
FROM engine.bulk_actions
WHERE id = $1 AND state = 'running'
FOR UPDATE SKIP LOCKED

-- name: bulk_action_advance
-- Records a batch: the cursor after its last run, what it looked at and did; done when the batch
-- was the last.
UPDATE engine.bulk_actions
SET after_at = $2, after_id = $3, matched = matched + $4, acted = acted + $5,
    state = CASE WHEN $6 THEN 'done' ELSE state END,
    ended_at = CASE WHEN $6 THEN engine.now() END, updated_at = engine.now()
WHERE id = $1

-- name: bulk_action_end
-- Ends a job that is still running: stopped by a person, or failed ($3: why).
UPDATE engine.bulk_actions
SET state = $2, error = $3, ended_at = engine.now(), updated_at = engine.now()
WHERE id = $1 AND state = 'running'
RETURNING id

-- name: bulk_actions_running
-- The jobs to carry on, oldest first (bulk_actions_running_idx).
SELECT id FROM engine.bulk_actions WHERE state = 'running' ORDER BY created_at LIMIT $1

-- name: bulk_actions_recent
-- The newest jobs, for the Bulk page (bulk_actions_created_idx).
SELECT id, action, filter, expected, state, matched, acted, error, created_at, updated_at,
       ended_at
FROM engine.bulk_actions ORDER BY created_at DESC LIMIT $1
