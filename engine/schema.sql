-- engine: durable functions on PostgreSQL. This file is the whole database contract.
--
-- Apply it with `psql -f schema.sql` (or `engine migrate`). It is idempotent: applying it
-- again upgrades functions in place and leaves data alone. Everything lives in schema `engine`.
--
-- How data flows
-- --------------
--   send_events()          an event row in `events`, plus a row in `event_queue`
--        |                 (a statement trigger NOTIFYs `engine_wakeup`: a hint, never data)
--        v
--   claim_events()         a worker locks due queue rows (FOR UPDATE SKIP LOCKED), evaluates
--   create_runs()          the CEL triggers of the registered `functions` in Python, and inserts
--        |                 one run per matching function in the same transaction
--        v
--   claim_runs()           due runs (queued, sleeping, retrying) and runs whose lease expired are
--        |                 leased to one worker, with their recorded steps, in one round trip
--        v
--   checkpoint_step()      each step's result is committed under the lease before the run moves on
--   suspend_run()          a sleep or a retry backoff releases the run with a due time (a timer)
--   finish_run()           the run ends COMPLETED, FAILED or CANCELLED
--
-- Every write a worker makes names its lease (owner + lease_token). A worker that lost its lease
-- gets 'lost' back and records nothing. Time comes from engine.now(), which tests can move.

SET client_min_messages = warning;
BEGIN;

-- Two processes applying the schema at once would race on CREATE ... IF NOT EXISTS.
SELECT pg_advisory_xact_lock(hashtext('engine.schema'));

CREATE SCHEMA IF NOT EXISTS engine;

CREATE TABLE IF NOT EXISTS engine.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO engine.meta (key, value) VALUES ('schema_version', '1')
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

CREATE OR REPLACE FUNCTION engine.schema_version() RETURNS int
LANGUAGE sql STABLE AS $$ SELECT value::int FROM engine.meta WHERE key = 'schema_version' $$;

-- ---------------------------------------------------------------------------------------------
-- The clock. Durable time (sleeps, backoffs, due events) is the database's time plus an offset
-- that is zero in production. Tests move it forward instead of sleeping for real.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.clock (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    offset_by interval NOT NULL DEFAULT '0'
);
INSERT INTO engine.clock (singleton) VALUES (true) ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION engine.now() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT statement_timestamp() + (SELECT offset_by FROM engine.clock WHERE singleton)
$$;

-- ---------------------------------------------------------------------------------------------
-- Events
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.events (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text NOT NULL,
    name        text NOT NULL,
    data        jsonb NOT NULL,
    ts          timestamptz NOT NULL,
    v           text,
    received_at timestamptz NOT NULL,
    traceparent text
);
CREATE INDEX IF NOT EXISTS events_id_idx ON engine.events (id);
CREATE INDEX IF NOT EXISTS events_name_idx ON engine.events (name, seq);

