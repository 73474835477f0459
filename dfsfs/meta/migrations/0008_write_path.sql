-- Migration 8: the write path as ARCHITECTURE's "Durability" section decides it.
--
-- A mount puts a chunk's bytes first, with no metadata call and no transaction open, then
-- dfsfs_commit_files points the file at it, creating the chunk's row if it is new
-- (dfsfs_take_chunk). A chunk's bytes are deleted only after dfsfs_claim_reclaim (or
-- dfsfs_claim_orphans) has marked its row durably as being deleted (refcount 0) and left a
-- tombstone; a commit that meets such a row, or a tombstone of the last hour for a new
-- row, is refused: the deletion may have removed the bytes after the mount's put. The
-- mount then secures the chunk: dfsfs_reserve_chunks takes a hold (waiting while the
-- deletion is under way) and says whether to put the bytes again, and the commit turns
-- the hold into a reference (invariant 2). Bytes put and never committed (overwritten
-- first) are claimed and deleted at once (invariant 5).
--
-- Bytes put by a mount are not durable until the mount's next sync point (the commit
-- interval, fsync, unmount): until then the chunk row says `settled = false` and names
-- the session that put it, so that after a power cut the next mount or fsck finds the
-- references whose bytes did not survive and cuts their files back (invariant 1).
--
-- Inodes whose last name is gone stay while a live session holds them (a mount has them
-- open, or its kernel still references them) and are purged by the last release.
-- Sessions that end without releasing (a killed daemon, a machine gone) are settled by
-- dfsfs_recover at the next mount of the account, or by fsck.
--
-- Every function runs as its caller (SECURITY INVOKER): row-level security scopes it.
-- Refusals are SQLSTATE 'DF' + errno (raised), or returned as such a code where a batch
-- goes on past a refused item.

-- ---- tables ------------------------------------------------------------------------------

ALTER TABLE chunks
    ADD COLUMN settled boolean NOT NULL DEFAULT true,  -- bytes durable in the stores
    ADD COLUMN unsettled_by bigint,  -- the session whose sync point settles them
    ADD COLUMN deleting_by bigint;  -- the session deleting the bytes (refcount 0)
COMMENT ON COLUMN chunks.refcount IS
    'file_chunks rows naming the chunk plus holds (chunk_holds) of sessions storing it';
CREATE INDEX chunks_unsettled ON chunks (user_id) WHERE NOT settled;

-- Bytes of chunks a file's contents take (holes take none): st_blocks.
ALTER TABLE inodes ADD COLUMN stored_bytes bigint NOT NULL DEFAULT 0;
UPDATE inodes i SET stored_bytes = t.bytes
  FROM (SELECT fc.ino, sum(c.size) AS bytes FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id
         GROUP BY fc.ino) t
 WHERE i.id = t.ino;
CREATE INDEX chunks_deleting ON chunks (user_id) WHERE deleting_by IS NOT NULL;

-- Holds and tombstones are rows of one account that name rows of the same account only
-- (keys with user_id, as migration 7's): a foreign-key check bypasses row-level security.
ALTER TABLE sessions ADD CONSTRAINT sessions_id_account UNIQUE (id, user_id);

-- Chunks a session reserved and has not committed yet; each counts in chunks.refcount.
CREATE TABLE chunk_holds (
    session_id bigint NOT NULL,
    chunk_id bigint NOT NULL,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    uses integer NOT NULL CHECK (uses >= 0),  -- file chunks it may still point at (0: going)
    PRIMARY KEY (session_id, chunk_id),
    FOREIGN KEY (session_id, user_id) REFERENCES sessions (id, user_id) ON DELETE CASCADE,
    FOREIGN KEY (chunk_id, user_id) REFERENCES chunks (id, user_id)
);
CREATE INDEX chunk_holds_chunk ON chunk_holds (chunk_id);

-- Chunks whose bytes were claimed for deletion lately. A commit that names a chunk with no
-- row takes the mount's own put of it on trust only if no deletion of it was claimed in
-- the last hour (mounts commit a put within minutes): otherwise the deletion may have
-- removed those bytes after the put, and the mount stores them again under a hold.
CREATE TABLE chunk_tombstones (
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    sha256 bytea NOT NULL,
    claimed_at timestamp with time zone NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, sha256)
);
CREATE INDEX chunk_tombstones_age ON chunk_tombstones (user_id, claimed_at);

-- Inodes a session holds: open in that mount, or still referenced by its kernel. An
-- inode without names is purged only when no live session holds it.
CREATE TABLE inode_holds (
    ino bigint NOT NULL,
    session_id bigint NOT NULL,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (ino, session_id),
    FOREIGN KEY (ino, user_id) REFERENCES inodes (id, user_id) ON DELETE CASCADE,
    FOREIGN KEY (session_id, user_id) REFERENCES sessions (id, user_id) ON DELETE CASCADE
);
CREATE INDEX inode_holds_session ON inode_holds (session_id);

SELECT dfsfs_scope_table('chunk_holds');
SELECT dfsfs_scope_table('inode_holds');
SELECT dfsfs_scope_table('chunk_tombstones');

-- ---- the functions of migration 4 this replaces ------------------------------------------

DROP FUNCTION dfsfs_unlink_each(bigint, bigint[], bytea[], bigint[], boolean[], bigint[]);
DROP FUNCTION dfsfs_unlink(bigint, bigint, bytea, bigint, boolean, bigint[]);
DROP FUNCTION dfsfs_remove_link(bigint, bigint, bigint, bigint[]);
DROP FUNCTION dfsfs_purge(bigint, bigint);
DROP FUNCTION dfsfs_release_chunks(bigint, bigint[]);
DROP FUNCTION dfsfs_make_node(bigint, bigint, bytea, integer, integer, integer, bigint, bigint, bytea);
DROP FUNCTION dfsfs_commit_file(bigint, bigint, bigint[], bytea[], integer[], bigint, bigint,
                                bigint, bigint, bigint, integer, integer, integer);

