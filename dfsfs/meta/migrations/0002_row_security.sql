-- Migration 2 (released): row-level security on every account-owned table, keyed on
-- settings the client made (replaced by server-derived scoping in a later migration).

ALTER TABLE usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage FORCE ROW LEVEL SECURITY;
CREATE POLICY usage_by_user ON usage USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);

ALTER TABLE inodes ENABLE ROW LEVEL SECURITY;
ALTER TABLE inodes FORCE ROW LEVEL SECURITY;
CREATE POLICY inodes_by_user ON inodes USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);

ALTER TABLE dentries ENABLE ROW LEVEL SECURITY;
ALTER TABLE dentries FORCE ROW LEVEL SECURITY;
CREATE POLICY dentries_by_user ON dentries USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);

ALTER TABLE chunks ENABLE ROW LEVEL SECURITY;
ALTER TABLE chunks FORCE ROW LEVEL SECURITY;
CREATE POLICY chunks_by_user ON chunks USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);

ALTER TABLE file_chunks ENABLE ROW LEVEL SECURITY;
ALTER TABLE file_chunks FORCE ROW LEVEL SECURITY;
CREATE POLICY file_chunks_by_user ON file_chunks USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);

ALTER TABLE xattrs ENABLE ROW LEVEL SECURITY;
ALTER TABLE xattrs FORCE ROW LEVEL SECURITY;
CREATE POLICY xattrs_by_user ON xattrs USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);

ALTER TABLE damage ENABLE ROW LEVEL SECURITY;
ALTER TABLE damage FORCE ROW LEVEL SECURITY;
CREATE POLICY damage_by_user ON damage USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);

ALTER TABLE backup_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE backup_queue FORCE ROW LEVEL SECURITY;
CREATE POLICY backup_queue_by_user ON backup_queue USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR user_id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);
