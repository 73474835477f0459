-- Migration 1 (released): the tables, as the first release created them.
-- Frozen: a released migration never changes; later changes are later migrations.

CREATE TABLE users (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    is_admin boolean DEFAULT false NOT NULL,
    root_ino bigint,
    quota_bytes bigint,
    quota_inodes bigint,
    failed_logins integer DEFAULT 0 NOT NULL,
    throttled_until timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    last_fsck_at timestamp with time zone
);

CREATE TABLE usage (
    user_id bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    files bigint DEFAULT 0 NOT NULL,
    directories bigint DEFAULT 0 NOT NULL,
    symlinks bigint DEFAULT 0 NOT NULL,
    logical_bytes bigint DEFAULT 0 NOT NULL,
    chunks bigint DEFAULT 0 NOT NULL,
    stored_bytes bigint DEFAULT 0 NOT NULL
);

CREATE TABLE inodes (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    mode integer NOT NULL,
    uid integer NOT NULL,
    gid integer NOT NULL,
    size bigint DEFAULT 0 NOT NULL,
    nlink integer DEFAULT 1 NOT NULL,
    atime_ns bigint NOT NULL,
    mtime_ns bigint NOT NULL,
    ctime_ns bigint NOT NULL,
    rdev bigint DEFAULT 0 NOT NULL,
    target bytea,
    CONSTRAINT inodes_nlink_nonnegative CHECK (nlink >= 0),
    CONSTRAINT inodes_size_nonnegative CHECK (size >= 0)
);
CREATE INDEX inodes_user ON inodes (user_id);

CREATE TABLE dentries (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    parent_ino bigint NOT NULL REFERENCES inodes(id) ON DELETE CASCADE,
    name bytea NOT NULL,
    ino bigint NOT NULL REFERENCES inodes(id) ON DELETE CASCADE,
    CONSTRAINT dentries_parent_name UNIQUE (parent_ino, name)
);
CREATE INDEX dentries_ino ON dentries (ino);

CREATE TABLE chunks (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    sha256 bytea NOT NULL,
    size integer NOT NULL,
    refcount bigint NOT NULL,
    backed_up boolean DEFAULT true NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT chunks_user_sha256 UNIQUE (user_id, sha256),
    CONSTRAINT chunks_refcount_nonnegative CHECK (refcount >= 0)
);

CREATE TABLE file_chunks (
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    ino bigint NOT NULL REFERENCES inodes(id) ON DELETE CASCADE,
    index bigint NOT NULL,
    chunk_id bigint NOT NULL REFERENCES chunks(id),
    PRIMARY KEY (ino, index)
);
CREATE INDEX file_chunks_chunk ON file_chunks (chunk_id);

CREATE TABLE xattrs (
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    ino bigint NOT NULL REFERENCES inodes(id) ON DELETE CASCADE,
    name bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (ino, name)
);

CREATE TABLE damage (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    sha256 bytea NOT NULL,
    store text NOT NULL,
    kind text NOT NULL,
    detected_at timestamp with time zone DEFAULT now() NOT NULL,
    repaired_at timestamp with time zone,
    detail text
);
CREATE INDEX damage_user_unrepaired ON damage (user_id, repaired_at);

CREATE TABLE backup_queue (
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    sha256 bytea NOT NULL,
    enqueued_at timestamp with time zone DEFAULT now() NOT NULL,
    PRIMARY KEY (user_id, sha256)
);