-- ---- sessions ----------------------------------------------------------------------------

CREATE FUNCTION dfsfs_session_live(p_session bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM sessions
                    WHERE id = p_session AND ended_at IS NULL AND expires_at > now())
$$;

-- Which process on which boot of its host runs the session: a later mount on the same
-- machine tells from these that the session's daemon is gone, without waiting for expiry.
ALTER TABLE sessions
    ADD COLUMN boot_id text,  -- /proc/sys/kernel/random/boot_id when the session started
    ADD COLUMN process_start bigint;  -- the process's start time (clock ticks since boot)
DO $do$
BEGIN
    EXECUTE format('GRANT SELECT (boot_id, process_start) ON sessions TO %I',
                   (SELECT client_role FROM trust_settings));
END $do$;

-- The client role may not write `sessions` (migration 7): the functions below do what the
-- write path needs, as the owner, for an account the caller acts for.

CREATE FUNCTION dfsfs_require_account(p_account bigint) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
-- Raises DF001 unless the caller acts for p_account: a session of that account, an
-- admin session, or a connection of the owner role.
BEGIN
    IF pg_catalog.pg_has_role(session_user, (SELECT owner_role FROM trust_settings), 'MEMBER')
       OR p_account = dfsfs_current_account() OR dfsfs_session_is_admin() THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'this session does not act for account %', p_account USING ERRCODE = 'DF001';
END $$;

