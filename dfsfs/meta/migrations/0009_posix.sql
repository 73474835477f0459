-- Migration 9: the namespace rules of POSIX, kept by the server for any number of mounts.
--
-- A rename is one call, dfsfs_rename; a hard link is one call, dfsfs_link. Both lock what
-- they change in one fixed order, the order every namespace change of dfsfs follows:
--   1. a rename between two directories takes the account's rename lock (its `users` row,
--      which row-level security keeps other accounts from locking, as they could an
--      advisory lock's key). Like Linux's s_vfs_rename_mutex, it keeps the shape of the directory
--      tree still while the rename checks that a directory does not move below itself:
--      only such renames change which directory is whose ancestor, and they take turns;
--   2. the parent directories' inode rows, in id order (FOR NO KEY UPDATE, the lock the
--      update of their times takes anyway);
--   3. the entries renamed or replaced, in id order;
--   4. the inode rows of the renamed and the replaced inode, in id order.
-- So no interleaving of renames from any number of mounts makes a directory its own
-- ancestor (a cycle cut off from the root) or leaves it in a removed directory.
--
-- Which directory an entry is in is guarded by triggers on dentries, whatever function
-- writes the row:
--   - an entry enters a directory (is inserted, or moved to another parent) only under that
--     directory's row lock, and only while the directory still has its name (nlink > 0);
--   - an entry naming a directory is removed only under that directory's row lock, and
--     only if the directory is empty.
-- An rmdir (or a rename over an empty directory) on one mount and a create, link or
-- rename into that directory on another are thus ordered by the directory's row lock:
-- the later one sees what the earlier did (ENOTEMPTY, or ENOENT), and no entry is ever
-- left in a removed directory, where nothing could reach it.
--
-- Names are checked by the server too (NOT VALID: rows written before are fsck's to find):
-- 1 to 255 bytes, no '/' or NUL, not '.' or '..'.
--
-- Every function runs as its caller (SECURITY INVOKER): row-level security scopes it.
-- Refusals are SQLSTATE 'DF' + errno.

-- ---- names ---------------------------------------------------------------------------------

ALTER TABLE dentries ADD CONSTRAINT dentries_name_valid CHECK (
    octet_length(name) BETWEEN 1 AND 255
    AND position('\x2f'::bytea IN name) = 0
    AND position('\x00'::bytea IN name) = 0
    AND name <> '\x2e'::bytea AND name <> '\x2e2e'::bytea) NOT VALID;

-- ---- directory membership ------------------------------------------------------------------

CREATE FUNCTION dfsfs_entry_enters_directory() RETURNS trigger
LANGUAGE plpgsql AS $$
-- Before an entry is inserted into a directory or moved to another one: lock the
-- directory, which must exist, be a directory and still have its name.
DECLARE
    parent_mode integer;
    parent_nlink integer;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.parent_ino = OLD.parent_ino THEN
        RETURN NEW;  -- a new name in the same directory, or another inode under the name
    END IF;
    SELECT mode, nlink INTO parent_mode, parent_nlink FROM inodes
     WHERE id = NEW.parent_ino FOR NO KEY UPDATE;
    IF NOT FOUND OR parent_nlink = 0 THEN
        RAISE EXCEPTION 'directory % does not exist', NEW.parent_ino USING ERRCODE = 'DF002';
    END IF;
    IF parent_mode & 61440 <> 16384 THEN
        RAISE EXCEPTION 'inode % is not a directory', NEW.parent_ino USING ERRCODE = 'DF020';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER dentries_enter_directory BEFORE INSERT OR UPDATE OF parent_ino ON dentries
    FOR EACH ROW EXECUTE FUNCTION dfsfs_entry_enters_directory();

CREATE FUNCTION dfsfs_entry_leaves() RETURNS trigger
LANGUAGE plpgsql AS $$
-- Before an entry is removed: if it names a directory, lock that directory, which must be
-- empty (a create on another mount may have just put an entry in it). Entries that go
-- with an inode being purged (a cascade, one trigger level down) are let go: an inode is
-- purged only without names, and whatever a broken tree left in it is fsck's to reattach.
DECLARE
    named_mode integer;
BEGIN
    IF pg_trigger_depth() > 1 THEN
        RETURN OLD;
    END IF;
    SELECT mode INTO named_mode FROM inodes WHERE id = OLD.ino FOR NO KEY UPDATE;
    IF FOUND AND named_mode & 61440 = 16384
       AND EXISTS (SELECT 1 FROM dentries WHERE parent_ino = OLD.ino) THEN
        RAISE EXCEPTION 'directory % not empty', OLD.ino USING ERRCODE = 'DF039';
    END IF;
    RETURN OLD;
END $$;

CREATE TRIGGER dentries_leave BEFORE DELETE ON dentries
    FOR EACH ROW EXECUTE FUNCTION dfsfs_entry_leaves();

-- ---- rename --------------------------------------------------------------------------------

CREATE FUNCTION dfsfs_lock_parents(p_account bigint, p_parents bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
-- Lock directories (step 2 of the order above); each must exist, be a directory and
-- still have its name.
DECLARE
    locked integer := 0;
    parent record;
BEGIN
    FOR parent IN
        SELECT id, mode, nlink FROM inodes
         WHERE id = ANY(p_parents) AND user_id = p_account ORDER BY id FOR NO KEY UPDATE
    LOOP
        IF parent.mode & 61440 <> 16384 THEN
            RAISE EXCEPTION 'inode % is not a directory', parent.id USING ERRCODE = 'DF020';
        END IF;
        IF parent.nlink = 0 THEN
            RAISE EXCEPTION 'directory % was removed', parent.id USING ERRCODE = 'DF002';
        END IF;
        locked := locked + 1;
    END LOOP;
    IF locked < (SELECT count(DISTINCT p) FROM unnest(p_parents) AS p) THEN
        RAISE EXCEPTION 'directory does not exist' USING ERRCODE = 'DF002';
    END IF;
END $$;

CREATE FUNCTION dfsfs_is_ancestor(p_account bigint, p_dir bigint, p_ino bigint)
RETURNS boolean
LANGUAGE sql STABLE AS $$
-- Whether directory p_dir is p_ino or one of its ancestors (walking up from p_ino). UNION
-- drops inodes met before, so even a corrupt tree (a cycle fsck has not repaired yet)
-- ends the walk.
    WITH RECURSIVE up(ino) AS (
        SELECT p_ino
      UNION
        SELECT d.parent_ino FROM dentries d JOIN up ON d.ino = up.ino
         WHERE d.user_id = p_account)
    SELECT EXISTS (SELECT 1 FROM up WHERE ino = p_dir)
$$;

CREATE FUNCTION dfsfs_rename(
    p_account bigint, p_session bigint, p_old_parent bigint, p_old_name bytea,
    p_new_parent bigint, p_new_name bytea, p_flags integer, p_now bigint,
    OUT moved inodes, OUT replaced inodes)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- rename(2) and renameat2(2) with RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2). Returns
-- the renamed inode after, and the inode that had the new name (NULL if none), after:
-- replaced, it lost that name, and left without names the renaming session holds it
-- until dfsfs_release_inodes (see dfsfs_remove_link); exchanged, it has the old name. The renamed inode (with EXCHANGE, both)
-- gets a new ctime, as on ext4; both parents new mtimes and ctimes.
DECLARE
    source_ino bigint;
    target_ino bigint;
    source_is_dir boolean;
    target_is_dir boolean;
    shift integer;
BEGIN
    IF p_flags & ~3 <> 0 OR p_flags = 3 THEN
        RAISE EXCEPTION 'rename flags % not supported', p_flags USING ERRCODE = 'DF022';
    END IF;
    IF p_old_parent <> p_new_parent THEN
        PERFORM 1 FROM users WHERE id = p_account FOR NO KEY UPDATE;
    END IF;
    PERFORM dfsfs_lock_parents(p_account, ARRAY[p_old_parent, p_new_parent]);
    PERFORM 1 FROM dentries
      WHERE user_id = p_account
        AND ((parent_ino = p_old_parent AND name = p_old_name)
             OR (parent_ino = p_new_parent AND name = p_new_name))
      ORDER BY id FOR UPDATE;
    SELECT ino INTO source_ino FROM dentries
     WHERE parent_ino = p_old_parent AND name = p_old_name AND user_id = p_account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such entry' USING ERRCODE = 'DF002';
    END IF;
    SELECT ino INTO target_ino FROM dentries
     WHERE parent_ino = p_new_parent AND name = p_new_name AND user_id = p_account;
    PERFORM 1 FROM inodes WHERE id IN (source_ino, target_ino) AND user_id = p_account
      ORDER BY id FOR NO KEY UPDATE;
    SELECT * INTO moved FROM inodes WHERE id = source_ino AND user_id = p_account;
    source_is_dir := moved.mode & 61440 = 16384;
    IF target_ino IS NOT NULL THEN
        SELECT mode & 61440 = 16384 INTO target_is_dir FROM inodes
         WHERE id = target_ino AND user_id = p_account;
    END IF;

    IF p_flags & 2 <> 0 AND target_ino IS NULL THEN
        RAISE EXCEPTION 'RENAME_EXCHANGE target does not exist' USING ERRCODE = 'DF002';
    END IF;
    IF p_flags & 1 <> 0 AND target_ino IS NOT NULL THEN
        RAISE EXCEPTION 'target exists' USING ERRCODE = 'DF017';
    END IF;
    IF target_ino = source_ino THEN
        RETURN;  -- two names of one inode (or one name): POSIX says do nothing
    END IF;
    -- a directory never moves below itself (checked under the rename lock)
    IF p_old_parent <> p_new_parent THEN
        IF source_is_dir AND dfsfs_is_ancestor(p_account, source_ino, p_new_parent) THEN
            RAISE EXCEPTION 'cannot move a directory below itself' USING ERRCODE = 'DF022';
        END IF;
        IF p_flags & 2 <> 0 AND target_is_dir
           AND dfsfs_is_ancestor(p_account, target_ino, p_old_parent) THEN
            RAISE EXCEPTION 'cannot move a directory below itself' USING ERRCODE = 'DF022';
        END IF;
    END IF;

    IF p_flags & 2 <> 0 THEN
        UPDATE dentries SET ino = target_ino
         WHERE parent_ino = p_old_parent AND name = p_old_name AND user_id = p_account;
        UPDATE dentries SET ino = source_ino
         WHERE parent_ino = p_new_parent AND name = p_new_name AND user_id = p_account;
        shift := CASE WHEN p_old_parent = p_new_parent THEN 0
                      ELSE source_is_dir::integer - target_is_dir::integer END;
        UPDATE inodes SET mtime_ns = p_now, ctime_ns = p_now,
                          nlink = nlink + CASE WHEN id = p_old_parent THEN -shift ELSE shift END
         WHERE id IN (p_old_parent, p_new_parent) AND user_id = p_account;
        UPDATE inodes SET ctime_ns = p_now WHERE id = target_ino AND user_id = p_account
        RETURNING * INTO replaced;
    ELSE
        IF target_ino IS NOT NULL THEN
            IF source_is_dir AND NOT target_is_dir THEN
                RAISE EXCEPTION 'cannot replace a non-directory with a directory'
                      USING ERRCODE = 'DF020';
            END IF;
            IF target_is_dir AND NOT source_is_dir THEN
                RAISE EXCEPTION 'cannot replace a directory with a non-directory'
                      USING ERRCODE = 'DF021';
            END IF;
            IF target_is_dir AND EXISTS (
                    SELECT 1 FROM dentries WHERE parent_ino = target_ino AND user_id = p_account) THEN
                RAISE EXCEPTION 'target directory not empty' USING ERRCODE = 'DF039';
            END IF;
            DELETE FROM dentries
             WHERE parent_ino = p_new_parent AND name = p_new_name AND user_id = p_account;
            replaced := dfsfs_remove_link(p_account, p_session, target_ino, p_now);
        END IF;
        UPDATE dentries SET parent_ino = p_new_parent, name = p_new_name
         WHERE parent_ino = p_old_parent AND name = p_old_name AND user_id = p_account;
        -- the parents' link counts: a directory moved across takes its '..' along; a
        -- directory replaced takes its own
        shift := CASE WHEN source_is_dir AND p_old_parent <> p_new_parent THEN 1 ELSE 0 END;
        UPDATE inodes
           SET mtime_ns = p_now, ctime_ns = p_now,
               nlink = nlink + CASE WHEN id = p_new_parent THEN shift ELSE 0 END
                             - CASE WHEN id = p_old_parent THEN shift ELSE 0 END
                             - CASE WHEN id = p_new_parent AND coalesce(target_is_dir, false)
                                    THEN 1 ELSE 0 END
         WHERE id IN (p_old_parent, p_new_parent) AND user_id = p_account;
    END IF;
    UPDATE inodes SET ctime_ns = p_now WHERE id = source_ino AND user_id = p_account
    RETURNING * INTO moved;
END $$;

-- ---- link ------------------------------------------------------------------------------------

CREATE FUNCTION dfsfs_link(
    p_account bigint, p_ino bigint, p_new_parent bigint, p_new_name bytea, p_now bigint)
RETURNS inodes
LANGUAGE plpgsql AS $$
-- link(2): a new name for an existing file, in the lock order of dfsfs_rename. A
-- directory cannot be linked (EPERM), nor a file whose last name is gone (ENOENT).
DECLARE
    node inodes;
BEGIN
    PERFORM dfsfs_lock_parents(p_account, ARRAY[p_new_parent]);
    SELECT * INTO node FROM inodes WHERE id = p_ino AND user_id = p_account FOR NO KEY UPDATE;
    IF NOT FOUND OR node.nlink = 0 THEN
        RAISE EXCEPTION 'inode % was removed', p_ino USING ERRCODE = 'DF002';
    END IF;
    IF node.mode & 61440 = 16384 THEN
        RAISE EXCEPTION 'hard links to directories are not allowed' USING ERRCODE = 'DF001';
    END IF;
    INSERT INTO dentries (user_id, parent_ino, name, ino)
    VALUES (p_account, p_new_parent, p_new_name, p_ino)
    ON CONFLICT (parent_ino, name) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'file exists' USING ERRCODE = 'DF017';
    END IF;
    UPDATE inodes SET mtime_ns = p_now, ctime_ns = p_now
     WHERE id = p_new_parent AND user_id = p_account;
    UPDATE inodes SET nlink = nlink + 1, ctime_ns = p_now
     WHERE id = p_ino AND user_id = p_account
    RETURNING * INTO node;
    RETURN node;
END $$;
