-- engine: durable functions on PostgreSQL. This file is the whole database contract.
--
-- Apply it with `psql -f schema.sql` (or `engine migrate`). It is idempotent: applying it
-- again upgrades functions in place and leaves data alone. Everything lives in schema `engine`;
-- for an Engine(schema="engine_billing") the engine rewrites the schema's name where it
-- qualifies an object (engine.runs), in `SCHEMA engine` and in the channel `engine_wakeup`
-- (engine/pg_schema.py): name the schema only in these forms here.
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
--   checkpoint_completed() each step's result is committed under the lease before the run moves on
--                          (checkpoint_many(): the steps of several runs, in one commit)
--   suspend_run()          a sleep or a retry backoff releases the run with a due time (a timer)
--   finish_run()           the run ends COMPLETED, FAILED or CANCELLED
--
-- Every write a worker makes names its lease (owner + lease_token). A worker that lost its lease
-- gets 'lost' back and records nothing. Time comes from engine.now(), which tests can move.

SET client_min_messages = warning;
BEGIN;

-- Two processes applying the schema at once would race on CREATE ... IF NOT EXISTS.
-- (An advisory lock only while the schema does not exist yet: roles are granted later. After
-- that, a table lock that no role but the owner and the worker can take.)
DO $$
BEGIN
    IF to_regclass('engine.meta') IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('engine.schema'));
    ELSE
        LOCK TABLE engine.meta IN SHARE ROW EXCLUSIVE MODE;
    END IF;
END $$;

CREATE SCHEMA IF NOT EXISTS engine;

CREATE TABLE IF NOT EXISTS engine.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
-- `engine migrate` stores the hash of the text it applied here, and does nothing while it is the
-- same; applying this file any other way (psql) makes the next `engine migrate` apply it again.
DELETE FROM engine.meta WHERE key = 'schema_hash';

