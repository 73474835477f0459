-- Migration 3 (released): an account's connection sees its own users row only.

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY users_by_user ON users USING (
    current_setting('dfsfs.admin', true) = 'on'
    OR id = nullif(current_setting('dfsfs.user_id', true), '')::bigint);
