"""Run scripts/lazyfs.py for a test: start it, cut the power, unmount, and always clean up.

    lazy = LazyMount(backing, mountpoint, live)   # live: a path that does not exist yet
    lazy.start()            # mounted when this returns
    lazy.cut()              # power cut: the backing directory keeps only what was synced
    lazy.cleanup()          # (after killing what used it) gone, without syncing anything
    lazy.start()            # the reboot: a new live copy of the backing directory
    lazy.unmount()          # clean: everything reaches the backing directory

Every LazyMount still running when the interpreter exits is torn down by an atexit hook
(SIGTERM: a clean shutdown unless it was cut).
"""

import atexit
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mounting import is_mount

LAZYFS = Path(__file__).resolve().parents[2] / "scripts" / "lazyfs.py"
START_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 30

_running: set["LazyMount"] = set()


class LazyMountError(AssertionError):
    pass


class LazyMount:
    def __init__(self, backing: Path, mountpoint: Path, live: Path, log_path: Path | None = None,
                 cut_keeps: float = 0.0, lies: tuple[str, ...] = ()):
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.live = Path(live)
        self.log_path = Path(log_path) if log_path else self.mountpoint.with_name(
            self.mountpoint.name + ".lazyfs.log")
        self.cut_keeps = cut_keeps
        self.lies = lies
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.process is None, "lazyfs is already running"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.live, ignore_errors=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(LAZYFS), str(self.backing), str(self.mountpoint),
                 "--live", str(self.live), "--cut-keeps", str(self.cut_keeps),
                 *(f"--lie={path}" for path in self.lies)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not is_mount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.cleanup()
                raise LazyMountError(f"lazyfs did not mount {self.mountpoint}:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)

    def cut(self) -> None:
        """The power cut: lazyfs forgets everything unsynced and never touches the backing
        directory again. The mount stays (every fsync fails) until `cleanup()`, so that the
        processes using it die before it goes."""
        assert self.process is not None, "lazyfs is not running"
        lines = self.log_text().count("power cut:")
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while self.log_text().count("power cut:") == lines:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise LazyMountError(f"lazyfs did not cut the power:\n{self.log_text()[-3000:]}")
            time.sleep(0.005)

    def unmount(self) -> None:
        """A clean unmount (everything synced); fails when lazyfs reports a broken model."""
        if self.process is None:
            return
        result = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            self.cleanup()
            raise LazyMountError(f"fusermount3 -u {self.mountpoint}: {result.stderr}")
        status = self._wait_exit()
        self.cleanup()
        if status != 0:
            raise LazyMountError(f"lazyfs exited {status}:\n{self.log_text()[-3000:]}")

    def _wait_exit(self) -> int | None:
        try:
            return self.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        """Whatever state it is in: kill lazyfs, detach the mount, remove the live copy."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()  # after a cut: exits without syncing
                if self._wait_exit() is None:
                    self.process.kill()
                    self.process.wait(timeout=EXIT_TIMEOUT_S)
            self.process = None
        if is_mount(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False)
        shutil.rmtree(self.live, ignore_errors=True)
        _running.discard(self)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@atexit.register
def _cleanup_everything() -> None:
    for lazy in list(_running):
        lazy.cleanup()
