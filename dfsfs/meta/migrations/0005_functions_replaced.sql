-- Migration 5: the functions of migration 4 as released, dropped and created again.
-- Migration 4 was edited in place before it was frozen, so a database that reached
-- version 4 early holds older functions (dfsfs_unlink without its `refusal` column,
-- which CREATE OR REPLACE cannot add to an OUT row type): this brings every version-4
-- database to the same functions.

DROP FUNCTION IF EXISTS dfsfs_unlink_each(bigint, bigint[], bytea[], bigint[], boolean[], bigint[]);
DROP FUNCTION IF EXISTS dfsfs_unlink(bigint, bigint, bytea, bigint, boolean, bigint[]);
DROP FUNCTION IF EXISTS dfsfs_remove_link(bigint, bigint, bigint, bigint[]);
DROP FUNCTION IF EXISTS dfsfs_purge(bigint, bigint);
DROP FUNCTION IF EXISTS dfsfs_release_chunks(bigint, bigint[]);
DROP FUNCTION IF EXISTS dfsfs_make_node(bigint, bigint, bytea, integer, integer, integer, bigint, bigint, bytea);
DROP FUNCTION IF EXISTS dfsfs_commit_file(bigint, bigint, bigint[], bytea[], integer[], bigint, bigint, bigint, bigint, bigint, integer, integer, integer);

