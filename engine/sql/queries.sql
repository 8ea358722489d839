-- Every query the engine sends, by name. State changes are SQL functions in schema.sql that
-- check their own preconditions; these are the calls. Loaded by engine/db.py.

-- name: schema_version
SELECT engine.schema_version()

-- name: register_functions
SELECT engine.register_functions($1, $2::jsonb, $3)

-- name: registry
SELECT app_id, function_id, triggers FROM engine.functions

-- name: send_events
SELECT id FROM engine.send_events($1::jsonb, $2, $3) AS id

-- name: claim_events
SELECT seq, id, name, data, ts, v, traceparent FROM engine.claim_events($1)

-- name: create_runs
SELECT id, function_id, event_seq, lease_token, created_at
FROM engine.create_runs($1::bigint[], $2::jsonb, $3::uuid, $4::interval)

-- name: claim_runs
SELECT id, function_id, lease_token, attempt, log_lines, cancel_requested, traceparent,
       created_at, claimed_at, event, steps
FROM engine.claim_runs($1, $2::text[], $3::uuid, $4::interval, $5)

-- name: next_due
SELECT engine.next_due($1, $2::text[]) AS next_due, engine.now() AS now

-- name: checkpoint_step
SELECT engine.checkpoint_step($1::uuid, $2::uuid, $3, $4::jsonb)

-- name: suspend_run
SELECT engine.suspend_run($1::uuid, $2::uuid, $3, $4, $5, $6, $7, $8, $9::jsonb)

-- name: finish_run
SELECT engine.finish_run($1::uuid, $2::uuid, $3, $4, $5::jsonb, $6::jsonb, $7)

-- name: heartbeat
SELECT id, cancel_requested FROM engine.heartbeat($1::uuid, $2::interval, $3::uuid[])

-- name: cancel_run
SELECT engine.cancel_run($1::uuid)

-- name: get_run
SELECT * FROM engine.run_details WHERE id = $1::uuid

-- name: run_status
SELECT status FROM engine.runs WHERE id = $1::uuid

-- name: list_runs
SELECT * FROM engine.run_details
WHERE app_id = $1 AND ($2::text IS NULL OR function_id = $2) AND ($3::text IS NULL OR status = $3)
ORDER BY created_at DESC, id
LIMIT $4

-- name: runs_for_event
SELECT d.* FROM engine.run_details d JOIN engine.events e ON e.seq = d.event_seq
WHERE e.id = $1
ORDER BY d.created_at, d.id

-- name: now
SELECT engine.now()
