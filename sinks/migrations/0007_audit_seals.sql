-- Sealed chain heads (sinks/seals.py, `sluice audit seal`): each row is a
-- signed document naming every chain's head (step, partition, seq, hash) at
-- sealing time, signed with an Ed25519 key that is never stored here.
-- `sluice audit verify --public-key` holds the trail to every seal, which
-- catches an owner who rewrites rows, recomputes the hashes and moves the
-- heads. Append-only like the trail itself.
CREATE TABLE audit_seals (
    id        bigserial   PRIMARY KEY,
    sealed_at timestamptz NOT NULL,
    key_id    text        NOT NULL,
    -- The exact bytes signed (canonical JSON), and the base64 signature.
    document  text        NOT NULL,
    signature text        NOT NULL
);

CREATE FUNCTION audit_seals_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_seals is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_seals_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_seals
    FOR EACH STATEMENT EXECUTE FUNCTION audit_seals_append_only();

-- Sealing may run as the writer role (it needs no more than appending).
GRANT SELECT, INSERT ON audit_seals TO sluice_writer;
GRANT USAGE ON SEQUENCE audit_seals_id_seq TO sluice_writer;
