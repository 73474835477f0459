-- Migration 10: every row an account can write holds what a mount can serve.
--
-- An account's own connections may write its rows with any SQL (row-level security keeps
-- them to the account, not to what dfsfs would write). These checks refuse, on the
-- server, the rows no mount writes and a mount could not serve as a file system: unknown
-- file types, sizes past the largest file, symbolic links without a usable target,
-- extended attributes larger than Linux allows, chunk indices past the largest file.
-- The limits are those of dfsfs/core/settings.py (MAX_FILE_SIZE = 2^44, PATH_MAX = 4096,
-- XATTR_SIZE_MAX = 65536; the smallest chunk is 4 KiB). NOT VALID: rows written before
-- stay, and fsck finds and quarantines them.

ALTER TABLE inodes ADD CONSTRAINT inodes_mode_known CHECK (
    mode BETWEEN 0 AND 65535
    AND (mode & 61440) IN (32768, 16384, 40960, 4096, 49152, 8192, 24576)) NOT VALID;

ALTER TABLE inodes ADD CONSTRAINT inodes_size_in_range CHECK (size <= 17592186044416) NOT VALID;

ALTER TABLE inodes ADD CONSTRAINT inodes_target_valid CHECK (
    CASE WHEN (mode & 61440) = 40960
         THEN target IS NOT NULL AND octet_length(target) BETWEEN 1 AND 4095
              AND position('\x00'::bytea IN target) = 0
         ELSE target IS NULL
    END) NOT VALID;

ALTER TABLE xattrs ADD CONSTRAINT xattrs_sizes_valid CHECK (
    octet_length(name) BETWEEN 1 AND 255 AND octet_length(value) <= 65536) NOT VALID;

ALTER TABLE file_chunks ADD CONSTRAINT file_chunks_index_in_range CHECK (
    index BETWEEN 0 AND 4294967295) NOT VALID;