-- User-given event ids deduplicate for 24 hours: a second event with the same id inside the
-- window is stored once. A row whose window passed is taken over by the next event.
CREATE TABLE IF NOT EXISTS engine.event_ids (
    id         text PRIMARY KEY,
    seq        bigint NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Events not yet routed to functions. Rows are deleted when routed, so the table stays small.
CREATE TABLE IF NOT EXISTS engine.event_queue (
    seq    bigint PRIMARY KEY REFERENCES engine.events (seq) ON DELETE CASCADE,
    due_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS event_queue_due_idx ON engine.event_queue (due_at, seq);

-- ---------------------------------------------------------------------------------------------
-- Functions: the registry workers and senders keep current, so that any worker can route any
-- event to every function that it triggers, whichever app the function belongs to.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.functions (
    app_id      text NOT NULL,
    function_id text NOT NULL,
    triggers    jsonb NOT NULL DEFAULT '[]',
    config      jsonb NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, function_id)
);

-- ---------------------------------------------------------------------------------------------
-- Runs and steps
-- ---------------------------------------------------------------------------------------------
-- status: QUEUED, RUNNING, SLEEPING, RETRYING (non-terminal);
--         COMPLETED, FAILED, CANCELLED, SKIPPED (terminal: a terminal run never changes).
CREATE TABLE IF NOT EXISTS engine.runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id           text NOT NULL,
    function_id      text NOT NULL,
    status           text NOT NULL CHECK (status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING',
                                                     'COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED')),
    event_seq        bigint NOT NULL REFERENCES engine.events (seq) ON DELETE CASCADE,
    -- Exactly one run per (function, cause): 'event:<seq>' for event-triggered runs.
    dedupe_key       text,
    due_at           timestamptz NOT NULL,
    waiting_reason   text,
    lease_owner      uuid,
    lease_token      bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    attempt          int NOT NULL DEFAULT 0,     -- attempts of the function body (errors outside steps)
    log_lines        int NOT NULL DEFAULT 0,     -- lines ctx.logger emitted, so replays stay quiet
    cancel_requested boolean NOT NULL DEFAULT false,
    output           jsonb,
    error            jsonb,
    traceparent      text,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    ended_at         timestamptz,
    updated_at       timestamptz NOT NULL
) WITH (fillfactor = 80);  -- runs are updated in place: leave room for HOT updates
CREATE UNIQUE INDEX IF NOT EXISTS runs_dedupe_idx
    ON engine.runs (app_id, function_id, dedupe_key) WHERE dedupe_key IS NOT NULL;
-- The claim reads only these two partial indexes: finished runs never slow it down.
CREATE INDEX IF NOT EXISTS runs_due_idx
    ON engine.runs (app_id, due_at) WHERE status IN ('QUEUED', 'SLEEPING', 'RETRYING');
CREATE INDEX IF NOT EXISTS runs_leased_idx
    ON engine.runs (app_id, lease_expires_at) WHERE status = 'RUNNING';
CREATE INDEX IF NOT EXISTS runs_event_idx ON engine.runs (event_seq);
CREATE INDEX IF NOT EXISTS runs_function_idx ON engine.runs (app_id, function_id, created_at DESC);

-- status: COMPLETED, FAILED (terminal), SLEEPING, RETRYING.
-- The primary key refuses a second record of a step; a terminal step is never rewritten.
CREATE TABLE IF NOT EXISTS engine.steps (
    run_id     uuid NOT NULL REFERENCES engine.runs (id) ON DELETE CASCADE,
    step_key   text NOT NULL,
    position   int NOT NULL,
    kind       text NOT NULL,
    status     text NOT NULL CHECK (status IN ('COMPLETED', 'FAILED', 'SLEEPING', 'RETRYING')),
    attempts   int NOT NULL DEFAULT 1,
    output     jsonb,
    error      jsonb,
    wake_at    timestamptz,
    created_at timestamptz NOT NULL,
    ended_at   timestamptz,
    PRIMARY KEY (run_id, step_key)
);

-- ---------------------------------------------------------------------------------------------
-- Wake-ups. NOTIFY is a hint that carries no data; workers poll as a safety net. It fires once
-- per statement (never per row, never from a step checkpoint): every notifying commit takes one
-- instance-wide lock, so notifications must stay off the hot path.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION engine.notify_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('engine_wakeup', 'events');
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER event_queue_notify
    AFTER INSERT ON engine.event_queue
    FOR EACH STATEMENT EXECUTE FUNCTION engine.notify_events();

-- Runs created already leased by the worker that routed them wake nobody.
CREATE OR REPLACE FUNCTION engine.notify_runs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_runs WHERE status = 'QUEUED') THEN
        PERFORM pg_notify('engine_wakeup', 'runs');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER runs_notify
    AFTER INSERT ON engine.runs
    REFERENCING NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION engine.notify_runs();

