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
--
-- Another schema (Engine(schema="engine_billing"), engine migrate --schema engine_billing):
-- set engine.schema for the session, and the same rights on that schema go to roles of its own,
-- engine_billing_sender, engine_billing_worker and engine_billing_reader (created if need be),
-- which have none on any other app's schema:
--
--   PGOPTIONS='-c engine.schema=engine_billing' psql -f ops/roles.sql
--
-- (or SET engine.schema = 'engine_billing' before running this file). Plain SQL, no psql
-- variable: any client can run it. Every statement names the schema through format('%I').

SET client_min_messages = warning;
BEGIN;

DO $$
DECLARE
    s text := coalesce(nullif(current_setting('engine.schema', true), ''), 'engine');
    v_sender text := s || '_sender';
    v_worker text := s || '_worker';
    v_reader text := s || '_reader';
    v_role text;
BEGIN
    -- The name the engine accepts (engine/pg_schema.py), so that the role names are too.
    IF s !~ '^[a-z_][a-z0-9_]{0,55}$' THEN
        RAISE EXCEPTION 'engine.schema %: not a schema name the engine accepts', s;
    END IF;
    IF to_regnamespace(s) IS NULL THEN
        RAISE EXCEPTION 'schema % does not exist: run engine migrate --schema % first', s, s;
    END IF;
    FOREACH v_role IN ARRAY ARRAY[v_sender, v_worker, v_reader] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
    END LOOP;

    -- Nothing for PUBLIC: every right below is granted on purpose.
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', s);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', s);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM PUBLIC', s);
    EXECUTE format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', s);

    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I, %I, %I', s, v_sender, v_worker, v_reader);

    -- Sender: one function (SECURITY DEFINER, see schema.sql).
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.send_event(text, jsonb, text, timestamptz, text)'
                   ' TO %2$I', s, v_sender);
    -- The HTTP event API's one call (SECURITY DEFINER too): a live key and names within its
    -- prefixes.
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.send_events_with_key(text, jsonb, text)'
                   ' TO %2$I', s, v_sender);

    -- Worker: the tables and every function.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO %I',
                   s, v_worker);
    EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO %I', s, v_worker);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO %I', s, v_worker);

    -- Reader: tables and views, and the pure functions the views and dashboards call.
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', s, v_reader);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.now(), %1$I.schema_version(),'
                   ' %1$I.run_event(bigint), %1$I.run_steps(uuid), %1$I.batch_of(uuid),'
                   ' %1$I.run_history(uuid), %1$I.execution_history(uuid),'
                   ' %1$I.pause_history(uuid), %1$I.list_event_keys(),'
                   ' %1$I.step_history(uuid, boolean), %1$I.step_attempt_list(%1$I.steps)'
                   ' TO %2$I', s, v_reader);
    -- The dashboard's Functions and Workers pages (queries overview_*): why runs wait, and the
    -- steps a worker reported executing.
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.flow_reason(%1$I.runs, timestamptz),'
                   ' %1$I.unserved_reason(), %1$I.executing_steps(jsonb) TO %2$I', s, v_reader);
    -- Engine.list_functions and `engine functions list`, which a reader (a replica's login)
    -- runs.
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.function_list(text) TO %2$I', s, v_reader);
    -- Bulk actions (bulk_actions, the Bulk page's background jobs): the dashboard's acting
    -- login (the worker role) starts and advances them, and a worker's retention deletes the
    -- ended ones; a reader only follows their progress.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.bulk_actions TO %I',
                   s, v_worker);
    EXECUTE format('GRANT SELECT ON %I.bulk_actions TO %I', s, v_reader);
    -- Of the event keys, a reader sees all but their hashes (useless without the key, but a
    -- reader has no need of them).
    EXECUTE format('REVOKE SELECT ON %I.event_keys FROM %I', s, v_reader);
    EXECUTE format('GRANT SELECT (name, prefixes, created_at, revoked_at) ON %I.event_keys'
                   ' TO %I', s, v_reader);
END $$;

COMMIT;
