-- Migration 11: a release waits for a removal of the same inode under way.
--
-- dfsfs_release_inodes used to drop the session's holds first and then look for inodes to
-- purge with `nlink = 0` in the statement's snapshot. Racing a removal of the same inode
-- (dfsfs_remove_link: nlink to 0, then a hold, which it skips when the hold is already
-- there), the release could delete the hold the removal had just seen, then miss the
-- removal's nlink = 0 (not yet committed when its snapshot was taken): the inode was left
-- with no name and no hold until the next release or recovery. Locking the inodes first,
-- in id order, puts the release wholly before or wholly after such a removal: before, the
-- removal adds its hold; after, the release sees nlink = 0 and purges.

CREATE OR REPLACE FUNCTION dfsfs_release_inodes(
    p_account bigint, p_session bigint, p_inos bigint[],
    OUT purged bigint[], OUT chunk_ids bigint[], OUT digests bytea[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- This session lets go of these inodes (closed, and forgotten by its kernel); those left
-- without a name and without a live holder are purged.
BEGIN
    PERFORM 1 FROM inodes WHERE id = ANY(p_inos) AND user_id = p_account
      ORDER BY id FOR NO KEY UPDATE;
    DELETE FROM inode_holds
     WHERE ino = ANY(p_inos) AND session_id = p_session AND user_id = p_account;
    SELECT r.purged, r.chunk_ids, r.digests INTO purged, chunk_ids, digests
      FROM dfsfs_purge_unheld(p_account, p_inos) AS r;
END $$;