-- ---------------------------------------------------------------------------------------------
-- Sending events. Any language can call engine.send_event() inside its own transaction: the
-- event exists only if that transaction commits. Errors use SQLSTATE class 'EN' (see errors.py).
-- Limits: 5,000 events per call, names of 1 to 512 characters, 512 KiB of JSON per event.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION engine.check_event(p_name text, p_data jsonb, p_system boolean)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_name IS NULL OR length(p_name) = 0 THEN
        RAISE EXCEPTION 'event name is required' USING ERRCODE = 'EN001';
    END IF;
    IF length(p_name) > 512 THEN
        RAISE EXCEPTION 'event name is % characters long; the limit is 512', length(p_name)
            USING ERRCODE = 'EN001';
    END IF;
    IF NOT p_system AND p_name LIKE 'engine/%' THEN
        RAISE EXCEPTION 'event name "%" uses the reserved prefix "engine/"', p_name
            USING ERRCODE = 'EN001';
    END IF;
    IF jsonb_typeof(p_data) <> 'object' THEN
        RAISE EXCEPTION 'event "%": data must be a JSON object, not %', p_name, jsonb_typeof(p_data)
            USING ERRCODE = 'EN001';
    END IF;
    IF octet_length(p_data::text) > 512 * 1024 THEN
        RAISE EXCEPTION 'event "%": data is % bytes; the limit is 524288', p_name, octet_length(p_data::text)
            USING ERRCODE = 'EN001';
    END IF;
END $$;

-- p_events: a JSON array of {name, data, id?, ts?, v?}. Returns the event ids in order.
CREATE OR REPLACE FUNCTION engine.send_events(
    p_events jsonb, p_traceparent text DEFAULT NULL, p_system boolean DEFAULT false)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := engine.now();
    v_event jsonb;
    v_id    text;
    v_data  jsonb;
    v_ts    timestamptz;
    v_seq   bigint;
    v_fresh boolean;
BEGIN
    IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'events must be a JSON array' USING ERRCODE = 'EN001';
    END IF;
    IF jsonb_array_length(p_events) > 5000 THEN
        RAISE EXCEPTION 'cannot send % events at once; the limit is 5000', jsonb_array_length(p_events)
            USING ERRCODE = 'EN001';
    END IF;
    FOR v_event IN SELECT value FROM jsonb_array_elements(p_events) LOOP
        v_data := coalesce(nullif(v_event -> 'data', 'null'::jsonb), '{}'::jsonb);
        PERFORM engine.check_event(v_event ->> 'name', v_data, p_system);
        v_ts := coalesce((v_event ->> 'ts')::timestamptz, v_now);
        v_id := v_event ->> 'id';
        IF v_id IS NOT NULL THEN
            v_fresh := NULL;
            INSERT INTO engine.event_ids AS known (id, seq, expires_at)
            VALUES (v_id, 0, v_now + interval '24 hours')
            ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at
                WHERE known.expires_at <= v_now
            RETURNING true INTO v_fresh;
            IF v_fresh IS NULL THEN  -- seen inside its 24-hour window: stored once, starts nothing
                RETURN NEXT v_id;
                CONTINUE;
            END IF;
        ELSE
            v_id := gen_random_uuid()::text;
        END IF;
        INSERT INTO engine.events (id, name, data, ts, v, received_at, traceparent)
        VALUES (v_id, v_event ->> 'name', v_data, v_ts, v_event ->> 'v', v_now,
                coalesce(v_event ->> 'traceparent', p_traceparent))
        RETURNING seq INTO v_seq;
        UPDATE engine.event_ids SET seq = v_seq WHERE id = v_id AND v_event ? 'id';
        INSERT INTO engine.event_queue (seq, due_at) VALUES (v_seq, greatest(v_ts, v_now));
        RETURN NEXT v_id;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION engine.send_event(
    name text, data jsonb, id text DEFAULT NULL, ts timestamptz DEFAULT NULL,
    traceparent text DEFAULT NULL)
