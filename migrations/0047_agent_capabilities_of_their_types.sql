-- A worker's capabilities hold values of the types every reader of them expects.
--
-- An HTTP agent's health check (`GET /api/runtime/workers/:id/agent-health`) merged the
-- `capabilities` object of the agent's `/health` answer into the stored one as it came.
-- A value of another type under a key the runtime reads (`"max_concurrency": "lots"`,
-- `4.0` or `null`, `"claude_cli": "yes"`, `"labels": "gpu"`) then failed every read of
-- the worker: the worker listings answered 500, and the statements that cast
-- `max_concurrency` to an integer (the agent dispatch pass, sticky routing) failed. The
-- API now merges such a key only with a value of its type (`Capabilities::agent_report`).
--
-- Here a stored key of the wrong type is removed, so its default applies, as for a key
-- never reported: `claude_cli` true, `max_concurrency` 1, `labels` empty. Each `CASE`
-- tests the type before the value is cast or unnested. Idempotent.

UPDATE workers SET capabilities = '{"claude_cli": true, "max_concurrency": 1, "labels": []}'::jsonb
WHERE jsonb_typeof(capabilities) <> 'object';

UPDATE workers SET capabilities = capabilities - 'claude_cli'
WHERE capabilities ? 'claude_cli' AND jsonb_typeof(capabilities -> 'claude_cli') <> 'boolean';

UPDATE workers SET capabilities = capabilities - 'max_concurrency'
WHERE capabilities ? 'max_concurrency'
  AND CASE WHEN jsonb_typeof(capabilities -> 'max_concurrency') = 'number'
                AND (capabilities ->> 'max_concurrency') ~ '^[0-9]{1,10}$'
           THEN (capabilities ->> 'max_concurrency')::bigint NOT BETWEEN 1 AND 2147483647
           ELSE true END;

UPDATE workers SET capabilities = capabilities - 'labels'
WHERE capabilities ? 'labels'
  AND CASE WHEN jsonb_typeof(capabilities -> 'labels') = 'array'
           THEN EXISTS (SELECT 1 FROM jsonb_array_elements(capabilities -> 'labels') AS e(v)
                        WHERE jsonb_typeof(e.v) <> 'string')
           ELSE true END;
