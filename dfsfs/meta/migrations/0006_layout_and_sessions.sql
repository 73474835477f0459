-- Migration 6: what every machine must agree on, recorded once; mount sessions; and the
-- scoping functions every row-level policy from here on is written with.

-- How file bytes are laid out in the chunk stores. One row, written by `dfsfs init`
-- (or, for a database made before this migration, by the first init or mount after it,
-- from what the stored chunks show): a mount reads files with this chunk size whatever
-- its own configuration says, so a second machine cannot read wrong bytes.
CREATE TABLE layout (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    chunk_size integer NOT NULL CHECK (chunk_size > 0 AND chunk_size & (chunk_size - 1) = 0),
    recorded_at timestamp with time zone DEFAULT now() NOT NULL
);

-- The account a connection acts for, and whether it may see every account's rows
-- (administration). Every policy names these two functions, so that changing how the
-- account is established (a client setting now, the server's session later) changes
-- one place.
CREATE FUNCTION dfsfs_current_account() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('dfsfs.user_id', true), '')::bigint
$$;

CREATE FUNCTION dfsfs_sees_all() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('dfsfs.admin', true) = 'on', false)
$$;

-- A mount (or a CLI command) of an account while it runs. Holds taken by a session
-- (chunks it is storing, inodes it has open) end with it: at its clean end, or when it
-- stops renewing `expires_at` (the daemon was killed, the machine is gone).
CREATE TABLE sessions (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash bytea UNIQUE,  -- SHA-256 of the session's secret token (login on the server)
    host text NOT NULL,  -- where the daemon runs (for `dfsfs user sessions`)
    pid integer NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    heartbeat_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,  -- renewed by the heartbeat
    ended_at timestamp with time zone,  -- a clean end or a revocation
    end_reason text  -- 'unmounted', 'revoked', 'expired'
);
CREATE INDEX sessions_user_live ON sessions (user_id) WHERE ended_at IS NULL;
ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY sessions_by_user ON sessions
    USING (dfsfs_sees_all() OR user_id = (SELECT dfsfs_current_account()))
    WITH CHECK (dfsfs_sees_all() OR user_id = (SELECT dfsfs_current_account()));

-- A database made before this migration: its chunk size is what the stored chunks show
-- (a chunk followed by another one in its file is whole, unless a truncation cut it and
-- a later write extended the file past it; the largest such chunk is whole). With no
-- such chunk, `dfsfs init` records the configured size.
INSERT INTO layout (chunk_size)
SELECT max(c.size) FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id
 WHERE EXISTS (SELECT 1 FROM file_chunks later
                WHERE later.ino = fc.ino AND later.index > fc.index)
HAVING max(c.size) >= 4096 AND max(c.size) & (max(c.size) - 1) = 0;
