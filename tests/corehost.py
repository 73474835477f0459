"""The file-system core without a kernel: a FileSystem on the real PostgreSQL and real local
chunk stores, run by a trio loop in a thread of its own, so that plain (synchronous) tests
can drive it the way the FUSE layer does, and stop it as an unmount would. (A crash is a
killed daemon: tests/test_faults_crash.py.)

    with CoreHost(url, account_name, tmp_path) as core:
        fh, attrs = core.call(core.fs.create, core.fs.root_ino, b"f", 0o644, 0, 0, os.O_WRONLY)
        core.call(core.fs.write, fh, 0, b"data")
        core.call(core.fs.release, fh)
"""

import os
import threading
from pathlib import Path

import trio
from conftest import client_url_of, login_as

from dfsfs import recovery
from dfsfs.chunks.local import LocalChunkStore
from dfsfs.chunks.mirrored import MirroredChunkStore
from dfsfs.core.filesystem import FileSystem
from dfsfs.core.settings import CoreSettings
from dfsfs.meta.store import MetadataStore
from dfsfs.session import logout, session_engine

START_TIMEOUT_S = 30
ACCOUNT_PASSWORD = "core-host-password"  # the password of accounts the tests drive this way


def local_stores(base: Path) -> MirroredChunkStore:
    return MirroredChunkStore(LocalChunkStore(str(base / "primary"), "primary"),
                              LocalChunkStore(str(base / "backup"), "backup"))


class CoreHost:
    def __init__(self, database_url: str, account_name: str, store_dir: Path,
                 settings: CoreSettings | None = None, password: str = ACCOUNT_PASSWORD):
        self.settings = settings or CoreSettings(chunk_size=4096, write_buffer_bytes=1 << 20)
        self.login = login_as(database_url, account_name, password)
        self.engine = session_engine(client_url_of(database_url), self.login, relaxed_commits=True)
        recovery.describe_own_session(self.engine)
        self.meta = MetadataStore(self.engine, self.login.account, self.login.session_id)
        self.store = local_stores(Path(store_dir))
        self.fs = FileSystem(self.meta, self.store, self.settings)
        self.store.on_damage = self.fs.damage.report
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "CoreHost":
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise TimeoutError("the core did not start")
        if self._failure is not None:
            raise self._failure
        return self

    def _serve(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            self._failure = error
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self.fs.running():
            await self.fs.recover([])
            self._started.set()
            await self._stop.wait()

    def call(self, function, *args, **kwargs):
        """Run a core coroutine (or plain function) on the core's loop; return its result."""
        async def run():
            result = function(*args, **kwargs)
            return await result if hasattr(result, "__await__") else result

        return trio.from_thread.run(run, trio_token=self._token)

    def stop(self) -> None:
        """As an unmount: commit everything, make it durable, end the session."""
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(START_TIMEOUT_S)
        logout(self.engine, "unmounted")
        self.store.close()
        self.engine.dispose()

    def __enter__(self) -> "CoreHost":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    # ---- what a test does most: whole files -----------------------------------------------

    def write_file(self, parent_ino: int, name: bytes, data: bytes) -> int:
        fh, attrs = self.call(self.fs.create, parent_ino, name, 0o644, 0, 0, os.O_WRONLY)
        self.call(self.fs.write, fh, 0, data)
        self.call(self.fs.flush, fh)
        self.call(self.fs.release, fh)
        return attrs.ino

    def read_file(self, ino: int) -> bytes:
        fh, _ = self.call(self.fs.open, ino, os.O_RDONLY)
        try:
            size = self.call(self.fs.getattr, ino).size
            return self.call(self.fs.read, fh, 0, size) if size else b""
        finally:
            self.call(self.fs.release, fh)
