-- Least-privilege roles for engine. Apply after schema.sql, as the owner of schema `engine`
-- (psql -f ops/roles.sql), and again after each schema upgrade; then grant the roles to login
-- roles: GRANT engine_sender TO my_web_app; GRANT engine_worker TO my_worker; ...
--
--   engine_sender  may send events through engine.send_event(), and with an event key through
--                  engine.send_events_with_key() (what the HTTP event API calls), and do
--                  nothing else: it sees no table (not even the keys), cannot send `engine/`
--                  system events, cannot touch runs.
--   engine_worker  what `engine worker` (and an Engine sending, managing runs) needs: read and
--                  write the engine tables, call the engine functions. It is no superuser and
--                  owns nothing, so it cannot change the schema.
--   engine_reader  read-only access for dashboards: every table and view of the schema (of the
--                  event keys, all but their hashes), and the read-only functions the views use.
--
-- Event keys are created and revoked by the owner (engine keys create/revoke), or by a role
-- granted engine_worker, which may write every table anyway.

SET client_min_messages = warning;
BEGIN;

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['engine_sender', 'engine_worker', 'engine_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
    END LOOP;
END $$;

-- Nothing for PUBLIC: every right below is granted on purpose.
REVOKE ALL ON SCHEMA engine FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA engine FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA engine FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA engine FROM PUBLIC;

GRANT USAGE ON SCHEMA engine TO engine_sender, engine_worker, engine_reader;

-- Sender: one function (SECURITY DEFINER, see schema.sql).
GRANT EXECUTE ON FUNCTION engine.send_event(text, jsonb, text, timestamptz, text) TO engine_sender;
-- The HTTP event API's one call (SECURITY DEFINER too): a live key and names within its prefixes.
GRANT EXECUTE ON FUNCTION engine.send_events_with_key(text, jsonb, text) TO engine_sender;

-- Worker: the tables and every function.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA engine TO engine_worker;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA engine TO engine_worker;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA engine TO engine_worker;

-- Reader: tables and views, and the pure functions the views and dashboards call.
GRANT SELECT ON ALL TABLES IN SCHEMA engine TO engine_reader;
GRANT EXECUTE ON FUNCTION engine.now(), engine.schema_version(), engine.run_event(bigint),
    engine.run_steps(uuid), engine.batch_of(uuid), engine.run_history(uuid),
    engine.execution_history(uuid), engine.pause_history(uuid), engine.list_event_keys(),
    engine.step_history(uuid, boolean), engine.step_attempt_list(engine.steps) TO engine_reader;
-- The dashboard's Functions and Workers pages (queries overview_*): why runs wait, and the steps
-- a worker reported executing.
GRANT EXECUTE ON FUNCTION engine.flow_reason(engine.runs, timestamptz), engine.unserved_reason(),
    engine.executing_steps(jsonb) TO engine_reader;
-- Engine.list_functions and `engine functions list`, which a reader (a replica's login) runs.
GRANT EXECUTE ON FUNCTION engine.function_list(text) TO engine_reader;
-- Of the event keys, a reader sees all but their hashes (useless without the key, but a reader
-- has no need of them).
REVOKE SELECT ON engine.event_keys FROM engine_reader;
GRANT SELECT (name, prefixes, created_at, revoked_at) ON engine.event_keys TO engine_reader;

COMMIT;