RETURNS text LANGUAGE sql AS $$
    SELECT engine.send_events(
        jsonb_build_array(jsonb_strip_nulls(jsonb_build_object('name', name, 'data', data, 'id', id, 'ts', ts))),
        traceparent)
$$;

-- ---------------------------------------------------------------------------------------------
-- The function registry
-- ---------------------------------------------------------------------------------------------
-- p_functions: [{function_id, triggers, config}]. With p_replace, functions of the app that are
-- not listed are removed (a worker starting with the current code); without it, only upserted.
CREATE OR REPLACE FUNCTION engine.register_functions(p_app text, p_functions jsonb, p_replace boolean)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO engine.functions AS f (app_id, function_id, triggers, config, updated_at)
    SELECT p_app, x.function_id, x.triggers, x.config, now()
    FROM jsonb_to_recordset(p_functions) AS x(function_id text, triggers jsonb, config jsonb)
    ON CONFLICT (app_id, function_id) DO UPDATE
        SET triggers = excluded.triggers, config = excluded.config, updated_at = now()
        WHERE (f.triggers, f.config) IS DISTINCT FROM (excluded.triggers, excluded.config);
    IF p_replace THEN
        DELETE FROM engine.functions f
        WHERE f.app_id = p_app
          AND f.function_id NOT IN (SELECT x ->> 'function_id' FROM jsonb_array_elements(p_functions) x);
    END IF;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Routing events to runs (one transaction: claim_events, then create_runs)
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION engine.claim_events(p_limit int)
RETURNS TABLE (seq bigint, id text, name text, data jsonb, ts timestamptz, v text, traceparent text)
LANGUAGE sql AS $$
    SELECT e.seq, e.id, e.name, e.data, e.ts, e.v, e.traceparent
    FROM engine.event_queue q JOIN engine.events e ON e.seq = q.seq
    WHERE q.due_at <= engine.now()
    ORDER BY q.due_at, q.seq
    LIMIT p_limit
    FOR UPDATE OF q SKIP LOCKED
$$;

-- p_runs: [{app_id, function_id, event_seq, claim}]. Runs with claim=true are created RUNNING
-- and leased to p_owner (the router executes them at once); the others are QUEUED.
-- Returns the runs leased to p_owner. The unique dedupe key makes routing exactly-once.
CREATE OR REPLACE FUNCTION engine.create_runs(
    p_seqs bigint[], p_runs jsonb, p_owner uuid, p_lease interval)