-- Creates an index unless one of that name exists. CREATE INDEX IF NOT EXISTS locks the table
-- against writes before it looks (and so waits behind any open transaction that wrote to it):
-- re-applying an unchanged schema must not block sends. An index whose definition changes is
-- dropped in its version's upgrade block and created again here.
CREATE OR REPLACE FUNCTION engine.ensure_index(p_name text, p_definition text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass('engine.' || p_name) IS NULL THEN
        EXECUTE p_definition;
    END IF;
END $$;

-- Adds a column to an engine table unless it has it (or the table does not exist yet: it is
-- created below with the column). Looked up in the catalog: nothing is locked when it is there.
CREATE OR REPLACE FUNCTION engine.ensure_column(p_table text, p_column text, p_type text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass('engine.' || p_table) IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass('engine.' || p_table)
              AND a.attname = p_column AND NOT a.attisdropped) THEN
        EXECUTE format('ALTER TABLE engine.%I ADD COLUMN %I %s', p_table, p_column, p_type);
    END IF;
END $$;

-- Drops the engine functions named p_names that have no argument (in or out) p_argument: the
-- signatures of earlier builds, which CREATE OR REPLACE cannot change in place.
CREATE OR REPLACE FUNCTION engine.drop_without_argument(p_names text[], p_argument text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_fn regprocedure;
BEGIN
    FOR v_fn IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = 'engine'::regnamespace AND p.proname = ANY (p_names)
          AND NOT p_argument = ANY (coalesce(p.proargnames, '{}'))
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_fn);
    END LOOP;
END $$;

-- Upgrades from earlier versions: constraints and partial indexes whose definitions changed are
-- dropped here and created again below; new columns are added.
DO $$
BEGIN
    IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 2 THEN
        ALTER TABLE engine.runs DROP CONSTRAINT IF EXISTS runs_status_check;
        ALTER TABLE engine.steps DROP CONSTRAINT IF EXISTS steps_status_check;
        DROP FUNCTION IF EXISTS engine.cancel_run(uuid);
        DROP FUNCTION IF EXISTS engine.suspend_run(uuid, uuid, bigint, text, timestamptz, text,
                                                   int, int, jsonb);
        DROP FUNCTION IF EXISTS engine.claim_events(int);
        DROP FUNCTION IF EXISTS engine.register_functions(text, jsonb, boolean);
        DROP INDEX IF EXISTS engine.runs_due_idx;
        ALTER TABLE engine.runs
            ADD COLUMN IF NOT EXISTS parent_run_id uuid,
            ADD COLUMN IF NOT EXISTS start_deadline timestamptz,
            ADD COLUMN IF NOT EXISTS finish_timeout interval,
            ADD COLUMN IF NOT EXISTS finish_deadline timestamptz,
            ADD CONSTRAINT runs_status_check CHECK (status IN (
                'QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING',
                'COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED'));
        ALTER TABLE engine.steps
            ADD COLUMN IF NOT EXISTS event_seq bigint,
            ADD CONSTRAINT steps_status_check CHECK (status IN (
                'COMPLETED', 'FAILED', 'SLEEPING', 'RETRYING', 'WAITING'));
    END IF;
END $$;

DO $$
BEGIN
    IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 3 THEN
        ALTER TABLE engine.runs
            ADD COLUMN IF NOT EXISTS concurrency jsonb,
            ADD COLUMN IF NOT EXISTS blocked_on text,
            ADD COLUMN IF NOT EXISTS singleton_key text,
            ADD COLUMN IF NOT EXISTS throttle jsonb,
            ADD COLUMN IF NOT EXISTS debounce_key text,
            ADD COLUMN IF NOT EXISTS debounce_until timestamptz;
        DROP FUNCTION IF EXISTS engine.invoke(uuid, uuid, bigint, jsonb, text, text, jsonb,
                                              timestamptz, jsonb, text);
        DROP FUNCTION IF EXISTS engine.fire_cron(text, text, text, timestamptz, timestamptz);
        DROP FUNCTION IF EXISTS engine.claim_events(int);
    END IF;
END $$;

DO $$
BEGIN
    IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 4 THEN
        ALTER TABLE engine.runs
            ADD COLUMN IF NOT EXISTS batch_key text,
            ADD COLUMN IF NOT EXISTS batch_size int,
            ADD COLUMN IF NOT EXISTS batch_max int;
        DROP FUNCTION IF EXISTS engine.claim_runs(text, text[], uuid, interval, int);
        DROP FUNCTION IF EXISTS engine.take_permits(jsonb);
    END IF;
END $$;

DO $$
BEGIN
    IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 5 THEN
        ALTER TABLE engine.runs ADD COLUMN IF NOT EXISTS rank_at timestamptz;
        DROP INDEX IF EXISTS engine.runs_blocked_idx;
    END IF;
END $$;

DO $$
BEGIN
    IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 6 THEN
        DROP FUNCTION IF EXISTS engine.invoke(uuid, uuid, bigint, jsonb, text, text, jsonb,
                                              timestamptz, jsonb, text, jsonb);
    END IF;
END $$;

DO $$
BEGIN
    IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 7 THEN
        DROP FUNCTION IF EXISTS engine.finish_run(uuid, uuid, bigint, text, jsonb, jsonb, int);
    END IF;
END $$;

-- v9 (replay by step id and place): a step's id as the code gave it and its place in its
-- branch, so that replay matches steps whatever the order concurrent branches run in.
DO $$ BEGIN IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 9 THEN
    ALTER TABLE engine.steps
        ADD COLUMN IF NOT EXISTS step_id text,
        ADD COLUMN IF NOT EXISTS follows text;
END IF; END $$;

-- v9 (deploys): the registry is what every live worker serves (a worker starting no longer
-- deletes what workers of another version registered); functions no worker serves go inactive.
DO $$ BEGIN IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 9 THEN
    DROP FUNCTION IF EXISTS engine.register_functions(text, jsonb, boolean);
    DROP FUNCTION IF EXISTS engine.event_lock(text);  -- routing locks rows now (event_names)
    DROP FUNCTION IF EXISTS engine.prune(interval);  -- now in batches: prune(interval, int)
    ALTER TABLE engine.functions
        ADD COLUMN IF NOT EXISTS active boolean NOT NULL DEFAULT true,
        ADD COLUMN IF NOT EXISTS live_until timestamptz NOT NULL DEFAULT now();
    -- Workers of the previous version do not heartbeat: give them time to be replaced.
    UPDATE engine.functions SET live_until = now() + interval '10 minutes';
    -- Runs whose function a replacing registration deleted: their function is listed again,
    -- inactive, so that the sweep enforces their timeouts and says why nobody runs them.
    INSERT INTO engine.functions (app_id, function_id, active, live_until)
    SELECT DISTINCT r.app_id, r.function_id, false, now() FROM engine.runs r
    WHERE r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
    ON CONFLICT DO NOTHING;
END IF; END $$;

-- v9 (run ids, cancels, run state): run ids take a per-database salt and length-prefixed names
-- (engine.event_run_id); claim_runs takes the state limit; steps record their size and may be
-- CANCELLED (an open step of a run that ended).
DO $$ BEGIN IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 9 THEN
    DROP FUNCTION IF EXISTS engine.event_run_id(text, text, bigint);
    DROP FUNCTION IF EXISTS engine.claim_runs(text, text[], uuid, interval, int);
    ALTER TABLE engine.steps DROP CONSTRAINT IF EXISTS steps_status_check;
    ALTER TABLE engine.steps
        ADD COLUMN IF NOT EXISTS bytes bigint,
        ADD CONSTRAINT steps_status_check CHECK (status IN (
            'COMPLETED', 'FAILED', 'SLEEPING', 'RETRYING', 'WAITING', 'CANCELLED')) NOT VALID;
    -- The runs still under way get their size, so the claim can refuse one that is too large.
    UPDATE engine.steps s
    SET bytes = coalesce(octet_length(s.output::text), 0) + coalesce(octet_length(s.error::text), 0)
    FROM engine.runs r
    WHERE r.id = s.run_id AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING');
END IF; END $$;

-- v9 (poison events, #11): check_event bounds every field of an event; claim_events returns
-- the event as JSON (a BC ts failed asyncpg's decoding of the whole batch); events that cannot
-- be routed are dead-lettered (error, dead_lettered_at) instead of stopping routing.
DO $$ BEGIN IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 9 THEN
    DROP FUNCTION IF EXISTS engine.check_event(text, jsonb, boolean);
    DROP FUNCTION IF EXISTS engine.claim_events(int);
    ALTER TABLE engine.events
        ADD COLUMN IF NOT EXISTS dead_lettered_at timestamptz,
        ADD COLUMN IF NOT EXISTS error jsonb;
END IF; END $$;

-- v9 (worker robustness, #11): the heartbeat reports a passed finish timeout on its own and
-- records the steps executing (runs.executing), which a takeover counts as failed attempts;
-- claim_runs says which runs it took over. Checked in the catalog rather than by version:
-- databases of earlier builds of version 9 have the older signatures. Nothing is locked when
-- everything is in place already.
SELECT engine.ensure_column('runs', 'executing', 'jsonb');
SELECT engine.drop_without_argument('{claim_runs}', 'taken_over');
SELECT engine.drop_without_argument('{heartbeat}', 'timed_out');
-- claim_runs learns whether its caller replays ctx.patched markers (below, engine.claim_runs).
SELECT engine.drop_without_argument('{claim_runs}', 'p_replays_patches');

-- v10 (run history, #14): each step keeps its final attempt's start and worker, failed attempts
-- and executions get tables of their own, and each run its own trace context. record_step,
-- suspend_run and finish_run take the worker, the body's error and its traceback (internal
-- signatures: callers pass JSON items); claim_runs returns the trace context.
DO $$ BEGIN IF (SELECT value::int FROM engine.meta WHERE key = 'schema_version') < 10 THEN
    DROP FUNCTION IF EXISTS engine.record_step(uuid, jsonb);
    DROP FUNCTION IF EXISTS engine.suspend_run(uuid, uuid, bigint, text, timestamptz, text, int,
                                               int, jsonb, text[]);
    DROP FUNCTION IF EXISTS engine.finish_run(uuid, uuid, bigint, text, jsonb, jsonb, int, jsonb);
    DROP FUNCTION IF EXISTS engine.claim_runs(text, text[], uuid, interval, int, bigint);
    DROP FUNCTION IF EXISTS engine.create_runs(bigint[], jsonb, uuid, interval);
    DROP FUNCTION IF EXISTS engine.insert_runs(jsonb, uuid, interval);
    DROP FUNCTION IF EXISTS engine.route_simple(int, jsonb, text[], bigint, text, uuid, interval, int);
    ALTER TABLE engine.steps
        ADD COLUMN IF NOT EXISTS started_at timestamptz,
        ADD COLUMN IF NOT EXISTS worker uuid;
    ALTER TABLE engine.runs ADD COLUMN IF NOT EXISTS trace_context text;
END IF; END $$;

-- v10 (CLI, #14): function_list returns each function's config (its flow control), for
-- `engine functions list`; a new result column needs the old function dropped. Checked in the
-- catalog rather than by version: databases of earlier builds of version 10 have the old one.
SELECT engine.drop_without_argument('{function_list}', 'config');

-- v10 (ctx.logger, #12): runs count the lines ctx.logger emitted at each place after a step
-- (log_places), not only at the run's tail; suspend_run, finish_run and claim_runs carry them.
-- Checked in the catalog: databases of earlier builds of version 10 lack them.
SELECT engine.ensure_column('runs', 'log_places', 'jsonb');
SELECT engine.drop_without_argument('{suspend_run,finish_run}', 'p_log_places');
SELECT engine.drop_without_argument('{claim_runs}', 'log_places');

-- v10 (retention): engine.prune_registry returns its counts by table (jsonb) instead of a total.
-- Checked in the catalog: the old signature may exist at any version.
DO $$ BEGIN
    IF (SELECT p.prorettype FROM pg_proc p
        WHERE p.oid = to_regprocedure('engine.prune_registry(interval, integer)')) <> 'jsonb'::regtype
    THEN
        DROP FUNCTION engine.prune_registry(interval, integer);
    END IF;
END $$;

-- v11 (step input, #15): a `run` step's arguments (engine/step_input.py), kept with the step and
-- with each failed attempt, for the history only. Checked in the catalog: no version bump.
SELECT engine.ensure_column('steps', 'input', 'jsonb');
SELECT engine.ensure_column('step_attempts', 'input', 'jsonb');

-- v11 (claim order): runs_due_idx gains event_seq, the claim's tie-breaker (see the index).
-- Checked in the catalog: databases of earlier builds of version 11 have the old index.
DO $$ BEGIN
    IF pg_get_indexdef(to_regclass('engine.runs_due_idx')) NOT LIKE '%due_at, event_seq)%' THEN
        DROP INDEX engine.runs_due_idx;
    END IF;
END $$;

-- v11 (HTTP event API, #15): event keys (engine.event_keys) and the functions that create, list,
-- revoke and send with them; new objects only, created below (CREATE ... IF NOT EXISTS, CREATE
-- OR REPLACE): nothing of version 10 changes.
INSERT INTO engine.meta (key, value) VALUES ('schema_version', '11')
ON CONFLICT (key) DO UPDATE SET value = excluded.value;
-- A random id of this database's install, created once (re-applying this file never changes
-- it; an upgraded database gets one here): run ids are salted with it (engine.run_id_salt).
INSERT INTO engine.meta (key, value) VALUES ('install_id', gen_random_uuid()::text)
ON CONFLICT DO NOTHING;
-- Bumped by every change of engine.functions: routers reload the registry when it moves, so no
-- event is routed with a stale view of the functions it triggers.
INSERT INTO engine.meta (key, value) VALUES ('registry_version', '0') ON CONFLICT DO NOTHING;

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
    traceparent text,
    -- A dead letter: an event that could not be routed (its data could not be read, a trigger
    -- or key expression failed on it, or creating its runs failed) is taken off the queue with
    -- the reason ({type, message}) instead of stopping routing for everyone. No run started.
    dead_lettered_at timestamptz,
    error       jsonb
);
SELECT engine.ensure_index('events_id_idx', $index$
CREATE INDEX IF NOT EXISTS events_id_idx ON engine.events (id)$index$);
SELECT engine.ensure_index('events_name_idx', $index$
CREATE INDEX IF NOT EXISTS events_name_idx ON engine.events (name, seq)$index$);
SELECT engine.ensure_index('events_dead_idx', $index$
CREATE INDEX IF NOT EXISTS events_dead_idx ON engine.events (dead_lettered_at)
    WHERE dead_lettered_at IS NOT NULL$index$);

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
SELECT engine.ensure_index('event_queue_due_idx', $index$
CREATE INDEX IF NOT EXISTS event_queue_due_idx ON engine.event_queue (due_at, seq)$index$);

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
    -- Routing starts runs of active functions only. A function is active while a live worker
    -- serves it (engine.workers) or until live_until (real time, not durable time: moving the
    -- durable clock in a test must not retire functions), which a registration pushes forward.
    active      boolean NOT NULL DEFAULT true,
    live_until  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, function_id)
);

-- Whether the plain triggers of a function (no expression) can be routed in SQL
-- (engine.route_events): it has no flow control, as the worker that registered it decided
-- (its Python knows the options; SQL does not repeat the list). NULL: registered by an engine
-- that did not say, so its events are routed in Python, as every event once was.
ALTER TABLE engine.functions ADD COLUMN IF NOT EXISTS routes_in_sql boolean;

-- The active functions by the names their triggers fire on. A routing tick looks up the
-- functions of other apps that its events trigger (engine.routed_in_python, route_events)
-- instead of receiving every trigger of the schema (+2.4-3.2 ms a tick with 2,000 functions);
-- a run's end asks whether a function is triggered by the system event it sends
-- (engine.emit_system_event), where a containment test on every function's triggers cost it
-- 0.24 ms with 200 functions registered and 1.4-1.7 ms with 2,000. fastupdate off: the registry
-- changes when workers start, and a lookup never reads a list of pending entries (until a
-- vacuum, 2,000 new functions made each tick 0.3 ms slower).
-- A partial index of the functions naming an engine/ event served the run's end before this one
-- existed: this one serves both.
DROP INDEX IF EXISTS engine.functions_system_triggers_idx;
SELECT engine.ensure_index('functions_triggers_idx', $index$
CREATE INDEX IF NOT EXISTS functions_triggers_idx ON engine.functions
    USING gin (triggers jsonb_path_ops) WITH (fastupdate = off) WHERE active$index$);

-- The workers alive, with the functions each serves: a row per worker, refreshed by its
-- heartbeat (engine.worker_beat, every few seconds, never per step) and deleted when it stops
-- or, after it expires, by engine.sweep. Several versions of an app may run side by side (a
-- rolling deploy): the union of their functions is routed.
CREATE TABLE IF NOT EXISTS engine.workers (
    owner      uuid PRIMARY KEY,
    app_id     text NOT NULL,
    functions  text[] NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
SELECT engine.ensure_index('workers_app_idx', $index$
CREATE INDEX IF NOT EXISTS workers_app_idx ON engine.workers (app_id)$index$);

-- ---------------------------------------------------------------------------------------------
-- Runs and steps
-- ---------------------------------------------------------------------------------------------
-- The statuses of runs and steps, as functions for the tables' CHECK constraints and the WHEN of
-- runs_ended. The executor reads a CHECK's (and a trigger WHEN's) stored expression anew at
-- every INSERT or UPDATE statement, and an IN list is stored as an array constant written out
-- byte by byte: reading it back cost 6.5 µs a statement (a one-row INSERT in a PL/pgSQL loop:
-- 10.7 µs with `status IN (...)`, 4.1 without a check, 5.9 with this call; a WHEN of two IN lists,
-- 7 µs more than two calls), paid by every step's INSERT and every UPDATE of a run (6.7% of the
-- server's CPU in the throughput scenario, perf). A call is read back in a few tokens.
CREATE OR REPLACE FUNCTION engine.is_run_status(p_status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN p_status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING',
                        'COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED');
END $$;

-- A terminal status of a run (a terminal run never changes).
CREATE OR REPLACE FUNCTION engine.is_final_run_status(p_status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN p_status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED');
END $$;

CREATE OR REPLACE FUNCTION engine.is_step_status(p_status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN p_status IN ('COMPLETED', 'FAILED', 'SLEEPING', 'RETRYING', 'WAITING', 'CANCELLED');
END $$;

-- status: QUEUED, RUNNING, SLEEPING, RETRYING, WAITING (non-terminal);
--         COMPLETED, FAILED, CANCELLED, SKIPPED (terminal: a terminal run never changes).
CREATE TABLE IF NOT EXISTS engine.runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id           text NOT NULL,
    function_id      text NOT NULL,
    status           text NOT NULL CONSTRAINT runs_status_check
                         CHECK (engine.is_run_status(status)),
    event_seq        bigint NOT NULL REFERENCES engine.events (seq) ON DELETE CASCADE,
    -- Exactly one run per (function, cause): 'event:<seq>' for event-triggered runs,
    -- 'cron:<time>' for cron ticks, 'invoke:<parent run>:<step>' for invoked runs.
    dedupe_key       text,
    parent_run_id    uuid,                       -- the run whose step.invoke started this one
    due_at           timestamptz NOT NULL,
    waiting_reason   text,
    lease_owner      uuid,
    lease_token      bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    attempt          int NOT NULL DEFAULT 0,     -- attempts of the function body (errors outside steps)
    log_lines        int NOT NULL DEFAULT 0,     -- lines ctx.logger emitted, so replays stay quiet
    log_places       jsonb,                      -- ... at each place after a step ({place: n})
    cancel_requested boolean NOT NULL DEFAULT false,
    output           jsonb,
    error            jsonb,
    traceparent      text,                       -- the sender's trace context (W3C), if any
    trace_context    text,                       -- the run's own span, minted at its creation
    -- timeouts: start_deadline bounds the first start; finish_deadline (set at the first
    -- start from finish_timeout) bounds the end. Passing either cancels the run.
    start_deadline   timestamptz,
    finish_timeout   interval,
    finish_deadline  timestamptz,
    -- flow control: the concurrency permits the run needs while RUNNING ([{slot, limit}], sorted
    -- by slot), and the slot it is parked on while that slot is full (its due_at is 'infinity'
    -- until a permit is released)
    concurrency      jsonb,
    blocked_on       text,
    singleton_key    text,                       -- at most one active run per key (singleton)
    throttle         jsonb,                      -- {key, interval, burst}: GCRA on first starts
    debounce_key     text,                       -- a debounced run not yet started takes ...
    debounce_until   timestamptz,                -- ... each new event of its key, until then
    batch_key        text,                       -- batch_events: a run not yet started collects
    batch_size       int,                        -- events of its key (engine.batch_events)
    batch_max        int,                        -- until it holds batch_max of them
    rank_at          timestamptz,                -- its place in line: creation shifted by priority
    -- the steps executing ({v, steps: [{key, position, id, follows, attempt, final,
    -- started_at}]}; workers before v10 wrote the bare list) as last reported
    -- (heartbeat): a takeover of its expired lease counts each as a failed attempt
    executing        jsonb,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    ended_at         timestamptz,
    updated_at       timestamptz NOT NULL
) WITH (fillfactor = 80);  -- runs are updated in place: leave room for HOT updates
SELECT engine.ensure_index('runs_dedupe_idx', $index$
CREATE UNIQUE INDEX IF NOT EXISTS runs_dedupe_idx
    ON engine.runs (app_id, function_id, dedupe_key) WHERE dedupe_key IS NOT NULL$index$);
-- The claim reads only these two partial indexes: finished runs never slow it down.
-- runs_due_idx holds the claim's whole order (due_at, then event_seq): runs routed from one
-- batch of events share their due_at, and an index of (app_id, due_at) alone made each claim
-- read and sort all of them to take its few (a backlog of 1,000 runs read 950 rows a claim).
SELECT engine.ensure_index('runs_due_idx', $index$
CREATE INDEX IF NOT EXISTS runs_due_idx
    ON engine.runs (app_id, due_at, event_seq)
    WHERE status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')$index$);
SELECT engine.ensure_index('runs_leased_idx', $index$
CREATE INDEX IF NOT EXISTS runs_leased_idx
    ON engine.runs (app_id, lease_expires_at) WHERE status = 'RUNNING'$index$);
-- Listings newest first (engine runs list), a page at a time: keyset on (created_at, id).
SELECT engine.ensure_index('runs_created_idx', $index$
CREATE INDEX IF NOT EXISTS runs_created_idx ON engine.runs (created_at, id)$index$);
SELECT engine.ensure_index('runs_event_idx', $index$
CREATE INDEX IF NOT EXISTS runs_event_idx ON engine.runs (event_seq)$index$);
-- The sweep finds runs past a timeout here (engine.sweep), whether or not a worker serves them.
SELECT engine.ensure_index('runs_deadline_idx', $index$
CREATE INDEX IF NOT EXISTS runs_deadline_idx
    ON engine.runs (least(finish_deadline, start_deadline))
    WHERE status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
      AND (finish_deadline IS NOT NULL OR start_deadline IS NOT NULL)$index$);
SELECT engine.ensure_index('runs_blocked_idx', $index$
CREATE INDEX IF NOT EXISTS runs_blocked_idx
    ON engine.runs (blocked_on, coalesce(rank_at, created_at), event_seq)
    WHERE blocked_on IS NOT NULL$index$);

SELECT engine.ensure_index('runs_singleton_idx', $index$
CREATE INDEX IF NOT EXISTS runs_singleton_idx ON engine.runs (singleton_key)
    WHERE singleton_key IS NOT NULL
      AND status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')$index$);

SELECT engine.ensure_index('runs_debounce_idx', $index$
CREATE INDEX IF NOT EXISTS runs_debounce_idx ON engine.runs (debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'QUEUED' AND started_at IS NULL$index$);

SELECT engine.ensure_index('runs_batch_idx', $index$
CREATE INDEX IF NOT EXISTS runs_batch_idx ON engine.runs (batch_key)
    WHERE batch_key IS NOT NULL AND status = 'QUEUED' AND started_at IS NULL$index$);

-- The events of a batched run, in order (the first is also the run's event_seq).
CREATE TABLE IF NOT EXISTS engine.batch_events (
    run_id   uuid NOT NULL REFERENCES engine.runs (id) ON DELETE CASCADE,
    position int NOT NULL,
    seq      bigint NOT NULL REFERENCES engine.events (seq) ON DELETE CASCADE,
    PRIMARY KEY (run_id, position)
);

-- Idempotency keys, kept 24 hours: a second run with the same key is SKIPPED.
CREATE TABLE IF NOT EXISTS engine.idempotency_keys (
    key        text PRIMARY KEY,
    run_event  bigint NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Rate limits: the start times admitted in the current window of each key (a sliding log, so
-- "at most N per period" holds over every window, not only aligned ones).
CREATE TABLE IF NOT EXISTS engine.rate_log (
    key text NOT NULL,
    at  timestamptz NOT NULL
);
SELECT engine.ensure_index('rate_log_key_idx', $index$
CREATE INDEX IF NOT EXISTS rate_log_key_idx ON engine.rate_log (key, at)$index$);

-- Throttles (GCRA): per key, the theoretical arrival time of the next start. A run may start when
-- now >= tat - interval * burst; starting moves tat to max(tat, now) + interval.
CREATE TABLE IF NOT EXISTS engine.throttles (
    key text PRIMARY KEY,
    tat timestamptz NOT NULL DEFAULT '-infinity'
);

-- Concurrency permits: one row per slot ('fn:<app>/<fn>' or 'app:<app>', plus '|<key>' for keyed
-- limits) counting its RUNNING runs. A claim takes a permit under the row's lock only while
-- in_use < limit; leaving RUNNING gives it back (trigger runs_released). Counting runs and then
-- claiming would overshoot when workers race; this cannot.
CREATE TABLE IF NOT EXISTS engine.concurrency_slots (
    slot   text PRIMARY KEY,
    in_use int NOT NULL DEFAULT 0 CHECK (in_use >= 0)
);
SELECT engine.ensure_index('runs_function_idx', $index$
CREATE INDEX IF NOT EXISTS runs_function_idx ON engine.runs (app_id, function_id, created_at DESC)$index$);

-- kind: run, sleep, wait (wait_for_event), invoke, send (send_event).
-- status: COMPLETED, FAILED, CANCELLED (terminal; CANCELLED: its run ended before it did),
--         SLEEPING, RETRYING, WAITING (a wait or an invoke).
-- The primary key refuses a second record of a step; a terminal step is never rewritten.
CREATE TABLE IF NOT EXISTS engine.steps (
    run_id     uuid NOT NULL REFERENCES engine.runs (id) ON DELETE CASCADE,
    step_key   text NOT NULL,
    position   int NOT NULL,
    kind       text NOT NULL,
    status     text NOT NULL CONSTRAINT steps_status_check
                   CHECK (engine.is_step_status(status)),
    attempts   int NOT NULL DEFAULT 1,
    output     jsonb,
    error      jsonb,
    wake_at    timestamptz,                  -- a sleep's end; a wait's or an invoke's timeout
    event_seq  bigint,                       -- the event a wait consumed
    created_at timestamptz NOT NULL,
    ended_at   timestamptz,
    step_id    text,    -- the id the code gave (step_key adds a counter to a repeated one)
    follows    text,    -- its place in its branch: '>k' after step k, '+k' a branch's first
                        -- (NULL: recorded before schema version 9); see engine/replay.py
    bytes      bigint,                       -- JSON size of output and error (a run's state)
    started_at timestamptz,                  -- when its last attempt started (a `run` step)
    worker     uuid,                         -- the worker (lease owner) that recorded it
    input      jsonb,   -- a `run` step's arguments {args, kwargs} (NULL: none, or not kept)
    PRIMARY KEY (run_id, step_key)
);

-- v11 (cheaper checks): the status checks of databases created earlier take the functions'
-- form (see engine.is_run_status). Checked in the catalog: no version bump. NOT VALID: the rows
-- there passed the same check in its IN-list form, and validating would read every run and step
-- under the ALTER's lock, which blocks every read and write of the table until this schema
-- commits.
DO $$
DECLARE
    v_check record;
BEGIN
    FOR v_check IN
        SELECT * FROM (VALUES ('engine.runs', 'runs_status_check', 'is_run_status'),
                              ('engine.steps', 'steps_status_check', 'is_step_status'))
                      AS x(tbl, name, fn)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_constraint c
                       WHERE c.conrelid = v_check.tbl::regclass AND c.conname = v_check.name
                         AND pg_get_constraintdef(c.oid) LIKE '%' || v_check.fn || '(status)%') THEN
            EXECUTE format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I, ADD CONSTRAINT %I'
                           ' CHECK (engine.%I(status)) NOT VALID',
                           v_check.tbl, v_check.name, v_check.name, v_check.fn);
        END IF;
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------------
-- History: what a run did, for get_run, the CLI and traces. Written in the transactions that
-- already write the step or the run (never a round trip of its own); deleted with the run.
-- ---------------------------------------------------------------------------------------------
-- Each failed attempt of a `run` step (a successful one is the step's own row: started_at,
-- ended_at, worker), with its error and traceback and, when it was retried, the retry's time.
CREATE TABLE IF NOT EXISTS engine.step_attempts (
    run_id     uuid NOT NULL REFERENCES engine.runs (id) ON DELETE CASCADE,
    step_key   text NOT NULL,
    attempt    int NOT NULL,                 -- 0-based
    outcome    text NOT NULL,                -- RETRYING (retried) or FAILED (for good)
    started_at timestamptz,
    ended_at   timestamptz NOT NULL,
    worker     uuid,
    error      jsonb,                        -- {type, message, traceback}
    retry_at   timestamptz,
    input      jsonb,                        -- its arguments, as engine.steps.input
    PRIMARY KEY (run_id, step_key, attempt)
);

-- Each execution of a run: a claim by a worker (or the routing that started it at once) until
-- the worker let go: the run's status then (outcome; LOST when its lease expired and another
-- worker took it over), when it was due again, and why (due_at, reason). body_error: the error
-- of the function's body when the execution ended in a retry of the whole function.
CREATE TABLE IF NOT EXISTS engine.run_executions (
    run_id      uuid NOT NULL REFERENCES engine.runs (id) ON DELETE CASCADE,
    lease_token bigint NOT NULL,             -- 1 for the first execution, then 2, 3...
    worker      uuid NOT NULL,
    claimed_at  timestamptz NOT NULL,
    taken_over  boolean NOT NULL DEFAULT false,
    waited      text,                        -- why it had waited to start (flow control...)
    ended_at    timestamptz,
    outcome     text,
    due_at      timestamptz,
    reason      text,
    body_error  jsonb,
    PRIMARY KEY (run_id, lease_token)
);

-- The child runs of a run (step.invoke), for its history.
SELECT engine.ensure_index('runs_parent_idx', $index$
CREATE INDEX IF NOT EXISTS runs_parent_idx ON engine.runs (parent_run_id)
    WHERE parent_run_id IS NOT NULL$index$);

-- ---------------------------------------------------------------------------------------------
-- Matchers: what a run waits to hear about. A `wait` (step.wait_for_event) or an `invoke`
-- (step.invoke, waiting for its child's engine/function.finished) completes a WAITING step; a
-- `cancel` (cancel=[Cancel(...)]) cancels the run. A matcher is consumed by deleting it, so the
-- event that resolves it does so exactly once, in the transaction that records the step.
--
-- Races between an event being routed and a matcher being registered are closed by a lock per
-- event name (a row of engine.event_names): routing holds it shared, registration holds it
-- exclusively while it inserts the matcher and looks back for events that arrived since the
-- run's trigger. Every event is then seen by at least one side; the delete decides which one
-- resolves it. Row locks, never advisory locks: any role (engine_sender, engine_reader) may take
-- any advisory lock, and these keys were computable; no role but the worker may lock these rows.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.event_names (
    name text PRIMARY KEY
);

-- Locks the rows of p_names (created when missing), in name order: FOR SHARE, or FOR UPDATE
-- with p_exclusive. A row deleted by engine.prune in between is created again.
CREATE OR REPLACE FUNCTION engine.lock_event_names(p_names text[], p_exclusive boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_names  text[];
    v_locked int;
BEGIN
    -- One name whose row exists (every run's end, most routings): the lock alone, without the
    -- INSERT that would find the row there (5-8 µs a call instead of 15-25).
    IF cardinality(p_names) = 1 AND p_names[1] IS NOT NULL THEN
        IF p_exclusive THEN
            PERFORM 1 FROM engine.event_names n WHERE n.name = p_names[1] FOR UPDATE;
        ELSE
            PERFORM 1 FROM engine.event_names n WHERE n.name = p_names[1] FOR SHARE;
        END IF;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    v_names := ARRAY(SELECT DISTINCT x FROM unnest(p_names) x WHERE x IS NOT NULL ORDER BY 1);
    LOOP
        INSERT INTO engine.event_names (name) SELECT unnest(v_names) ON CONFLICT DO NOTHING;
        IF p_exclusive THEN
            SELECT count(*) INTO v_locked FROM (
                SELECT 1 FROM engine.event_names n WHERE n.name = ANY (v_names)
                ORDER BY n.name FOR UPDATE) l;
        ELSE
            SELECT count(*) INTO v_locked FROM (
                SELECT 1 FROM engine.event_names n WHERE n.name = ANY (v_names)
                ORDER BY n.name FOR SHARE) l;
        END IF;
        EXIT WHEN v_locked = cardinality(v_names);
    END LOOP;
END $$;

CREATE TABLE IF NOT EXISTS engine.matchers (
    run_id      uuid NOT NULL REFERENCES engine.runs (id) ON DELETE CASCADE,
    key         text NOT NULL,          -- the step key of a wait or invoke; 'cancel:<n>'
    kind        text NOT NULL CHECK (kind IN ('wait', 'invoke', 'cancel')),
    event_name  text NOT NULL,
    match_path  text[],                 -- match=: async.data at this path ...
    match_value jsonb,                  -- ... equals this (the trigger's value, or JSON null)
    expression  text,                   -- if_exp: CEL over `event` (the trigger) and `async`
    since_seq   bigint NOT NULL,        -- only events after this one resolve the matcher
    expires_at  timestamptz NOT NULL,   -- 'infinity' when there is no timeout
    on_timeout  jsonb,                  -- the step record written when it expires
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, key)
);
SELECT engine.ensure_index('matchers_name_idx', $index$
CREATE INDEX IF NOT EXISTS matchers_name_idx ON engine.matchers (event_name)$index$);
-- An event finds the matchers it may resolve by their match= value (engine.matcher_candidates),
-- and those without one by name: neither reads the other matchers of the name. A hash index:
-- a value may be any JSON, larger than a btree entry may be.
SELECT engine.ensure_index('matchers_value_idx', $index$
CREATE INDEX IF NOT EXISTS matchers_value_idx ON engine.matchers USING hash (match_value)$index$);
SELECT engine.ensure_index('matchers_unmatched_idx', $index$
CREATE INDEX IF NOT EXISTS matchers_unmatched_idx ON engine.matchers (event_name)
    WHERE match_path IS NULL$index$);
-- Whether some run awaits an event name N is asked as `(SELECT m.event_name FROM
-- engine.matchers m WHERE m.event_name >= N ORDER BY m.event_name LIMIT 1) IS NOT DISTINCT
-- FROM N` (the first awaited name from N on is N), never as EXISTS (... = N): when most matchers
-- await one name (10,000 runs waiting for the same event), the planner expects every name to
-- have that many, and answers EXISTS (and min()) with a sequential scan that "stops at the first
-- row"; for any other name (every routed event, every run's engine/function.finished) it read
-- all the matchers: 4-44 ms a routing with 10,000 waiters. An ordered range with LIMIT 1 is one
-- descent of this index in every plan (0.06-0.24 ms; tests/test_plans.py).

-- ---------------------------------------------------------------------------------------------
-- Cron schedules: one row per (function, cron), holding the next time it fires. Any worker of
-- the app may fire it: the row is claimed with SKIP LOCKED and the run's dedupe key
-- 'cron:<time>' makes each scheduled time start one run.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.cron_schedules (
    app_id      text NOT NULL,
    function_id text NOT NULL,
    cron        text NOT NULL,
    next_at     timestamptz NOT NULL,
    PRIMARY KEY (app_id, function_id, cron),
    FOREIGN KEY (app_id, function_id) REFERENCES engine.functions ON DELETE CASCADE
);

-- ---------------------------------------------------------------------------------------------
-- Gauges: the unfinished runs by app, function, status and flow-control reason, for the metrics
-- workers export. One snapshot row shared by every worker: a snapshot older than the caller's
-- interval is taken again by the one caller that locks the row, while the others get the last
-- one at once. So the scan (of the partial indexes of unfinished runs: finished runs cost
-- nothing) happens once per interval per database, however many workers export.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.gauges (
    id       int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    taken_at timestamptz NOT NULL,
    gauges   jsonb NOT NULL
);

-- Why a run that has not started waits on flow control (NULL: it does not).
CREATE OR REPLACE FUNCTION engine.flow_reason(r engine.runs, p_now timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN r.blocked_on IS NOT NULL THEN 'concurrency'
        WHEN r.status <> 'QUEUED' OR r.started_at IS NOT NULL THEN NULL
        WHEN r.debounce_until IS NOT NULL THEN 'debounce'
        WHEN r.batch_key IS NOT NULL THEN 'batch'
        WHEN r.throttle IS NOT NULL AND r.due_at > p_now THEN 'throttle'
    END
$$;

CREATE OR REPLACE FUNCTION engine.take_gauges(p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(to_jsonb(g)), '[]'::jsonb) FROM (
        SELECT r.app_id, r.function_id, r.status, engine.flow_reason(r, p_now) AS flow,
               count(*) AS runs,
               count(*) FILTER (WHERE r.status <> 'RUNNING' AND r.due_at <= p_now) AS due,
               extract(epoch FROM p_now - min(r.due_at)
                   FILTER (WHERE r.status <> 'RUNNING' AND r.due_at <= p_now)) AS oldest_due_age
        FROM engine.runs r
        WHERE r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING') OR r.status = 'RUNNING'
        GROUP BY 1, 2, 3, 4
    ) g
$$;

CREATE OR REPLACE FUNCTION engine.gauges(p_max_age interval) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_last engine.gauges;
    v_gauges jsonb;
BEGIN
    SELECT * INTO v_last FROM engine.gauges WHERE id = 1;
    IF FOUND AND v_last.taken_at > clock_timestamp() - p_max_age THEN
        RETURN v_last.gauges;
    END IF;
    INSERT INTO engine.gauges (id, taken_at, gauges) VALUES (1, '-infinity', '[]')
    ON CONFLICT (id) DO NOTHING;
    PERFORM 1 FROM engine.gauges WHERE id = 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN  -- another worker is taking it right now
        RETURN coalesce(v_last.gauges, '[]'::jsonb);
    END IF;
    v_gauges := engine.take_gauges(engine.now());
    UPDATE engine.gauges SET taken_at = clock_timestamp(), gauges = v_gauges WHERE id = 1;
    RETURN v_gauges;
END $$;

-- A run's event and steps as JSON (claims, get_run and matchers read them).
CREATE OR REPLACE FUNCTION engine.run_event(p_seq bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', e.id, 'name', e.name, 'data', e.data, 'ts', e.ts, 'v', e.v)
    FROM engine.events e WHERE e.seq = p_seq
$$;

CREATE OR REPLACE FUNCTION engine.run_steps(p_run uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'key', s.step_key, 'position', s.position, 'kind', s.kind, 'status', s.status,
               'attempts', s.attempts, 'output', s.output, 'error', s.error, 'wake_at', s.wake_at,
               'id', s.step_id, 'follows', s.follows)
               ORDER BY s.position), '[]'::jsonb)
    FROM engine.steps s WHERE s.run_id = p_run
$$;

-- Runs p_definition (DDL) unless the object is p_present already with this very definition
-- (remembered in engine.meta under p_key). CREATE TRIGGER locks its table against writes, and
-- CREATE OR REPLACE VIEW its view against reads; each waits for every open transaction that used
-- the table, and everything after queues behind it: re-applying an unchanged schema must not
-- take these locks (a send in a long application transaction would stall all sends and routing).
CREATE OR REPLACE FUNCTION engine.ensure(p_key text, p_present boolean, p_definition text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_present AND EXISTS (SELECT 1 FROM engine.meta m
                             WHERE m.key = p_key AND m.value = md5(p_definition)) THEN
        RETURN;
    END IF;
    EXECUTE p_definition;
    INSERT INTO engine.meta (key, value) VALUES (p_key, md5(p_definition))
    ON CONFLICT (key) DO UPDATE SET value = excluded.value;
END $$;

CREATE OR REPLACE FUNCTION engine.ensure_trigger(p_table regclass, p_name text, p_definition text)
RETURNS void LANGUAGE sql AS $$
    SELECT engine.ensure('trigger:' || p_name,
        EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = p_name),
        p_definition)
$$;

-- A run's steps for get_run and list_runs. Steps too large to build into one value (over
-- 256 MiB: a run recorded before max_state_bytes existed) come without their outputs and errors
-- ("omitted": true), rather than failing the call.
CREATE OR REPLACE FUNCTION engine.run_history(p_run uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN engine.step_history(p_run, true);
EXCEPTION WHEN program_limit_exceeded THEN
    RETURN engine.step_history(p_run, false);
END $$;

CREATE OR REPLACE FUNCTION engine.step_attempt_list(s engine.steps) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(a.entry ORDER BY a.attempt), '[]'::jsonb) FROM (
        SELECT f.attempt, jsonb_build_object(
                   'attempt', f.attempt, 'outcome', f.outcome, 'started_at', f.started_at,
                   'ended_at', f.ended_at, 'worker', f.worker, 'error', f.error,
                   'retry_at', f.retry_at, 'input', f.input) AS entry
        FROM engine.step_attempts f WHERE f.run_id = s.run_id AND f.step_key = s.step_key
        UNION ALL
        SELECT s.attempts - 1, jsonb_build_object(
                   'attempt', s.attempts - 1, 'outcome', 'COMPLETED', 'started_at', s.started_at,
                   'ended_at', s.ended_at, 'worker', s.worker, 'input', s.input)
        WHERE s.status = 'COMPLETED'
    ) a
$$;

-- A run's steps with their attempts and times, for get_run (p_payloads: with their outputs and
-- errors). The attempts of a `run` step: each failed one (engine.step_attempts), then the
-- successful one, which is the step's own row.
CREATE OR REPLACE FUNCTION engine.step_history(p_run uuid, p_payloads boolean) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'key', s.step_key, 'position', s.position, 'kind', s.kind, 'status', s.status,
               'attempts', s.attempts,
               'output', CASE WHEN p_payloads THEN s.output END,
               'error', CASE WHEN p_payloads THEN s.error END,
               'input', CASE WHEN p_payloads THEN s.input END,
               'omitted', NOT p_payloads, 'wake_at', s.wake_at, 'created_at', s.created_at,
               'ended_at', s.ended_at,
               'attempt_list', CASE WHEN s.kind = 'run' THEN engine.step_attempt_list(s) END)
               ORDER BY s.position), '[]'::jsonb)
    FROM engine.steps s WHERE s.run_id = p_run
$$;

-- A run's executions (engine.run_executions), in order. The execution that ended the run is
-- not updated by finish_run (one write less per run): it ended when the run did.
CREATE OR REPLACE FUNCTION engine.execution_history(p_run uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'number', x.lease_token, 'worker', x.worker, 'claimed_at', x.claimed_at,
               'taken_over', x.taken_over, 'waited', x.waited,
               'ended_at', coalesce(x.ended_at, CASE WHEN x.lease_token = r.lease_token
                                                     THEN r.ended_at END),
               'outcome', coalesce(x.outcome, CASE WHEN x.lease_token = r.lease_token
                                                        AND r.ended_at IS NOT NULL
                                                   THEN r.status END),
               'due_at', x.due_at, 'reason', x.reason,
               'error', x.body_error) ORDER BY x.lease_token), '[]'::jsonb)
    FROM engine.run_executions x JOIN engine.runs r ON r.id = x.run_id
    WHERE x.run_id = p_run
$$;

-- A run's pauses, in the order they began: its sleeps, waits and invokes (their steps' rows),
-- and its retry backoffs (a failed attempt of a step, or of the body, until the next execution
-- at or after the retry time). ended_by: time, event, child, timeout or cancel; NULL while it
-- lasts. A backoff the run's end cut short ends with the run ('cancel' when it was cancelled).
CREATE OR REPLACE FUNCTION engine.pause_history(p_run uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH run AS (
        SELECT r.id, r.status, r.ended_at FROM engine.runs r WHERE r.id = p_run
    ), waits AS (
        SELECT s.kind, s.step_key, coalesce(s.started_at, s.created_at) AS began_at,
               CASE WHEN s.wake_at < '9999-01-01' THEN s.wake_at END AS due_at, s.ended_at,
               CASE WHEN s.status IN ('SLEEPING', 'WAITING', 'RETRYING') THEN NULL
                    WHEN s.status = 'CANCELLED' THEN 'cancel'
                    WHEN s.kind = 'sleep' THEN 'time'
                    WHEN s.kind = 'wait' THEN CASE WHEN s.event_seq IS NULL THEN 'timeout' ELSE 'event' END
                    WHEN s.error ->> 'type' = 'InvokeTimeoutError' THEN 'timeout'
                    ELSE 'child' END AS ended_by,
               CASE WHEN s.kind = 'wait' THEN (SELECT e.id FROM engine.events e
                                               WHERE e.seq = s.event_seq) END AS event_id,
               CASE WHEN s.kind = 'invoke' THEN (
                   SELECT c.id FROM engine.runs c
                   WHERE c.parent_run_id = p_run
                     AND c.dedupe_key = format('invoke:%s:%s', p_run, s.step_key)) END AS child
        FROM engine.steps s WHERE s.run_id = p_run AND s.kind IN ('sleep', 'wait', 'invoke')
    ), backoffs AS (
        SELECT a.step_key, a.ended_at AS began_at, a.retry_at AS due_at
        FROM engine.step_attempts a WHERE a.run_id = p_run AND a.outcome = 'RETRYING'
        UNION ALL
        SELECT NULL, x.ended_at, x.due_at FROM engine.run_executions x
        WHERE x.run_id = p_run AND x.outcome = 'RETRYING' AND x.body_error IS NOT NULL
    ), backoffs_ended AS (
        SELECT b.*, (SELECT min(x.claimed_at) FROM engine.run_executions x
                     WHERE x.run_id = p_run AND x.claimed_at >= coalesce(b.due_at, b.began_at)
                    ) AS resumed_at
        FROM backoffs b
    ), pauses AS (
        SELECT w.kind, w.step_key, w.began_at, w.due_at, w.ended_at, w.ended_by, w.event_id,
               w.child FROM waits w
        UNION ALL
        SELECT 'backoff', b.step_key, b.began_at, b.due_at,
               coalesce(b.resumed_at, run.ended_at),
               CASE WHEN b.resumed_at IS NOT NULL THEN 'time'
                    WHEN run.status = 'CANCELLED' THEN 'cancel'
                    WHEN run.ended_at IS NOT NULL THEN lower(run.status) END,
               NULL, NULL
        FROM backoffs_ended b, run
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'kind', p.kind, 'step_id', p.step_key, 'began_at', p.began_at, 'due_at', p.due_at,
               'ended_at', p.ended_at, 'ended_by', p.ended_by, 'event_id', p.event_id,
               'child_run_id', p.child) ORDER BY p.began_at, p.step_key), '[]'::jsonb)
    FROM pauses p
$$;

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

SELECT engine.ensure_trigger('engine.event_queue', 'event_queue_notify', $trigger$
CREATE OR REPLACE TRIGGER event_queue_notify
    AFTER INSERT ON engine.event_queue
    FOR EACH STATEMENT EXECUTE FUNCTION engine.notify_events()$trigger$);

-- Runs created already leased by the worker that routed them wake nobody.
CREATE OR REPLACE FUNCTION engine.notify_runs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_runs WHERE status = 'QUEUED') THEN
        PERFORM pg_notify('engine_wakeup', 'runs');
    END IF;
    RETURN NULL;
END $$;

SELECT engine.ensure_trigger('engine.runs', 'runs_notify', $trigger$
CREATE OR REPLACE TRIGGER runs_notify
    AFTER INSERT ON engine.runs
    REFERENCING NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION engine.notify_runs()$trigger$);

-- ---------------------------------------------------------------------------------------------
-- Sending events. Any language can call engine.send_event() inside its own transaction: the
-- event exists only if that transaction commits. Errors use SQLSTATE class 'EN' (see errors.py).
-- Limits (the same in engine/events.py): 5,000 events per call; names, ids and versions (`v`) of
-- 1 to 512 characters (2 KiB of UTF-8: an id's unique index entry must fit in ~2.7 KB); data a
-- JSON object of at most 512 KiB. Beyond these, the database refuses what Python cannot read
-- back (docs/reliability.md, "Poison events"): data
-- nested more than 100 levels deep (Python's decoders recurse), numbers beyond a double's range
-- (json decodes 1e400 as inf, orjson refuses it; an integer of more than 4,300 digits is refused
-- by int()), a `ts` outside 0001-01-02 .. 9999-12-30 UTC (Python's datetime; asyncpg cannot
-- read BC dates, and a day of margin keeps every time zone's rendering inside year 1..9999),
-- infinities, and a traceparent that is not a W3C traceparent (it is copied onto every run).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION engine.check_event(
    p_name text, p_data jsonb, p_system boolean, p_id text DEFAULT NULL, p_v text DEFAULT NULL,
    p_traceparent text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_text text := p_data::text;
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
    IF p_id IS NOT NULL AND length(p_id) NOT BETWEEN 1 AND 512 THEN
        RAISE EXCEPTION 'event "%": id is % characters long; ids have 1 to 512', p_name,
            length(p_id) USING ERRCODE = 'EN001';
    END IF;
    IF p_v IS NOT NULL AND length(p_v) NOT BETWEEN 1 AND 512 THEN
        RAISE EXCEPTION 'event "%": v is % characters long; versions have 1 to 512', p_name,
            length(p_v) USING ERRCODE = 'EN001';
    END IF;
    IF p_traceparent IS NOT NULL THEN
        PERFORM engine.check_traceparent(p_name, p_traceparent);
    END IF;
    IF jsonb_typeof(p_data) <> 'object' THEN
        RAISE EXCEPTION 'event "%": data must be a JSON object, not %', p_name, jsonb_typeof(p_data)
            USING ERRCODE = 'EN001';
    END IF;
    IF octet_length(v_text) > 512 * 1024 THEN
        RAISE EXCEPTION 'event "%": data is % bytes; the limit is 524288', p_name, octet_length(v_text)
            USING ERRCODE = 'EN001';
    END IF;
    -- The walks below cost about a microsecond per value: cheap scans of the text spare them to
    -- every event that cannot fail them. 101 levels need 101 opening brackets, and a number
    -- beyond a double 309 digits in a row (jsonb prints numbers without an exponent).
    -- A container at level 100 (the data object is level 0) makes 101 levels of nesting. The
    -- bounded walk stops there, however deep the value goes.
    IF length(v_text) - length(translate(v_text, '{[', '')) > 100 AND jsonb_path_exists(p_data,
            'strict $.**{100} ? (@.type() == "object" || @.type() == "array")') THEN
        RAISE EXCEPTION 'event "%": data is nested more than 100 levels deep; the limit is 100', p_name
            USING ERRCODE = 'EN001';
    END IF;
    -- $max: the largest double, exactly (2^1024 - 2^971), as Python compares an int with it.
    -- (The scan asks for 255 digits: the longest repetition PostgreSQL's regex takes.)
    IF v_text ~ '[0-9]{255}' AND jsonb_path_exists(p_data,
            'strict $.** ? (@.type() == "number" && (@ > $max || @ < -$max))',
            jsonb_build_object('max',
            '179769313486231570814527423731704356798070567525844996598917476803157260780028538760589558632766878171540458953514382464234321326889464182768467546703537516986049910576551282076245490090389328944075868508455133942304583236903222948165808559332123348274797826204144723168738177180919299881250404026184124858368'::numeric)) THEN
        RAISE EXCEPTION 'event "%": data holds a number beyond +/-1.7976931348623157e308 (the '
            'largest double), which Python cannot read back', p_name USING ERRCODE = 'EN001';
    END IF;
END $$;

-- A traceparent, when given, is a W3C traceparent (version-traceid-parentid-flags, lowercase
-- hex, ids not all zeros; a future version may append fields), at most 256 characters.
CREATE OR REPLACE FUNCTION engine.check_traceparent(p_name text, p_traceparent text)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_traceparent IS NULL THEN
        RETURN;
    END IF;
    IF length(p_traceparent) > 256
       OR p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$'
       OR left(p_traceparent, 2) = 'ff'
       OR (left(p_traceparent, 2) = '00' AND length(p_traceparent) <> 55)
       OR substr(p_traceparent, 4, 32) = repeat('0', 32)
       OR substr(p_traceparent, 37, 16) = repeat('0', 16) THEN
        RAISE EXCEPTION 'event "%": traceparent % is not a W3C traceparent '
            '(00-<32 hex>-<16 hex>-<2 hex>)', p_name,
            CASE WHEN length(p_traceparent) > 60
                 THEN format('of %s characters', length(p_traceparent))
                 ELSE quote_literal(p_traceparent) END
            USING ERRCODE = 'EN001';
    END IF;
END $$;

-- An event's `ts` (ISO text, as in the JSON of send_events; NULL: not given), checked: a
-- timestamp that Python and asyncpg can read back (see above).
CREATE OR REPLACE FUNCTION engine.event_ts(p_name text, p_ts text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ts timestamptz;
BEGIN
    IF p_ts IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        v_ts := p_ts::timestamptz;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'event "%": ts % is not a timestamp (%)', p_name, quote_literal(left(p_ts, 60)),
            SQLERRM USING ERRCODE = 'EN001';
    END;
    IF v_ts IS NULL OR NOT (v_ts >= '0001-01-02 00:00:00+00' AND v_ts <= '9999-12-30 00:00:00+00') THEN
        RAISE EXCEPTION 'event "%": ts % is out of range; it must be between 0001-01-02 and '
            '9999-12-30 (UTC)', p_name, p_ts USING ERRCODE = 'EN001';
    END IF;
    RETURN v_ts;
END $$;

-- An event's data, once engine.check_event has accepted the event (it raises otherwise): a value
-- the set form of engine.store_events writes, so that the check runs for every event it stores
-- (the planner may leave out an unused call of an immutable function).
CREATE OR REPLACE FUNCTION engine.checked_data(
    p_name text, p_data jsonb, p_system boolean, p_v text, p_traceparent text)
RETURNS jsonb LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM engine.check_event(p_name, p_data, p_system, NULL, p_v, p_traceparent);
    RETURN p_data;
END $$;

-- p_events: a JSON array of {name, data, id?, ts?, v?}. Returns the event ids in order, each
-- with the sequence number of the event stored (NULL: the id was seen inside its 24 hours).
-- Each event stored is queued for the routers, unless p_queue is false (send_and_route queues
-- those it does not route itself).
SELECT engine.drop_without_argument(ARRAY['store_events'], 'p_queue');
CREATE OR REPLACE FUNCTION engine.store_events(
    p_events jsonb, p_traceparent text, p_system boolean, p_queue boolean DEFAULT true)
RETURNS TABLE (id text, seq bigint) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := engine.now();
    v_event jsonb;
    v_id    text;
    v_data  jsonb;
    v_ts    timestamptz;
    v_seq   bigint;
    v_fresh boolean;
    v_keyed boolean;  -- the event came with its own id (kept 24 hours in engine.event_ids)
    v_trace text;
    v_ids   text[];
    v_seqs  bigint[];
    v_dues  timestamptz[];
BEGIN
    IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'events must be a JSON array' USING ERRCODE = 'EN001';
    END IF;
    IF jsonb_array_length(p_events) > 5000 THEN
        RAISE EXCEPTION 'cannot send % events at once; the limit is 5000', jsonb_array_length(p_events)
            USING ERRCODE = 'EN001';
    END IF;
    -- Events without an id of their own (most sends) are stored in one statement: a statement
    -- per event cost a send of 1,000 events 31-33 ms of the server's CPU, one statement 14-16
    -- (bench/README, session 19). An event with an id is kept once in its 24 hours
    -- (engine.event_ids), one at a time below.
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_events) e WHERE e ->> 'id' IS NOT NULL) THEN
        WITH input AS MATERIALIZED (
            SELECT e.n, e.x ->> 'name' AS name, e.x ->> 'v' AS v, e.x ->> 'ts' AS ts,
                   coalesce(nullif(e.x -> 'data', 'null'::jsonb), '{}'::jsonb) AS data,
                   coalesce(e.x ->> 'traceparent', p_traceparent) AS trace,
                   gen_random_uuid()::text AS id
            FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(x, n)
        ), stored AS (
            INSERT INTO engine.events AS ev (id, name, data, ts, v, received_at, traceparent)
            SELECT i.id, i.name, engine.checked_data(i.name, i.data, p_system, i.v, i.trace),
                   coalesce(engine.event_ts(i.name, i.ts), v_now), i.v, v_now, i.trace
            FROM input i ORDER BY i.n  -- seq follows the order of the events sent
            RETURNING ev.id, ev.seq, ev.ts
        )
        SELECT array_agg(s.id ORDER BY i.n), array_agg(s.seq ORDER BY i.n),
               array_agg(greatest(s.ts, v_now) ORDER BY i.n)
        INTO v_ids, v_seqs, v_dues
        FROM stored s JOIN input i ON i.id = s.id;
        IF p_queue AND v_seqs IS NOT NULL THEN
            INSERT INTO engine.event_queue (seq, due_at) SELECT * FROM unnest(v_seqs, v_dues);
        END IF;
        RETURN QUERY SELECT * FROM unnest(v_ids, v_seqs);
        RETURN;
    END IF;
    FOR v_event IN SELECT value FROM jsonb_array_elements(p_events) LOOP
        v_data := coalesce(nullif(v_event -> 'data', 'null'::jsonb), '{}'::jsonb);
        v_id := v_event ->> 'id';
        v_keyed := v_id IS NOT NULL;
        v_trace := coalesce(v_event ->> 'traceparent', p_traceparent);
        PERFORM engine.check_event(v_event ->> 'name', v_data, p_system, v_id, v_event ->> 'v',
                                   v_trace);
        v_ts := coalesce(engine.event_ts(v_event ->> 'name', v_event ->> 'ts'), v_now);
        IF v_id IS NOT NULL THEN
            v_fresh := NULL;
            INSERT INTO engine.event_ids AS known (id, seq, expires_at)
            VALUES (v_id, 0, v_now + interval '24 hours')
            ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at
                WHERE known.expires_at <= v_now
            RETURNING true INTO v_fresh;
            IF v_fresh IS NULL THEN  -- seen inside its 24-hour window: stored once, starts nothing
                id := v_id;
                seq := NULL;
                RETURN NEXT;
                CONTINUE;
            END IF;
        ELSE
            v_id := gen_random_uuid()::text;
        END IF;
        INSERT INTO engine.events (id, name, data, ts, v, received_at, traceparent)
        VALUES (v_id, v_event ->> 'name', v_data, v_ts, v_event ->> 'v', v_now, v_trace)
        RETURNING seq INTO v_seq;
        -- Tested here, not in the UPDATE's WHERE clause: a condition on a variable there made
        -- PostgreSQL plan the statement again at every event (its custom plan, which folds the
        -- condition away, looked cheaper than the cached one).
        IF v_keyed THEN
            UPDATE engine.event_ids SET seq = v_seq WHERE id = v_id;
        END IF;
        IF p_queue THEN
            INSERT INTO engine.event_queue (seq, due_at) VALUES (v_seq, greatest(v_ts, v_now));
        END IF;
        id := v_id;
        seq := v_seq;
        RETURN NEXT;
    END LOOP;
END $$;

-- p_events: a JSON array of {name, data, id?, ts?, v?}. Returns the event ids in order.
CREATE OR REPLACE FUNCTION engine.send_events(
    p_events jsonb, p_traceparent text DEFAULT NULL, p_system boolean DEFAULT false)
RETURNS SETOF text LANGUAGE sql AS $$
    SELECT s.id FROM engine.store_events(p_events, p_traceparent, p_system) s
$$;

-- The one entry point a sending role needs (ops/roles.sql grants it alone): it runs with its
-- owner's rights, so a sender needs no privilege on the tables, and it cannot send `engine/`
-- system events. search_path is pinned, as for any SECURITY DEFINER function.
CREATE OR REPLACE FUNCTION engine.send_event(
    name text, data jsonb, id text DEFAULT NULL, ts timestamptz DEFAULT NULL,
    traceparent text DEFAULT NULL)
RETURNS text LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- Built as given: JSON nulls at the top are "not given" to send_events, and nulls inside
    -- data are kept (jsonb_strip_nulls here once dropped them at every level).
    SELECT engine.send_events(
        jsonb_build_array(jsonb_build_object('name', name, 'data', data, 'id', id, 'ts', ts)),
        traceparent)
$$;

-- ---------------------------------------------------------------------------------------------
-- Event keys: what authenticates a sender of the HTTP event API (POST /e/{key}, engine/web).
-- A key is a random token of 256 bits shown once when created; only its SHA-256 is stored, so
-- that a copy of this table (a backup, a reader) cannot be used to send. A key may be limited to
-- event name prefixes (empty: any name a sender may use). A revoked key keeps its row, and its
-- name, for the record; it is refused from the next request on: every send checks the key.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.event_keys (
    name       text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    key_hash   bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    prefixes   text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);

-- The hash a key is stored and looked up by.
CREATE OR REPLACE FUNCTION engine.event_key_hash(p_key text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT AS $$ SELECT pg_catalog.sha256(pg_catalog.convert_to(p_key, 'UTF8')) $$;

-- Stores a key (generated by the caller: engine/keys.py) under p_name; returns its creation
-- time. A name is taken for good, revoked or not: EN006 if it exists. Prefixes are checked here
-- too (1 to 512 characters, none under the reserved `engine/`, 100 at most), for SQL callers.
CREATE OR REPLACE FUNCTION engine.create_event_key(p_name text, p_key text, p_prefixes text[])
RETURNS timestamptz LANGUAGE plpgsql AS $$
DECLARE
    v_prefixes text[] := coalesce(p_prefixes, '{}');
    v_created  timestamptz := engine.now();
BEGIN
    IF length(p_key) < 32 THEN
        RAISE EXCEPTION 'an event key has 32 characters at least' USING ERRCODE = 'EN006';
    END IF;
    IF cardinality(v_prefixes) > 100 OR EXISTS (
            SELECT 1 FROM unnest(v_prefixes) p
            WHERE p IS NULL OR length(p) NOT BETWEEN 1 AND 512 OR p LIKE 'engine/%') THEN
        RAISE EXCEPTION 'event key prefixes have 1 to 512 characters, none under "engine/",'
            ' 100 at most' USING ERRCODE = 'EN006';
    END IF;
    INSERT INTO engine.event_keys (name, key_hash, prefixes, created_at)
    VALUES (p_name, engine.event_key_hash(p_key), v_prefixes, v_created);
    RETURN v_created;
EXCEPTION
    WHEN unique_violation THEN
        RAISE EXCEPTION 'an event key named "%" exists already (names are never reused, even'
            ' once revoked)', p_name USING ERRCODE = 'EN006';
    WHEN check_violation THEN
        RAISE EXCEPTION 'event key name "%" is not valid: 1 to 100 letters, digits, ".", "_" or'
            ' "-", starting with a letter or a digit', p_name USING ERRCODE = 'EN006';
END $$;

-- Every key, oldest first, without its hash (a reader may call it: ops/roles.sql grants it the
-- columns it reads and not the hash).
CREATE OR REPLACE FUNCTION engine.list_event_keys()
RETURNS TABLE (name text, prefixes text[], created_at timestamptz, revoked_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT k.name, k.prefixes, k.created_at, k.revoked_at FROM engine.event_keys k
    ORDER BY k.created_at, k.name
$$;

-- Revokes the key p_name (from the next request on); returns when it was revoked (the first
-- revocation's time if it was already), or NULL if no key has that name.
CREATE OR REPLACE FUNCTION engine.revoke_event_key(p_name text) RETURNS timestamptz
LANGUAGE sql AS $$
    UPDATE engine.event_keys SET revoked_at = coalesce(revoked_at, engine.now())
    WHERE name = p_name RETURNING revoked_at
$$;

-- Sends p_events (as engine.send_events, never `engine/` names) with the key p_key, in one
-- round trip: the key must be live (EN004 otherwise) and every event name must start with one
-- of its prefixes (EN005 otherwise), or nothing is stored. It runs with its owner's rights, so
-- a sender needs the EXECUTE grant alone (ops/roles.sql) and never sees the keys table.
CREATE OR REPLACE FUNCTION engine.send_events_with_key(
    p_key text, p_events jsonb, p_traceparent text DEFAULT NULL)
RETURNS SETOF text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_prefixes text[];
    v_outside  text;
BEGIN
    SELECT k.prefixes INTO v_prefixes FROM engine.event_keys k
    WHERE k.key_hash = engine.event_key_hash(p_key) AND k.revoked_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown or revoked event key' USING ERRCODE = 'EN004';
    END IF;
    IF cardinality(v_prefixes) > 0 AND jsonb_typeof(p_events) = 'array' THEN
        SELECT coalesce(e ->> 'name', '') INTO v_outside FROM jsonb_array_elements(p_events) e
        WHERE NOT EXISTS (SELECT 1 FROM unnest(v_prefixes) p
                          WHERE starts_with(coalesce(e ->> 'name', ''), p))
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'event name "%" is outside this key''s prefixes (%)', v_outside,
                array_to_string(v_prefixes, ', ') USING ERRCODE = 'EN005';
        END IF;
    END IF;
    RETURN QUERY SELECT engine.send_events(p_events, p_traceparent, false);
END $$;

-- ---------------------------------------------------------------------------------------------
-- The function registry
-- ---------------------------------------------------------------------------------------------
-- p_functions: [{function_id, triggers, config, crons: [{cron, next_at}]}], upserted and active
-- for p_ttl at least (a worker's heartbeat keeps them active after that: engine.worker_beat).
-- Registering never removes a function: during a rolling deploy, what a live worker of another
-- version registered stays routed; a function that no worker serves any more goes inactive
-- (engine.sweep). p_replace is kept for older callers and ignored. A cron schedule keeps its
-- next time while its cron is unchanged, so a restart neither skips nor repeats a tick.
CREATE OR REPLACE FUNCTION engine.register_functions(
    p_app text, p_functions jsonb, p_replace boolean, p_ttl interval DEFAULT '2 minutes')
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_changed bigint;
BEGIN
    INSERT INTO engine.functions AS f (app_id, function_id, triggers, config, updated_at, active,
                                       live_until, routes_in_sql)
    SELECT p_app, x.function_id, x.triggers, x.config, now(), true, now() + p_ttl,
           x.routes_in_sql
    FROM jsonb_to_recordset(p_functions)
         AS x(function_id text, triggers jsonb, config jsonb, routes_in_sql boolean)
    ON CONFLICT (app_id, function_id) DO UPDATE
        SET triggers = excluded.triggers, config = excluded.config, updated_at = now(),
            active = true, live_until = greatest(f.live_until, excluded.live_until),
            -- A worker that does not say (an older engine) leaves what was said of the same
            -- triggers and config; of others, nothing is known.
            routes_in_sql = CASE WHEN (f.triggers, f.config) = (excluded.triggers, excluded.config)
                                 THEN coalesce(excluded.routes_in_sql, f.routes_in_sql)
                                 ELSE excluded.routes_in_sql END
        WHERE (f.triggers, f.config, f.active)
              IS DISTINCT FROM (excluded.triggers, excluded.config, true)
           -- a function registered before workers said (an upgrade): said now
           OR (excluded.routes_in_sql IS NOT NULL
               AND f.routes_in_sql IS DISTINCT FROM excluded.routes_in_sql);
    GET DIAGNOSTICS v_changed = ROW_COUNT;
    UPDATE engine.functions f SET live_until = now() + p_ttl
    FROM jsonb_to_recordset(p_functions) AS x(function_id text)
    WHERE f.app_id = p_app AND f.function_id = x.function_id AND f.live_until < now() + p_ttl;
    IF v_changed > 0 THEN
        PERFORM engine.registry_changed();
        PERFORM engine.clear_unserved(p_app, ARRAY(
            SELECT x ->> 'function_id' FROM jsonb_array_elements(p_functions) x));
    END IF;
    DELETE FROM engine.cron_schedules c
    USING jsonb_to_recordset(p_functions) AS x(function_id text, crons jsonb)
    WHERE c.app_id = p_app AND c.function_id = x.function_id
      AND NOT coalesce(x.crons, '[]') @> jsonb_build_array(jsonb_build_object('cron', c.cron));
    INSERT INTO engine.cron_schedules (app_id, function_id, cron, next_at)
    SELECT p_app, x.function_id, c.cron, c.next_at
    FROM jsonb_to_recordset(p_functions) AS x(function_id text, crons jsonb),
         jsonb_to_recordset(coalesce(x.crons, '[]')) AS c(cron text, next_at timestamptz)
    ON CONFLICT DO NOTHING;
END $$;

-- Routers reload the registry when its version moves.
CREATE OR REPLACE FUNCTION engine.registry_changed() RETURNS void
LANGUAGE sql AS $$
    UPDATE engine.meta SET value = (value::bigint + 1)::text WHERE key = 'registry_version'
$$;

-- What a run of a function that no live worker serves says while it waits (see engine.sweep).
CREATE OR REPLACE FUNCTION engine.unserved_reason() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'no live worker serves this function' $$;

-- A worker of p_app serves p_functions again: their waiting runs lose the unserved reason.
CREATE OR REPLACE FUNCTION engine.clear_unserved(p_app text, p_functions text[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE engine.runs r SET waiting_reason = NULL
    WHERE r.app_id = p_app AND r.function_id = ANY (p_functions)
      AND r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')
      AND r.waiting_reason = engine.unserved_reason()
$$;

-- A worker's heartbeat (every p_ttl / 3 or so): it is alive until now() + p_ttl, and so are the
-- functions it serves. A function that was inactive is active again (and routed again).
CREATE OR REPLACE FUNCTION engine.worker_beat(
    p_owner uuid, p_app text, p_functions text[], p_ttl interval)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_revived text[];
BEGIN
    INSERT INTO engine.workers AS w (owner, app_id, functions, expires_at)
    VALUES (p_owner, p_app, p_functions, now() + p_ttl)
    ON CONFLICT (owner) DO UPDATE
        SET functions = excluded.functions, seen_at = now(), expires_at = excluded.expires_at;
    SELECT array_agg(f.function_id) INTO v_revived FROM engine.functions f
    WHERE f.app_id = p_app AND f.function_id = ANY (p_functions) AND NOT f.active;
    UPDATE engine.functions f
    SET live_until = greatest(f.live_until, now() + p_ttl), active = true
    WHERE f.app_id = p_app AND f.function_id = ANY (p_functions)
      AND (f.live_until < now() + p_ttl / 2 OR NOT f.active);
    IF v_revived IS NOT NULL THEN
        PERFORM engine.registry_changed();
        PERFORM engine.clear_unserved(p_app, v_revived);
    END IF;
END $$;

-- A worker stopping: the functions no other live worker serves go inactive at once (a demo that
-- ends must not leave its functions to catch the next demo's events).
CREATE OR REPLACE FUNCTION engine.worker_gone(p_owner uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_gone engine.workers;
BEGIN
    DELETE FROM engine.workers w WHERE w.owner = p_owner RETURNING * INTO v_gone;
    IF v_gone IS NULL THEN
        RETURN;
    END IF;
    UPDATE engine.functions f SET live_until = now()
    WHERE f.app_id = v_gone.app_id AND f.function_id = ANY (v_gone.functions)
      AND f.live_until > now()
      AND NOT EXISTS (SELECT 1 FROM engine.workers w
                      WHERE w.app_id = f.app_id AND f.function_id = ANY (w.functions)
                        AND w.expires_at > now());
    PERFORM engine.retire_functions();
END $$;

-- Functions past live_until that no live worker serves go inactive: routing stops starting runs
-- of them, and their waiting runs say why nobody runs them. Returns how many went inactive.
CREATE OR REPLACE FUNCTION engine.retire_functions() RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_retired int;
BEGIN
    WITH retired AS (
        UPDATE engine.functions f SET active = false
        WHERE f.active AND f.live_until <= now()
          AND NOT EXISTS (SELECT 1 FROM engine.workers w
                          WHERE w.app_id = f.app_id AND f.function_id = ANY (w.functions)
                            AND w.expires_at > now())
        RETURNING f.app_id, f.function_id
    ), marked AS (
        UPDATE engine.runs r SET waiting_reason = engine.unserved_reason()
        FROM retired f
        WHERE r.app_id = f.app_id AND r.function_id = f.function_id
          AND r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')
        RETURNING r.id
    ) SELECT count(*) INTO v_retired FROM retired;
    IF v_retired > 0 THEN
        PERFORM engine.registry_changed();
    END IF;
    RETURN v_retired;
END $$;

-- The periodic sweep any worker runs (every few seconds, whatever its app): forgets expired
-- workers, retires the functions nobody serves, and cancels up to p_limit runs past a timeout
-- that no claim will look at (their function may have no worker at all: timeouts hold anyway).
-- Returns how many runs it cancelled.
CREATE OR REPLACE FUNCTION engine.sweep(p_limit int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_now  timestamptz := engine.now();
    v_late uuid[];
    v_kept uuid[];
BEGIN
    DELETE FROM engine.workers w WHERE w.expires_at <= now();
    PERFORM engine.retire_functions();
    SELECT array_agg(l.id) INTO v_late FROM (
        SELECT r.id FROM engine.runs r
        WHERE r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
          AND least(r.finish_deadline, r.start_deadline) <= v_now
          -- Implied by the line above, but spelt out as runs_deadline_idx's predicate is: the
          -- planner uses a partial index only when the query states its predicate. Without
          -- it, each sweep read every run, finished ones included (tests/test_plans.py).
          AND (r.finish_deadline IS NOT NULL OR r.start_deadline IS NOT NULL)
          -- A running run is its worker's to end (or a claim's, when its lease expires), unless
          -- no live worker serves its function: then nobody else ever will.
          AND (r.status <> 'RUNNING'
               OR (r.lease_expires_at < v_now AND EXISTS (
                       SELECT 1 FROM engine.functions f
                       WHERE f.app_id = r.app_id AND f.function_id = r.function_id
                         AND NOT f.active)))
        ORDER BY least(r.finish_deadline, r.start_deadline)
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED) l;
    IF v_late IS NULL THEN
        RETURN 0;
    END IF;
    v_kept := engine.enforce_timeouts(v_late, v_now);
    RETURN cardinality(v_late) - cardinality(v_kept);
END $$;

-- The functions of p_app that no live worker serves, with their runs waiting (for the warning
-- each worker of the app logs).
CREATE OR REPLACE FUNCTION engine.unserved_runs(p_app text)
RETURNS TABLE (function_id text, runs bigint)
LANGUAGE sql STABLE AS $$
    SELECT r.function_id, count(*) FROM engine.runs r
    JOIN engine.functions f ON f.app_id = r.app_id AND f.function_id = r.function_id
    WHERE r.app_id = p_app AND NOT f.active
      AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
    GROUP BY r.function_id ORDER BY r.function_id
$$;

-- For `engine functions list`: every registered function, whether it is active, the workers
-- serving it, its runs by status and its config (retries, timeouts, cancels, flow control).
CREATE OR REPLACE FUNCTION engine.function_list(p_app text)
RETURNS TABLE (app_id text, function_id text, triggers jsonb, active boolean, workers bigint,
               runs jsonb, config jsonb)
LANGUAGE sql STABLE AS $$
    SELECT f.app_id, f.function_id, f.triggers, f.active,
           (SELECT count(*) FROM engine.workers w
            WHERE w.app_id = f.app_id AND f.function_id = ANY (w.functions)
              AND w.expires_at > now()),
           (SELECT coalesce(jsonb_object_agg(c.status, c.n), '{}') FROM (
                SELECT r.status, count(*) AS n FROM engine.runs r
                WHERE r.app_id = f.app_id AND r.function_id = f.function_id
                GROUP BY r.status) c),
           f.config
    FROM engine.functions f
    WHERE p_app IS NULL OR f.app_id = p_app
    ORDER BY f.app_id, f.function_id
$$;

-- Locks this app's cron schedules that are due (SKIP LOCKED: one worker fires each tick). The
-- worker computes the tick to fire and the next one, then calls fire_cron in this transaction.
CREATE OR REPLACE FUNCTION engine.due_crons(p_app text)
RETURNS TABLE (function_id text, cron text, next_at timestamptz)
LANGUAGE sql AS $$
    SELECT c.function_id, c.cron, c.next_at FROM engine.cron_schedules c
    WHERE c.app_id = p_app AND c.next_at <= engine.now()
    ORDER BY c.next_at
    FOR UPDATE SKIP LOCKED
$$;

-- Starts the run of one cron tick (an engine/scheduled.timer event) and moves the schedule on.
-- The dedupe key 'cron:<time>' makes a tick start one run, however many workers fire it.
CREATE OR REPLACE FUNCTION engine.fire_cron(
    p_app text, p_function text, p_cron text, p_tick timestamptz, p_next timestamptz,
    p_admission jsonb)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := engine.now();
    v_key text := 'cron:' || to_char(p_tick AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"');
    v_seq bigint;
BEGIN
    UPDATE engine.cron_schedules c SET next_at = p_next
    WHERE c.app_id = p_app AND c.function_id = p_function AND c.cron = p_cron;
    IF EXISTS (SELECT 1 FROM engine.runs r
               WHERE r.app_id = p_app AND r.function_id = p_function AND r.dedupe_key = v_key) THEN
        RETURN NULL;
    END IF;
    INSERT INTO engine.events (id, name, data, ts, received_at)
    VALUES (p_app || '/' || p_function || '/' || v_key, 'engine/scheduled.timer',
            jsonb_build_object('cron', p_cron, 'scheduled_at', p_tick, 'function_id', p_function),
            p_tick, v_now)
    RETURNING seq INTO v_seq;
    RETURN (engine.insert_run(p_app, p_function, v_seq, v_key, NULL, NULL, p_admission, v_now)).id;
END $$;

-- Creates one run outside routing (a cron tick, an invoke) with the flow control the worker
-- computed for it (p_admission: the fields engine.admit reads, without debounce and batching):
-- it may come out SKIPPED (rate limit, idempotency, singleton), with the reason. Returns the run,
-- or NULL if its dedupe key exists already.
CREATE OR REPLACE FUNCTION engine.insert_run(
    p_app text, p_function text, p_seq bigint, p_dedupe text, p_parent uuid, p_traceparent text,
    p_admission jsonb, p_now timestamptz)
RETURNS engine.runs LANGUAGE plpgsql AS $$
DECLARE
    v_entry jsonb := engine.admit(jsonb_build_array(coalesce(p_admission, '{}')
        || jsonb_build_object('app_id', p_app, 'function_id', p_function, 'event_seq', p_seq)),
        p_now) -> 0;
    v_shift interval := make_interval(secs => coalesce((v_entry ->> 'priority')::int, 0));
    v_run   engine.runs;
BEGIN
    INSERT INTO engine.runs AS r (app_id, function_id, status, event_seq, dedupe_key, parent_run_id,
                                  due_at, traceparent, trace_context, start_deadline,
                                  finish_timeout, concurrency, singleton_key, throttle, rank_at,
                                  waiting_reason, created_at, ended_at, updated_at)
    VALUES (p_app, p_function, CASE WHEN v_entry ? 'skip' THEN 'SKIPPED' ELSE 'QUEUED' END,
            p_seq, p_dedupe, p_parent, p_now - v_shift, p_traceparent,
            engine.new_trace_context(p_traceparent),
            p_now + engine.timeout_of(p_app, p_function, 'start'),
            engine.timeout_of(p_app, p_function, 'finish'),
            nullif(v_entry -> 'concurrency', 'null'), v_entry ->> 'singleton_key',
            nullif(v_entry -> 'throttle', 'null'), p_now - v_shift, v_entry ->> 'skip', p_now,
            CASE WHEN v_entry ? 'skip' THEN p_now END, p_now)
    ON CONFLICT DO NOTHING
    RETURNING * INTO v_run;
    RETURN v_run;
END $$;

-- Raises EN003 unless p_app's p_function is registered: a run started outside routing (an
-- invoke, a direct start) names its function itself. p_verb says what could not be done.
CREATE OR REPLACE FUNCTION engine.require_function(p_app text, p_function text, p_verb text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM engine.functions f
                   WHERE f.app_id = p_app AND f.function_id = p_function) THEN
        RAISE EXCEPTION 'cannot % %/%: no such function is registered', p_verb, p_app,
            p_function USING ERRCODE = 'EN003';
    END IF;
END $$;

-- Starts one run of p_function outside routing, with the event a cron tick or a step.invoke
-- would give it (p_name: engine/scheduled.timer or engine/function.invoked, carrying p_data):
-- the testing kit's run_function runs cron-only and invoke-only functions this way, since no
-- event routes to them. p_admission as in insert_run. Returns the run (SKIPPED if its flow
-- control refused it).
CREATE OR REPLACE FUNCTION engine.start_run_directly(
    p_app text, p_function text, p_name text, p_data jsonb, p_admission jsonb)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := engine.now();
    v_seq bigint;
BEGIN
    IF p_name IS DISTINCT FROM 'engine/scheduled.timer'
       AND p_name IS DISTINCT FROM 'engine/function.invoked' THEN
        RAISE EXCEPTION 'a run started directly has the event engine/scheduled.timer or '
            'engine/function.invoked, not %', p_name USING ERRCODE = 'EN001';
    END IF;
    PERFORM engine.require_function(p_app, p_function, 'start');
    INSERT INTO engine.events (id, name, data, ts, received_at)
    VALUES (gen_random_uuid()::text, p_name,
            -- a tick's fields, as engine.fire_cron gives them (p_data names the cron)
            CASE WHEN p_name = 'engine/scheduled.timer'
                 THEN jsonb_build_object('scheduled_at', v_now, 'function_id', p_function)
                 ELSE '{}' END || coalesce(p_data, '{}'),
            v_now, v_now)
    RETURNING seq INTO v_seq;
    RETURN (engine.insert_run(p_app, p_function, v_seq, 'direct:' || v_seq, NULL, NULL,
                              p_admission, v_now)).id;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Routing events to runs (one transaction: claim_events, then create_runs)
-- ---------------------------------------------------------------------------------------------
-- Locks up to p_limit due queue rows, and the names of their events in shared mode, so that no
-- matcher of those names is half-registered while they are routed. `awaited` tells the router
-- whether some run has a matcher for the event's name (then it asks for matcher_candidates).
-- The event comes as JSON (as a run sees it), decoded row by row in Python: one event Python
-- cannot read is dead-lettered (engine.dead_letter) while the others are routed.
CREATE OR REPLACE FUNCTION engine.claim_events(p_limit int)
RETURNS TABLE (seq bigint, name text, event jsonb, traceparent text, awaited boolean,
               registry_version bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_seqs bigint[];
BEGIN
    SELECT array_agg(d.seq) INTO v_seqs FROM (
        SELECT q.seq FROM engine.event_queue q
        WHERE q.due_at <= engine.now()
        ORDER BY q.due_at, q.seq
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED) d;
    IF v_seqs IS NULL THEN
        RETURN;
    END IF;
    PERFORM engine.lock_event_names(
        ARRAY(SELECT e.name FROM engine.events e WHERE e.seq = ANY (v_seqs)), false);
    RETURN QUERY
    SELECT e.seq, e.name,
           jsonb_build_object('id', e.id, 'name', e.name, 'data', e.data, 'ts', e.ts, 'v', e.v),
           e.traceparent,
           (SELECT m.event_name FROM engine.matchers m WHERE m.event_name >= e.name
            ORDER BY m.event_name LIMIT 1) IS NOT DISTINCT FROM e.name,  -- see matchers_name_idx
           (SELECT value::bigint FROM engine.meta WHERE key = 'registry_version')
    FROM engine.events e WHERE e.seq = ANY (v_seqs)
    ORDER BY e.seq;
END $$;

-- Takes events off the routing queue as dead letters (p_dead: [{seq, error}], error being
-- {type, message}): they start no run, and a person finds them with
-- `SELECT * FROM engine.events WHERE dead_lettered_at IS NOT NULL`. Returns how many.
CREATE OR REPLACE FUNCTION engine.dead_letter(p_dead jsonb) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_count int;
BEGIN
    WITH dead AS (
        UPDATE engine.events e SET dead_lettered_at = engine.now(), error = x.error
        FROM jsonb_to_recordset(p_dead) AS x(seq bigint, error jsonb)
        WHERE e.seq = x.seq
        RETURNING e.seq
    ), unqueued AS (
        DELETE FROM engine.event_queue q USING dead d WHERE q.seq = d.seq
    )
    SELECT count(*) INTO v_count FROM dead;
    RETURN v_count;
END $$;

-- Routing in one statement, for events that need no Python: their name is not in p_complex
-- (no trigger on it has a CEL expression or belongs to a function with flow control) and no run
-- waits for it (no matcher). p_simple lists the plain triggers [{app_id, function_id, event,
-- local}] of the router's registry (local: the router has the function's code, so its runs may
-- be leased to p_owner), whose version must be p_version (else nothing is routed and `deferred`
-- says so). Other due events are left for the full path (claim_events, create_runs). The first
-- row is a summary (id NULL: how many events were routed, whether some were deferred); the
-- others are the runs created leased to p_owner, with their event.
CREATE OR REPLACE FUNCTION engine.route_simple(
    p_limit int, p_simple jsonb, p_complex text[], p_version bigint, p_app text, p_owner uuid,
    p_lease interval, p_capacity int)
RETURNS TABLE (routed int, deferred boolean, id uuid, function_id text, event_seq bigint,
               lease_token bigint, created_at timestamptz, event jsonb, traceparent text,
               trace_context text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_claimed bigint[];
BEGIN
    IF (SELECT m.value::bigint FROM engine.meta m WHERE m.key = 'registry_version')
       IS DISTINCT FROM p_version THEN
        RETURN QUERY SELECT 0, true, NULL::uuid, NULL::text, NULL::bigint, NULL::bigint,
                            NULL::timestamptz, NULL::jsonb, NULL::text, NULL::text;
        RETURN;
    END IF;
    -- This transaction commits without waiting for its WAL flush (about half of the time from
    -- an event to its first step). Nothing is lost if a crash takes it: the events are durable
    -- and are routed again, to runs with the same ids (engine.event_run_id). And nothing
    -- depends on it unflushed: WAL is flushed in order, so the first step's checkpoint (and
    -- any other durable commit that saw these runs) makes it durable too.
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT array_agg(d.seq) INTO v_claimed FROM (
        SELECT q.seq FROM engine.event_queue q
        WHERE q.due_at <= engine.now()
        ORDER BY q.due_at, q.seq
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED) d;
    IF v_claimed IS NULL THEN
        RETURN QUERY SELECT 0, false, NULL::uuid, NULL::text, NULL::bigint, NULL::bigint,
                            NULL::timestamptz, NULL::jsonb, NULL::text, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM engine.route_events(v_claimed, p_simple, p_complex, p_app, p_owner,
                                                   p_lease, p_capacity);
END $$;

-- Whether events named p_name need the Python router because of a function other than the
-- caller's own (p_app's functions p_mine, whose code the caller has): a trigger on the name with
-- an expression, or a function that may not be routed in SQL (flow control, or registered by an
-- engine that did not say: see engine.functions.routes_in_sql). Found by name
-- (functions_triggers_idx), however many functions the schema holds.
CREATE OR REPLACE FUNCTION engine.routed_in_python(p_name text, p_app text, p_mine text[])
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM engine.functions f
        WHERE f.active AND f.triggers @> jsonb_build_array(jsonb_build_object('event', p_name))
          AND NOT (f.app_id = p_app AND f.function_id = ANY (p_mine))
          AND (f.routes_in_sql IS NOT TRUE
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(f.triggers) t
                          WHERE t ->> 'event' = p_name
                            AND coalesce(t -> 'expression', 'null') <> 'null')))
$$;

-- Routes the claimed due events p_seqs that need no Python (route_simple's second half): the
-- first row is the summary, the others the runs leased to p_owner. p_simple is either the
-- plain triggers to route with (a JSON array), or {"own": [the caller's own plain triggers],
-- "mine": [the ids of the caller's functions]}: then the other functions an event triggers are
-- looked up by its name, with what their own workers registered (engine.routed_in_python), and
-- p_complex names the caller's complex names only. A routing tick passes the latter past 40
-- plain triggers of other functions (engine.router.LOOKUP_ABOVE): the whole registry, parsed at
-- every tick, made a tick of one event take 1.0 ms with 200 other triggers and 3.1-3.9 ms with
-- 2,000, against 0.7 with none; looked up, 0.7-0.8 and 0.85-0.93 ms.
CREATE OR REPLACE FUNCTION engine.route_events(
    p_seqs bigint[], p_simple jsonb, p_complex text[], p_app text, p_owner uuid,
    p_lease interval, p_capacity int)
RETURNS TABLE (routed int, deferred boolean, id uuid, function_id text, event_seq bigint,
               lease_token bigint, created_at timestamptz, event jsonb, traceparent text,
               trace_context text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_fast    bigint[];
    v_plan    jsonb;
    v_runs    jsonb;
    v_simple  jsonb := p_simple;
    v_mine    text[];  -- set when the other functions are looked up by name
BEGIN
    -- As in claim_events: no matcher of these names is half-registered while they are routed.
    PERFORM engine.lock_event_names(
        ARRAY(SELECT e.name FROM engine.events e WHERE e.seq = ANY (p_seqs)), false);
    IF jsonb_typeof(p_simple) = 'object' THEN
        v_simple := p_simple -> 'own';
        v_mine := ARRAY(SELECT jsonb_array_elements_text(p_simple -> 'mine'));
    END IF;
    -- Each name is looked at once, however many of the events bear it.
    WITH claimed AS (
        SELECT e.seq, e.name FROM engine.events e WHERE e.seq = ANY (p_seqs)
    ), in_python AS (
        SELECT n.name FROM (SELECT DISTINCT c.name FROM claimed c) n
        WHERE n.name = ANY (p_complex)
           OR (SELECT m.event_name FROM engine.matchers m WHERE m.event_name >= n.name
               ORDER BY m.event_name LIMIT 1) IS NOT DISTINCT FROM n.name  -- matchers_name_idx
           OR (v_mine IS NOT NULL AND engine.routed_in_python(n.name, p_app, v_mine))
    )
    SELECT array_agg(c.seq) INTO v_fast FROM claimed c
    WHERE NOT EXISTS (SELECT 1 FROM in_python p WHERE p.name = c.name);
    IF v_fast IS NULL THEN
        RETURN QUERY SELECT 0, true, NULL::uuid, NULL::text, NULL::bigint, NULL::bigint,
                            NULL::timestamptz, NULL::jsonb, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v_mine IS NOT NULL THEN  -- the caller gave its own triggers: the others, by name
        SELECT v_simple || coalesce(jsonb_agg(jsonb_build_object(
                   'app_id', f.app_id, 'function_id', f.function_id, 'event', n.name,
                   'local', false)), '[]')
        INTO v_simple
        FROM (SELECT DISTINCT e.name FROM engine.events e WHERE e.seq = ANY (v_fast)) n
        JOIN engine.functions f
          ON f.active AND f.triggers @> jsonb_build_array(jsonb_build_object('event', n.name))
        WHERE NOT (f.app_id = p_app AND f.function_id = ANY (v_mine));
    END IF;
    RETURN QUERY SELECT cardinality(v_fast), cardinality(v_fast) < cardinality(p_seqs),
                        NULL::uuid, NULL::text, NULL::bigint, NULL::bigint, NULL::timestamptz,
                        NULL::jsonb, NULL::text, NULL::text;
    DELETE FROM engine.event_queue q WHERE q.seq = ANY (v_fast);
    BEGIN
        -- Plain triggers only: nothing to admit, one statement (as a send routes its events).
        v_runs := engine.create_plain_runs(v_fast, v_simple, p_app, p_owner, p_lease,
                                           p_capacity, engine.now());
    EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded
                   OR plpgsql_error THEN
        -- No single event can stop the batch: engine.create_runs creates the runs one event at
        -- a time, and dead-letters an event whose runs cannot be created.
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'app_id', p.app_id, 'function_id', p.function_id, 'event_seq', p.event_seq,
                   'claim', p.claim)), '[]')
        INTO v_plan
        FROM engine.plain_plan(v_fast, v_simple, p_app, p_capacity, engine.now()) p;
        -- The event's traceparent by a lookup per run, never a join: a join of the runs
        -- created (planned as 1,000 rows) with engine.events was planned as a hash of every
        -- event while the table was small, and the plan was kept as it grew.
        SELECT jsonb_agg(jsonb_build_object(
                   'id', c.id, 'function_id', c.function_id, 'event_seq', c.event_seq,
                   'lease_token', c.lease_token, 'created_at', c.created_at,
                   'event', engine.run_event(c.event_seq),
                   'traceparent', (SELECT e.traceparent FROM engine.events e
                                   WHERE e.seq = c.event_seq),
                   'trace_context', c.trace_context))
        INTO v_runs
        FROM engine.create_runs(v_fast, v_plan, p_owner, p_lease) c
        WHERE c.lease_token > 0;
    END;
    RETURN QUERY
    SELECT NULL::int, NULL::boolean, x.id, x.function_id, x.event_seq, x.lease_token,
           x.created_at, x.event, x.traceparent, x.trace_context
    FROM jsonb_to_recordset(v_runs)
        AS x(id uuid, function_id text, event_seq bigint, lease_token bigint,
             created_at timestamptz, event jsonb, traceparent text, trace_context text);
END $$;

-- Sends events (as send_events) and routes, in the same transaction, those due that need no
-- Python, for a worker in the sender's process: the runs it has room for come back leased to it
-- (p_owner), and their first step starts without waiting for a NOTIFY and a routing transaction
-- of its own. Routing never fails the send: an event it does not route (sent with a later ts,
-- the registry moved, a name with CEL triggers or waiting runs, a routing error) goes on the
-- queue for the routers, woken as for any send. The first row carries the ids (as send_events)
-- and the routing summary; the others are the runs leased to p_owner, as route_simple's.
--
-- p_simple is every plain trigger of the events' names (a JSON array, as route_events takes
-- it). An event routed here is never queued (a queue row written, then deleted, as the routers'
-- engine.route_events would need), and its runs are written by engine.create_plain_runs: each
-- statement of a routing cost the server about what a client's INSERT does, and the start was
-- mostly this call (bench/README, sessions 18 and 19).
CREATE OR REPLACE FUNCTION engine.send_and_route(
    p_events jsonb, p_traceparent text, p_simple jsonb, p_complex text[], p_version bigint,
    p_app text, p_owner uuid, p_lease interval, p_capacity int)
RETURNS TABLE (ids text[], routed int, deferred boolean, id uuid, function_id text,
               event_seq bigint, lease_token bigint, created_at timestamptz, event jsonb,
               traceparent text, trace_context text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids    text[];
    v_stored bigint[];
    v_fast   bigint[];  -- the events routed here
    v_runs   jsonb;     -- the runs leased to p_owner, as route_events returns them
    -- Read once: in a filter of the cached plans (which find the rows by seq), engine.now()
    -- would be called, and the clock read, for each event. The statement's time, as the
    -- events' received_at.
    v_now    timestamptz := engine.now();
BEGIN
    SELECT array_agg(s.id ORDER BY s.n), array_agg(s.seq) FILTER (WHERE s.seq IS NOT NULL)
    INTO v_ids, v_stored
    FROM engine.store_events(p_events, p_traceparent, false, false) WITH ORDINALITY AS s(id, seq, n);
    IF v_stored IS NOT NULL AND (SELECT m.value::bigint FROM engine.meta m
                                 WHERE m.key = 'registry_version') = p_version THEN
        BEGIN
            -- As in claim_events: no matcher of these names is half-registered while they
            -- are routed (the next statement's snapshot is taken once the lock is held). The
            -- names as sent: the rows just stored need not be read back for them.
            PERFORM engine.lock_event_names(
                ARRAY(SELECT DISTINCT x ->> 'name' FROM jsonb_array_elements(p_events) x),
                false);
            -- Due now, of a name without CEL triggers (p_complex) and without waiting runs
            -- (an ordered probe of matchers_name_idx).
            SELECT array_agg(e.seq) INTO v_fast FROM engine.events e
            WHERE e.seq = ANY (v_stored) AND e.ts <= v_now AND NOT e.name = ANY (p_complex)
              AND (SELECT m.event_name FROM engine.matchers m WHERE m.event_name >= e.name
                   ORDER BY m.event_name LIMIT 1) IS DISTINCT FROM e.name;
            IF v_fast IS NOT NULL THEN
                v_runs := engine.create_plain_runs(v_fast, p_simple, p_app, p_owner, p_lease,
                                                   p_capacity, v_now);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            -- Whatever it did is undone; the events wait on the queue for a router, which
            -- routes them (or sets aside the one that cannot be) as it does any event.
            RAISE WARNING 'engine: routing events in their send failed (% %): left to the routers',
                SQLSTATE, SQLERRM;
            v_fast := NULL;
            v_runs := NULL;
        END;
    END IF;
    -- The others are queued; the queue's trigger wakes the routers.
    IF cardinality(v_stored) > coalesce(cardinality(v_fast), 0) THEN
        INSERT INTO engine.event_queue (seq, due_at)
        SELECT e.seq, greatest(e.ts, v_now) FROM engine.events e
        WHERE e.seq = ANY (v_stored) AND NOT e.seq = ANY (coalesce(v_fast, '{}'));
    END IF;
    RETURN QUERY SELECT v_ids, coalesce(cardinality(v_fast), 0),
                        coalesce(cardinality(v_fast), 0) < coalesce(cardinality(v_stored), 0),
                        NULL::uuid, NULL::text, NULL::bigint, NULL::bigint, NULL::timestamptz,
                        NULL::jsonb, NULL::text, NULL::text;
    IF v_runs IS NOT NULL THEN
        RETURN QUERY
        SELECT NULL::text[], NULL::int, NULL::boolean, x.id, x.function_id, x.event_seq,
               x.lease_token, x.created_at, x.event, x.traceparent, x.trace_context
        FROM jsonb_to_recordset(v_runs)
            AS x(id uuid, function_id text, event_seq bigint, lease_token bigint,
                 created_at timestamptz, event jsonb, traceparent text, trace_context text);
    END IF;
END $$;

-- The live matchers that the claimed events p_seqs may resolve, filtered by name, match= and
-- age in SQL; the router evaluates the CEL expressions (`if_exp`) of what is left.
-- A matcher with match= is found by its value: the value at its path in the event is one of the
-- event's values (jsonb_path_query '$.**': every value at every depth of its data, or null for
-- a path it lacks), so the candidates are looked up in matchers_value_idx by those few values,
-- then compared at their path. Reading every matcher of the name and comparing each, as this
-- did, read all 10,000 runs waiting for `shop/paid` to resume one (160-180 ms an event on the
-- loaded 2-core machine; tests/test_plans.py).
CREATE OR REPLACE FUNCTION engine.matcher_candidates(p_seqs bigint[])
RETURNS TABLE (event_seq bigint, run_id uuid, key text, kind text, expression text, trigger jsonb)
LANGUAGE sql STABLE AS $$
    SELECT e.seq, m.run_id, m.key, m.kind, m.expression,
           CASE WHEN m.expression IS NOT NULL THEN engine.run_event(r.event_seq) END
    FROM engine.events e
    CROSS JOIN LATERAL (
        SELECT w.run_id, w.key, w.kind, w.expression, w.since_seq, w.expires_at
        FROM engine.matchers w
        WHERE w.event_name = e.name AND w.match_path IS NULL
        UNION ALL
        SELECT w.run_id, w.key, w.kind, w.expression, w.since_seq, w.expires_at
        FROM engine.matchers w
        WHERE w.match_value = ANY (ARRAY(SELECT jsonb_path_query(e.data, 'strict $.**'))
                                   || 'null'::jsonb)
          AND w.event_name = e.name AND w.match_path IS NOT NULL
          AND coalesce(e.data #> w.match_path, 'null') = w.match_value) m
    JOIN engine.runs r ON r.id = m.run_id
    WHERE e.seq = ANY (p_seqs) AND m.since_seq < e.seq AND m.expires_at > engine.now()
    ORDER BY e.seq, m.run_id, m.key
$$;

-- Consumes one matcher with one event: a wait's step completes with the event, an invoke's with
-- the child's result (or fails with its error), a cancel cancels the run. Returns false when the
-- matcher was gone already (resolved by someone else, expired, or its run ended).
CREATE OR REPLACE FUNCTION engine.resolve_match(p_run uuid, p_key text, p_seq bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := engine.now();
    v_kind  text;
    v_event jsonb;
    v_error jsonb;
BEGIN
    -- The run's row first: a suspend_run of this run under way (which holds it) has then either
    -- committed, and the update below wakes it, or not yet looked at its awaited steps, and sees
    -- this one resolved. Without it, both could miss each other and the run wait forever.
    PERFORM 1 FROM engine.runs r WHERE r.id = p_run FOR NO KEY UPDATE;
    DELETE FROM engine.matchers m WHERE m.run_id = p_run AND m.key = p_key
    RETURNING m.kind INTO v_kind;
    IF v_kind IS NULL THEN
        RETURN false;
    END IF;
    v_event := engine.run_event(p_seq);
    IF v_kind = 'cancel' THEN
        PERFORM engine.cancel_run(p_run, format('cancelled by event %s (%s)',
                                                v_event ->> 'name', v_event ->> 'id'));
        RETURN true;
    END IF;
    v_error := nullif(v_event #> '{data,error}', 'null'::jsonb);
    UPDATE engine.steps s
    SET status = CASE WHEN v_kind = 'invoke' AND v_error IS NOT NULL THEN 'FAILED' ELSE 'COMPLETED' END,
        output = CASE WHEN v_kind = 'invoke' THEN v_event #> '{data,result}' ELSE v_event END,
        error = CASE WHEN v_kind = 'invoke' THEN v_error END,
        event_seq = p_seq, ended_at = v_now,
        bytes = engine.step_bytes(CASE WHEN v_kind = 'invoke' THEN v_event #> '{data,result}'
                                       ELSE v_event END,
                                  CASE WHEN v_kind = 'invoke' THEN v_error END)
    WHERE s.run_id = p_run AND s.step_key = p_key AND s.status = 'WAITING';
    -- A suspended run wakes now to go on; a running one notices when it suspends (suspend_run).
    UPDATE engine.runs r
    SET due_at = v_now, waiting_reason = format('resumed by event %s', v_event ->> 'name'),
        updated_at = v_now
    WHERE r.id = p_run AND r.status IN ('WAITING', 'SLEEPING');
    RETURN true;
END $$;

-- p_matches: [{run_id, key, event_seq}]. Returns how many were resolved.
CREATE OR REPLACE FUNCTION engine.resolve_matches(p_matches jsonb) RETURNS int
LANGUAGE sql AS $$
    -- In run id order, the order in which batched suspends and ends lock runs too.
    SELECT count(*) FILTER (WHERE engine.resolve_match(x.run_id, x.key, x.event_seq))::int
    FROM (SELECT * FROM jsonb_to_recordset(p_matches) AS m(run_id uuid, key text, event_seq bigint)
          ORDER BY m.run_id, m.key OFFSET 0) x
$$;

-- Registers matchers for a run this worker holds, with the WAITING steps they complete, and
-- looks back for events that arrived since the run's trigger. A matcher with no expression is
-- resolved here by the first such event; for the others the candidates are returned
-- (`resolved` false) for the worker to evaluate their CEL expression.
-- p_steps: step records (as checkpoint_step); p_matchers: [{key, kind, event_name, match_path,
-- match_value, expression, expires_at, on_timeout}]. Raises EN002 if the lease is lost.
CREATE OR REPLACE FUNCTION engine.register_matchers(
    p_run uuid, p_owner uuid, p_token bigint, p_steps jsonb, p_matchers jsonb)
RETURNS TABLE (key text, event_seq bigint, event jsonb, resolved boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now     timestamptz := engine.now();
    v_since   bigint;
    v_step    jsonb;
    v_matcher record;
    v_seq     bigint;
BEGIN
    -- Name locks first, in a fixed order, before any row lock: routers hold them shared.
    PERFORM engine.lock_event_names(
        ARRAY(SELECT x ->> 'event_name' FROM jsonb_array_elements(p_matchers) x), true);
    IF engine.hold_lease(p_run, p_owner, p_token) IS NULL THEN
        RAISE EXCEPTION 'run %: lease lost', p_run USING ERRCODE = 'EN002';
    END IF;
    SELECT r.event_seq INTO v_since FROM engine.runs r WHERE r.id = p_run;
    FOR v_step IN SELECT value FROM jsonb_array_elements(p_steps) LOOP
        PERFORM engine.record_step(p_run, v_step, p_owner);
    END LOOP;
    FOR v_matcher IN
        SELECT * FROM jsonb_to_recordset(p_matchers) AS x(
            key text, kind text, event_name text, match_path text[], match_value jsonb,
            expression text, expires_at timestamptz, on_timeout jsonb)
    LOOP
        INSERT INTO engine.matchers AS m (run_id, key, kind, event_name, match_path, match_value,
                                          expression, since_seq, expires_at, on_timeout, created_at)
        VALUES (p_run, v_matcher.key, v_matcher.kind, v_matcher.event_name, v_matcher.match_path,
                v_matcher.match_value, v_matcher.expression, v_since,
                coalesce(v_matcher.expires_at, 'infinity'),
                v_matcher.on_timeout, v_now)
        ON CONFLICT DO NOTHING;
        IF v_matcher.expression IS NULL THEN
            SELECT c.seq INTO v_seq FROM engine.lookback(p_run, v_matcher.key, 1) c;
            IF v_seq IS NOT NULL AND engine.resolve_match(p_run, v_matcher.key, v_seq) THEN
                RETURN QUERY SELECT v_matcher.key, v_seq, engine.run_event(v_seq), true;
            END IF;
        ELSE
            RETURN QUERY SELECT v_matcher.key, c.seq, engine.run_event(c.seq), false
                         FROM engine.lookback(p_run, v_matcher.key, 1000) c;
        END IF;
    END LOOP;
END $$;

-- Events that arrived after the run's trigger and may resolve one of its matchers: due, of the
-- right name, passing match=, and not already consumed by another wait of the same run.
-- The range since the trigger is written on (name, seq), the columns of events_name_idx, which
-- the primary key cannot serve: as `e.seq > m.since_seq` the planner could walk every event
-- since the trigger in seq order (events_pkey) and filter them on the name, which it did on a
-- loaded database (120,000 events read for a wait registered after 120,000 others; none now,
-- tests/test_plans.py).
CREATE OR REPLACE FUNCTION engine.lookback(p_run uuid, p_key text, p_limit int)
RETURNS TABLE (seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT e.seq
    FROM engine.matchers m
    JOIN engine.events e
      ON e.name = m.event_name AND (e.name, e.seq) > (m.event_name, m.since_seq)
    WHERE m.run_id = p_run AND m.key = p_key
      AND (m.match_path IS NULL OR coalesce(e.data #> m.match_path, 'null') = m.match_value)
      AND NOT EXISTS (SELECT 1 FROM engine.steps s WHERE s.run_id = p_run AND s.event_seq = e.seq)
      AND NOT EXISTS (SELECT 1 FROM engine.event_queue q
                      WHERE q.seq = e.seq AND q.due_at > engine.now())
    ORDER BY e.seq
    LIMIT p_limit
$$;

-- A function's timeouts.start or timeouts.finish, from the registry (NULL: none).
CREATE OR REPLACE FUNCTION engine.timeout_of(p_app text, p_function text, p_which text)
RETURNS interval LANGUAGE sql STABLE AS $$
    SELECT (f.config #>> ARRAY['timeouts', p_which])::interval
    FROM engine.functions f WHERE f.app_id = p_app AND f.function_id = p_function
$$;

-- Both timeouts of a function, for the runs being created (a lookup in FROM, which PostgreSQL
-- inlines into the creating statement as a subquery).
CREATE OR REPLACE FUNCTION engine.timeouts_of(p_app text, p_function text)
RETURNS TABLE (start_timeout interval, finish_timeout interval) LANGUAGE sql STABLE AS $$
    SELECT (f.config #>> '{timeouts,start}')::interval, (f.config #>> '{timeouts,finish}')::interval
    FROM engine.functions f WHERE f.app_id = p_app AND f.function_id = p_function
    LIMIT 1
$$;

-- p_runs: [{app_id, function_id, event_seq, claim, concurrency}]. Runs with claim=true are
-- created RUNNING and leased to p_owner (the router executes them at once; never a run with
-- concurrency limits, whose permits only the claim takes); the others are QUEUED.
-- Returns the runs leased to p_owner. The unique dedupe key makes routing exactly-once.
-- A new run's own trace context (W3C traceparent): a new span id in the sender's trace
-- (p_parent), or in a new trace when the sender had none. Every execution of the run is a child
-- of this span, so a run is always one trace, across sleeps, retries and workers; the worker
-- that ends the run emits the span itself, from the run's creation to its end.
CREATE OR REPLACE FUNCTION engine.new_trace_context(p_parent text) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT '00-' || coalesce(substr(p_parent, 4, 32), replace(gen_random_uuid()::text, '-', ''))
           || '-' || left(replace(gen_random_uuid()::text, '-', ''), 16) || '-'
           || coalesce(right(p_parent, 2), '01')
$$;

-- What makes this database's run ids its own: the install id (engine.meta, random, created once),
-- the database's oid and the cluster's system identifier. A database reset or created anew gets
-- a new install id; a copy (CREATE DATABASE ... TEMPLATE, a dump restored elsewhere) keeps the
-- install id but not the oid and cluster. A crash, a restart or a failover to a physical
-- replica change none of them, so a routing redone after a crash derives the same ids.
-- Computed once per session (the cluster's identifier is read from a file, under a
-- subtransaction: 15-23 µs a routing) and kept in a setting of the session, under this
-- database's install id: a schema reset meanwhile (a new install id) computes it again, as does
-- a session whose setting was reset (DISCARD ALL). Only the worker role routes, and it may
-- write runs anyway: what it sets in its own session gives it nothing more.
CREATE OR REPLACE FUNCTION engine.run_id_salt() RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_install text := (SELECT m.value FROM engine.meta m WHERE m.key = 'install_id');
    v_kept    text := current_setting('engine.run_id_salt', true);
    v_salt    text;
BEGIN
    IF starts_with(v_kept, v_install || '/') THEN
        RETURN v_kept;
    END IF;
    IF v_install IS NULL THEN
        RAISE EXCEPTION 'engine.meta holds no install_id: apply the schema again';
    END IF;
    SELECT v_install || '/' || d.oid INTO STRICT v_salt
    FROM pg_database d WHERE d.datname = current_database();
    BEGIN
        v_salt := v_salt || '/' || (SELECT c.system_identifier FROM pg_control_system() c);
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;  -- a managed server may hide it: the install id and the oid remain
    END;
    PERFORM set_config('engine.run_id_salt', v_salt, false);
    RETURN v_salt;
END $$;

-- The id of the run an event starts for a function: the same every time that event is routed to
-- that function in this database, so a routing lost in a crash (see route_simple) recreates the
-- run under the id its first execution may already have used, in idempotency keys and
-- elsewhere; and, salted with engine.run_id_salt(), different from every id another database
-- gives (event sequence numbers restart at 1 in each). Each name is prefixed with its length:
-- ids may hold any character ('/', ':', '|'), and no two (app, function) pairs read alike.
-- ('engine' || '.run' is a constant of the derivation, the same whatever the engine's schema is
-- named: engine/pg_schema.py rewrites every engine.name of this file for another schema.)
CREATE OR REPLACE FUNCTION engine.event_run_id(
    p_salt text, p_app text, p_function text, p_seq bigint)
RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
    SELECT md5(format('engine' || '.run|%s|%s:%s|%s:%s|event:%s', p_salt, length(p_app), p_app,
                      length(p_function), p_function, p_seq))::uuid
$$;

-- Takes the routed events p_seqs off the queue and creates their runs (see insert_runs). No
-- single event can stop the batch: if creating the runs fails for a reason that lies in the data
-- (a data exception, a constraint violation, a program limit, an error raised by the engine's
-- own functions), the batch is done again one event at a time, each in a subtransaction of its
-- own, and an event whose runs cannot be created is dead-lettered with the reason. Any other
-- error (a deadlock, a lost connection...) fails the routing, which is tried again. The common
-- case costs one subtransaction per batch and no round trip.
CREATE OR REPLACE FUNCTION engine.create_runs(
    p_seqs bigint[], p_runs jsonb, p_owner uuid, p_lease interval)
RETURNS TABLE (id uuid, function_id text, event_seq bigint, lease_token bigint, created_at timestamptz,
               trace_context text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_created jsonb;
    v_seq     bigint;
BEGIN
    DELETE FROM engine.event_queue q WHERE q.seq = ANY (p_seqs);
    BEGIN
        SELECT coalesce(jsonb_agg(c), '[]') INTO v_created
        FROM engine.insert_runs(p_runs, p_owner, p_lease) c;
    EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded
                   OR plpgsql_error THEN
        v_created := '[]';
        FOR v_seq IN SELECT DISTINCT (x ->> 'event_seq')::bigint
                     FROM jsonb_array_elements(p_runs) x ORDER BY 1 LOOP
            BEGIN
                SELECT v_created || coalesce(jsonb_agg(c), '[]') INTO v_created
                FROM engine.insert_runs(
                    (SELECT jsonb_agg(x) FROM jsonb_array_elements(p_runs) x
                     WHERE (x ->> 'event_seq')::bigint = v_seq), p_owner, p_lease) c;
            EXCEPTION WHEN data_exception OR integrity_constraint_violation
                           OR program_limit_exceeded OR plpgsql_error THEN
                PERFORM engine.dead_letter(jsonb_build_array(jsonb_build_object(
                    'seq', v_seq, 'error', jsonb_build_object(
                        'type', 'RunCreationError', 'sqlstate', SQLSTATE,
                        'message', format('its runs could not be created: %s', SQLERRM)))));
                RAISE WARNING 'engine: event % dead-lettered: its runs could not be created: %',
                    v_seq, SQLERRM;
            END;
        END LOOP;
    END;
    RETURN QUERY
    SELECT x.id, x.function_id, x.event_seq, x.lease_token, x.created_at, x.trace_context
    FROM jsonb_to_recordset(v_created)
        AS x(id uuid, function_id text, event_seq bigint, lease_token bigint, created_at timestamptz,
             trace_context text);
END $$;

-- Creates the runs of p_runs (as in create_runs); returns those created.
CREATE OR REPLACE FUNCTION engine.insert_runs(p_runs jsonb, p_owner uuid, p_lease interval)
RETURNS TABLE (id uuid, function_id text, event_seq bigint, lease_token bigint, created_at timestamptz,
               trace_context text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now  timestamptz := engine.now();
    v_salt text := engine.run_id_salt();
BEGIN
    RETURN QUERY
    WITH admitted AS (
        SELECT x.* FROM jsonb_to_recordset(engine.admit(p_runs, v_now))
            AS x(app_id text, function_id text, event_seq bigint, claim boolean, concurrency jsonb,
                 singleton_key text, skip text, priority int, throttle jsonb, debounce_key text,
                 debounce_period float8, debounce_timeout float8, merged boolean,
                 batch_key text, batch_max int, batch_timeout float8, batch_seqs jsonb)
        WHERE NOT coalesce(x.merged, false)
    ), created AS (
        INSERT INTO engine.runs AS r (id, app_id, function_id, status, event_seq, dedupe_key, due_at,
                                      lease_owner, lease_token, lease_expires_at, traceparent,
                                      trace_context, start_deadline, finish_timeout, finish_deadline, concurrency,
                                      singleton_key, throttle, debounce_key, debounce_until,
                                      batch_key, batch_size, batch_max, rank_at,
                                      waiting_reason, created_at, started_at, ended_at, updated_at)
        SELECT engine.event_run_id(v_salt, x.app_id, x.function_id, x.event_seq), x.app_id, x.function_id,
               CASE WHEN x.skip IS NOT NULL THEN 'SKIPPED' WHEN x.claim THEN 'RUNNING' ELSE 'QUEUED' END,
               x.event_seq, 'event:' || x.event_seq,
               -- A run's place in line is its event's arrival (not when a router, racing
               -- others, created it). Priority N: due N seconds earlier, so the claim (by
               -- due_at) takes it ahead of runs queued up to N seconds before it; a negative N
               -- delays it. A debounced run waits its period; a batch its timeout, unless full.
               CASE WHEN x.debounce_period IS NOT NULL
                         OR jsonb_array_length(coalesce(x.batch_seqs, '[]')) < x.batch_max
                    THEN v_now + make_interval(secs => coalesce(x.debounce_period, 0)
                                                       + coalesce(x.batch_timeout, 0))
                    ELSE least(e.received_at, v_now) END
               - make_interval(secs => coalesce(x.priority, 0)),
               CASE WHEN x.claim THEN p_owner END,
               CASE WHEN x.claim THEN 1 ELSE 0 END,
               CASE WHEN x.claim THEN v_now + p_lease END,
               e.traceparent, engine.new_trace_context(e.traceparent),
               v_now + t.start_timeout, t.finish_timeout,
               CASE WHEN x.claim THEN v_now + t.finish_timeout END,
               nullif(x.concurrency, 'null'),
               x.singleton_key, nullif(x.throttle, 'null'), x.debounce_key,
               v_now + make_interval(secs => x.debounce_timeout),
               x.batch_key, jsonb_array_length(x.batch_seqs), x.batch_max,
               least(e.received_at, v_now) - make_interval(secs => coalesce(x.priority, 0)),
               coalesce(x.skip, CASE WHEN x.debounce_key IS NOT NULL THEN 'debounced: waiting for a quiet period'
                                     WHEN x.batch_key IS NOT NULL THEN 'collecting a batch of events' END),
               v_now,
               CASE WHEN x.claim THEN v_now END,
               CASE WHEN x.skip IS NOT NULL THEN v_now END,
               v_now
        FROM admitted x
        -- A lookup per run (LIMIT keeps the subquery from being flattened into a join): a
        -- join was planned as a hash of every event while the table was small (see route_simple).
        CROSS JOIN LATERAL (SELECT ev.received_at, ev.traceparent FROM engine.events ev
                            WHERE ev.seq = x.event_seq LIMIT 1) e
        LEFT JOIN LATERAL engine.timeouts_of(x.app_id, x.function_id) t ON true  -- once per run
        ON CONFLICT (app_id, function_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
        RETURNING r.id, r.app_id, r.function_id, r.event_seq, r.lease_token, r.created_at,
                  r.trace_context
    ), batched AS (
        INSERT INTO engine.batch_events (run_id, position, seq)
        SELECT c.id, b.ordinality - 1, b.value::bigint
        FROM created c
        JOIN admitted x ON (x.app_id, x.function_id, x.event_seq) = (c.app_id, c.function_id, c.event_seq)
        CROSS JOIN LATERAL jsonb_array_elements_text(x.batch_seqs) WITH ORDINALITY AS b(value, ordinality)
        WHERE x.batch_seqs IS NOT NULL
    ), executing AS (  -- started at once by this router: its first execution
        INSERT INTO engine.run_executions (run_id, lease_token, worker, claimed_at)
        SELECT c.id, 1, p_owner, v_now FROM created c WHERE c.lease_token = 1
    )
    SELECT c.id, c.function_id, c.event_seq, c.lease_token, c.created_at, c.trace_context
    FROM created c;
END $$;

-- The runs that the routed events p_seqs make for their plain triggers p_simple (a JSON array
-- of {app_id, function_id, event, local}), with the event of each: one run per trigger, leased
-- to the caller (claim) when its trigger is local and the caller has room for it (the first
-- p_capacity such runs, in event order). engine.create_plain_runs writes them, and
-- engine.route_events gives the same plan to engine.create_runs when that fails.
CREATE OR REPLACE FUNCTION engine.plain_plan(
    p_seqs bigint[], p_simple jsonb, p_app text, p_capacity int, p_now timestamptz)
RETURNS TABLE (app_id text, function_id text, event_seq bigint, claim boolean, event_id text,
               name text, data jsonb, ts timestamptz, v text, traceparent text,
               arrived timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT t.app_id, t.function_id, e.seq,
           coalesce(t.local, t.app_id = p_app)
           AND count(*) FILTER (WHERE coalesce(t.local, t.app_id = p_app)) OVER (
                   ORDER BY e.seq, t.app_id, t.function_id
                   ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) <= p_capacity,
           e.id, e.name, e.data, e.ts, e.v, e.traceparent, least(e.received_at, p_now)
    FROM engine.events e
    JOIN jsonb_to_recordset(p_simple)
         AS t(app_id text, function_id text, event text, local boolean) ON t.event = e.name
    WHERE e.seq = ANY (p_seqs)
$$;

-- The runs of the routed events p_seqs for their plain triggers p_simple (a JSON array of
-- {app_id, function_id, event, local}), planned and written in one statement; returns those
-- leased to p_owner, as a JSON array of route_events' rows. A plain trigger has no expression
-- and its function no flow control: an event makes one run per trigger, with nothing to admit
-- (engine.insert_runs, for the Python router's runs, admits each). A run is leased to p_owner
-- (RUNNING, with its first execution) when its trigger is local and p_owner has room for it
-- (the first p_capacity such runs, in event order); the others are QUEUED for the claims. The
-- rows are insert_runs' for the same triggers (tests/test_send_routing.py compares them column
-- by column). Sends (send_and_route) and routing ticks (route_events) write their runs here.
CREATE OR REPLACE FUNCTION engine.create_plain_runs(
    p_seqs bigint[], p_simple jsonb, p_app text, p_owner uuid, p_lease interval,
    p_capacity int, p_now timestamptz)
RETURNS jsonb LANGUAGE sql AS $$
    WITH planned AS (
        SELECT * FROM engine.plain_plan(p_seqs, p_simple, p_app, p_capacity, p_now)
    ), created AS (
        INSERT INTO engine.runs AS r (id, app_id, function_id, status, event_seq, dedupe_key,
                                      due_at, lease_owner, lease_token, lease_expires_at,
                                      traceparent, trace_context, start_deadline, finish_timeout,
                                      finish_deadline, rank_at, created_at, started_at, updated_at)
        SELECT engine.event_run_id(salt.v, p.app_id, p.function_id, p.event_seq),
               p.app_id, p.function_id, CASE WHEN p.claim THEN 'RUNNING' ELSE 'QUEUED' END,
               p.event_seq, 'event:' || p.event_seq, p.arrived,
               CASE WHEN p.claim THEN p_owner END, CASE WHEN p.claim THEN 1 ELSE 0 END,
               CASE WHEN p.claim THEN p_now + p_lease END,
               p.traceparent, engine.new_trace_context(p.traceparent),
               p_now + t.start_timeout, t.finish_timeout,
               CASE WHEN p.claim THEN p_now + t.finish_timeout END,
               p.arrived, p_now, CASE WHEN p.claim THEN p_now END, p_now
        FROM planned p
        CROSS JOIN (SELECT engine.run_id_salt() AS v) salt  -- once, not for each run
        LEFT JOIN LATERAL engine.timeouts_of(p.app_id, p.function_id) t ON true  -- once per run
        ON CONFLICT (app_id, function_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
        RETURNING r.id, r.app_id, r.function_id, r.event_seq, r.lease_token, r.created_at,
                  r.trace_context
    ), executing AS (  -- started at once by this worker: its first execution
        INSERT INTO engine.run_executions (run_id, lease_token, worker, claimed_at)
        SELECT c.id, 1, p_owner, p_now FROM created c WHERE c.lease_token = 1
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', c.id, 'function_id', c.function_id, 'event_seq', c.event_seq,
               'lease_token', c.lease_token, 'created_at', c.created_at,
               'event', jsonb_build_object('id', p.event_id, 'name', p.name, 'data', p.data,
                                           'ts', p.ts, 'v', p.v),
               'traceparent', p.traceparent, 'trace_context', c.trace_context)), '[]')
    FROM created c
    JOIN planned p
      ON (p.app_id, p.function_id, p.event_seq) = (c.app_id, c.function_id, c.event_seq)
    WHERE c.lease_token > 0
$$;

-- Admission control for runs being created (p_runs as in create_runs, with the keys the router
-- computed: idempotency_key; rate_key with rate_limit and rate_period (seconds); singleton_key
-- with singleton_mode). Returns p_runs with `skip` (the reason) set on the runs that must be
-- SKIPPED, and `claim` cleared on them. Keys are locked (engine.lock_flow_keys, sorted) first, so
-- routers admitting the same key serialize and every limit is exact.
-- Flow-control keys being admitted, one row each, locked by the router admitting runs for the key
-- (never advisory locks, which any role may take: see engine.event_names). used_at lets
-- engine.prune delete the rows of keys no longer in use.
CREATE TABLE IF NOT EXISTS engine.flow_locks (
    key     text PRIMARY KEY,
    used_at timestamptz NOT NULL DEFAULT now()
);

-- Locks the rows of p_keys, in key order (inserting a row locks it as well as updating one).
CREATE OR REPLACE FUNCTION engine.lock_flow_keys(p_keys text[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO engine.flow_locks AS l (key)
    SELECT DISTINCT x FROM unnest(p_keys) x WHERE x IS NOT NULL ORDER BY 1
    ON CONFLICT (key) DO UPDATE SET used_at = now()
$$;

CREATE OR REPLACE FUNCTION engine.admit(p_runs jsonb, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_out     jsonb := '[]';
    v_run     jsonb;
    v_skip    text;
    v_key     text;
    v_used    int;
    v_fresh   boolean;
    v_batch   jsonb := '{}';   -- singleton key -> index in v_out of the run admitted for it
    v_pending jsonb := '{}';   -- debounce key -> index in v_out of the new run created for it
    v_open    jsonb := '{}';   -- batch key -> index in v_out of a new batch run not yet full
    v_index   int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_runs) x
                   WHERE x ?| ARRAY['idempotency_key', 'rate_key', 'singleton_key', 'debounce_key',
                                    'batch_key']) THEN
        RETURN p_runs;  -- the common case: no admission control at all
    END IF;
    PERFORM engine.lock_flow_keys(ARRAY(
        SELECT v.key FROM jsonb_array_elements(p_runs) x,
        LATERAL (VALUES (x ->> 'rate_key'), (x ->> 'singleton_key'), (x ->> 'debounce_key'),
                        (x ->> 'batch_key')) AS v(key)));
    FOR v_run IN SELECT value FROM jsonb_array_elements(p_runs) LOOP
        v_skip := NULL;
        v_key := v_run ->> 'idempotency_key';
        IF v_key IS NOT NULL THEN
            v_fresh := NULL;
            INSERT INTO engine.idempotency_keys AS k (key, run_event, expires_at)
            VALUES (v_key, (v_run ->> 'event_seq')::bigint, p_now + interval '24 hours')
            ON CONFLICT (key) DO UPDATE
                SET run_event = excluded.run_event, expires_at = excluded.expires_at
                WHERE k.expires_at <= p_now
            RETURNING true INTO v_fresh;
            IF v_fresh IS NULL THEN
                v_skip := format('idempotency: key %s was used by another run in the last 24 hours',
                                 split_part(v_key, '|', 2));
            END IF;
        END IF;
        v_key := v_run ->> 'rate_key';
        IF v_skip IS NULL AND v_key IS NOT NULL THEN
            DELETE FROM engine.rate_log l
            WHERE l.key = v_key AND l.at <= p_now - make_interval(secs => (v_run ->> 'rate_period')::float8);
            SELECT count(*) INTO v_used FROM engine.rate_log l WHERE l.key = v_key;
            IF v_used >= (v_run ->> 'rate_limit')::int THEN
                v_skip := format('rate limit: %s runs already started in the last %s seconds',
                                 v_used, v_run ->> 'rate_period');
            ELSE
                INSERT INTO engine.rate_log (key, at) VALUES (v_key, p_now);
            END IF;
        END IF;
        v_key := v_run ->> 'singleton_key';
        IF v_skip IS NULL AND v_key IS NOT NULL THEN
            IF v_run ->> 'singleton_mode' = 'cancel' THEN
                PERFORM engine.cancel_run(r.id, 'replaced by a newer run (singleton)')
                FROM engine.runs r WHERE r.singleton_key = v_key
                  AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING');
                IF v_batch ? v_key THEN  -- an earlier event of this batch: it never starts
                    v_out := jsonb_set(v_out, ARRAY[v_batch ->> v_key],
                        (v_out -> (v_batch ->> v_key)::int)
                        || '{"skip": "replaced by a newer run (singleton)", "claim": false}');
                END IF;
            ELSIF v_batch ? v_key OR EXISTS (
                    SELECT 1 FROM engine.runs r WHERE r.singleton_key = v_key
                      AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')) THEN
                v_skip := 'singleton: another run of this key is active';
            END IF;
            IF v_skip IS NULL THEN
                v_batch := v_batch || jsonb_build_object(v_key, jsonb_array_length(v_out));
            END IF;
        END IF;
        v_key := v_run ->> 'debounce_key';
        IF v_skip IS NULL AND v_key IS NOT NULL THEN
            IF v_pending ? v_key THEN  -- an earlier event of this batch: the later one wins
                v_out := jsonb_set(v_out, ARRAY[v_pending ->> v_key, 'event_seq'],
                                   v_run -> 'event_seq');
                v_run := v_run || '{"merged": true}';
            ELSIF engine.debounce(v_run, p_now) THEN
                v_run := v_run || '{"merged": true}';  -- the pending run of its key took it
            ELSE
                v_pending := v_pending || jsonb_build_object(v_key, jsonb_array_length(v_out));
            END IF;
        END IF;
        v_key := v_run ->> 'batch_key';
        IF v_skip IS NULL AND v_key IS NOT NULL THEN
            IF v_open ? v_key THEN  -- a batch opened by an earlier event of this call
                v_index := (v_open ->> v_key)::int;
                v_out := jsonb_set(v_out, ARRAY[v_index::text, 'batch_seqs'],
                                   (v_out #> ARRAY[v_index::text, 'batch_seqs'])
                                   || jsonb_build_array(v_run -> 'event_seq'));
                IF jsonb_array_length(v_out #> ARRAY[v_index::text, 'batch_seqs'])
                   >= (v_run ->> 'batch_max')::int THEN
                    v_open := v_open - v_key;
                END IF;
                v_run := v_run || '{"merged": true}';
            ELSIF engine.add_to_batch(v_run, p_now) THEN
                v_run := v_run || '{"merged": true}';
            ELSE
                v_run := v_run || jsonb_build_object('batch_seqs', jsonb_build_array(v_run -> 'event_seq'));
                IF (v_run ->> 'batch_max')::int > 1 THEN
                    v_open := v_open || jsonb_build_object(v_key, jsonb_array_length(v_out));
                END IF;
            END IF;
        END IF;
        IF v_skip IS NOT NULL THEN
            v_run := v_run || jsonb_build_object('skip', v_skip, 'claim', false);
        END IF;
        v_out := v_out || jsonb_build_array(v_run);
    END LOOP;
    RETURN v_out;
END $$;

-- Adds an event to the open batch of its key (a batched run not yet started nor full); a full
-- batch is due at once. False when no batch is open (a new one is created for the event).
CREATE OR REPLACE FUNCTION engine.add_to_batch(p_run jsonb, p_now timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_id   uuid;
    v_size int;
    v_max  int;
BEGIN
    SELECT r.id, r.batch_size, r.batch_max INTO v_id, v_size, v_max FROM engine.runs r
    WHERE r.batch_key = p_run ->> 'batch_key' AND r.status = 'QUEUED' AND r.started_at IS NULL
      AND r.batch_size < r.batch_max
    ORDER BY r.created_at
    LIMIT 1
    FOR UPDATE;
    IF v_id IS NULL THEN
        RETURN false;
    END IF;
    INSERT INTO engine.batch_events (run_id, position, seq)
    VALUES (v_id, v_size, (p_run ->> 'event_seq')::bigint);
    UPDATE engine.runs r
    SET batch_size = v_size + 1, updated_at = p_now,
        due_at = CASE WHEN v_size + 1 >= v_max THEN p_now ELSE r.due_at END
    WHERE r.id = v_id;
    IF v_size + 1 >= v_max THEN
        PERFORM pg_notify('engine_wakeup', 'runs');  -- a full batch starts now
    END IF;
    RETURN true;
END $$;

-- A batched run's events, in order.
CREATE OR REPLACE FUNCTION engine.batch_of(p_run uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_agg(engine.run_event(b.seq) ORDER BY b.position)
    FROM engine.batch_events b WHERE b.run_id = p_run
$$;

-- Gives a new event to the pending (not yet started) debounced run of its key, pushing its start
-- back by the period, but not past its debounce_until. True when such a run took it; false when
-- there is none (a new run is created for the event).
CREATE OR REPLACE FUNCTION engine.debounce(p_run jsonb, p_now timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    SELECT r.id INTO v_id FROM engine.runs r
    WHERE r.debounce_key = p_run ->> 'debounce_key' AND r.status = 'QUEUED' AND r.started_at IS NULL
    ORDER BY r.created_at
    LIMIT 1
    FOR UPDATE;
    IF v_id IS NULL THEN
        RETURN false;
    END IF;
    UPDATE engine.runs r
    SET event_seq = (p_run ->> 'event_seq')::bigint, updated_at = p_now,
        due_at = least(p_now + make_interval(secs => (p_run ->> 'debounce_period')::float8),
                       coalesce(r.debounce_until, 'infinity'))
    WHERE r.id = v_id;
    RETURN true;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Claiming runs
-- ---------------------------------------------------------------------------------------------
-- What a run did, for get_run and dashboards: the run, its event and its steps.
SELECT engine.ensure('view:run_details', to_regclass('engine.run_details') IS NOT NULL, $view$
CREATE OR REPLACE VIEW engine.run_details AS
SELECT r.id, r.app_id, r.function_id, r.status, r.attempt, r.waiting_reason, r.due_at,
       r.output, r.error, r.created_at, r.started_at, r.ended_at, r.event_seq,
       engine.run_event(r.event_seq) AS event, engine.run_history(r.id) AS steps,
       engine.execution_history(r.id) AS executions, engine.pause_history(r.id) AS pauses,
       substr(coalesce(r.trace_context, r.traceparent), 4, 32) AS trace_id
FROM engine.runs r$view$);

-- Leases up to p_limit runs of the given functions to p_owner: due queued, sleeping, retrying
-- and waiting runs, and running runs whose lease expired (their worker died). Returns each run
-- with its event and its recorded steps, so a claimed run replays with no further round trip,
-- and state_bytes, the size of those steps (engine.steps.bytes). A due run past one of its
-- timeouts is cancelled instead of claimed; one whose steps hold more than p_max_state bytes
-- fails instead (engine.enforce_state_limit).
-- p_replays_patches: the caller's code replays ctx.patched markers (steps of kind 'patch').
-- Workers from before them call without it: they would fail a run holding one as unreadable,
-- so during a deploy such runs wait for a newer worker instead (tests/test_deploys.py).
CREATE OR REPLACE FUNCTION engine.claim_runs(
    p_app text, p_functions text[], p_owner uuid, p_lease interval, p_limit int,
    p_max_state bigint DEFAULT 32 * 1024 * 1024, p_replays_patches boolean DEFAULT false)
RETURNS TABLE (id uuid, function_id text, lease_token bigint, attempt int, log_lines int,
               cancel_requested boolean, traceparent text, created_at timestamptz,
               claimed_at timestamptz, event jsonb, steps jsonb, events jsonb, state_bytes bigint,
               taken_over boolean, trace_context text, log_places jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now     timestamptz := engine.now();
    v_ids     uuid[] := '{}';
    v_taken   uuid[] := '{}';  -- taken over from a worker whose lease expired
    v_run       record;
    v_blocked   text;
    v_throttled boolean;
    v_turn      timestamptz;
BEGIN
    FOR v_run IN
        WITH due AS (
            SELECT r.id, r.status, r.concurrency, r.throttle, r.started_at,
                   coalesce(r.rank_at, r.created_at) AS rank_at, r.event_seq
            FROM engine.runs r
            WHERE r.app_id = p_app AND r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')
              AND r.due_at <= v_now AND r.function_id = ANY (p_functions)
            ORDER BY r.due_at, r.event_seq
            LIMIT p_limit + 32  -- room for runs that park on a full concurrency slot
            FOR UPDATE SKIP LOCKED
        ), expired AS (
            SELECT r.id, r.status, r.concurrency, r.throttle, r.started_at,
                   coalesce(r.rank_at, r.created_at) AS rank_at, r.event_seq
            FROM engine.runs r
            WHERE r.app_id = p_app AND r.status = 'RUNNING'
              AND r.lease_expires_at < v_now AND r.function_id = ANY (p_functions)
              -- Never the caller's own: it is still executing them (a late heartbeat, a durable
              -- clock jump) and its next heartbeat renews them; a run it lost track of, it
              -- releases itself (release_orphans).
              AND r.lease_owner IS DISTINCT FROM p_owner
            ORDER BY r.lease_expires_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        )
        -- Runs taken over from a dead worker first: they are under way (and hold their
        -- permits); behind a backlog they would wait for all of it to drain.
        SELECT * FROM expired UNION ALL SELECT * FROM due
    LOOP
        EXIT WHEN cardinality(v_ids) >= p_limit;
        -- A run holding a ctx.patched marker is not for a worker from before them. Looked up
        -- here, for those callers only, through steps_patch_idx: in the queries above, a NOT
        -- EXISTS would be planned as a hash of every marker at each claim.
        CONTINUE WHEN NOT p_replays_patches AND EXISTS (
            SELECT 1 FROM engine.steps s WHERE s.run_id = v_run.id AND s.kind = 'patch');
        -- Throttled functions: a first start waits for its turn (the row is locked until commit).
        v_throttled := v_run.throttle IS NOT NULL AND v_run.started_at IS NULL;
        IF v_throttled THEN
            v_turn := engine.throttle_turn(v_run.throttle, v_now);
            IF v_turn IS NULL THEN
                CONTINUE;  -- the throttle row is locked by another claim: try again next time
            ELSIF v_turn > v_now THEN
                UPDATE engine.runs r
                SET due_at = v_turn, updated_at = v_now,
                    waiting_reason = format('throttled until %s', v_turn)
                WHERE r.id = v_run.id;
                CONTINUE;
            END IF;
        END IF;
        -- A run taken over from a dead worker keeps the permits it holds.
        IF v_run.concurrency IS NOT NULL AND v_run.status <> 'RUNNING' THEN
            v_blocked := engine.take_permits(v_run.concurrency, v_run.rank_at, v_run.event_seq);
            IF v_blocked = '' THEN
                CONTINUE;  -- a slot row is locked by another claim: try again next time
            ELSIF v_blocked IS NOT NULL THEN
                -- Parked: no worker looks at it again until a permit of that slot is released.
                UPDATE engine.runs r
                SET due_at = 'infinity', blocked_on = v_blocked, updated_at = v_now,
                    waiting_reason = format('concurrency limit reached (%s)', v_blocked)
                WHERE r.id = v_run.id;
                CONTINUE;
            END IF;
        END IF;
        IF v_throttled THEN
            UPDATE engine.throttles t
            SET tat = greatest(t.tat, v_now) + make_interval(secs => (v_run.throttle ->> 'interval')::float8)
            WHERE t.key = v_run.throttle ->> 'key';
        END IF;
        v_ids := v_ids || v_run.id;
        IF v_run.status = 'RUNNING' THEN
            v_taken := v_taken || v_run.id;
        END IF;
    END LOOP;
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    PERFORM engine.charge_lost_steps(v_taken, v_now, p_lease);
    PERFORM engine.begin_executions(v_ids, v_taken, p_owner, v_now);
    UPDATE engine.runs r
    SET status = 'RUNNING', lease_owner = p_owner, lease_token = r.lease_token + 1,
        lease_expires_at = v_now + p_lease, started_at = coalesce(r.started_at, v_now),
        finish_deadline = coalesce(r.finish_deadline, v_now + r.finish_timeout),
        waiting_reason = NULL, blocked_on = NULL, updated_at = v_now, executing = NULL
    WHERE r.id = ANY (v_ids);
    v_ids := engine.enforce_timeouts(v_ids, v_now);
    -- A sleep whose time has come is over: record it so that replay returns at once.
    UPDATE engine.steps s SET status = 'COMPLETED', ended_at = s.wake_at
    WHERE s.run_id = ANY (v_ids) AND s.status = 'SLEEPING' AND s.wake_at <= v_now;
    -- So is a wait or an invoke whose timeout passed: it records what its matcher says.
    WITH gone AS (
        DELETE FROM engine.matchers m
        WHERE m.run_id = ANY (v_ids) AND m.kind IN ('wait', 'invoke') AND m.expires_at <= v_now
        RETURNING m.run_id, m.key, m.on_timeout
    )
    UPDATE engine.steps s
    SET status = coalesce(g.on_timeout ->> 'status', 'COMPLETED'), output = g.on_timeout -> 'output',
        error = g.on_timeout -> 'error', ended_at = v_now,
        bytes = engine.step_bytes(g.on_timeout -> 'output', g.on_timeout -> 'error')
    FROM gone g WHERE s.run_id = g.run_id AND s.step_key = g.key AND s.status = 'WAITING';
    -- A run whose recorded state is over the limit fails here, before its history is built
    -- into one value: it cannot break the claim of the others (or be loaded at all).
    v_ids := engine.enforce_state_limit(v_ids, p_max_state, v_now);
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    SELECT r.id, r.function_id, r.lease_token, r.attempt, r.log_lines, r.cancel_requested,
           r.traceparent, r.created_at, v_now, engine.run_event(r.event_seq), engine.run_steps(r.id),
           CASE WHEN r.batch_key IS NOT NULL THEN engine.batch_of(r.id) END,
           (SELECT coalesce(sum(s.bytes), 0)::bigint FROM engine.steps s WHERE s.run_id = r.id),
           r.id = ANY (v_taken), r.trace_context, r.log_places
    FROM engine.runs r WHERE r.id = ANY (v_ids);
END $$;

-- A tick's claim and, in a statement of its own after it (so that it sees the runs the claim
-- took as RUNNING), engine.next_due: a worker needs both when the claim left slots free, and
-- two round trips cost it twice the client and server time of one. The claimed runs come
-- first; the last row has a NULL id and carries next_due and now. A claim that took p_limit
-- runs leaves the worker no free slot: it ticks again when one of its runs ends, not at a due
-- time, so next_due is not computed (NULL).
CREATE OR REPLACE FUNCTION engine.claim_runs_then_next_due(
    p_app text, p_functions text[], p_owner uuid, p_lease interval, p_limit int,
    p_max_state bigint, p_replays_patches boolean)
RETURNS TABLE (id uuid, function_id text, lease_token bigint, attempt int, log_lines int,
               cancel_requested boolean, traceparent text, created_at timestamptz,
               claimed_at timestamptz, event jsonb, steps jsonb, events jsonb, state_bytes bigint,
               taken_over boolean, trace_context text, log_places jsonb, next_due timestamptz,
               now timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_claimed bigint;
    v_due     timestamptz;
BEGIN
    RETURN QUERY
    SELECT c.*, NULL::timestamptz, NULL::timestamptz
    FROM engine.claim_runs(p_app, p_functions, p_owner, p_lease, p_limit, p_max_state,
                           p_replays_patches) c;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    IF v_claimed < p_limit THEN
        v_due := engine.next_due(p_app, p_functions);
    END IF;
    RETURN QUERY
    SELECT NULL::uuid, NULL::text, NULL::bigint, NULL::int, NULL::int, NULL::boolean, NULL::text,
           NULL::timestamptz, NULL::timestamptz, NULL::jsonb, NULL::jsonb, NULL::jsonb,
           NULL::bigint, NULL::boolean, NULL::text, NULL::jsonb, v_due, engine.now();
END $$;

-- The history of a claim (before its UPDATE of the runs: the token and the waiting reason are
-- the previous ones): an execution begins for each claimed run, and the execution of a run taken
-- over from an expired lease ends LOST when that lease expired.
CREATE OR REPLACE FUNCTION engine.begin_executions(
    p_ids uuid[], p_taken uuid[], p_owner uuid, p_now timestamptz)
RETURNS void LANGUAGE sql AS $$
    UPDATE engine.run_executions x SET ended_at = r.lease_expires_at, outcome = 'LOST'
    FROM engine.runs r
    WHERE r.id = ANY (p_taken) AND x.run_id = r.id AND x.lease_token = r.lease_token
      AND x.ended_at IS NULL;
    INSERT INTO engine.run_executions (run_id, lease_token, worker, claimed_at, taken_over, waited)
    SELECT r.id, r.lease_token + 1, p_owner, p_now, r.id = ANY (p_taken),
           CASE WHEN r.started_at IS NULL THEN r.waiting_reason END
    FROM engine.runs r WHERE r.id = ANY (p_ids)
    ON CONFLICT DO NOTHING;
$$;

-- Ends the open executions of runs that ended or were released without their worker's write
-- (a timeout or the state limit at the claim, a worker that lost track of them): their outcome
-- is the run's status.
CREATE OR REPLACE FUNCTION engine.close_executions(p_runs uuid[], p_now timestamptz)
RETURNS void LANGUAGE sql AS $$
    UPDATE engine.run_executions x SET ended_at = p_now, outcome = r.status
    FROM engine.runs r
    WHERE r.id = ANY (p_runs) AND x.run_id = r.id AND x.ended_at IS NULL;
$$;

-- The steps of a report of the steps executing ({v, steps}, or a bare list from older workers).
CREATE OR REPLACE FUNCTION engine.executing_steps(p_report jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE jsonb_typeof(p_report)
               WHEN 'object' THEN coalesce(p_report -> 'steps', '[]')
               WHEN 'array' THEN p_report
               ELSE '[]' END
$$;

-- Whether p_new (a report of the steps executing) replaces p_old, for the run's execution
-- p_token. A report names its execution (token) and counts the changes it has seen (v): a
-- heartbeat's report is taken before its round trip, and may arrive after a newer one (a step
-- noted meanwhile by note_executing), or come from an older execution of the run in the same
-- worker (one whose blocked loop let the lease expire, and which the worker took back since). A
-- stale report replacing a newer one would let a takeover miss the step executing, and run it
-- once more than its retries allow. Bare lists (workers before v10) always replace.
CREATE OR REPLACE FUNCTION engine.newer_report(p_new jsonb, p_old jsonb, p_token bigint)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_new) IS DISTINCT FROM 'object' THEN true
        WHEN (p_new ->> 'token')::bigint IS DISTINCT FROM p_token THEN false
        WHEN jsonb_typeof(p_old) IS DISTINCT FROM 'object'
             OR (p_old ->> 'token')::bigint IS DISTINCT FROM p_token THEN true
        ELSE (p_new ->> 'v')::bigint >= (p_old ->> 'v')::bigint END
$$;

-- A run taken over from a worker whose lease expired while steps were executing (its heartbeat
-- recorded them in runs.executing): each counts as a failed attempt of its step, so a step that
-- blocks its worker's event loop past the lease (or kills its worker) is retried within its
-- `retries`, not without bound. A step recorded meanwhile is left as it is.
CREATE OR REPLACE FUNCTION engine.charge_lost_steps(
    p_runs uuid[], p_now timestamptz, p_lease interval)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_runs) = 0 THEN
        RETURN;
    END IF;
    PERFORM engine.record_step(r.id, jsonb_build_object(
        'key', x ->> 'key', 'position', (x ->> 'position')::int, 'kind', 'run',
        'status', CASE WHEN (x ->> 'final')::boolean THEN 'FAILED' ELSE 'RETRYING' END,
        'attempts', (x ->> 'attempt')::int + 1, 'output', NULL, 'wake_at', NULL,
        'id', x ->> 'id', 'follows', x ->> 'follows', 'started_at', x -> 'started_at',
        'ended_at', r.lease_expires_at,
        'error', jsonb_build_object(
            'type', 'LeaseLostError',
            'message', format('the worker lost the run''s lease while step %L was executing: '
                              'no heartbeat for %s or more (its event loop was blocked that '
                              'long, or the worker died)', x ->> 'key',
                              date_trunc('second', p_now - r.lease_expires_at + p_lease)))),
        r.lease_owner)
    FROM engine.runs r, jsonb_array_elements(engine.executing_steps(r.executing)) x
    WHERE r.id = ANY (p_runs);
END $$;


-- When a throttled run may start (GCRA: tat - interval * burst), locking its key's row; NULL when
-- the row is locked by another claim.
CREATE OR REPLACE FUNCTION engine.throttle_turn(p_throttle jsonb, p_now timestamptz)
RETURNS timestamptz LANGUAGE plpgsql AS $$
DECLARE
    v_key text := p_throttle ->> 'key';
    v_tat timestamptz;
BEGIN
    SELECT t.tat INTO v_tat FROM engine.throttles t WHERE t.key = v_key FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM engine.throttles t WHERE t.key = v_key) THEN
            RETURN NULL;
        END IF;
        INSERT INTO engine.throttles (key) VALUES (v_key) ON CONFLICT DO NOTHING;
        SELECT t.tat INTO v_tat FROM engine.throttles t WHERE t.key = v_key FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    RETURN greatest(v_tat - make_interval(secs => (p_throttle ->> 'interval')::float8
                                                   * (p_throttle ->> 'burst')::int), '-infinity');
END $$;

-- Takes one permit of each slot (p_slots: [{slot, cap, fifo}], sorted) for a run being claimed
-- whose place in line is (p_rank, p_seq): its rank_at (creation shifted by priority) and event.
-- Returns NULL when all were taken, the first full slot's name (nothing taken), or '' when a
-- slot row is locked by another claim (nothing taken: SKIP LOCKED keeps claims from waiting on
-- each other, and so from deadlocking). A FIFO slot also counts as full while a run ahead in
-- line is parked on it, so runs start in line order.
CREATE OR REPLACE FUNCTION engine.take_permits(p_slots jsonb, p_rank timestamptz, p_seq bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_slot  record;
    v_taken text[] := '{}';
    v_used  int;
BEGIN
    FOR v_slot IN SELECT x.slot, x.cap, coalesce(x.fifo, false) AS fifo
                  FROM jsonb_to_recordset(p_slots) AS x(slot text, cap int, fifo boolean) LOOP
        SELECT s.in_use INTO v_used FROM engine.concurrency_slots s
        WHERE s.slot = v_slot.slot FOR UPDATE SKIP LOCKED;
        IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM engine.concurrency_slots s
                                     WHERE s.slot = v_slot.slot) THEN
            INSERT INTO engine.concurrency_slots (slot) VALUES (v_slot.slot) ON CONFLICT DO NOTHING;
            SELECT s.in_use INTO v_used FROM engine.concurrency_slots s
            WHERE s.slot = v_slot.slot FOR UPDATE SKIP LOCKED;
        END IF;
        IF v_used IS NOT NULL AND v_slot.fifo AND EXISTS (
                SELECT 1 FROM engine.runs b
                WHERE b.blocked_on = v_slot.slot
                  AND (coalesce(b.rank_at, b.created_at), b.event_seq) < (p_rank, p_seq)
                  AND b.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')) THEN
            v_used := v_slot.cap;  -- an older run waits for this slot: it goes first
        END IF;
        IF v_used IS NULL OR v_used >= v_slot.cap THEN
            UPDATE engine.concurrency_slots s SET in_use = s.in_use - 1 WHERE s.slot = ANY (v_taken);
            RETURN CASE WHEN v_used IS NULL THEN '' ELSE v_slot.slot END;
        END IF;
        UPDATE engine.concurrency_slots s SET in_use = s.in_use + 1 WHERE s.slot = v_slot.slot;
        v_taken := v_taken || v_slot.slot;
    END LOOP;
    RETURN NULL;
END $$;

-- A run leaving RUNNING gives its permits back and wakes the longest-parked run of each slot. The
-- woken run keeps blocked_on until it is claimed, so a FIFO slot still makes newer runs wait.
CREATE OR REPLACE FUNCTION engine.release_permits() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_now  timestamptz := engine.now();
    v_slot text;
BEGIN
    FOR v_slot IN SELECT x ->> 'slot' FROM jsonb_array_elements(NEW.concurrency) x LOOP
        UPDATE engine.concurrency_slots s SET in_use = greatest(s.in_use - 1, 0)
        WHERE s.slot = v_slot;
        UPDATE engine.runs r SET due_at = v_now, updated_at = v_now
        WHERE r.id = (SELECT b.id FROM engine.runs b
                      WHERE b.blocked_on = v_slot AND b.due_at = 'infinity'
                        AND b.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')
                      ORDER BY coalesce(b.rank_at, b.created_at), b.event_seq
                      LIMIT 1
                      FOR UPDATE SKIP LOCKED);
    END LOOP;
    RETURN NULL;
END $$;

SELECT engine.ensure_trigger('engine.runs', 'runs_released', $trigger$
CREATE OR REPLACE TRIGGER runs_released
    AFTER UPDATE OF status ON engine.runs
    FOR EACH ROW
    WHEN (OLD.status = 'RUNNING' AND NEW.status <> 'RUNNING' AND NEW.concurrency IS NOT NULL)
    EXECUTE FUNCTION engine.release_permits()$trigger$);

-- Fails the just-claimed runs whose recorded steps hold more than p_max bytes (a run that grew
-- through waits or invokes, or that was recorded under a larger limit); returns the others.
CREATE OR REPLACE FUNCTION engine.enforce_state_limit(p_ids uuid[], p_max bigint, p_now timestamptz)
RETURNS uuid[] LANGUAGE plpgsql AS $$
DECLARE
    v_over uuid[];
BEGIN
    -- The common case, no run over the limit, reads the claimed runs' steps through the primary
    -- key and nothing else (planned with the UPDATE below, a generic plan cached while the
    -- tables looked small may scan every run to join them).
    IF NOT EXISTS (SELECT 1 FROM engine.steps s WHERE s.run_id = ANY (p_ids)
                   GROUP BY s.run_id HAVING sum(s.bytes) > p_max) THEN
        RETURN p_ids;
    END IF;
    WITH sizes AS (
        SELECT s.run_id, sum(s.bytes) AS bytes FROM engine.steps s
        WHERE s.run_id = ANY (p_ids) GROUP BY s.run_id HAVING sum(s.bytes) > p_max
    ), over AS (
        UPDATE engine.runs r
        SET status = 'FAILED', ended_at = p_now, lease_owner = NULL, lease_expires_at = NULL,
            updated_at = p_now,
            error = jsonb_build_object(
                'type', 'StateLimitError',
                'message', format('the run''s recorded steps hold %s bytes; the limit on a run''s '
                                  'state is %s (max_state_bytes)', z.bytes, p_max))
        FROM sizes z WHERE r.id = z.run_id
        RETURNING r.id
    )
    SELECT array_agg(o.id) INTO v_over FROM over o;
    IF v_over IS NULL THEN
        RETURN p_ids;
    END IF;
    PERFORM engine.close_executions(v_over, p_now);
    RETURN ARRAY(SELECT x FROM unnest(p_ids) x WHERE x <> ALL (v_over));
END $$;

-- Cancels the just-claimed runs that are past a timeout; returns the others.
CREATE OR REPLACE FUNCTION engine.enforce_timeouts(p_ids uuid[], p_now timestamptz)
RETURNS uuid[] LANGUAGE plpgsql AS $$
DECLARE
    v_late uuid[];
BEGIN
    -- The common case, no deadline passed, is one primary-key lookup of the claimed runs, and
    -- the steps are read only for the runs past their start deadline: planned together (a
    -- generic plan cached while engine.steps looked small), the NOT EXISTS below may become a
    -- hashed subplan that reads every step of every run at each claim.
    IF NOT EXISTS (SELECT 1 FROM engine.runs r
                   WHERE r.id = ANY (p_ids)
                     AND (r.finish_deadline <= p_now OR r.start_deadline <= p_now)) THEN
        RETURN p_ids;
    END IF;
    WITH late AS (
        UPDATE engine.runs r
        SET status = 'CANCELLED', ended_at = p_now, lease_owner = NULL, lease_expires_at = NULL,
            error = jsonb_build_object(
                'type', 'FunctionTimeout',
                'message', CASE WHEN r.finish_deadline <= p_now
                                THEN format('the run did not finish within %s (timeouts.finish)', r.finish_timeout)
                                ELSE format('the run did not start within %s (timeouts.start)',
                                            r.start_deadline - r.created_at) END)
        WHERE r.id = ANY (p_ids)
          AND (r.finish_deadline <= p_now
               OR (r.start_deadline <= p_now AND NOT EXISTS (
                       SELECT 1 FROM engine.steps s WHERE s.run_id = r.id)))
        RETURNING r.id
    )
    SELECT array_agg(l.id) INTO v_late FROM late l;
    IF v_late IS NULL THEN
        RETURN p_ids;
    END IF;
    PERFORM engine.close_executions(v_late, p_now);
    RETURN ARRAY(SELECT x FROM unnest(p_ids) x WHERE x <> ALL (v_late));
END $$;

-- The earliest time at which something becomes claimable for these functions (or routable).
CREATE OR REPLACE FUNCTION engine.next_due(p_app text, p_functions text[]) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(r.due_at) FROM engine.runs r
         WHERE r.app_id = p_app AND r.status IN ('QUEUED', 'SLEEPING', 'RETRYING', 'WAITING')
           AND r.function_id = ANY (p_functions)),
        (SELECT min(c.next_at) FROM engine.cron_schedules c WHERE c.app_id = p_app),
        (SELECT min(r.lease_expires_at) FROM engine.runs r
         WHERE r.app_id = p_app AND r.status = 'RUNNING' AND r.function_id = ANY (p_functions)),
        (SELECT min(q.due_at) FROM engine.event_queue q))
$$;

-- ---------------------------------------------------------------------------------------------
-- Writes under a lease. Each returns 'ok', 'cancel' (ok, and a cancel was requested), 'lost'
-- (the lease is no longer ours: nothing was written) or 'duplicate' (the step is already final).
-- ---------------------------------------------------------------------------------------------
-- Whether a finish deadline has passed. The CASE keeps engine.now() (a read of engine.clock) off
-- the checkpoint path for the runs that have no finish timeout: almost all of them.
CREATE OR REPLACE FUNCTION engine.past_deadline(p_deadline timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_deadline IS NULL THEN false ELSE p_deadline <= engine.now() END
$$;

-- Locks the run row FOR KEY SHARE: a concurrent claim (FOR UPDATE SKIP LOCKED) skips the run
-- rather than slipping a new lease in between this check and the insert. NULL when the lease is
-- not (or no longer) the caller's.
--
-- The lease is checked in a CASE, not in the WHERE clause, here and in every lease-guarded write
-- of one run: a WHERE clause stating status = 'RUNNING' lets the planner find the row through
-- runs_leased_idx (the partial index of RUNNING runs) instead of the primary key, and a plan made
-- when few runs were RUNNING (an ANALYZE at a quiet moment; the cached generic plan of a
-- worker's connection) then reads every RUNNING run's index entry for each checkpoint: a cost
-- that grows with the runs in flight. By id alone the plan is one primary-key lookup, always.
CREATE OR REPLACE FUNCTION engine.hold_lease(p_run uuid, p_owner uuid, p_token bigint)
RETURNS boolean LANGUAGE sql AS $$
    SELECT CASE WHEN r.lease_owner = p_owner AND r.lease_token = p_token AND r.status = 'RUNNING'
                THEN r.cancel_requested OR engine.past_deadline(r.finish_deadline) END
    FROM engine.runs r
    WHERE r.id = p_run
    FOR KEY SHARE
$$;

-- The size a step adds to its run's state: its output and error as jsonb values in memory, which
-- is what a claim aggregates (one jsonb value holds at most 256 MiB). O(1): no serialization.
CREATE OR REPLACE FUNCTION engine.step_bytes(p_output jsonb, p_error jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(pg_column_size(p_output), 0)::bigint + coalesce(pg_column_size(p_error), 0)
$$;

-- Records a step (p_step: {key, position, kind, status, attempts, output, error, wake_at, id,
-- follows, started_at, ended_at, traceback, retry_at, input}) recorded by p_worker; false if the step
-- is final already. A failed attempt of a `run` step is also kept in engine.step_attempts, with
-- its traceback. The times come from the worker (its estimate of engine.now() when the attempt
-- started and ended): a completed step is committed with the next write, not when it ended.
CREATE OR REPLACE FUNCTION engine.record_step(p_run uuid, p_step jsonb, p_worker uuid DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz := engine.now();
    v_status  text := p_step ->> 'status';
    v_started timestamptz := (p_step ->> 'started_at')::timestamptz;
    v_ended   timestamptz := coalesce((p_step ->> 'ended_at')::timestamptz, v_now);
    v_ok      boolean;
BEGIN
    INSERT INTO engine.steps AS s (run_id, step_key, position, kind, status, attempts, output,
                                   error, wake_at, created_at, ended_at, step_id, follows, bytes,
                                   started_at, worker, input)
    VALUES (p_run, p_step ->> 'key', (p_step ->> 'position')::int, p_step ->> 'kind',
            v_status, (p_step ->> 'attempts')::int, p_step -> 'output', p_step -> 'error',
            (p_step ->> 'wake_at')::timestamptz, v_now,
            CASE WHEN v_status IN ('COMPLETED', 'FAILED') THEN v_ended END,
            p_step ->> 'id', p_step ->> 'follows',
            engine.step_bytes(p_step -> 'output', p_step -> 'error'), v_started, p_worker,
            p_step -> 'input')
    ON CONFLICT (run_id, step_key) DO UPDATE
        SET status = excluded.status, attempts = excluded.attempts, output = excluded.output,
            error = excluded.error, wake_at = excluded.wake_at, ended_at = excluded.ended_at,
            bytes = excluded.bytes, started_at = excluded.started_at, worker = excluded.worker,
            input = excluded.input
        WHERE s.status NOT IN ('COMPLETED', 'FAILED')
    RETURNING true INTO v_ok;
    IF v_ok AND p_step ->> 'kind' = 'run' AND v_status IN ('RETRYING', 'FAILED') THEN
        INSERT INTO engine.step_attempts (run_id, step_key, attempt, outcome, started_at, ended_at,
                                          worker, error, retry_at, input)
        VALUES (p_run, p_step ->> 'key', (p_step ->> 'attempts')::int - 1, v_status, v_started,
                v_ended, p_worker,
                coalesce(p_step -> 'error', '{}') || jsonb_strip_nulls(jsonb_build_object(
                    'traceback', p_step -> 'traceback')),
                (p_step ->> 'retry_at')::timestamptz, p_step -> 'input')
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN coalesce(v_ok, false);
END $$;

-- Records several steps as engine.record_step does each, in one statement: a buffered
-- checkpoint (engine/checkpointing.py) carries up to a thousand steps, and a row at a time in
-- PL/pgSQL cost ~0.2 ms each. Returns how many were written (fewer than given: some step was
-- final already). The keys must be distinct (one statement cannot write a row twice).
CREATE OR REPLACE FUNCTION engine.record_steps(p_run uuid, p_steps jsonb, p_worker uuid)
RETURNS bigint LANGUAGE sql AS $$
    WITH given AS (
        SELECT x, x ->> 'key' AS key, x ->> 'status' AS status,
               (x ->> 'started_at')::timestamptz AS started,
               coalesce((x ->> 'ended_at')::timestamptz, engine.now()) AS ended
        FROM jsonb_array_elements(p_steps) AS x
    ), written AS (
        INSERT INTO engine.steps AS s (run_id, step_key, position, kind, status, attempts, output,
                                       error, wake_at, created_at, ended_at, step_id, follows,
                                       bytes, started_at, worker, input)
        SELECT p_run, g.key, (g.x ->> 'position')::int, g.x ->> 'kind', g.status,
               (g.x ->> 'attempts')::int, g.x -> 'output', g.x -> 'error',
               (g.x ->> 'wake_at')::timestamptz, engine.now(),
               CASE WHEN g.status IN ('COMPLETED', 'FAILED') THEN g.ended END,
               g.x ->> 'id', g.x ->> 'follows', engine.step_bytes(g.x -> 'output', g.x -> 'error'),
               g.started, p_worker, g.x -> 'input'
        FROM given g
        ON CONFLICT (run_id, step_key) DO UPDATE
            SET status = excluded.status, attempts = excluded.attempts, output = excluded.output,
                error = excluded.error, wake_at = excluded.wake_at, ended_at = excluded.ended_at,
                bytes = excluded.bytes, started_at = excluded.started_at, worker = excluded.worker,
                input = excluded.input
            WHERE s.status NOT IN ('COMPLETED', 'FAILED')
        RETURNING s.step_key
    ), attempts AS (
        INSERT INTO engine.step_attempts (run_id, step_key, attempt, outcome, started_at,
                                          ended_at, worker, error, retry_at, input)
        SELECT p_run, g.key, (g.x ->> 'attempts')::int - 1, g.status, g.started, g.ended,
               p_worker,
               coalesce(g.x -> 'error', '{}') || jsonb_strip_nulls(jsonb_build_object(
                   'traceback', g.x -> 'traceback')),
               (g.x ->> 'retry_at')::timestamptz, g.x -> 'input'
        FROM given g JOIN written w ON w.step_key = g.key
        WHERE g.x ->> 'kind' = 'run' AND g.status IN ('RETRYING', 'FAILED')
        ON CONFLICT DO NOTHING
    )
    SELECT count(*) FROM written
$$;

-- Records several steps at once (those that completed since the last checkpoint), as below.
-- A list with a key twice (not written by this version's workers) is recorded a step at a time.
CREATE OR REPLACE FUNCTION engine.checkpoint_steps(
    p_run uuid, p_owner uuid, p_token bigint, p_steps jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_cancel boolean := engine.hold_lease(p_run, p_owner, p_token);
    v_step   jsonb;
    v_count  int := jsonb_array_length(p_steps);
BEGIN
    IF v_cancel IS NULL THEN
        RETURN 'lost';
    END IF;
    IF v_count = 1 THEN  -- the usual item of a batch: no cursor over a list of one
        IF NOT engine.record_step(p_run, p_steps -> 0, p_owner) THEN
            RETURN 'duplicate';
        END IF;
    ELSIF v_count > 1 AND v_count = (SELECT count(DISTINCT x ->> 'key')
                                     FROM jsonb_array_elements(p_steps) AS x) THEN
        IF engine.record_steps(p_run, p_steps, p_owner) < v_count THEN
            RETURN 'duplicate';
        END IF;
    ELSE
        FOR v_step IN SELECT value FROM jsonb_array_elements(p_steps) LOOP
            IF NOT engine.record_step(p_run, v_step, p_owner) THEN
                RETURN 'duplicate';
            END IF;
        END LOOP;
    END IF;
    RETURN CASE WHEN v_cancel THEN 'cancel' ELSE 'ok' END;
END $$;

-- Batched forms: a worker groups the checkpoints, ends and suspensions of its concurrent runs
-- into one transaction (one commit for many runs). Each item gets its own result, in order.
--
-- Whether a batch names each step once (and, with p_runs_once, each run once): what the set
-- forms need, since one statement cannot write a row twice.
CREATE OR REPLACE FUNCTION engine.writes_once(p_items jsonb, p_runs_once boolean)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT (NOT p_runs_once OR (SELECT count(DISTINCT e.x ->> 'run') = count(*)
                                FROM jsonb_array_elements(p_items) AS e(x)))
       AND (SELECT count(*) = count(DISTINCT (e.x ->> 'run', s.x ->> 'key'))
            FROM jsonb_array_elements(p_items) AS e(x),
                 jsonb_array_elements(e.x -> 'steps') AS s(x))
$$;

-- A batch of checkpoints is written as a set (engine.checkpoint_set) when no step appears in it
-- twice, as in every batch a worker of this version sends; one that names a step twice goes an
-- item at a time, in order.
CREATE OR REPLACE FUNCTION engine.checkpoint_many(p_items jsonb)
RETURNS TABLE (ord bigint, result text) LANGUAGE plpgsql AS $$
BEGIN
    IF engine.writes_once(p_items, false) THEN
        RETURN QUERY SELECT c.ord, c.result FROM engine.checkpoint_set(p_items) c;
    ELSE
        RETURN QUERY
        SELECT e.ord, engine.checkpoint_steps((e.x ->> 'run')::uuid, (e.x ->> 'owner')::uuid,
                                              (e.x ->> 'token')::bigint, e.x -> 'steps')
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(x, ord)
        ORDER BY e.ord;
    END IF;
END $$;

-- The checkpoints of many runs in one statement, each item answered as engine.checkpoint_steps
-- answers it: 'lost' without the lease (nothing written), 'duplicate' when a step of it was
-- final already, 'cancel' when a cancel is pending (its steps are recorded), else 'ok'. The
-- runs are locked FOR KEY SHARE in their ids' order, as an item at a time locks them. Written
-- as a set, a batch costs the server one statement's start-up instead of a function call and
-- its statements per item: 40-48 µs of CPU an item instead of 54-78 for batches of 25 one-step
-- items (bench/README.md, session 17). The run and key of every step must be distinct.
CREATE OR REPLACE FUNCTION engine.checkpoint_set(p_items jsonb)
RETURNS TABLE (ord bigint, result text) LANGUAGE sql AS $$
    WITH items AS (
        SELECT e.ord, (e.x ->> 'run')::uuid AS run, (e.x ->> 'owner')::uuid AS owner,
               (e.x ->> 'token')::bigint AS token, coalesce(e.x -> 'steps', '[]') AS steps
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(x, ord)
    ), held AS (  -- engine.hold_lease of each item (NULL without the lease), in run id order
        SELECT i.ord, l.cancel
        FROM (SELECT * FROM items ORDER BY run) i
        -- One lookup by id an item: a join of the items and the runs may be planned as a hash
        -- of every run, the generic plan a worker's connection caches while the table is young
        -- and keeps while it grows (tests/test_generic_plans.py).
        CROSS JOIN LATERAL (
            SELECT CASE WHEN r.lease_owner = i.owner AND r.lease_token = i.token
                             AND r.status = 'RUNNING'
                        THEN r.cancel_requested OR engine.past_deadline(r.finish_deadline)
                   END AS cancel
            FROM engine.runs r WHERE r.id = i.run
            FOR KEY SHARE
        ) l
    ), given AS (
        SELECT i.ord, i.run, i.owner, x, x ->> 'key' AS key, x ->> 'status' AS status,
               (x ->> 'started_at')::timestamptz AS started,
               coalesce((x ->> 'ended_at')::timestamptz, engine.now()) AS ended
        FROM items i JOIN held h ON h.ord = i.ord AND h.cancel IS NOT NULL,
             jsonb_array_elements(i.steps) AS x
    ), written AS (  -- as engine.record_step writes each
        INSERT INTO engine.steps AS s (run_id, step_key, position, kind, status, attempts, output,
                                       error, wake_at, created_at, ended_at, step_id, follows,
                                       bytes, started_at, worker, input)
        SELECT g.run, g.key, (g.x ->> 'position')::int, g.x ->> 'kind', g.status,
               (g.x ->> 'attempts')::int, g.x -> 'output', g.x -> 'error',
               (g.x ->> 'wake_at')::timestamptz, engine.now(),
               CASE WHEN g.status IN ('COMPLETED', 'FAILED') THEN g.ended END,
               g.x ->> 'id', g.x ->> 'follows', engine.step_bytes(g.x -> 'output', g.x -> 'error'),
               g.started, g.owner, g.x -> 'input'
        FROM given g
        ON CONFLICT (run_id, step_key) DO UPDATE
            SET status = excluded.status, attempts = excluded.attempts, output = excluded.output,
                error = excluded.error, wake_at = excluded.wake_at, ended_at = excluded.ended_at,
                bytes = excluded.bytes, started_at = excluded.started_at, worker = excluded.worker,
                input = excluded.input
            WHERE s.status NOT IN ('COMPLETED', 'FAILED')
        RETURNING s.run_id, s.step_key
    ), counted AS (
        SELECT g.ord, count(*) AS steps
        FROM given g JOIN written w ON w.run_id = g.run AND w.step_key = g.key
        GROUP BY g.ord
    ), attempts AS (  -- a failed attempt of a `run` step, as engine.record_step keeps it
        INSERT INTO engine.step_attempts (run_id, step_key, attempt, outcome, started_at,
                                          ended_at, worker, error, retry_at, input)
        SELECT g.run, g.key, (g.x ->> 'attempts')::int - 1, g.status, g.started, g.ended,
               g.owner,
               coalesce(g.x -> 'error', '{}') || jsonb_strip_nulls(jsonb_build_object(
                   'traceback', g.x -> 'traceback')),
               (g.x ->> 'retry_at')::timestamptz, g.x -> 'input'
        FROM given g JOIN written w ON w.run_id = g.run AND w.step_key = g.key
        WHERE g.x ->> 'kind' = 'run' AND g.status IN ('RETRYING', 'FAILED')
        ON CONFLICT DO NOTHING
    )
    SELECT i.ord,
           CASE WHEN h.cancel IS NULL THEN 'lost'
                WHEN coalesce(c.steps, 0) < jsonb_array_length(i.steps) THEN 'duplicate'
                WHEN h.cancel THEN 'cancel'
                ELSE 'ok' END
    FROM items i LEFT JOIN held h ON h.ord = i.ord LEFT JOIN counted c ON c.ord = i.ord
    ORDER BY i.ord
$$;

-- p_step: {key, position, kind, status, attempts, output, error, wake_at}
CREATE OR REPLACE FUNCTION engine.checkpoint_step(p_run uuid, p_owner uuid, p_token bigint, p_step jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_cancel boolean := engine.hold_lease(p_run, p_owner, p_token);
BEGIN
    IF v_cancel IS NULL THEN
        RETURN 'lost';
    END IF;
    IF NOT engine.record_step(p_run, p_step, p_owner) THEN
        RETURN 'duplicate';
    END IF;
    RETURN CASE WHEN v_cancel THEN 'cancel' ELSE 'ok' END;
END $$;

-- The usual checkpoint, in typed arguments: one completed step, the only thing its write
-- carries (what a worker sends for a run's step when nothing else is committing with it). It
-- records what engine.checkpoint_many records for that step, and returns what it returns; the
-- error column holds a JSON null, as a record's does. Without the JSON to unpack and the layers
-- of functions that each unpack their part of it, the server spends 0.22-0.25 ms of CPU on a
-- step's transaction instead of 0.26-0.32 (an INSERT of a small row: 0.14), measured per
-- committed call (bench/step_ladder.py; bench/README.md, session 13).
CREATE OR REPLACE FUNCTION engine.checkpoint_completed(
    p_run uuid, p_owner uuid, p_token bigint, p_key text, p_position int, p_kind text,
    p_attempts int, p_output jsonb, p_step_id text, p_follows text, p_started_at timestamptz,
    p_ended_at timestamptz, p_input jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_cancel boolean := engine.hold_lease(p_run, p_owner, p_token);
    v_ok     boolean;
BEGIN
    IF v_cancel IS NULL THEN
        RETURN 'lost';
    END IF;
    INSERT INTO engine.steps AS s (run_id, step_key, position, kind, status, attempts, output,
                                   error, created_at, ended_at, step_id, follows, bytes,
                                   started_at, worker, input)
    VALUES (p_run, p_key, p_position, p_kind, 'COMPLETED', p_attempts, p_output, 'null',
            engine.now(), coalesce(p_ended_at, engine.now()), p_step_id, p_follows,
            engine.step_bytes(p_output, 'null'), p_started_at, p_owner, p_input)
    ON CONFLICT (run_id, step_key) DO UPDATE  -- as engine.record_step's
        SET status = excluded.status, attempts = excluded.attempts, output = excluded.output,
            error = excluded.error, wake_at = excluded.wake_at, ended_at = excluded.ended_at,
            bytes = excluded.bytes, started_at = excluded.started_at, worker = excluded.worker,
            input = excluded.input
        WHERE s.status NOT IN ('COMPLETED', 'FAILED')
    RETURNING true INTO v_ok;
    RETURN CASE WHEN v_ok IS NULL THEN 'duplicate' WHEN v_cancel THEN 'cancel' ELSE 'ok' END;
END $$;

-- Releases the run until p_due (a sleep, a wait, a retry backoff, or a worker handing work
-- back), recording p_steps (sleep steps) first. A run whose cancel was requested ends CANCELLED
-- instead. p_awaited names the waits and invokes the run is blocked on: if an event resolved one
-- of them while the run was still executing, the run is due at once. A finish timeout caps p_due.
-- p_body_error: the function body's error (with its traceback) when this is a retry of the
-- whole function, kept in the execution's history.
CREATE OR REPLACE FUNCTION engine.suspend_run(
    p_run uuid, p_owner uuid, p_token bigint, p_status text, p_due timestamptz, p_reason text,
    p_attempt int, p_log_lines int, p_steps jsonb, p_awaited text[] DEFAULT '{}',
    p_body_error jsonb DEFAULT NULL, p_log_places jsonb DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := engine.now();
    v_cancel boolean := engine.hold_lease(p_run, p_owner, p_token);
    v_step   jsonb;
    v_due    timestamptz := p_due;
    v_status text;
BEGIN
    IF v_cancel IS NULL THEN
        RETURN 'lost';
    END IF;
    -- Held before looking at the awaited steps: see engine.resolve_match.
    PERFORM 1 FROM engine.runs r WHERE r.id = p_run FOR NO KEY UPDATE;
    FOR v_step IN SELECT value FROM jsonb_array_elements(p_steps) LOOP
        -- A cancelled run records the steps that completed, not the sleep it was about to start.
        CONTINUE WHEN v_cancel AND v_step ->> 'status' = 'SLEEPING';
        PERFORM engine.record_step(p_run, v_step, p_owner);
    END LOOP;
    IF EXISTS (SELECT 1 FROM engine.steps s
               WHERE s.run_id = p_run AND s.step_key = ANY (p_awaited) AND s.status <> 'WAITING') THEN
        v_due := v_now;
    END IF;
    UPDATE engine.runs r
    SET status = CASE WHEN v_cancel THEN 'CANCELLED' ELSE p_status END,
        due_at = least(v_due, r.finish_deadline),
        waiting_reason = CASE WHEN v_cancel THEN r.waiting_reason ELSE p_reason END,
        -- The count of the lines logged after the run's tail (see RunLogger): replaced, not
        -- maxed, since the tail moves from one execution to the next.
        attempt = p_attempt, log_lines = p_log_lines,
        log_places = coalesce(p_log_places, r.log_places),
        ended_at = CASE WHEN v_cancel THEN v_now END,
        error = CASE WHEN v_cancel THEN engine.cancel_error(r, v_now) END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = v_now
    WHERE r.id = p_run
    RETURNING r.status, r.due_at INTO v_status, v_due;
    UPDATE engine.run_executions x
    SET ended_at = v_now, outcome = v_status, due_at = CASE WHEN v_status <> 'CANCELLED' THEN v_due END,
        reason = CASE WHEN v_status <> 'CANCELLED' THEN p_reason END, body_error = p_body_error
    WHERE x.run_id = p_run AND x.lease_token = p_token;
    IF p_status = 'QUEUED' AND NOT v_cancel THEN
        PERFORM pg_notify('engine_wakeup', 'runs');  -- handed back: wake another worker
    END IF;
    RETURN CASE WHEN v_cancel THEN 'cancel' ELSE 'ok' END;
END $$;

-- The error a run cancelled by its finish timeout carries (NULL for other cancels).
CREATE OR REPLACE FUNCTION engine.timeout_error(r engine.runs, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN r.finish_deadline <= p_now THEN jsonb_build_object(
        'type', 'FunctionTimeout',
        'message', format('the run did not finish within %s (timeouts.finish)', r.finish_timeout))
    END
$$;

-- The error of a run cancelled for p_reason.
CREATE OR REPLACE FUNCTION engine.cancelled(p_reason text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('type', 'FunctionCancelled',
                              'message', coalesce(p_reason, 'the run was cancelled'))
$$;

-- The error of a cancelled run, saying who or what cancelled it: the first cancel request (its
-- reason was recorded by engine.cancel_run), else the finish timeout that passed.
CREATE OR REPLACE FUNCTION engine.cancel_error(r engine.runs, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(CASE WHEN r.cancel_requested THEN r.error END,
                    engine.timeout_error(r, p_now),
                    engine.cancelled(r.waiting_reason))
$$;

-- Ends a run: p_status is COMPLETED, FAILED or CANCELLED. p_steps are the records of the steps
-- that completed since the last checkpoint (the last step of a function usually): committing
-- them with the run's end saves a round trip, and nothing ran after them but replayable code.
-- A cancel requested before this call wins, whatever the worker says: the steps are recorded,
-- the run ends CANCELLED with the cancel's reason, and the function's output is discarded.
-- Returns 'ok', 'cancel' (it ended CANCELLED instead of p_status) or 'lost'.
-- p_traceback: the traceback of p_error, kept in the execution's history only.
CREATE OR REPLACE FUNCTION engine.finish_run(
    p_run uuid, p_owner uuid, p_token bigint, p_status text, p_output jsonb, p_error jsonb,
    p_log_lines int, p_steps jsonb DEFAULT '[]', p_traceback text DEFAULT NULL,
    p_log_places jsonb DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := engine.now();
    v_step   jsonb;
    v_status text;
BEGIN
    IF jsonb_array_length(p_steps) > 0 THEN
        IF engine.hold_lease(p_run, p_owner, p_token) IS NULL THEN
            RETURN 'lost';
        END IF;
        -- Recorded by another execution: this one is stale. One step (the usual end) needs no
        -- cursor over the list (as in engine.checkpoint_steps: written out in both, since a
        -- function shared by them would cost a call more than the cursor it saves).
        IF jsonb_array_length(p_steps) = 1 THEN
            IF NOT engine.record_step(p_run, p_steps -> 0, p_owner) THEN
                RETURN 'lost';
            END IF;
        ELSE
            FOR v_step IN SELECT value FROM jsonb_array_elements(p_steps) LOOP
                IF NOT engine.record_step(p_run, v_step, p_owner) THEN
                    RETURN 'lost';
                END IF;
            END LOOP;
        END IF;
    END IF;
    UPDATE engine.runs r
    SET status = CASE WHEN r.cancel_requested THEN 'CANCELLED' ELSE p_status END,
        output = CASE WHEN r.cancel_requested THEN NULL ELSE p_output END,
        ended_at = v_now,
        error = CASE WHEN r.cancel_requested THEN engine.cancel_error(r, v_now)
                     WHEN p_status = 'CANCELLED' THEN coalesce(p_error, engine.cancel_error(r, v_now))
                     ELSE p_error END,
        log_lines = greatest(r.log_lines, p_log_lines),
        log_places = coalesce(p_log_places, r.log_places),
        lease_owner = NULL, lease_expires_at = NULL, updated_at = v_now,
        -- a cancel keeps its reason (who cancelled it), which engine/function.cancelled carries
        waiting_reason = CASE WHEN r.cancel_requested OR p_status = 'CANCELLED' THEN r.waiting_reason END
    WHERE r.id = p_run  -- the lease in a CASE: see engine.hold_lease
      AND CASE WHEN r.lease_owner = p_owner AND r.lease_token = p_token AND r.status = 'RUNNING'
               THEN true ELSE false END
    RETURNING r.status INTO v_status;
    -- The execution that ends a run ends with it (engine.execution_history reads its end from
    -- the run): only the error of a failed run, with its traceback, is written here.
    IF v_status = 'FAILED' THEN
        UPDATE engine.run_executions x
        SET ended_at = v_now, outcome = v_status,
            body_error = p_error || jsonb_strip_nulls(jsonb_build_object('traceback', p_traceback))
        WHERE x.run_id = p_run AND x.lease_token = p_token;
    END IF;
    RETURN CASE WHEN v_status IS NULL THEN 'lost'
                WHEN v_status = 'CANCELLED' AND p_status <> 'CANCELLED' THEN 'cancel'
                ELSE 'ok' END;
END $$;

-- A batch of run ends is written as a set (engine.finish_set) when it ends each run once and
-- names each step once, as every batch a worker of this version sends; another goes an item at
-- a time, in order.
CREATE OR REPLACE FUNCTION engine.finish_many(p_items jsonb)
RETURNS TABLE (ord bigint, result text) LANGUAGE plpgsql AS $$
BEGIN
    IF engine.writes_once(p_items, true) THEN
        RETURN QUERY SELECT f.ord, f.result FROM engine.finish_set(p_items) f;
    ELSE
        RETURN QUERY
        SELECT e.ord, engine.finish_run((e.x ->> 'run')::uuid, (e.x ->> 'owner')::uuid,
                                        (e.x ->> 'token')::bigint, e.x ->> 'status',
                                        nullif(e.x -> 'output', 'null'),
                                        nullif(e.x -> 'error', 'null'),
                                        (e.x ->> 'log_lines')::int, e.x -> 'steps',
                                        e.x ->> 'traceback', nullif(e.x -> 'log_places', 'null'))
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(x, ord)
        ORDER BY e.ord;
    END IF;
END $$;

-- The ends of many runs as a set, each item written and answered as engine.finish_run writes
-- and answers it ('ok', 'cancel' or 'lost'); the runs_ended trigger sends their end events. The
-- leases are checked and the steps written as a batch of checkpoints writes them (the runs
-- locked in their ids' order), then the runs whose steps were all written end, in one
-- statement. One difference, for a stale execution only: an item whose steps include one final
-- already ends nothing and answers 'lost', as there, but its other steps are written (as
-- engine.record_steps writes them), where an item at a time stops at that step. Runs and steps
-- must be distinct.
CREATE OR REPLACE FUNCTION engine.finish_set(p_items jsonb)
RETURNS TABLE (ord bigint, result text) LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz := engine.now();
    v_written bigint[] := ARRAY(SELECT c.ord FROM engine.checkpoint_set(p_items) c
                                WHERE c.result IN ('ok', 'cancel'));
BEGIN
    RETURN QUERY
    WITH items AS (
        SELECT e.ord, (e.x ->> 'run')::uuid AS run, (e.x ->> 'owner')::uuid AS owner,
               (e.x ->> 'token')::bigint AS token, e.x ->> 'status' AS status,
               nullif(e.x -> 'output', 'null') AS output, nullif(e.x -> 'error', 'null') AS error,
               (e.x ->> 'log_lines')::int AS log_lines, e.x ->> 'traceback' AS traceback,
               nullif(e.x -> 'log_places', 'null') AS log_places
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(x, ord)
    ), ended AS (  -- engine.finish_run's update of each run
        UPDATE engine.runs r
        SET status = CASE WHEN r.cancel_requested THEN 'CANCELLED' ELSE i.status END,
            output = CASE WHEN r.cancel_requested THEN NULL ELSE i.output END,
            ended_at = v_now,
            error = CASE WHEN r.cancel_requested THEN engine.cancel_error(r, v_now)
                         WHEN i.status = 'CANCELLED'
                         THEN coalesce(i.error, engine.cancel_error(r, v_now))
                         ELSE i.error END,
            log_lines = greatest(r.log_lines, i.log_lines),
            log_places = coalesce(i.log_places, r.log_places),
            lease_owner = NULL, lease_expires_at = NULL, updated_at = v_now,
            waiting_reason = CASE WHEN r.cancel_requested OR i.status = 'CANCELLED'
                                  THEN r.waiting_reason END
        FROM items i
        -- The runs by id, whatever the plan (see engine.checkpoint_set).
        WHERE r.id = ANY (ARRAY(SELECT w.run FROM items w WHERE w.ord = ANY (v_written)))
          AND r.id = i.run AND i.ord = ANY (v_written)
          AND CASE WHEN r.lease_owner = i.owner AND r.lease_token = i.token
                        AND r.status = 'RUNNING' THEN true ELSE false END  -- see hold_lease
        RETURNING i.ord, r.id AS run, r.status
    ), failed AS (  -- the error of a failed run, with its traceback, in its execution's history
        UPDATE engine.run_executions x
        SET ended_at = v_now, outcome = e.status,
            body_error = i.error || jsonb_strip_nulls(jsonb_build_object('traceback', i.traceback))
        FROM ended e JOIN items i ON i.ord = e.ord
        WHERE x.run_id = ANY (ARRAY(SELECT f.run FROM ended f WHERE f.status = 'FAILED'))
          AND e.status = 'FAILED' AND x.run_id = i.run AND x.lease_token = i.token
    )
    SELECT i.ord, CASE WHEN e.status IS NULL THEN 'lost'
                       WHEN e.status = 'CANCELLED' AND i.status <> 'CANCELLED' THEN 'cancel'
                       ELSE 'ok' END
    FROM items i LEFT JOIN ended e ON e.ord = i.ord
    ORDER BY i.ord;
END $$;

CREATE OR REPLACE FUNCTION engine.suspend_many(p_items jsonb)
RETURNS TABLE (ord bigint, result text) LANGUAGE sql AS $$
    SELECT e.ord, engine.suspend_run((e.x ->> 'run')::uuid, (e.x ->> 'owner')::uuid,
                                     (e.x ->> 'token')::bigint, e.x ->> 'status',
                                     (e.x ->> 'due')::timestamptz, e.x ->> 'reason',
                                     (e.x ->> 'attempt')::int, (e.x ->> 'log_lines')::int,
                                     e.x -> 'steps',
                                     ARRAY(SELECT jsonb_array_elements_text(e.x -> 'awaited')),
                                     nullif(e.x -> 'body_error', 'null'),
                                     nullif(e.x -> 'log_places', 'null'))
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(x, ord)
    ORDER BY e.ord
$$;

-- Runs leased to p_owner that it does not execute (p_held): a claim or a routing that committed
-- while its reply was lost with the connection, or an execution that died of an unexpected
-- error. Queued again at once instead of when their lease expires. A worker calls this between
-- its ticks, when no claim of its own is in flight, so every such run is one it lost track of.
CREATE OR REPLACE FUNCTION engine.release_orphans(p_app text, p_owner uuid, p_held uuid[])
RETURNS int LANGUAGE sql AS $$
    WITH released AS (
        UPDATE engine.runs r
        SET status = 'QUEUED', due_at = engine.now(), lease_owner = NULL, lease_expires_at = NULL,
            waiting_reason = 'handed back: its worker lost track of it', updated_at = engine.now()
        WHERE r.app_id = p_app AND r.status = 'RUNNING' AND r.lease_owner = p_owner
          AND r.id <> ALL (p_held)
        RETURNING r.id
    ), closed AS (
        UPDATE engine.run_executions x SET ended_at = engine.now(), outcome = 'QUEUED',
                                           reason = 'handed back: its worker lost track of it'
        FROM released r WHERE x.run_id = r.id AND x.ended_at IS NULL)
    SELECT count(*)::int FROM released
$$;

-- Extends the leases of the runs a worker still executes and records the steps each is
-- executing (p_executing: {run id: {v, steps: [{key, position, id, follows, attempt, final,
-- started_at}]}}, a report of each run it holds, kept unless a newer one is there); reports
-- the ones it lost, cancel requests (so a run with a long step learns of a cancel without a checkpoint) and passed
-- finish timeouts (the worker ends such a run even if a step never returns).
CREATE OR REPLACE FUNCTION engine.heartbeat(
    p_owner uuid, p_lease interval, p_runs uuid[], p_executing jsonb DEFAULT '{}')
RETURNS TABLE (id uuid, cancel_requested boolean, timed_out boolean)
LANGUAGE sql AS $$
    UPDATE engine.runs r SET lease_expires_at = engine.now() + p_lease,
                             executing = CASE WHEN engine.newer_report(p_executing -> r.id::text,
                                                                       r.executing, r.lease_token)
                                              THEN p_executing -> r.id::text
                                              ELSE r.executing END
    WHERE r.id IN (SELECT h.id FROM engine.runs h WHERE h.id = ANY (p_runs)
                   ORDER BY h.id FOR NO KEY UPDATE)  -- in id order, as batches are (batching.py)
      AND r.lease_owner = p_owner AND r.status = 'RUNNING'
    RETURNING r.id, r.cancel_requested, engine.past_deadline(r.finish_deadline)
$$;

-- Records the steps a run taken over from an expired lease is about to execute (its step
-- starts do not wait for a heartbeat: if one blocks the loop at once, a takeover still counts
-- it). Returns as checkpoint_step does.
CREATE OR REPLACE FUNCTION engine.note_executing(
    p_run uuid, p_owner uuid, p_token bigint, p_steps jsonb)
RETURNS text LANGUAGE sql AS $$
    WITH noted AS (
        UPDATE engine.runs r
        SET executing = CASE WHEN engine.newer_report(p_steps, r.executing, p_token) THEN p_steps
                             ELSE r.executing END
        WHERE r.id = p_run  -- the lease in a CASE: see engine.hold_lease
          AND CASE WHEN r.lease_owner = p_owner AND r.lease_token = p_token AND r.status = 'RUNNING'
                   THEN true ELSE false END
        RETURNING r.cancel_requested OR engine.past_deadline(r.finish_deadline) AS cancel)
    SELECT coalesce((SELECT CASE WHEN n.cancel THEN 'cancel' ELSE 'ok' END FROM noted n), 'lost')
$$;

-- ---------------------------------------------------------------------------------------------
-- Steps that talk to other runs: send_event, invoke
-- ---------------------------------------------------------------------------------------------
-- Sends p_events and records the step with their ids in one transaction, so that a replay never
-- sends twice. Returns the checkpoint result (as checkpoint_step) and the ids.
CREATE OR REPLACE FUNCTION engine.send_step(
    p_run uuid, p_owner uuid, p_token bigint, p_step jsonb, p_events jsonb, p_traceparent text)
RETURNS TABLE (result text, ids jsonb) LANGUAGE plpgsql AS $$
DECLARE
    v_ids jsonb;
    v_result text;
BEGIN
    IF engine.hold_lease(p_run, p_owner, p_token) IS NULL THEN
        RETURN QUERY SELECT 'lost'::text, NULL::jsonb;
        RETURN;
    END IF;
    SELECT coalesce(jsonb_agg(i), '[]') INTO v_ids FROM engine.send_events(p_events, p_traceparent) i;
    v_result := engine.checkpoint_step(p_run, p_owner, p_token,
                                       p_step || jsonb_build_object('output', v_ids));
    IF v_result = 'duplicate' THEN  -- recorded by an earlier execution: send nothing
        RAISE EXCEPTION 'step % of run % is already recorded', p_step ->> 'key', p_run
            USING ERRCODE = 'EN002';
    END IF;
    RETURN QUERY SELECT v_result, v_ids;
END $$;

-- Starts p_function as a child run of p_run (an engine/function.invoked event carrying p_data),
-- records the parent's step as WAITING and registers the matcher that its child's
-- engine/function.finished resolves. The child cannot end before this commits, so no lookback is
-- needed. Returns the child's id; raises EN002 if the lease is lost, EN003 for an unknown function.
CREATE OR REPLACE FUNCTION engine.invoke(
    p_run uuid, p_owner uuid, p_token bigint, p_step jsonb, p_app text, p_function text,
    p_data jsonb, p_expires timestamptz, p_on_timeout jsonb, p_traceparent text,
    p_admission jsonb)
RETURNS TABLE (child uuid, skipped text) LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := engine.now();
    v_key   text := p_step ->> 'key';
    v_seq   bigint;
    v_child engine.runs;
BEGIN
    IF engine.hold_lease(p_run, p_owner, p_token) IS NULL THEN
        RAISE EXCEPTION 'run %: lease lost', p_run USING ERRCODE = 'EN002';
    END IF;
    PERFORM engine.require_function(p_app, p_function, 'invoke');
    INSERT INTO engine.events (id, name, data, ts, received_at, traceparent)
    VALUES (gen_random_uuid()::text, 'engine/function.invoked',
            p_data, v_now, v_now, p_traceparent)
    RETURNING seq INTO v_seq;
    v_child := engine.insert_run(p_app, p_function, v_seq, format('invoke:%s:%s', p_run, v_key),
                                 p_run, p_traceparent, p_admission, v_now);
    IF v_child.status = 'SKIPPED' THEN  -- the child's flow control refused it: the step fails
        PERFORM engine.record_step(p_run, p_step || jsonb_build_object(
            'status', 'FAILED', 'error', jsonb_build_object(
                'type', 'InvokeSkippedError',
                'message', format('function %s skipped the invoked run: %s', p_function,
                                  v_child.waiting_reason))), p_owner);
        RETURN QUERY SELECT v_child.id, v_child.waiting_reason;
        RETURN;
    END IF;
    PERFORM engine.record_step(p_run, p_step, p_owner);
    INSERT INTO engine.matchers (run_id, key, kind, event_name, match_path, match_value,
                                 since_seq, expires_at, on_timeout, created_at)
    VALUES (p_run, v_key, 'invoke', 'engine/function.finished', '{run_id}', to_jsonb(v_child.id::text),
            v_seq, coalesce(p_expires, 'infinity'), p_on_timeout, v_now);
    RETURN QUERY SELECT v_child.id, NULL::text;
END $$;

-- ---------------------------------------------------------------------------------------------
-- System events. When a run ends, the engine sends engine/function.finished (every terminal
-- run, with `result` or `error`), plus engine/function.failed or engine/function.cancelled.
-- Their id is the run's id. They are stored always (waits may look back for them) and queued
-- for routing only when a function is triggered by them or a matcher awaits them, which keeps
-- NOTIFY off the completion path. Runs triggered by these events send none (no loops).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION engine.emit_system_event(
    p_name text, p_id text, p_data jsonb, p_traceparent text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := engine.now();
    v_seq bigint;
BEGIN
    INSERT INTO engine.events (id, name, data, ts, received_at, traceparent)
    VALUES (p_id, p_name, p_data, v_now, v_now, p_traceparent)
    RETURNING seq INTO v_seq;
    PERFORM engine.lock_event_names(ARRAY[p_name], false);
    IF (SELECT m.event_name FROM engine.matchers m WHERE m.event_name >= p_name
        ORDER BY m.event_name LIMIT 1) IS NOT DISTINCT FROM p_name  -- see matchers_name_idx
       OR EXISTS (SELECT 1 FROM engine.functions f  -- see functions_triggers_idx
                  WHERE f.active  -- as routing: an event starts active functions only
                    AND f.triggers @> jsonb_build_array(jsonb_build_object('event', p_name))) THEN
        INSERT INTO engine.event_queue (seq, due_at) VALUES (v_seq, v_now);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION engine.on_run_ended() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_event jsonb := engine.run_event(NEW.event_seq);
    v_base  jsonb;
    v_error jsonb;
BEGIN
    DELETE FROM engine.matchers m WHERE m.run_id = NEW.id;
    -- A run that ended leaves no step open: a sleep, a retry or a wait it had not finished never
    -- will (a retrying step keeps its last error).
    UPDATE engine.steps s
    SET status = 'CANCELLED', ended_at = coalesce(NEW.ended_at, engine.now()),
        error = coalesce(nullif(s.error, 'null'), jsonb_build_object(
            'type', 'StepCancelled',
            'message', format('the run ended %s before this step finished', NEW.status)))
    WHERE s.run_id = NEW.id AND s.status IN ('SLEEPING', 'RETRYING', 'WAITING');
    IF v_event ->> 'name' IN ('engine/function.finished', 'engine/function.failed',
                              'engine/function.cancelled') THEN
        RETURN NULL;
    END IF;
    v_base := jsonb_build_object('app_id', NEW.app_id, 'function_id', NEW.function_id,
                                 'run_id', NEW.id, 'event', v_event);
    IF NEW.status = 'COMPLETED' THEN
        PERFORM engine.emit_system_event('engine/function.finished', NEW.id::text,
            v_base || jsonb_build_object('result', NEW.output), NEW.traceparent);
        RETURN NULL;
    END IF;
    IF NEW.status = 'FAILED' THEN
        v_error := coalesce(NEW.error, '{}'::jsonb);
        PERFORM engine.emit_system_event('engine/function.failed', NEW.id::text,
            v_base || jsonb_build_object('error', v_error), NEW.traceparent);
    ELSIF NEW.status = 'CANCELLED' THEN
        v_error := coalesce(NEW.error, jsonb_build_object(
            'type', 'FunctionCancelled',
            'message', coalesce(NEW.waiting_reason, 'the run was cancelled')));
        PERFORM engine.emit_system_event('engine/function.cancelled', NEW.id::text,
            v_base || jsonb_build_object('reason', v_error ->> 'message'), NEW.traceparent);
    ELSE
        RETURN NULL;  -- SKIPPED: the run never started
    END IF;
    PERFORM engine.emit_system_event('engine/function.finished', NEW.id::text,
        v_base || jsonb_build_object('error', v_error), NEW.traceparent);
    RETURN NULL;
END $$;

SELECT engine.ensure_trigger('engine.runs', 'runs_ended', $trigger$
CREATE OR REPLACE TRIGGER runs_ended
    AFTER UPDATE OF status ON engine.runs
    FOR EACH ROW
    WHEN (NOT engine.is_final_run_status(OLD.status) AND engine.is_final_run_status(NEW.status))
    EXECUTE FUNCTION engine.on_run_ended()$trigger$);

-- ---------------------------------------------------------------------------------------------
-- Management
-- ---------------------------------------------------------------------------------------------
-- A queued, sleeping, retrying or waiting run is cancelled at once; a running one is flagged and
-- its worker ends it between steps (or at its end: engine.finish_run honours the flag). p_reason
-- says who or what cancelled it; the first request's reason is kept, in the run's error (a
-- FunctionCancelled) and waiting_reason. Returns the run's status after the call (NULL: no such
-- run).
CREATE OR REPLACE FUNCTION engine.cancel_run(p_run uuid, p_reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := engine.now();
    v_status text;
BEGIN
    UPDATE engine.runs r
    SET cancel_requested = true,
        status = CASE WHEN r.status = 'RUNNING' THEN r.status ELSE 'CANCELLED' END,
        ended_at = CASE WHEN r.status = 'RUNNING' THEN NULL ELSE v_now END,
        error = CASE WHEN r.cancel_requested THEN r.error ELSE engine.cancelled(p_reason) END,
        waiting_reason = CASE WHEN r.cancel_requested THEN r.waiting_reason ELSE p_reason END,
        blocked_on = NULL, updated_at = v_now
    WHERE r.id = p_run AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
    RETURNING r.status INTO v_status;
    IF v_status IS NULL THEN
        SELECT r.status INTO v_status FROM engine.runs r WHERE r.id = p_run;
    END IF;
    RETURN v_status;
END $$;

-- Cancels the given runs (see cancel_run); returns how many were not already over.
CREATE OR REPLACE FUNCTION engine.cancel_runs(p_runs uuid[], p_reason text) RETURNS int
LANGUAGE sql AS $$
    SELECT count(*)::int FROM engine.runs r
    WHERE r.id = ANY (p_runs) AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
      AND engine.cancel_run(r.id, p_reason) IS NOT NULL
$$;

-- Runs a bulk cancel may choose from: not over, of one function, created in a time range.
CREATE OR REPLACE FUNCTION engine.cancellable_runs(
    p_app text, p_function text, p_after timestamptz, p_before timestamptz)
RETURNS TABLE (id uuid, event jsonb) LANGUAGE sql STABLE AS $$
    SELECT r.id, engine.run_event(r.event_seq) FROM engine.runs r
    WHERE r.app_id = p_app AND r.function_id = p_function
      AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING')
      AND (p_after IS NULL OR r.created_at > p_after)
      AND (p_before IS NULL OR r.created_at < p_before)
$$;

-- Starts the function of p_run again with the same event. With p_from_step, the steps recorded
-- before that step are copied over, so execution resumes there. Returns the new run's id.
CREATE OR REPLACE FUNCTION engine.rerun(p_run uuid, p_from_step text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_now      timestamptz := engine.now();
    v_old      engine.runs;
    v_position int;
    v_new      uuid;
BEGIN
    SELECT * INTO v_old FROM engine.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF p_from_step IS NOT NULL THEN
        SELECT s.position INTO v_position FROM engine.steps s
        WHERE s.run_id = p_run AND s.step_key = p_from_step;
        IF v_position IS NULL THEN
            RAISE EXCEPTION 'run % has no step %', p_run, p_from_step USING ERRCODE = 'EN003';
        END IF;
    END IF;
    INSERT INTO engine.runs (app_id, function_id, status, event_seq, due_at, traceparent,
                             trace_context, start_deadline, finish_timeout, concurrency,
                             created_at, updated_at)
    VALUES (v_old.app_id, v_old.function_id, 'QUEUED', v_old.event_seq, v_now, v_old.traceparent,
            engine.new_trace_context(v_old.traceparent),
            v_now + engine.timeout_of(v_old.app_id, v_old.function_id, 'start'),
            engine.timeout_of(v_old.app_id, v_old.function_id, 'finish'), v_old.concurrency,
            v_now, v_now)
    RETURNING id INTO v_new;
    INSERT INTO engine.steps (run_id, step_key, position, kind, status, attempts, output, error,
                              wake_at, event_seq, created_at, ended_at, step_id, follows, bytes,
                              started_at, worker)
    SELECT v_new, s.step_key, s.position, s.kind, s.status, s.attempts, s.output, s.error,
           s.wake_at, s.event_seq, s.created_at, s.ended_at, s.step_id, s.follows,
           coalesce(s.bytes, engine.step_bytes(s.output, s.error)), s.started_at, s.worker
    FROM engine.steps s
    WHERE s.run_id = p_run AND s.position < v_position AND s.status IN ('COMPLETED', 'FAILED');
    RETURN v_new;
END $$;

-- Moves durable time forward (tests and demos only): by p_by, or to p_to, never backwards.
-- Leases measure real time, so they move along: a running run keeps its worker. Returns the
-- new durable time and wakes the workers.
CREATE OR REPLACE FUNCTION engine.advance_clock(p_by interval, p_to timestamptz)
RETURNS timestamptz LANGUAGE plpgsql AS $$
DECLARE
    v_old interval;
    v_new interval;
BEGIN
    SELECT c.offset_by INTO v_old FROM engine.clock c WHERE c.singleton FOR UPDATE;
    v_new := greatest(v_old + coalesce(p_by, '0'), coalesce(p_to - statement_timestamp(), v_old));
    UPDATE engine.clock c SET offset_by = v_new WHERE c.singleton;
    UPDATE engine.runs r SET lease_expires_at = r.lease_expires_at + (v_new - v_old)
    WHERE r.status = 'RUNNING';
    PERFORM pg_notify('engine_wakeup', 'clock');
    RETURN statement_timestamp() + v_new;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Retention. Finished history older than a retention is deleted in small batches, each its own
-- short transaction (workers prune by themselves: engine/retention.py; `engine prune` and
-- CALL engine.prune_all do it on demand). A batch is two transactions: prune_history (finished
-- runs, with their steps, matchers and every other row that references them ON DELETE CASCADE,
-- and the events nothing needs any more), then prune_bookkeeping (keys, limits, lock rows).
-- Rows are taken with SKIP LOCKED: a prune never waits for a router or a claim. It locks only
-- finished runs, which no claim reads, and the bookkeeping rows no live work uses, for the few
-- milliseconds of its own short transaction.
-- ---------------------------------------------------------------------------------------------
-- Finished runs by end: a batch takes the oldest through it. Without it, every batch (and the
-- first batch of every pass, when nothing is old yet) scans the runs still within the retention.
-- The claim never reads it; a run's end adds one entry.
SELECT engine.ensure_index('runs_ended_idx', $index$
CREATE INDEX IF NOT EXISTS runs_ended_idx ON engine.runs (ended_at)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED')$index$);

-- Finished runs of one status, newest first: the status filter of the dashboard, the CLI and
-- list_run_summaries (ended_run_summaries). Without it, a status few runs have (CANCELLED among
-- a million COMPLETED) walks every run newest first: 525 ms with 1M runs. A run's end adds one
-- entry; unfinished runs have their own partial indexes.
SELECT engine.ensure_index('runs_status_created_idx', $index$
CREATE INDEX IF NOT EXISTS runs_status_created_idx ON engine.runs (status, created_at, id)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED')$index$);

-- The ctx.patched markers, by run: a claim for a worker from before them (claim_runs with
-- p_replays_patches false) skips the runs that hold one, reading only these few entries.
SELECT engine.ensure_index('steps_patch_idx', $index$
CREATE INDEX IF NOT EXISTS steps_patch_idx ON engine.steps (run_id) WHERE kind = 'patch'$index$);

-- Which worker prunes: one at a time per database. A worker takes the turn for a pass and renews
-- it at each batch (a lease in real time, so a dead worker's turn passes on); at the end of its
-- pass it keeps others from starting another one until p_rest has passed. A lease rather than a
-- row lock held for the pass: a transaction open for the whole pass would keep VACUUM from
-- reclaiming what the pass and the workload delete meanwhile.
CREATE TABLE IF NOT EXISTS engine.pruner (
    id         int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    owner      uuid,
    busy_until timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO engine.pruner (id) VALUES (1) ON CONFLICT DO NOTHING;

-- Takes or renews the pruning turn for p_lease; false when another worker holds it (or rests).
CREATE OR REPLACE FUNCTION engine.prune_turn(p_owner uuid, p_lease interval) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_turn engine.pruner;
BEGIN
    SELECT * INTO v_turn FROM engine.pruner WHERE id = 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR (v_turn.owner IS DISTINCT FROM p_owner
                     AND v_turn.busy_until > clock_timestamp()) THEN
        RETURN false;
    END IF;
    UPDATE engine.pruner SET owner = p_owner, busy_until = clock_timestamp() + p_lease
    WHERE id = 1;
    RETURN true;
END $$;

-- Ends p_owner's turn: the next pass, any worker's, starts after p_rest.
CREATE OR REPLACE FUNCTION engine.prune_rest(p_owner uuid, p_rest interval) RETURNS void
LANGUAGE sql AS $$
    UPDATE engine.pruner SET owner = NULL, busy_until = clock_timestamp() + p_rest
    WHERE id = 1 AND owner = p_owner
$$;

-- One batch of finished history: at most p_batch runs that ended more than p_age ago (on the
-- durable clock), with everything that references them ON DELETE CASCADE (steps, matchers, the
-- run's history) and their own events (the trigger and the engine/function.* events of their
-- end, whose id is the run's) once nothing else holds them; then, when no such run is left, at
-- most p_batch other events received more than p_age ago that no run, batch or queue holds
-- (events that started nothing). Events go with their runs rather than by a scan of old
-- events, which would read past every old event whose run is still there, batch after batch.
-- Returns {"runs": n, "events": n}.
CREATE OR REPLACE FUNCTION engine.prune_history(p_age interval, p_batch int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff timestamptz := engine.now() - p_age;
    v_runs   bigint;
    v_seqs   bigint[];
    v_ids    text[];
    v_events bigint;
    v_count  bigint;
BEGIN
    WITH gone AS (
        DELETE FROM engine.runs r WHERE r.id IN (
            SELECT x.id FROM engine.runs x
            WHERE x.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED')
              AND x.ended_at < v_cutoff
            ORDER BY x.ended_at LIMIT p_batch FOR UPDATE SKIP LOCKED)
        RETURNING r.id, r.event_seq)
    SELECT count(*), array_agg(DISTINCT g.event_seq), array_agg(g.id::text)
    INTO v_runs, v_seqs, v_ids FROM gone g;
    DELETE FROM engine.events e WHERE e.seq IN (
        SELECT x.seq FROM engine.events x
        WHERE (x.seq = ANY (v_seqs) OR (x.id = ANY (v_ids) AND x.name LIKE 'engine/function.%'))
          AND x.received_at < v_cutoff
          AND NOT EXISTS (SELECT 1 FROM engine.runs r WHERE r.event_seq = x.seq)
          AND NOT EXISTS (SELECT 1 FROM engine.batch_events b WHERE b.seq = x.seq)
          AND NOT EXISTS (SELECT 1 FROM engine.event_queue q WHERE q.seq = x.seq)
        FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_events = ROW_COUNT;
    IF v_runs < p_batch THEN
        DELETE FROM engine.events e WHERE e.seq IN (
            SELECT x.seq FROM engine.events x
            WHERE x.received_at < v_cutoff
              AND NOT EXISTS (SELECT 1 FROM engine.runs r WHERE r.event_seq = x.seq)
              AND NOT EXISTS (SELECT 1 FROM engine.batch_events b WHERE b.seq = x.seq)
              AND NOT EXISTS (SELECT 1 FROM engine.event_queue q WHERE q.seq = x.seq)
            LIMIT p_batch FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_events := v_events + v_count;
    END IF;
    RETURN jsonb_build_object('runs', v_runs, 'events', v_events);
END $$;

-- One batch of the bookkeeping no live work needs any more, at most p_batch rows of each kind:
-- expired event ids and idempotency keys, rate-limit entries older than every rate period (and
-- p_age), bulk actions that ended longer ago than p_age, matchers of ended runs, expired
-- workers, functions inactive for longer than p_age with
-- no run left in flight (with their cron schedules), event-name and flow lock rows nobody uses,
-- throttles back at rest and idle concurrency slots. The lock rows a router or a claim may
-- need come last, so the transaction holds them only until its commit, just after.
-- Returns {"<table>": n, ...}.
CREATE OR REPLACE FUNCTION engine.prune_bookkeeping(p_age interval, p_batch int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := engine.now();
    v_rate   interval := greatest(p_age, coalesce((
        SELECT max(make_interval(secs => (f.config -> 'rate_limit' ->> 'period')::float8))
        FROM engine.functions f WHERE f.config ? 'rate_limit'), '0'));
    v_count  bigint;
    v_counts jsonb := '{}';
BEGIN
    DELETE FROM engine.event_ids i WHERE i.id IN (
        SELECT x.id FROM engine.event_ids x WHERE x.expires_at < v_now
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('event_ids', v_count);
    DELETE FROM engine.idempotency_keys k WHERE k.key IN (
        SELECT x.key FROM engine.idempotency_keys x WHERE x.expires_at < v_now
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('idempotency_keys', v_count);
    DELETE FROM engine.rate_log l WHERE l.ctid IN (
        SELECT x.ctid FROM engine.rate_log x WHERE x.at < v_now - v_rate
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('rate_log', v_count);
    -- The dashboard's bulk actions that ended longer ago (a running one is never deleted).
    DELETE FROM engine.bulk_actions b WHERE b.id IN (
        SELECT x.id FROM engine.bulk_actions x
        WHERE x.state <> 'running' AND x.ended_at < v_now - p_age
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('bulk_actions', v_count);
    RETURN v_counts || engine.prune_registry(p_age, p_batch) || engine.prune_locks(p_age, p_batch);
END $$;

-- prune_bookkeeping's share for the registry: matchers of ended runs, expired workers, functions
-- long inactive. Returns {"<table>": n, ...}.
CREATE OR REPLACE FUNCTION engine.prune_registry(p_age interval, p_batch int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_count  bigint;
    v_counts jsonb := '{}';
BEGIN
    DELETE FROM engine.matchers m WHERE (m.run_id, m.key) IN (
        SELECT x.run_id, x.key FROM engine.matchers x JOIN engine.runs r ON r.id = x.run_id
        WHERE r.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'SKIPPED')
        LIMIT p_batch FOR UPDATE OF x SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('matchers', v_count);
    DELETE FROM engine.workers w WHERE w.owner IN (
        SELECT x.owner FROM engine.workers x WHERE x.expires_at < now()
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('workers', v_count);
    DELETE FROM engine.functions f WHERE (f.app_id, f.function_id) IN (
        SELECT x.app_id, x.function_id FROM engine.functions x
        WHERE NOT x.active AND x.live_until < now() - p_age
          AND NOT EXISTS (SELECT 1 FROM engine.runs r
                          WHERE r.app_id = x.app_id AND r.function_id = x.function_id
                            AND r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'RETRYING', 'WAITING'))
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_counts || jsonb_build_object('functions', v_count);
END $$;

-- prune_bookkeeping's share for the lock rows routers and claims take: event names with no event,
-- no matcher and no trigger, flow locks unused for an hour (or p_age if shorter), throttles whose arrival
-- time passed (as if never used) and concurrency slots with no permit taken and no run parked
-- on them (each is created again when next needed). Returns {"<table>": n, ...}.
CREATE OR REPLACE FUNCTION engine.prune_locks(p_age interval, p_batch int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := engine.now();
    v_count  bigint;
    v_counts jsonb := '{}';
BEGIN
    -- Not the names of system events (every run's end locks engine/function.finished's row)
    -- nor those a function is triggered by: a router or a run's end would wait for this
    -- transaction to recreate them.
    DELETE FROM engine.event_names n WHERE n.name IN (
        SELECT x.name FROM engine.event_names x
        WHERE x.name NOT LIKE 'engine/%'
          AND NOT EXISTS (SELECT 1 FROM engine.events e WHERE e.name = x.name)
          AND NOT EXISTS (SELECT 1 FROM engine.matchers m WHERE m.event_name = x.name)
          AND NOT EXISTS (SELECT 1 FROM engine.functions f
                          WHERE f.triggers @> jsonb_build_array(jsonb_build_object('event', x.name)))
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('event_names', v_count);
    DELETE FROM engine.flow_locks l WHERE l.key IN (
        SELECT x.key FROM engine.flow_locks x WHERE x.used_at < now() - least(p_age, '1 hour')
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('flow_locks', v_count);
    DELETE FROM engine.throttles t WHERE t.key IN (
        SELECT x.key FROM engine.throttles x WHERE x.tat < v_now
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('throttles', v_count);
    DELETE FROM engine.concurrency_slots c WHERE c.slot IN (
        SELECT x.slot FROM engine.concurrency_slots x
        WHERE x.in_use = 0 AND NOT EXISTS (SELECT 1 FROM engine.runs b WHERE b.blocked_on = x.slot)
        LIMIT p_batch FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_counts || jsonb_build_object('concurrency_slots', v_count);
END $$;

-- One batch of everything above, in one transaction (for SQL callers that loop; workers and
-- `engine prune` commit history and bookkeeping separately). Returns how many rows it deleted.
CREATE OR REPLACE FUNCTION engine.prune(p_age interval, p_batch int DEFAULT 5000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_history jsonb := engine.prune_history(p_age, p_batch);
    v_rest    jsonb := engine.prune_bookkeeping(p_age, p_batch);
BEGIN
    RETURN (SELECT sum(c.value::bigint) FROM jsonb_each_text(v_history || v_rest) c);
END $$;

-- engine.prune until nothing is left to delete, committing after each batch (so no batch holds
-- its row locks for long). CALL it outside a transaction block: CALL engine.prune_all('30 days').
CREATE OR REPLACE PROCEDURE engine.prune_all(p_age interval, p_batch int DEFAULT 5000)
LANGUAGE plpgsql AS $$
BEGIN
    WHILE engine.prune(p_age, p_batch) > 0 LOOP
        COMMIT;
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Bulk actions (#15): "cancel (or rerun) every run matching" as a durable job, started from the
-- dashboard's Bulk page and carried out in batches by a task of the dashboard process
-- (engine/web/bulk_jobs.py), each batch one transaction that acts on the next runs and moves the
-- cursor, so a restart resumes where the last committed batch ended and no run is acted on
-- twice. The id is the request's own (an idempotency key: a form posted twice starts one job).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS engine.bulk_actions (
    id         uuid PRIMARY KEY,
    action     text NOT NULL CONSTRAINT bulk_actions_action_check
                   CHECK (action IN ('cancel', 'rerun')),
    filter     jsonb NOT NULL,              -- the previewed filter (engine.web.overview.RunFilter)
    expected   bigint NOT NULL,             -- the runs the preview counted (at most its cap)
    state      text NOT NULL DEFAULT 'running' CONSTRAINT bulk_actions_state_check
                   CHECK (state IN ('running', 'done', 'stopped', 'failed')),
    after_at   timestamptz,                 -- the keyset cursor: the last run looked at
    after_id   uuid,
    matched    bigint NOT NULL DEFAULT 0,   -- matching runs looked at
    acted      bigint NOT NULL DEFAULT 0,   -- of those, cancelled (or rerun)
    error      text,                        -- why it failed
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    ended_at   timestamptz
);
SELECT engine.ensure_index('bulk_actions_running_idx', $index$
CREATE INDEX IF NOT EXISTS bulk_actions_running_idx ON engine.bulk_actions (created_at)
    WHERE state = 'running'$index$);
SELECT engine.ensure_index('bulk_actions_created_idx', $index$
CREATE INDEX IF NOT EXISTS bulk_actions_created_idx ON engine.bulk_actions (created_at DESC)$index$);

-- ---------------------------------------------------------------------------------------------
-- The worker's hot path plans without sequential scans. A connection caches the generic plan of
-- each statement inside these functions the first times it calls them, and keeps it until an
-- ANALYZE of the table replans it. On a new database those first calls see nearly empty tables,
-- where reading a whole table costs less than an index: a claim or a checkpoint would then read
-- every run (or step) of the database at each call until autovacuum analyzes the table (on the
-- 2-core bench machine, a claim of 13 runs took 14 ms with 3,000 runs in the tables). Every
-- statement of these functions has an index for what it looks up (tests/test_generic_plans.py
-- checks the claim's plans), so this changes plans, never results; and it holds for the
-- functions they call.
--
-- They also always use the cached (generic) plan of each statement. PostgreSQL plans a statement
-- again at each call while that custom plan looks cheaper than the cached one, and for many of
-- these it always did: a lookup by `= ANY (array)` is costed for ten elements in the cached plan
-- and for the one or few given in a custom plan. pg_stat_statements counted a plan at every
-- call for five statements of a routed send and five of a claim, each executing in
-- microseconds; a step retried (a suspension, then a claim) took 7.6 ms instead of 11.5 ms
-- (bench/README.md, session 12). The cached plans are the ones tests/test_generic_plans.py and
-- tests/test_plans.py check.
--
-- The claims also plan without sorts where an index gives the order. They take the first few
-- due rows in an index's order (runs_due_idx, runs_leased_idx, event_queue_due_idx); planned
-- on a young table (a few hundred runs, never analyzed), reading runs_function_idx and sorting
-- looked as cheap, and that cached plan then read and sorted every due run at each claim of a
-- growing backlog until autovacuum analyzed the table: a third of the server's CPU in the
-- throughput scenario (perf, session 15).
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
    v_function record;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure AS signature, p.proname AS name FROM pg_proc p
        WHERE p.pronamespace = (SELECT c.relnamespace FROM pg_class c
                                WHERE c.oid = 'engine.runs'::regclass)
          -- The entry points only: the functions they call per item (checkpoint_steps,
          -- finish_run, suspend_run) run under the caller's setting, without a save and
          -- restore of it per item.
          AND p.proname IN ('claim_runs', 'claim_runs_then_next_due', 'claim_events',
                            'route_simple', 'send_and_route', 'create_runs',
                            'checkpoint_many', 'checkpoint_completed', 'finish_many',
                            'suspend_many',
                            'heartbeat', 'note_executing', 'register_matchers',
                            'resolve_matches', 'matcher_candidates', 'send_step', 'invoke',
                            'release_orphans', 'next_due')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off'
                       ' SET plan_cache_mode = force_generic_plan', v_function.signature);
        IF v_function.name IN ('claim_runs', 'claim_runs_then_next_due', 'claim_events') THEN
            EXECUTE format('ALTER FUNCTION %s SET enable_sort = off', v_function.signature);
        END IF;
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Least-privilege roles (ops/roles.sql): <schema>_sender, <schema>_worker and <schema>_reader
-- get exactly their rights on this schema's objects, and PUBLIC none. ops/roles.sql creates the
-- roles, notes it in engine.meta ('roles') and calls this; applying this file calls it again
-- (below), so that the tables and functions an upgrade adds are the worker's at once and no
-- new function is left to PUBLIC (which may execute any function it is not refused). Before,
-- an upgrade left the worker without rights on a new table until roles.sql was run again.
-- A role missing (dropped since) is skipped with a warning, never a failed migration.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION engine.grant_roles() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s        text := 'engine'::regnamespace::text;
    v_sender text := s || '_sender';
    v_worker text := s || '_worker';
    v_reader text := s || '_reader';
    v_role   text;
BEGIN
    -- Nothing for PUBLIC: every right below is granted on purpose.
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', s);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', s);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM PUBLIC', s);
    EXECUTE format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', s);
    FOREACH v_role IN ARRAY ARRAY[v_sender, v_worker, v_reader] LOOP
        IF to_regrole(v_role) IS NULL THEN
            RAISE WARNING 'engine: role % does not exist: its rights on schema % were not '
                'granted (run ops/roles.sql again to create it)', v_role, s;
        END IF;
    END LOOP;

    IF to_regrole(v_sender) IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, v_sender);
        -- One function (SECURITY DEFINER, see send_event), and the HTTP event API's one call
        -- (SECURITY DEFINER too): a live key and names within its prefixes.
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.send_event(text, jsonb, text, timestamptz,'
                       ' text) TO %2$I', s, v_sender);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.send_events_with_key(text, jsonb, text)'
                       ' TO %2$I', s, v_sender);
    END IF;

    IF to_regrole(v_worker) IS NOT NULL THEN
        -- The tables and every function but this one.
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, v_worker);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO %I',
                       s, v_worker);
        EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO %I', s, v_worker);
        EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO %I', s, v_worker);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %I.grant_roles() FROM %I', s, v_worker);
    END IF;

    IF to_regrole(v_reader) IS NOT NULL THEN
        -- Tables and views, and the pure functions the views and dashboards call.
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, v_reader);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', s, v_reader);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.now(), %1$I.schema_version(),'
                       ' %1$I.run_event(bigint), %1$I.run_steps(uuid), %1$I.batch_of(uuid),'
                       ' %1$I.run_history(uuid), %1$I.execution_history(uuid),'
                       ' %1$I.pause_history(uuid), %1$I.list_event_keys(),'
                       ' %1$I.step_history(uuid, boolean), %1$I.step_attempt_list(%1$I.steps)'
                       ' TO %2$I', s, v_reader);
        -- The dashboard's Functions and Workers pages (queries overview_*): why runs wait, and
        -- the steps a worker reported executing.
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.flow_reason(%1$I.runs, timestamptz),'
                       ' %1$I.unserved_reason(), %1$I.executing_steps(jsonb) TO %2$I',
                       s, v_reader);
        -- Engine.list_functions and `engine functions list`, which a reader (a replica's
        -- login) runs.
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.function_list(text) TO %2$I', s, v_reader);
        -- Of the event keys, a reader sees all but their hashes (useless without the key, but
        -- a reader has no need of them).
        EXECUTE format('REVOKE SELECT ON %I.event_keys FROM %I', s, v_reader);
        EXECUTE format('GRANT SELECT (name, prefixes, created_at, revoked_at) ON %I.event_keys'
                       ' TO %I', s, v_reader);
    END IF;
END $$;

SELECT engine.grant_roles() FROM engine.meta m WHERE m.key = 'roles';

COMMIT;