CREATE FUNCTION dfsfs_release_chunks(
    p_user bigint, p_dropped bigint[], OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
-- One reference less per use; the chunks left without any are returned for reclaim.
-- One primary-key update per chunk, in id order (a fixed lock order: no deadlocks), so
-- the plan cannot turn into a scan of the user's chunks.
DECLARE
    dropped record;
    released record;
BEGIN
    chunk_ids := '{}';
    digests := '{}';
    FOR dropped IN
        SELECT id, count(*) AS n FROM unnest(p_dropped) AS id GROUP BY id ORDER BY id
    LOOP
        UPDATE chunks SET refcount = refcount - dropped.n
         WHERE id = dropped.id AND user_id = p_user AND refcount - dropped.n >= 0
        RETURNING id, sha256, refcount INTO released;
        IF FOUND AND released.refcount = 0 THEN
            chunk_ids := chunk_ids || released.id;
            digests := digests || released.sha256;
        END IF;
    END LOOP;
END $$;

CREATE FUNCTION dfsfs_purge(
    p_user bigint, p_ino bigint, OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
DECLARE
    dropped bigint[];
BEGIN
    WITH gone AS (
        DELETE FROM file_chunks WHERE ino = p_ino AND user_id = p_user RETURNING chunk_id)
    SELECT coalesce(array_agg(chunk_id), '{}') INTO dropped FROM gone;
    DELETE FROM inodes WHERE id = p_ino AND user_id = p_user;  -- xattrs go with it
    SELECT r.chunk_ids, r.digests INTO chunk_ids, digests
      FROM dfsfs_release_chunks(p_user, dropped) AS r;
END $$;

CREATE FUNCTION dfsfs_remove_link(
    p_user bigint, p_ino bigint, p_now bigint, p_open bigint[],
    OUT node inodes, OUT purged boolean, OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
-- After one of its names went away: one link less (a directory has none left). An inode
-- left without names is purged unless it is in p_open (open files stay until closed).
DECLARE
    kind integer;
BEGIN
    UPDATE inodes
       SET nlink = CASE WHEN mode & 61440 = 16384 THEN 0 ELSE nlink - 1 END,
           ctime_ns = p_now
     WHERE id = p_ino AND user_id = p_user
    RETURNING * INTO node;
    purged := false;
    chunk_ids := '{}';
    digests := '{}';
    IF node.nlink > 0 THEN
        RETURN;
    END IF;
    kind := node.mode & 61440;
    UPDATE usage
       SET files = files - (kind NOT IN (16384, 40960))::integer,
           directories = directories - (kind = 16384)::integer,
           symlinks = symlinks - (kind = 40960)::integer,
           logical_bytes = logical_bytes - node.size
     WHERE user_id = p_user;
    IF node.id = ANY(p_open) THEN
        RETURN;
    END IF;
    SELECT r.chunk_ids, r.digests INTO chunk_ids, digests FROM dfsfs_purge(p_user, node.id) AS r;
    purged := true;
END $$;

CREATE FUNCTION dfsfs_unlink(
    p_user bigint, p_parent bigint, p_name bytea, p_now bigint, p_directory boolean,
    p_open bigint[],
    OUT refusal text, OUT node inodes, OUT purged boolean, OUT chunk_ids bigint[],
    OUT digests bytea[])
LANGUAGE plpgsql AS $$
-- Remove a name (rmdir when p_directory). A refusal is returned, not raised, before
-- anything changed: a batch goes on without a subtransaction per name.
DECLARE
    target inodes;
    is_dir boolean;
    removed record;
BEGIN
    purged := false;
    chunk_ids := '{}';
    digests := '{}';
    SELECT i.* INTO target FROM dentries d JOIN inodes i ON i.id = d.ino
     WHERE d.parent_ino = p_parent AND d.name = p_name AND d.user_id = p_user;
    IF NOT FOUND THEN
        refusal := 'DF002';
        RETURN;
    END IF;
    is_dir := target.mode & 61440 = 16384;
    IF p_directory AND NOT is_dir THEN
        refusal := 'DF020';
    ELSIF is_dir AND NOT p_directory THEN
        refusal := 'DF021';
    ELSIF is_dir AND EXISTS (
            SELECT 1 FROM dentries WHERE parent_ino = target.id AND user_id = p_user) THEN
        refusal := 'DF039';
    END IF;
    IF refusal IS NOT NULL THEN
        RETURN;
    END IF;
    DELETE FROM dentries WHERE parent_ino = p_parent AND name = p_name AND user_id = p_user;
    UPDATE inodes SET mtime_ns = p_now, ctime_ns = p_now, nlink = nlink - is_dir::integer
     WHERE id = p_parent AND user_id = p_user;
    SELECT * INTO removed FROM dfsfs_remove_link(p_user, target.id, p_now, p_open);
    node := removed.node;
    purged := removed.purged;
    chunk_ids := removed.chunk_ids;
    digests := removed.digests;
END $$;

CREATE FUNCTION dfsfs_unlink_each(
    p_user bigint, p_parents bigint[], p_names bytea[], p_times bigint[],
    p_directories boolean[], p_open bigint[])
RETURNS TABLE (item integer, refusal text, node inodes, purged boolean, chunk_ids bigint[],
               digests bytea[])
LANGUAGE plpgsql AS $$
-- Remove many names in one call, in order; a refused one (gone already, not empty, ...)
-- is reported by its code and the others are still removed.
DECLARE
    removed record;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_names, 1), 0) LOOP
        SELECT * INTO removed FROM dfsfs_unlink(p_user, p_parents[i], p_names[i], p_times[i],
                                                p_directories[i], p_open);
        item := i;
        refusal := removed.refusal;
        node := removed.node;
        purged := removed.purged;
        chunk_ids := removed.chunk_ids;
        digests := removed.digests;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE FUNCTION dfsfs_make_node(
    p_user bigint, p_parent bigint, p_name bytea, p_mode integer, p_uid integer,
    p_gid integer, p_now bigint, p_rdev bigint, p_target bytea)
RETURNS inodes
LANGUAGE plpgsql AS $$
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
     WHERE p.id = p_parent AND p.user_id = p_user;
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
    VALUES (p_user, p_mode, p_uid, p_gid, coalesce(length(p_target), 0),
            CASE WHEN kind = 16384 THEN 2 ELSE 1 END, p_now, p_now, p_now, p_rdev, p_target)
    RETURNING * INTO node;
    INSERT INTO dentries (user_id, parent_ino, name, ino)
    VALUES (p_user, p_parent, p_name, node.id)
    ON CONFLICT (parent_ino, name) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'file exists' USING ERRCODE = 'DF017';  -- undoes the inode too
    END IF;
    UPDATE inodes
       SET mtime_ns = p_now, ctime_ns = p_now, nlink = nlink + (kind = 16384)::integer
     WHERE id = p_parent AND user_id = p_user;
    UPDATE usage
       SET files = files + (kind NOT IN (16384, 40960))::integer,
           directories = directories + (kind = 16384)::integer,
           symlinks = symlinks + (kind = 40960)::integer,
           logical_bytes = logical_bytes + node.size
     WHERE user_id = p_user;
    RETURN node;
END $$;

CREATE FUNCTION dfsfs_commit_file(
    p_user bigint, p_ino bigint, p_indices bigint[], p_digests bytea[], p_sizes integer[],
    p_size bigint, p_drop_from bigint, p_mtime bigint, p_ctime bigint, p_atime bigint,
    p_mode integer, p_uid integer, p_gid integer,
    OUT chunk_ids bigint[], OUT digests bytea[], OUT unreferenced bytea[])
LANGUAGE plpgsql AS $$
-- Point chunk indices at stored chunks (a NULL digest is a hole), drop indices from
-- p_drop_from on, set the size and the attributes given (NULL = unchanged). Returns the chunks left without references (for
-- reclaim) and the digests that had no reference before (the caller makes sure their
-- bytes still exist before committing: a reclaim may have just removed them).
DECLARE
    old inodes;
    dropped bigint[];
BEGIN
    SELECT * INTO old FROM inodes WHERE id = p_ino AND user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'inode % does not exist', p_ino USING ERRCODE = 'DF002';
    END IF;
    IF p_size > old.size AND EXISTS (
            SELECT 1 FROM usage u JOIN users a ON a.id = u.user_id
             WHERE u.user_id = p_user AND a.quota_bytes IS NOT NULL
               AND u.logical_bytes + (p_size - old.size) > a.quota_bytes) THEN
        RAISE EXCEPTION 'byte quota exceeded' USING ERRCODE = 'DF122';
    END IF;
    WITH gone AS (
        DELETE FROM file_chunks
         WHERE ino = p_ino AND user_id = p_user
           AND (index = ANY(p_indices) OR index >= coalesce(p_drop_from, 4611686018427387904))
        RETURNING chunk_id)
    SELECT coalesce(array_agg(chunk_id), '{}') INTO dropped FROM gone;
    -- New references before releasing old ones: a chunk both dropped and re-used never
    -- reaches zero. Rows are locked in digest order, so mounts cannot deadlock.
    WITH uses AS (
        SELECT d, min(s) AS s, count(*) AS n FROM unnest(p_digests, p_sizes) AS t(d, s)
         WHERE d IS NOT NULL GROUP BY d),
    referenced AS (
        INSERT INTO chunks (user_id, sha256, size, refcount)
        SELECT p_user, d, s, n FROM uses ORDER BY d
        ON CONFLICT (user_id, sha256) DO UPDATE SET refcount = chunks.refcount + EXCLUDED.refcount
        RETURNING id, sha256, size, refcount, (xmax = 0) AS inserted),
    placed AS (
        INSERT INTO file_chunks (user_id, ino, index, chunk_id)
        SELECT p_user, p_ino, t.i, r.id
          FROM unnest(p_indices, p_digests) AS t(i, d) JOIN referenced r ON r.sha256 = t.d
        RETURNING 1),
    counted AS (
        UPDATE usage
           SET chunks = chunks + (SELECT count(*) FROM referenced WHERE inserted),
               stored_bytes = stored_bytes
                   + (SELECT coalesce(sum(size), 0) FROM referenced WHERE inserted)
         WHERE user_id = p_user
        RETURNING 1)
    SELECT coalesce(array_agg(r.sha256) FILTER (WHERE r.refcount = u.n), '{}')
      INTO unreferenced
      FROM referenced r JOIN uses u ON u.d = r.sha256;
    SELECT r.chunk_ids, r.digests INTO chunk_ids, digests
      FROM dfsfs_release_chunks(p_user, dropped) AS r;
    UPDATE inodes
       SET size = p_size, mtime_ns = coalesce(p_mtime, mtime_ns),
           ctime_ns = coalesce(p_ctime, ctime_ns), atime_ns = coalesce(p_atime, atime_ns),
           mode = coalesce(p_mode, mode), uid = coalesce(p_uid, uid), gid = coalesce(p_gid, gid)
     WHERE id = p_ino AND user_id = p_user;
    IF old.nlink > 0 THEN
        UPDATE usage SET logical_bytes = logical_bytes + (p_size - old.size)
         WHERE user_id = p_user;
    END IF;
END $$;