RETURNS TABLE (id uuid, function_id text, event_seq bigint, lease_token bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := engine.now();
BEGIN
    DELETE FROM engine.event_queue q WHERE q.seq = ANY (p_seqs);
    RETURN QUERY
    INSERT INTO engine.runs AS r (app_id, function_id, status, event_seq, dedupe_key, due_at,
                                  lease_owner, lease_token, lease_expires_at, traceparent,
                                  created_at, started_at, updated_at)
    SELECT x.app_id, x.function_id,
           CASE WHEN x.claim THEN 'RUNNING' ELSE 'QUEUED' END,
           x.event_seq, 'event:' || x.event_seq, v_now,
           CASE WHEN x.claim THEN p_owner END,
           CASE WHEN x.claim THEN 1 ELSE 0 END,
           CASE WHEN x.claim THEN v_now + p_lease END,
           e.traceparent, v_now,
           CASE WHEN x.claim THEN v_now END,
           v_now
    FROM jsonb_to_recordset(p_runs) AS x(app_id text, function_id text, event_seq bigint, claim boolean)
    JOIN engine.events e ON e.seq = x.event_seq
    ON CONFLICT (app_id, function_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING r.id, r.function_id, r.event_seq, r.lease_token, r.created_at;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Claiming runs
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION engine.run_event(p_seq bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', e.id, 'name', e.name, 'data', e.data, 'ts', e.ts, 'v', e.v)
    FROM engine.events e WHERE e.seq = p_seq
$$;

CREATE OR REPLACE FUNCTION engine.run_steps(p_run uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'key', s.step_key, 'position', s.position, 'kind', s.kind, 'status', s.status,
               'attempts', s.attempts, 'output', s.output, 'error', s.error, 'wake_at', s.wake_at)
               ORDER BY s.position), '[]'::jsonb)
    FROM engine.steps s WHERE s.run_id = p_run
$$;

-- What a run did, for get_run and dashboards: the run, its event and its steps.
CREATE OR REPLACE VIEW engine.run_details AS
SELECT r.id, r.app_id, r.function_id, r.status, r.attempt, r.waiting_reason, r.due_at,
       r.output, r.error, r.created_at, r.started_at, r.ended_at, r.event_seq,
       engine.run_event(r.event_seq) AS event, engine.run_steps(r.id) AS steps
FROM engine.runs r;

-- Leases up to p_limit runs of the given functions to p_owner: due queued, sleeping and
-- retrying runs, and running runs whose lease expired (their worker died). Returns each run with
-- its event and its recorded steps, so a claimed run replays with no further round trip.
CREATE OR REPLACE FUNCTION engine.claim_runs(
    p_app text, p_functions text[], p_owner uuid, p_lease interval, p_limit int)
RETURNS TABLE (id uuid, function_id text, lease_token bigint, attempt int, log_lines int,
               cancel_requested boolean, traceparent text, created_at timestamptz,
               claimed_at timestamptz, event jsonb, steps jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := engine.now();
    v_ids uuid[];
BEGIN
    WITH due AS (
        SELECT r.id FROM engine.runs r
        WHERE r.app_id = p_app AND r.status IN ('QUEUED', 'SLEEPING', 'RETRYING')
          AND r.due_at <= v_now AND r.function_id = ANY (p_functions)
        ORDER BY r.due_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), expired AS (
        SELECT r.id FROM engine.runs r
        WHERE r.app_id = p_app AND r.status = 'RUNNING'
          AND r.lease_expires_at < v_now AND r.function_id = ANY (p_functions)
        ORDER BY r.lease_expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), picked AS (
        SELECT d.id FROM due d UNION ALL SELECT x.id FROM expired x LIMIT p_limit
    ), claimed AS (
        UPDATE engine.runs r
        SET status = 'RUNNING', lease_owner = p_owner, lease_token = r.lease_token + 1,
            lease_expires_at = v_now + p_lease, started_at = coalesce(r.started_at, v_now),
            waiting_reason = NULL, updated_at = v_now
        FROM picked WHERE r.id = picked.id
        RETURNING r.id
    )
    SELECT array_agg(c.id) INTO v_ids FROM claimed c;

    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- A sleep whose time has come is over: record it so that replay returns at once.
    UPDATE engine.steps s SET status = 'COMPLETED', ended_at = s.wake_at
    WHERE s.run_id = ANY (v_ids) AND s.status = 'SLEEPING' AND s.wake_at <= v_now;

    RETURN QUERY
    SELECT r.id, r.function_id, r.lease_token, r.attempt, r.log_lines, r.cancel_requested,
           r.traceparent, r.created_at, v_now, engine.run_event(r.event_seq), engine.run_steps(r.id)
    FROM engine.runs r WHERE r.id = ANY (v_ids);
END $$;

-- The earliest time at which something becomes claimable for these functions (or routable).
CREATE OR REPLACE FUNCTION engine.next_due(p_app text, p_functions text[]) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(r.due_at) FROM engine.runs r
         WHERE r.app_id = p_app AND r.status IN ('QUEUED', 'SLEEPING', 'RETRYING')
           AND r.function_id = ANY (p_functions)),
        (SELECT min(r.lease_expires_at) FROM engine.runs r
         WHERE r.app_id = p_app AND r.status = 'RUNNING' AND r.function_id = ANY (p_functions)),
        (SELECT min(q.due_at) FROM engine.event_queue q))
