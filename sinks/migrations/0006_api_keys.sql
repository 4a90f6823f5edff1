-- API keys of the HTTP gateway (DESIGN.md, "HTTP gateway"; `sluice keys`).
-- A key is `sg_<key_id>_<secret>`: key_id finds the row, and only a SHA-256
-- of the secret is kept (the secret is 256 random bits, so a plain hash is
-- as strong as a slow one and costs a request microseconds). Each key
-- belongs to one tenant; a revoked key stays, so `sluice keys list` still
-- names it and its id is never handed out again.
-- Numbered 0006: 0005 is left to the approvals migration (issue 18), which
-- was being written at the same time; the two touch no common table.

CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{12}$'),
    tenant      text        NOT NULL CHECK (length(tenant) BETWEEN 1 AND 128),
    secret_hash text        NOT NULL CHECK (length(secret_hash) = 64),
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);

-- The gateway may run under the workers' role: it only reads keys.
GRANT SELECT ON api_keys TO sluice_writer;
