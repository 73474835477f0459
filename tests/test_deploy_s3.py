"""The "beyond one machine" topology of docker-compose.yml, without Docker.

SeaweedFS runs as the compose file runs it (tests/seaweed.py), PostgreSQL is the test
server, `dfsfs init` and the first administrator are made as the compose `init` service
makes them, and a user then mounts with nothing but a small config file, as README's
"Beyond one machine" shows, with both chunk stores in S3. The everyday tools of
tests/test_mount_tools.py (rsync, tar, git, SQLite) then run on that mount.
"""

import hashlib
import os
import re

import pytest
import yaml

from mounting import PASSWORD, Deployment, mnt, run_cli, work  # noqa: F401 - fixtures
from test_mount_tools import (  # noqa: F401 - the same tests, on S3 primary + S3 backup
    test_git_inside_the_mount,
    test_rsync_in_and_out_shows_no_differences,
    test_sqlite_inside_the_mount,
    test_tar_round_trip,
)

pytest_plugins = ["seaweed"]
pytestmark = pytest.mark.timeout(240)
CHUNK_SIZE = "1M"
COMPOSE_FILE = os.path.join(os.path.dirname(__file__), "..", "docker-compose.yml")


def compose_store_urls(seaweed_s3) -> dict[str, str]:
    """DFSFS_STORE and DFSFS_BACKUP of the compose init service, pointed at this server."""
    with open(COMPOSE_FILE) as compose:
        environment = yaml.safe_load(compose)["services"]["init"]["environment"]
    return {
        name: environment[name]
        .replace("http://seaweedfs:8333", seaweed_s3.endpoint_url)
        .replace("/run/secrets/s3_credentials", str(seaweed_s3.credentials_file))
        for name in ("DFSFS_STORE", "DFSFS_BACKUP")
    }


@pytest.fixture(scope="module")
def site(seaweed_s3, database_url, tmp_path_factory):
    """The servers after the compose init service: schema, buckets, first administrator."""
    base = tmp_path_factory.mktemp("site")
    urls = compose_store_urls(seaweed_s3)
    deployment = Deployment(database_url, base, chunk_size=CHUNK_SIZE, extra_env=urls)
    return deployment, urls


@pytest.fixture(scope="module")
def deployment(site, database_url, tmp_path_factory):
    """A user's machine: a config file with the server addresses, and their password."""
    deployment, urls = site
    config = tmp_path_factory.mktemp("laptop") / "dfsfs.toml"
    config.write_text(f'database_url = "{database_url}"\n'
                      f'store_url = "{urls["DFSFS_STORE"]}"\n'
                      f'backup_url = "{urls["DFSFS_BACKUP"]}"\n')
    for name in ("DFSFS_DATABASE_URL", "DFSFS_STORE", "DFSFS_BACKUP", "DFSFS_CHUNK_SIZE"):
        deployment.env.pop(name)
    deployment.env["DFSFS_CONFIG"] = str(config)
    return deployment


def test_init_created_both_buckets_and_says_so(site, seaweed_s3):
    deployment, _urls = site
    again = deployment.run("init").stdout
    assert f"primary store: checked bucket dfsfs-primary at {seaweed_s3.endpoint_url}" in again
    assert f"backup store: checked bucket dfsfs-backup at {seaweed_s3.endpoint_url}" in again


def test_chunks_land_in_both_buckets(work, seaweed_s3):
    (work / "f").write_bytes(os.urandom(3 << 20))
    stores = {bucket: seaweed_s3.chunk_store(bucket=bucket, prefix="", name=bucket)
              for bucket in ("dfsfs-primary", "dfsfs-backup")}
    keys = {bucket: set(store.keys()) for bucket, store in stores.items()}
    assert len(keys["dfsfs-primary"]) >= 3
    assert keys["dfsfs-primary"] == keys["dfsfs-backup"]


def test_the_daemon_holds_no_store_secret_in_argv_or_environment(deployment, seaweed_s3, tmp_path):
    """Credentials from the start-up environment leave it before the daemon forks."""
    env = dict(deployment.env, AWS_ACCESS_KEY_ID=seaweed_s3.access_key,
               AWS_SECRET_ACCESS_KEY=seaweed_s3.secret_key)
    config = tmp_path / "env-credentials.toml"
    config.write_text(re.sub(r"&credentials=[^\"]*", "", open(env["DFSFS_CONFIG"]).read()))
    env["DFSFS_CONFIG"] = str(config)
    deployment.add_user("envkeys")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli(["mount", mountpoint, "--user", "envkeys"], env)
    try:
        pid = _pid_of(deployment, mountpoint)
        (mountpoint / "f").write_bytes(b"stored with keys from the environment")
        for part in ("environ", "cmdline"):
            seen = open(f"/proc/{pid}/{part}", "rb").read()
            assert seaweed_s3.secret_key.encode() not in seen, part
            assert seaweed_s3.access_key.encode() not in seen, part
    finally:
        run_cli(["umount", mountpoint], env, check=False)
    assert result.returncode == 0


def _pid_of(deployment, mountpoint) -> int:
    key = hashlib.sha256(os.fsencode(str(mountpoint))).hexdigest()[:16]
    return int((deployment.data_dir / "run" / f"mount-{key}.pid").read_text())


def apart(deployment, tmp_path, **variables) -> dict:
    """The deployment's environment with a data directory of its own: a failed mount's log
    (with its traceback) must not count against the module's healthy mount."""
    return dict(deployment.env, DFSFS_DATA_DIR=str(tmp_path / "data"), **variables)


def test_wrong_bucket_credentials_fail_the_mount_with_the_fix(deployment, seaweed_s3, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n")
    wrong.chmod(0o600)
    config = tmp_path / "wrong.toml"
    config.write_text(open(deployment.env["DFSFS_CONFIG"]).read().replace(
        str(seaweed_s3.credentials_file), str(wrong)))
    deployment.add_user("wrongkeys")
    (tmp_path / "mnt").mkdir()
    result = run_cli(["mount", tmp_path / "mnt", "--user", "wrongkeys"],
                     apart(deployment, tmp_path, DFSFS_CONFIG=str(config)), check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "does not know the access key: check the store's credentials" in lines[0]


def test_an_unreachable_store_fails_the_mount_within_its_deadline(deployment, tmp_path):
    config = tmp_path / "away.toml"
    config.write_text(re.sub(r"endpoint=http://127\.0\.0\.1:\d+", "endpoint=http://127.0.0.1:9&timeout=1",
                             open(deployment.env["DFSFS_CONFIG"]).read()))
    deployment.add_user("away")
    (tmp_path / "mnt").mkdir()
    result = run_cli(["mount", tmp_path / "mnt", "--user", "away"],
                     apart(deployment, tmp_path, DFSFS_CONFIG=str(config)), check=False,
                     timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the S3 server at http://127.0.0.1:9 does not answer" in lines[0]
    assert "start the S3 server or check endpoint=" in lines[0]
    assert PASSWORD not in result.stderr