$$;

-- ---------------------------------------------------------------------------------------------
-- Writes under a lease. Each returns 'ok', 'cancel' (ok, and a cancel was requested), 'lost'
-- (the lease is no longer ours: nothing was written) or 'duplicate' (the step is already final).
-- ---------------------------------------------------------------------------------------------
-- Locks the run row FOR KEY SHARE: a concurrent claim (FOR UPDATE SKIP LOCKED) skips the run
-- rather than slipping a new lease in between this check and the insert.
CREATE OR REPLACE FUNCTION engine.hold_lease(p_run uuid, p_owner uuid, p_token bigint)
RETURNS boolean LANGUAGE sql AS $$
    SELECT r.cancel_requested FROM engine.runs r
    WHERE r.id = p_run AND r.lease_owner = p_owner AND r.lease_token = p_token AND r.status = 'RUNNING'
    FOR KEY SHARE
$$;

CREATE OR REPLACE FUNCTION engine.record_step(p_run uuid, p_step jsonb) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := engine.now();
    v_ok  boolean;
BEGIN
    INSERT INTO engine.steps AS s (run_id, step_key, position, kind, status, attempts, output,
                                   error, wake_at, created_at, ended_at)
    VALUES (p_run, p_step ->> 'key', (p_step ->> 'position')::int, p_step ->> 'kind',
            p_step ->> 'status', (p_step ->> 'attempts')::int, p_step -> 'output', p_step -> 'error',
            (p_step ->> 'wake_at')::timestamptz, v_now,
            CASE WHEN p_step ->> 'status' IN ('COMPLETED', 'FAILED') THEN v_now END)
    ON CONFLICT (run_id, step_key) DO UPDATE
        SET status = excluded.status, attempts = excluded.attempts, output = excluded.output,
            error = excluded.error, wake_at = excluded.wake_at, ended_at = excluded.ended_at
        WHERE s.status NOT IN ('COMPLETED', 'FAILED')
    RETURNING true INTO v_ok;
    RETURN coalesce(v_ok, false);
END $$;

