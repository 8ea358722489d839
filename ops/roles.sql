-- Least-privilege roles for engine. Apply once after schema.sql, as the owner of schema
-- `engine` (psql -f ops/roles.sql); then grant the roles to login roles: GRANT engine_sender TO
-- my_web_app; GRANT engine_worker TO my_worker; ... Every later migration (engine migrate, or
-- schema.sql applied by psql) grants the roles their rights on what it adds: nothing to re-apply
-- after an upgrade.
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
    IF to_regprocedure(s || '.grant_roles()') IS NULL THEN
        RAISE EXCEPTION 'schema % is older than this file: run engine migrate --schema % first',
            s, s;
    END IF;
    FOREACH v_role IN ARRAY ARRAY[v_sender, v_worker, v_reader] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
    END LOOP;

    -- The rights themselves are granted by the schema's grant_roles() (schema.sql), which every
    -- migration calls again once this note is there: roles set up once stay right across
    -- upgrades.
    EXECUTE format('INSERT INTO %I.meta (key, value) VALUES (''roles'', ''on'')'
                   ' ON CONFLICT (key) DO NOTHING', s);
    EXECUTE format('SELECT %I.grant_roles()', s);
END $$;

COMMIT;