CREATE FUNCTION dfsfs_describe_session(p_pid integer, p_boot_id text, p_process_start bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
-- The daemon serving the connection's session names its process (the login ran in the
-- `dfsfs mount` command, whose process may not be the daemon's).
BEGIN
    UPDATE sessions SET pid = p_pid, boot_id = p_boot_id, process_start = p_process_start
     WHERE id = dfsfs_current_session() AND ended_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no dfsfs session on this connection' USING ERRCODE = 'DF128';
    END IF;
END $$;

CREATE FUNCTION dfsfs_open_session(p_account bigint, p_purpose text, p_host text, p_pid integer,
                                   p_boot_id text, p_process_start bigint, p_expiry_s integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
-- A session that holds and claims chunks of p_account in the name of a process (fsck,
-- which may act for several accounts under one login): no token, so no connection can
-- present it; it ends with dfsfs_end_sessions or when it expires.
DECLARE
    opened bigint;
BEGIN
    PERFORM dfsfs_require_account(p_account);
    INSERT INTO sessions (user_id, host, pid, boot_id, process_start, expires_at, purpose, expiry_s)
    VALUES (p_account, left(coalesce(p_host, ''), 255), coalesce(p_pid, 0), p_boot_id,
            p_process_start, clock_timestamp() + make_interval(secs => p_expiry_s),
            left(coalesce(p_purpose, 'command'), 32), p_expiry_s)
    RETURNING id INTO opened;
    RETURN opened;
END $$;

CREATE FUNCTION dfsfs_end_sessions(p_account bigint, p_sessions bigint[], p_reason text)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
-- End sessions of the account known to be over (a daemon found dead on its own host; a
-- work session done). Connections bound to them fail at their next statement.
DECLARE
    ended integer;
BEGIN
    PERFORM dfsfs_require_account(p_account);
    UPDATE sessions SET ended_at = clock_timestamp(), end_reason = left(p_reason, 64)
     WHERE id = ANY(p_sessions) AND user_id = p_account AND ended_at IS NULL;
    GET DIAGNOSTICS ended = ROW_COUNT;
    IF ended > 0 THEN
        PERFORM nextval('dfsfs_sessions_ended');
    END IF;
    RETURN ended;
END $$;

CREATE FUNCTION dfsfs_touch_session(p_account bigint, p_session bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
-- A write to WAL that costs nothing else (see dfsfs_settle).
BEGIN
    PERFORM dfsfs_require_account(p_account);
    UPDATE sessions SET heartbeat_at = clock_timestamp() WHERE id = p_session AND user_id = p_account;
END $$;

-- ---- chunk references ----------------------------------------------------------------------

CREATE FUNCTION dfsfs_release_chunks(
    p_account bigint, p_chunk_ids bigint[], OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- One reference (or hold) less per use; the chunks left with none are returned for
-- reclaim. One primary-key update per chunk, in id order (a fixed lock order).
DECLARE
    dropped record;
    released record;
BEGIN
    chunk_ids := '{}';
    digests := '{}';
    FOR dropped IN
        SELECT id, count(*) AS n FROM unnest(p_chunk_ids) AS id
         WHERE id IS NOT NULL GROUP BY id ORDER BY id
    LOOP
        UPDATE chunks SET refcount = refcount - dropped.n
         WHERE id = dropped.id AND user_id = p_account AND refcount - dropped.n >= 0
        RETURNING id, sha256, refcount INTO released;
        IF FOUND AND released.refcount = 0 THEN
            chunk_ids := chunk_ids || released.id;
            digests := digests || released.sha256;
        END IF;
    END LOOP;
END $$;

CREATE FUNCTION dfsfs_reserve_chunks(
    p_account bigint, p_session bigint, p_digests bytea[], p_sizes integer[])
RETURNS TABLE (digest bytea, chunk_id bigint, must_store boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- A hold for every use of every digest (one use per file chunk that will point at it).
-- must_store: the bytes may be absent or not yet durable, so the caller puts them (and
-- settles them at its next sync point). A chunk whose bytes a live session is deleting
-- right now comes back with chunk_id NULL: ask again in a moment. One whose deleting
-- session died is taken over (its bytes may be half deleted: they are stored again).
DECLARE
    wanted record;
    reserved_id bigint;
    reserved_size integer;
    is_settled boolean;
    inserted boolean;
BEGIN
    FOR wanted IN
        SELECT d, min(s) AS s, count(*)::integer AS n FROM unnest(p_digests, p_sizes) AS t(d, s)
         GROUP BY d ORDER BY d
    LOOP
        INSERT INTO chunks AS c (user_id, sha256, size, refcount, settled, unsettled_by)
        VALUES (p_account, wanted.d, wanted.s, wanted.n, false, p_session)
        ON CONFLICT (user_id, sha256) DO UPDATE
           SET refcount = c.refcount + EXCLUDED.refcount,
               settled = c.settled AND c.deleting_by IS NULL,
               unsettled_by = CASE WHEN c.settled AND c.deleting_by IS NULL THEN NULL
                                   ELSE p_session END,
               deleting_by = NULL
         WHERE c.deleting_by IS NULL OR NOT dfsfs_session_live(c.deleting_by)
        RETURNING c.id, c.size, c.settled, (c.xmax = 0)
             INTO reserved_id, reserved_size, is_settled, inserted;
        digest := wanted.d;
        IF NOT FOUND THEN
            chunk_id := NULL;
            must_store := true;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF inserted THEN
            UPDATE usage SET chunks = chunks + 1, stored_bytes = stored_bytes + reserved_size
             WHERE user_id = p_account;
        END IF;
        INSERT INTO chunk_holds AS h (session_id, chunk_id, user_id, uses)
        VALUES (p_session, reserved_id, p_account, wanted.n)
        ON CONFLICT (session_id, chunk_id) DO UPDATE SET uses = h.uses + EXCLUDED.uses;
        chunk_id := reserved_id;
        must_store := NOT is_settled;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE FUNCTION dfsfs_drop_holds(
    p_account bigint, p_session bigint, p_chunk_ids bigint[],
    OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Give up one use of a hold per entry (a chunk stored, then overwritten before any commit
-- named it; or a commit that failed for good); uses this session does not hold are
-- ignored. Chunks left with no reference and no hold are returned for reclaim.
DECLARE
    wanted record;
    held integer;
    dropped bigint[] := '{}';
BEGIN
    FOR wanted IN
        SELECT id, count(*)::integer AS n FROM unnest(p_chunk_ids) AS id GROUP BY id ORDER BY id
    LOOP
        SELECT uses INTO held FROM chunk_holds
         WHERE session_id = p_session AND chunk_id = wanted.id AND user_id = p_account FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        UPDATE chunk_holds SET uses = uses - least(held, wanted.n)
         WHERE session_id = p_session AND chunk_id = wanted.id AND user_id = p_account;
        dropped := dropped || array_fill(wanted.id, ARRAY[least(held, wanted.n)]);
    END LOOP;
    DELETE FROM chunk_holds WHERE session_id = p_session AND user_id = p_account AND uses <= 0;
    SELECT r.chunk_ids, r.digests INTO chunk_ids, digests
      FROM dfsfs_release_chunks(p_account, dropped) AS r;
END $$;

CREATE FUNCTION dfsfs_settle(p_account bigint, p_session bigint, p_digests bytea[])
RETURNS integer
LANGUAGE plpgsql AS $$
-- A sync point: the session made the bytes of these chunks durable in the stores. Called
-- in a durable commit, which flushes the WAL with every earlier commit of the mount. It
-- always writes WAL (the session's heartbeat), since PostgreSQL commits a transaction that
-- wrote none without flushing, whatever synchronous_commit says.
DECLARE
    settled integer;
BEGIN
    PERFORM dfsfs_touch_session(p_account, p_session);
    UPDATE chunks SET settled = true, unsettled_by = NULL
     WHERE user_id = p_account AND sha256 = ANY(p_digests) AND NOT chunks.settled
       AND deleting_by IS NULL;
    GET DIAGNOSTICS settled = ROW_COUNT;
    RETURN settled;
END $$;

-- ---- committing files ------------------------------------------------------------------------

CREATE FUNCTION dfsfs_take_chunk(p_account bigint, p_session bigint, p_digest bytea,
                                 p_size integer, p_uses integer) RETURNS bigint
LANGUAGE plpgsql AS $$
-- References for a file about to point `p_uses` chunks at `p_digest`, whose bytes this
-- session has put: from its hold on the chunk if it has one, else taken directly. Raises
-- DF016 (busy) when the bytes are being deleted, or were lately (see chunk_tombstones):
-- the caller reserves the chunk (waiting for the deletion), puts it again and retries.
DECLARE
    found_id bigint;
    held integer;
    inserted boolean;
BEGIN
    SELECT c.id, h.uses INTO found_id, held FROM chunks c
      LEFT JOIN chunk_holds h ON h.chunk_id = c.id AND h.session_id = p_session
     WHERE c.user_id = p_account AND c.sha256 = p_digest;
    IF held >= p_uses THEN
        UPDATE chunk_holds SET uses = uses - p_uses WHERE session_id = p_session AND chunk_id = found_id;
        RETURN found_id;
    END IF;
    INSERT INTO chunks AS c (user_id, sha256, size, refcount, settled, unsettled_by)
    VALUES (p_account, p_digest, p_size, p_uses, false, p_session)
    ON CONFLICT (user_id, sha256) DO UPDATE
       SET refcount = c.refcount + EXCLUDED.refcount,
           unsettled_by = CASE WHEN c.settled THEN NULL
                               WHEN c.unsettled_by IS NULL OR NOT dfsfs_session_live(c.unsettled_by)
                               THEN p_session ELSE c.unsettled_by END
     WHERE c.deleting_by IS NULL
    RETURNING c.id, (c.xmax = 0) INTO found_id, inserted;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunk % is being deleted', encode(p_digest, 'hex') USING ERRCODE = 'DF016';
    END IF;
    IF inserted THEN
        IF EXISTS (SELECT 1 FROM chunk_tombstones WHERE user_id = p_account AND sha256 = p_digest
                    AND claimed_at > now() - interval '1 hour') THEN
            RAISE EXCEPTION 'chunk % was deleted lately', encode(p_digest, 'hex') USING ERRCODE = 'DF016';
        END IF;
        UPDATE usage SET chunks = chunks + 1, stored_bytes = stored_bytes + p_size
         WHERE user_id = p_account;
    END IF;
    RETURN found_id;
END $$;

CREATE FUNCTION dfsfs_commit_files(
    p_account bigint, p_session bigint,
    p_inos bigint[], p_sizes bigint[], p_drop_from bigint[],
    p_mtimes bigint[], p_ctimes bigint[], p_atimes bigint[],
    p_modes integer[], p_uids integer[], p_gids integer[],
    p_chunk_file integer[], p_chunk_indices bigint[], p_digests bytea[], p_chunk_sizes integer[],
    OUT refusals text[], OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Commit several files in one call, in order. File i gets size p_sizes[i], loses its
-- chunks from index p_drop_from[i] on (NULL: none), takes the attributes given (NULL:
-- unchanged), and its chunk indices listed for it (p_chunk_file = i) point at the chunks
-- with the digests given (NULL: a hole), whose bytes this session has put (see
-- dfsfs_take_chunk). A file is refused whole (nothing of it changes; its code in
-- refusals[i], else NULL) when it is gone (DF002), over the byte quota (DF122), or names
-- a chunk being deleted (DF016). Returns the chunks left without references, for reclaim.
DECLARE
    old inodes;
    i integer;
    wanted record;
    taken bigint[];
    dropped bigint[];
    released record;
    stored_change bigint;
BEGIN
    refusals := array_fill(NULL::text, ARRAY[coalesce(array_length(p_inos, 1), 0)]);
    chunk_ids := '{}';
    digests := '{}';
    FOR i IN 1 .. coalesce(array_length(p_inos, 1), 0) LOOP
      BEGIN
        SELECT * INTO old FROM inodes WHERE id = p_inos[i] AND user_id = p_account FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'inode % is gone', p_inos[i] USING ERRCODE = 'DF002';
        END IF;
        IF p_sizes[i] > old.size AND old.nlink > 0 AND EXISTS (
                SELECT 1 FROM usage u JOIN users a ON a.id = u.user_id
                 WHERE u.user_id = p_account AND a.quota_bytes IS NOT NULL
                   AND u.logical_bytes + (p_sizes[i] - old.size) > a.quota_bytes) THEN
            RAISE EXCEPTION 'byte quota exceeded' USING ERRCODE = 'DF122';
        END IF;
        taken := '{}';
        FOR wanted IN
            SELECT t.d, min(t.s) AS s, count(*)::integer AS n
              FROM unnest(p_chunk_file, p_digests, p_chunk_sizes) AS t(f, d, s)
             WHERE t.f = i AND t.d IS NOT NULL GROUP BY t.d ORDER BY t.d
        LOOP
            taken := taken || array_fill(dfsfs_take_chunk(p_account, p_session, wanted.d, wanted.s,
                                                          wanted.n), ARRAY[wanted.n]);
        END LOOP;
        WITH gone AS (
            DELETE FROM file_chunks fc
             WHERE fc.ino = p_inos[i] AND fc.user_id = p_account
               AND (fc.index >= coalesce(p_drop_from[i], 4611686018427387904)
                    OR fc.index IN (SELECT t.x FROM unnest(p_chunk_file, p_chunk_indices) AS t(f, x)
                                     WHERE t.f = i))
            RETURNING fc.chunk_id)
        SELECT coalesce(array_agg(gone.chunk_id), '{}') INTO dropped FROM gone;
        SELECT coalesce((SELECT sum(c.size) FROM unnest(taken) AS w(x) JOIN chunks c ON c.id = w.x), 0)
             - coalesce((SELECT sum(c.size) FROM unnest(dropped) AS d(x) JOIN chunks c ON c.id = d.x), 0)
          INTO stored_change;
        INSERT INTO file_chunks (user_id, ino, index, chunk_id)
        SELECT p_account, p_inos[i], t.x, c.id
          FROM unnest(p_chunk_file, p_chunk_indices, p_digests) AS t(f, x, d)
          JOIN chunks c ON c.user_id = p_account AND c.sha256 = t.d
         WHERE t.f = i;
        SELECT r.chunk_ids, r.digests INTO released FROM dfsfs_release_chunks(p_account, dropped) AS r;
        chunk_ids := chunk_ids || released.chunk_ids;
        digests := digests || released.digests;
        UPDATE inodes
           SET size = p_sizes[i], mtime_ns = coalesce(p_mtimes[i], mtime_ns),
               ctime_ns = coalesce(p_ctimes[i], ctime_ns), atime_ns = coalesce(p_atimes[i], atime_ns),
               mode = coalesce(p_modes[i], mode), uid = coalesce(p_uids[i], uid),
               gid = coalesce(p_gids[i], gid), stored_bytes = stored_bytes + stored_change
         WHERE id = p_inos[i] AND user_id = p_account;
        IF old.nlink > 0 THEN
            UPDATE usage SET logical_bytes = logical_bytes + (p_sizes[i] - old.size)
             WHERE user_id = p_account;
        END IF;
      EXCEPTION WHEN SQLSTATE 'DF002' OR SQLSTATE 'DF122' OR SQLSTATE 'DF016' THEN
        refusals[i] := SQLSTATE;
      END;
    END LOOP;
    DELETE FROM chunk_holds WHERE session_id = p_session AND user_id = p_account AND uses <= 0;
END $$;

-- ---- deleting chunk bytes ----------------------------------------------------------------------

CREATE FUNCTION dfsfs_claim_reclaim(p_account bigint, p_session bigint, p_chunk_ids bigint[])
RETURNS TABLE (chunk_id bigint, digest bytea)
LANGUAGE sql AS $$
-- Mark chunks with no reference and no hold as being deleted by this session. Commit
-- this durably before deleting their bytes: a reservation then waits instead of trusting
-- bytes that are going, and after a crash the mark says which bytes may be gone.
    WITH claimed AS (
        UPDATE chunks SET deleting_by = p_session, settled = false, unsettled_by = NULL
         WHERE id = ANY(p_chunk_ids) AND user_id = p_account AND refcount = 0
           AND deleting_by IS NULL
        RETURNING id, sha256),
    remembered AS (
        INSERT INTO chunk_tombstones (user_id, sha256) SELECT p_account, sha256 FROM claimed
        ON CONFLICT (user_id, sha256) DO UPDATE SET claimed_at = now()
        RETURNING 1)
    SELECT id, sha256 FROM claimed
$$;

CREATE FUNCTION dfsfs_claim_orphans(p_account bigint, p_session bigint, p_digests bytea[])
RETURNS TABLE (chunk_id bigint, digest bytea)
LANGUAGE sql AS $$
-- Bytes that no chunk row names (a mount's put that no commit will name, because it was
-- overwritten first; what fsck finds): a row marked as being deleted by this session
-- (counted like any chunk, so that dfsfs_finish_reclaim can drop it) makes a commit or a
-- reservation of the digest wait while the bytes go. Digests that have a row are left.
    WITH claimed AS (
        INSERT INTO chunks (user_id, sha256, size, refcount, settled, deleting_by)
        SELECT p_account, d, 0, 0, false, p_session FROM unnest(p_digests) AS d ORDER BY d
        ON CONFLICT (user_id, sha256) DO NOTHING
        RETURNING id, sha256),
    remembered AS (
        INSERT INTO chunk_tombstones (user_id, sha256) SELECT p_account, sha256 FROM claimed
        ON CONFLICT (user_id, sha256) DO UPDATE SET claimed_at = now()
        RETURNING 1),
    counted AS (
        UPDATE usage SET chunks = chunks + (SELECT count(*) FROM claimed)
         WHERE user_id = p_account
        RETURNING 1)
    SELECT id, sha256 FROM claimed
$$;

CREATE FUNCTION dfsfs_finish_reclaim(p_account bigint, p_session bigint, p_chunk_ids bigint[])
RETURNS integer
LANGUAGE plpgsql AS $$
-- The bytes of these claimed chunks are gone from both stores: drop their rows.
DECLARE
    removed integer;
    freed bigint;
BEGIN
    WITH gone AS (
        DELETE FROM chunks
         WHERE id = ANY(p_chunk_ids) AND user_id = p_account AND deleting_by = p_session
           AND refcount = 0
        RETURNING size)
    SELECT count(*), coalesce(sum(size), 0) INTO removed, freed FROM gone;
    UPDATE usage SET chunks = chunks - removed, stored_bytes = stored_bytes - freed
     WHERE user_id = p_account;
    RETURN removed;
END $$;

-- ---- names and inodes --------------------------------------------------------------------------

CREATE FUNCTION dfsfs_make_node(
    p_account bigint, p_session bigint, p_parent bigint, p_name bytea, p_mode integer,
    p_uid integer, p_gid integer, p_now bigint, p_rdev bigint, p_target bytea,
    p_hold boolean)
RETURNS inodes
LANGUAGE plpgsql AS $$
-- Create a file, directory, symlink or special file; with p_hold, the creating session
-- holds it (a file created open).
DECLARE
    parent_mode integer;
    over_quota boolean;
    kind integer := p_mode & 61440;
    node inodes;
BEGIN
    SELECT p.mode, a.quota_inodes IS NOT NULL
                   AND u.files + u.directories + u.symlinks >= a.quota_inodes
      INTO parent_mode, over_quota
      FROM inodes p JOIN users a ON a.id = p.user_id JOIN usage u ON u.user_id = p.user_id
     WHERE p.id = p_parent AND p.user_id = p_account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'inode % does not exist', p_parent USING ERRCODE = 'DF002';
    END IF;
    IF parent_mode & 61440 <> 16384 THEN
        RAISE EXCEPTION 'not a directory' USING ERRCODE = 'DF020';
    END IF;
    IF over_quota THEN
        RAISE EXCEPTION 'inode quota exceeded' USING ERRCODE = 'DF122';
    END IF;
    INSERT INTO inodes (user_id, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns,
                        rdev, target)
    VALUES (p_account, p_mode, p_uid, p_gid, coalesce(length(p_target), 0),
            CASE WHEN kind = 16384 THEN 2 ELSE 1 END, p_now, p_now, p_now, p_rdev, p_target)
    RETURNING * INTO node;
    INSERT INTO dentries (user_id, parent_ino, name, ino)
    VALUES (p_account, p_parent, p_name, node.id)
    ON CONFLICT (parent_ino, name) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'file exists' USING ERRCODE = 'DF017';  -- undoes the inode too
    END IF;
    UPDATE inodes
       SET mtime_ns = p_now, ctime_ns = p_now, nlink = nlink + (kind = 16384)::integer
     WHERE id = p_parent AND user_id = p_account;
    UPDATE usage
       SET files = files + (kind NOT IN (16384, 40960))::integer,
           directories = directories + (kind = 16384)::integer,
           symlinks = symlinks + (kind = 40960)::integer,
           logical_bytes = logical_bytes + node.size
     WHERE user_id = p_account;
    IF p_hold THEN
        INSERT INTO inode_holds (ino, session_id, user_id) VALUES (node.id, p_session, p_account);
    END IF;
    RETURN node;
END $$;

CREATE FUNCTION dfsfs_open(
    p_account bigint, p_session bigint, p_ino bigint, p_map_up_to bigint,
    OUT node inodes, OUT indices bigint[], OUT digests bytea[], OUT sizes integer[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Open a file: its attributes, its chunk map when it is at most p_map_up_to bytes (else
-- NULL arrays), and a hold for this session, so that the file stays readable here even
-- if every name of it goes (on this mount or another).
BEGIN
    -- FOR SHARE: a purge (FOR UPDATE) either waits for this hold or is done before it.
    SELECT * INTO node FROM inodes WHERE id = p_ino AND user_id = p_account FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'inode % does not exist', p_ino USING ERRCODE = 'DF002';
    END IF;
    INSERT INTO inode_holds (ino, session_id, user_id) VALUES (p_ino, p_session, p_account)
    ON CONFLICT DO NOTHING;
    IF node.size <= p_map_up_to THEN
        SELECT coalesce(array_agg(fc.index ORDER BY fc.index), '{}'),
               coalesce(array_agg(c.sha256 ORDER BY fc.index), '{}'),
               coalesce(array_agg(c.size ORDER BY fc.index), '{}')
          INTO indices, digests, sizes
          FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id
         WHERE fc.ino = p_ino AND fc.user_id = p_account;
    END IF;
END $$;

CREATE FUNCTION dfsfs_purge(p_account bigint, p_ino bigint,
                            OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Remove an inode that has no name left, with its chunk references and xattrs.
DECLARE
    dropped bigint[];
BEGIN
    WITH gone AS (
        DELETE FROM file_chunks WHERE ino = p_ino AND user_id = p_account RETURNING chunk_id)
    SELECT coalesce(array_agg(chunk_id), '{}') INTO dropped FROM gone;
    DELETE FROM inodes WHERE id = p_ino AND user_id = p_account AND nlink = 0;
    SELECT r.chunk_ids, r.digests INTO chunk_ids, digests
      FROM dfsfs_release_chunks(p_account, dropped) AS r;
END $$;

CREATE FUNCTION dfsfs_purge_unheld(p_account bigint, p_inos bigint[],
                                  OUT purged bigint[], OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Purge those of these inodes that have no name left and no live session holding them.
-- Each is locked, then its holds are read afresh: an open (which takes the inode FOR
-- SHARE) either committed its hold before, and is seen, or waits and finds it gone.
DECLARE
    candidate bigint;
    released record;
BEGIN
    purged := '{}';
    chunk_ids := '{}';
    digests := '{}';
    FOR candidate IN SELECT DISTINCT x FROM unnest(p_inos) AS x ORDER BY x LOOP
        PERFORM 1 FROM inodes WHERE id = candidate AND user_id = p_account AND nlink = 0 FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        CONTINUE WHEN EXISTS (SELECT 1 FROM inode_holds h
                               WHERE h.ino = candidate AND dfsfs_session_live(h.session_id));
        SELECT * INTO released FROM dfsfs_purge(p_account, candidate);
        purged := purged || candidate;
        chunk_ids := chunk_ids || released.chunk_ids;
        digests := digests || released.digests;
    END LOOP;
END $$;

CREATE FUNCTION dfsfs_release_inodes(
    p_account bigint, p_session bigint, p_inos bigint[],
    OUT purged bigint[], OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- This session lets go of these inodes (closed, and forgotten by its kernel); those left
-- without a name and without a live holder are purged.
BEGIN
    DELETE FROM inode_holds
     WHERE ino = ANY(p_inos) AND session_id = p_session AND user_id = p_account;
    SELECT r.purged, r.chunk_ids, r.digests INTO purged, chunk_ids, digests
      FROM dfsfs_purge_unheld(p_account, p_inos) AS r;
END $$;

CREATE FUNCTION dfsfs_remove_link(
    p_account bigint, p_session bigint, p_ino bigint, p_now bigint)
RETURNS inodes
LANGUAGE plpgsql AS $$
-- After one of its names went away: one link less (a directory has none left). An inode
-- left without names is no longer counted in the usage; the removing session holds it
-- (its kernel still references it) until dfsfs_release_inodes, which purges it.
DECLARE
    node inodes;
    kind integer;
BEGIN
    UPDATE inodes
       SET nlink = CASE WHEN mode & 61440 = 16384 THEN 0 ELSE nlink - 1 END,
           ctime_ns = p_now
     WHERE id = p_ino AND user_id = p_account
    RETURNING * INTO node;
    IF node.nlink > 0 THEN
        RETURN node;
    END IF;
    kind := node.mode & 61440;
    UPDATE usage
       SET files = files - (kind NOT IN (16384, 40960))::integer,
           directories = directories - (kind = 16384)::integer,
           symlinks = symlinks - (kind = 40960)::integer,
           logical_bytes = logical_bytes - node.size
     WHERE user_id = p_account;
    INSERT INTO inode_holds (ino, session_id, user_id) VALUES (p_ino, p_session, p_account)
    ON CONFLICT DO NOTHING;
    RETURN node;
END $$;

CREATE FUNCTION dfsfs_unlink_each(
    p_account bigint, p_session bigint, p_parents bigint[], p_names bytea[],
    p_times bigint[], p_directories boolean[])
RETURNS TABLE (item integer, refusal text, node inodes)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Remove many names in one call, in order (rmdir where p_directories[i]). A refused one
-- (gone already, not empty, ...) is reported by its code and the others are still
-- removed; nothing of a refused one changes.
DECLARE
    named inodes;
    is_dir boolean;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_names, 1), 0) LOOP
        item := i;
        refusal := NULL;
        node := NULL;
        SELECT t.* INTO named FROM dentries d JOIN inodes t ON t.id = d.ino
         WHERE d.parent_ino = p_parents[i] AND d.name = p_names[i] AND d.user_id = p_account;
        IF NOT FOUND THEN
            refusal := 'DF002';
        ELSE
            is_dir := named.mode & 61440 = 16384;
            IF p_directories[i] AND NOT is_dir THEN
                refusal := 'DF020';
            ELSIF is_dir AND NOT p_directories[i] THEN
                refusal := 'DF021';
            ELSIF is_dir AND EXISTS (
                    SELECT 1 FROM dentries WHERE parent_ino = named.id AND user_id = p_account) THEN
                refusal := 'DF039';
            END IF;
        END IF;
        IF refusal IS NULL THEN
            DELETE FROM dentries
             WHERE parent_ino = p_parents[i] AND name = p_names[i] AND user_id = p_account;
            UPDATE inodes SET mtime_ns = p_times[i], ctime_ns = p_times[i],
                              nlink = nlink - is_dir::integer
             WHERE id = p_parents[i] AND user_id = p_account;
            node := dfsfs_remove_link(p_account, p_session, named.id, p_times[i]);
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- ---- recovery ----------------------------------------------------------------------------------


CREATE FUNCTION dfsfs_recover(
    p_account bigint,
    OUT ended integer, OUT purged bigint[],
    OUT reclaim_ids bigint[], OUT reclaim_digests bytea[],
    OUT unsettled_ids bigint[], OUT unsettled_digests bytea[],
    OUT deleting_ids bigint[], OUT deleting_digests bytea[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
#variable_conflict use_column
-- Settle what sessions of the account left behind when they ended without cleaning up
-- (a killed daemon, a power cut, a machine gone): end expired sessions; drop the chunk
-- holds and inode holds of ended ones (purging inodes with no name and no live holder);
-- and return the chunks whose bytes no live session has made durable (the caller checks
-- the stores: dfsfs_settle what is there, dfsfs_cut_lost the rest) and the chunks whose
-- deleting session died (the caller takes the deletion over: dfsfs_take_over_deletion).
DECLARE
    dead bigint[];
    dropped bigint[];
    released record;
BEGIN
    PERFORM dfsfs_require_account(p_account);  -- (it runs as the owner: every account's rows)
    UPDATE sessions SET ended_at = expires_at, end_reason = 'expired'
     WHERE user_id = p_account AND ended_at IS NULL AND expires_at <= clock_timestamp();
    GET DIAGNOSTICS ended = ROW_COUNT;
    IF ended > 0 THEN
        PERFORM nextval('dfsfs_sessions_ended');
    END IF;
    SELECT coalesce(array_agg(id), '{}') INTO dead FROM sessions
     WHERE user_id = p_account AND ended_at IS NOT NULL;
    -- chunk holds of ended sessions: one reference less per use
    SELECT coalesce(array_agg(h.chunk_id), '{}') INTO dropped
      FROM chunk_holds h, generate_series(1, h.uses)
     WHERE h.user_id = p_account AND h.session_id = ANY(dead);
    DELETE FROM chunk_holds WHERE user_id = p_account AND session_id = ANY(dead);
    SELECT r.chunk_ids, r.digests INTO reclaim_ids, reclaim_digests
      FROM dfsfs_release_chunks(p_account, dropped) AS r;
    -- inode holds of ended sessions, then inodes with no name and no live holder
    DELETE FROM inode_holds WHERE user_id = p_account AND session_id = ANY(dead);
    SELECT r.purged, r.chunk_ids, r.digests INTO released
      FROM dfsfs_purge_unheld(p_account, ARRAY(
          SELECT id FROM inodes WHERE user_id = p_account AND nlink = 0)) AS r;
    purged := released.purged;
    reclaim_ids := reclaim_ids || released.chunk_ids;
    reclaim_digests := reclaim_digests || released.digests;
    -- bytes no live session has made durable
    SELECT coalesce(array_agg(id ORDER BY id), '{}'), coalesce(array_agg(sha256 ORDER BY id), '{}')
      INTO unsettled_ids, unsettled_digests FROM chunks
     WHERE user_id = p_account AND NOT settled AND deleting_by IS NULL
       AND (unsettled_by IS NULL OR NOT dfsfs_session_live(unsettled_by));
    -- bytes a dead session was deleting
    SELECT coalesce(array_agg(id ORDER BY id), '{}'), coalesce(array_agg(sha256 ORDER BY id), '{}')
      INTO deleting_ids, deleting_digests FROM chunks
     WHERE user_id = p_account AND deleting_by IS NOT NULL AND NOT dfsfs_session_live(deleting_by);
    -- tombstones no commit can need any more
    DELETE FROM chunk_tombstones WHERE user_id = p_account AND claimed_at < now() - interval '1 hour';
    -- sessions ended a day ago (`dfsfs user sessions` lists them until then) that nothing
    -- names any more
    DELETE FROM sessions s
     WHERE s.user_id = p_account AND s.ended_at < clock_timestamp() - interval '1 day'
       AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.user_id = p_account
                        AND (c.unsettled_by = s.id OR c.deleting_by = s.id));
END $$;

CREATE FUNCTION dfsfs_take_over_deletion(p_account bigint, p_session bigint, p_chunk_ids bigint[])
RETURNS TABLE (chunk_id bigint, digest bytea)
LANGUAGE sql AS $$
-- Become the deleter of chunks whose deleting session died (see dfsfs_recover).
    UPDATE chunks SET deleting_by = p_session
     WHERE id = ANY(p_chunk_ids) AND user_id = p_account AND refcount = 0
       AND deleting_by IS NOT NULL AND NOT dfsfs_session_live(deleting_by)
    RETURNING id, sha256
$$;  -- (their tombstones were written when they were first claimed)

CREATE FUNCTION dfsfs_cut_lost(p_account bigint, p_chunk_size bigint, p_chunk_ids bigint[])
RETURNS TABLE (ino bigint, old_size bigint, new_size bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Chunks whose bytes did not survive (a power cut before the sync point that would have
-- made them durable): every file naming one is cut back to just before its first lost
-- chunk, as if the writes from there on had not happened, and a damage record says so.
-- The lost chunks' rows go. Only chunks still unsettled with no live session storing
-- them count (one a live session reserved since is being stored again).
DECLARE
    lost bigint[];
    hit record;
    dropped bigint[];
BEGIN
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO lost FROM (
        SELECT id FROM chunks
         WHERE id = ANY(p_chunk_ids) AND user_id = p_account AND NOT settled
           AND deleting_by IS NULL
           AND (unsettled_by IS NULL OR NOT dfsfs_session_live(unsettled_by))
         ORDER BY id FOR UPDATE) AS locked;
    FOR hit IN
        SELECT fc.ino AS target, min(fc.index) AS first_lost
          FROM file_chunks fc
         WHERE fc.user_id = p_account AND fc.chunk_id = ANY(lost)
         GROUP BY fc.ino ORDER BY fc.ino
    LOOP
        SELECT i.size INTO old_size FROM inodes i
         WHERE i.id = hit.target AND i.user_id = p_account FOR UPDATE;
        new_size := least(old_size, hit.first_lost * p_chunk_size);
        INSERT INTO damage (user_id, sha256, store, kind, detail)
        SELECT p_account, c.sha256, 'both', 'lost',
               format('not durable at a crash: inode %s cut from %s to %s bytes',
                      hit.target, old_size, new_size)
          FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id
         WHERE fc.ino = hit.target AND fc.index = hit.first_lost;
        WITH gone AS (
            DELETE FROM file_chunks fc
             WHERE fc.ino = hit.target AND fc.user_id = p_account AND fc.index >= hit.first_lost
            RETURNING fc.chunk_id)
        SELECT coalesce(array_agg(chunk_id), '{}') INTO dropped FROM gone;
        PERFORM dfsfs_release_chunks(p_account, dropped);
        UPDATE inodes i
           SET size = new_size,
               stored_bytes = (SELECT coalesce(sum(c.size), 0) FROM file_chunks fc
                                 JOIN chunks c ON c.id = fc.chunk_id WHERE fc.ino = hit.target)
         WHERE i.id = hit.target AND i.user_id = p_account;
        UPDATE usage SET logical_bytes = logical_bytes - (old_size - new_size)
         WHERE user_id = p_account
           AND EXISTS (SELECT 1 FROM inodes i WHERE i.id = hit.target AND i.nlink > 0);
        ino := hit.target;
        RETURN NEXT;
    END LOOP;
    WITH gone AS (
        DELETE FROM chunks WHERE id = ANY(lost) AND user_id = p_account AND refcount = 0
        RETURNING size)
    UPDATE usage SET chunks = chunks - (SELECT count(*) FROM gone),
                     stored_bytes = stored_bytes - (SELECT coalesce(sum(size), 0) FROM gone)
     WHERE user_id = p_account;
END $$;

-- ---- the change feed ---------------------------------------------------------------------------
-- Every committed change of a name or an inode is announced on the account's channel, so
-- that the other mounts of the account drop what their kernels cached at once (instead
-- of after the entry and attribute timeouts) and file managers see it. The channel's name
-- holds a random key only the account's sessions are told: PostgreSQL lets any role
-- LISTEN on any channel, and the payloads name files.
-- Payload: <session> e+ <parent ino> <ino> <name, hex>  (a name appeared)
--          <session> e- <parent ino> <ino> <name, hex>  (a name went)
--          <session> i <ino>                           (an inode's attributes or data changed)
-- where <session> is the changing connection's dfsfs.session_id setting (its own mount
-- skips its own changes).

ALTER TABLE users ADD COLUMN feed_key text NOT NULL DEFAULT md5(random()::text || clock_timestamp()::text);

CREATE FUNCTION dfsfs_feed_channel(p_account bigint) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER AS $$
-- The channel of an account's change feed, for that account's own connections only.
    SELECT 'dfsfs_' || feed_key FROM users
     WHERE id = p_account AND p_account = (SELECT dfsfs_current_account())
$$;

CREATE FUNCTION dfsfs_announce(p_account bigint, p_change text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
-- Only when another session of the account is live: a single mount (the usual case) then
-- pays nothing, nor takes the lock PostgreSQL serialises notifying commits with. Asked
-- once per transaction (a setting local to it remembers the answer).
DECLARE
    me text := coalesce(nullif(current_setting('dfsfs.session_id', true), ''), '0');
    listened text := current_setting('dfsfs.feed_listened', true);
BEGIN
    IF listened IS NULL OR listened = '' THEN
        listened := CASE WHEN EXISTS (
            SELECT 1 FROM sessions
             WHERE user_id = p_account AND ended_at IS NULL AND expires_at > now()
               AND id <> me::bigint) THEN 'yes' ELSE 'no' END;
        PERFORM set_config('dfsfs.feed_listened', listened, true);
    END IF;
    IF listened = 'yes' THEN
        PERFORM pg_notify('dfsfs_' || feed_key, me || ' ' || p_change) FROM users WHERE id = p_account;
    END IF;
END $$;

CREATE FUNCTION dfsfs_announce_entry() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM dfsfs_announce(OLD.user_id, format('e- %s %s %s', OLD.parent_ino, OLD.ino,
                                                   encode(OLD.name, 'hex')));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM dfsfs_announce(NEW.user_id, format('e+ %s %s %s', NEW.parent_ino, NEW.ino,
                                                   encode(NEW.name, 'hex')));
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION dfsfs_announce_inode() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dfsfs_announce(NEW.user_id, format('i %s', NEW.id));
    RETURN NULL;
END $$;

CREATE TRIGGER dentries_announce AFTER INSERT OR UPDATE OR DELETE ON dentries
    FOR EACH ROW EXECUTE FUNCTION dfsfs_announce_entry();
CREATE TRIGGER inodes_announce AFTER UPDATE ON inodes
    FOR EACH ROW
    WHEN (OLD.size IS DISTINCT FROM NEW.size OR OLD.mtime_ns IS DISTINCT FROM NEW.mtime_ns
          OR OLD.ctime_ns IS DISTINCT FROM NEW.ctime_ns OR OLD.mode IS DISTINCT FROM NEW.mode
          OR OLD.uid IS DISTINCT FROM NEW.uid OR OLD.gid IS DISTINCT FROM NEW.gid
          OR OLD.nlink IS DISTINCT FROM NEW.nlink OR OLD.atime_ns IS DISTINCT FROM NEW.atime_ns)
    EXECUTE FUNCTION dfsfs_announce_inode();

-- SECURITY DEFINER functions resolve names in this schema only (never pg_temp first), as
-- migration 7's.
DO $do$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.pronamespace = current_schema()::regnamespace AND p.prosecdef LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $do$;