-- p_step: {key, position, kind, status, attempts, output, error, wake_at}
CREATE OR REPLACE FUNCTION engine.checkpoint_step(p_run uuid, p_owner uuid, p_token bigint, p_step jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_cancel boolean := engine.hold_lease(p_run, p_owner, p_token);
BEGIN
    IF v_cancel IS NULL THEN
        RETURN 'lost';
    END IF;
    IF NOT engine.record_step(p_run, p_step) THEN
        RETURN 'duplicate';
    END IF;
    RETURN CASE WHEN v_cancel THEN 'cancel' ELSE 'ok' END;
END $$;

-- Releases the run until p_due (a sleep, a retry backoff, or a worker handing work back),
-- recording p_steps (sleep steps) first. A run whose cancel was requested ends CANCELLED instead.
CREATE OR REPLACE FUNCTION engine.suspend_run(
    p_run uuid, p_owner uuid, p_token bigint, p_status text, p_due timestamptz, p_reason text,
    p_attempt int, p_log_lines int, p_steps jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := engine.now();
    v_cancel boolean := engine.hold_lease(p_run, p_owner, p_token);
    v_step   jsonb;
BEGIN
    IF v_cancel IS NULL THEN
        RETURN 'lost';
    END IF;
    FOR v_step IN SELECT value FROM jsonb_array_elements(p_steps) LOOP
        PERFORM engine.record_step(p_run, v_step);
    END LOOP;
    UPDATE engine.runs r
    SET status = CASE WHEN v_cancel THEN 'CANCELLED' ELSE p_status END,
        due_at = p_due, waiting_reason = CASE WHEN v_cancel THEN NULL ELSE p_reason END,
        attempt = p_attempt, log_lines = greatest(r.log_lines, p_log_lines),
        ended_at = CASE WHEN v_cancel THEN v_now END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = v_now
    WHERE r.id = p_run;
    IF p_status = 'QUEUED' AND NOT v_cancel THEN
        PERFORM pg_notify('engine_wakeup', 'runs');  -- handed back: wake another worker
    END IF;
    RETURN CASE WHEN v_cancel THEN 'cancel' ELSE 'ok' END;
END $$;

-- Ends a run: p_status is COMPLETED, FAILED or CANCELLED.
CREATE OR REPLACE FUNCTION engine.finish_run(
    p_run uuid, p_owner uuid, p_token bigint, p_status text, p_output jsonb, p_error jsonb,
    p_log_lines int)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := engine.now();
BEGIN
    UPDATE engine.runs r
    SET status = p_status, output = p_output, error = p_error, ended_at = v_now,
        log_lines = greatest(r.log_lines, p_log_lines),
        lease_owner = NULL, lease_expires_at = NULL, waiting_reason = NULL, updated_at = v_now
    WHERE r.id = p_run AND r.lease_owner = p_owner AND r.lease_token = p_token AND r.status = 'RUNNING';
    RETURN CASE WHEN FOUND THEN 'ok' ELSE 'lost' END;
END $$;

-- Extends the leases of the runs a worker still executes; reports the ones it lost and any
-- cancel requests (so a run with a long step learns of a cancel without a checkpoint).
CREATE OR REPLACE FUNCTION engine.heartbeat(p_owner uuid, p_lease interval, p_runs uuid[])
RETURNS TABLE (id uuid, cancel_requested boolean)
LANGUAGE sql AS $$
    UPDATE engine.runs r SET lease_expires_at = engine.now() + p_lease
    WHERE r.id = ANY (p_runs) AND r.lease_owner = p_owner AND r.status = 'RUNNING'
    RETURNING r.id, r.cancel_requested
$$;

-- ---------------------------------------------------------------------------------------------
-- Management
-- ---------------------------------------------------------------------------------------------
-- A queued, sleeping or retrying run is cancelled at once; a running one is flagged and its
-- worker ends it between steps. Returns the run's status after the call (NULL: no such run).
CREATE OR REPLACE FUNCTION engine.cancel_run(p_run uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := engine.now();
    v_status text;
BEGIN
    UPDATE engine.runs r
    SET cancel_requested = true,
        status = CASE WHEN r.status = 'RUNNING' THEN r.status ELSE 'CANCELLED' END,
        ended_at = CASE WHEN r.status = 'RUNNING' THEN NULL ELSE v_now END,
        waiting_reason = NULL, updated_at = v_now
    WHERE r.id = p_run AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING')
    RETURNING r.status INTO v_status;
    IF v_status IS NULL THEN
        SELECT r.status INTO v_status FROM engine.runs r WHERE r.id = p_run;
    END IF;
    RETURN v_status;
END $$;

-- Deletes finished runs (with their steps) and routed events older than p_age. Events still
-- referenced by a kept run stay.
CREATE OR REPLACE FUNCTION engine.prune(p_age interval) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff timestamptz := engine.now() - p_age;
    v_runs   bigint;
BEGIN
    DELETE FROM engine.runs r
    WHERE r.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED') AND r.ended_at < v_cutoff;
    GET DIAGNOSTICS v_runs = ROW_COUNT;
    DELETE FROM engine.events e
    WHERE e.received_at < v_cutoff
      AND NOT EXISTS (SELECT 1 FROM engine.runs r WHERE r.event_seq = e.seq)
      AND NOT EXISTS (SELECT 1 FROM engine.event_queue q WHERE q.seq = e.seq);
    DELETE FROM engine.event_ids i WHERE i.expires_at < v_cutoff;
    RETURN v_runs;
END $$;

COMMIT;
