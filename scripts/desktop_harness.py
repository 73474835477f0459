#!/usr/bin/env python3
"""What a desktop sees of a dfsfs mount: a file manager under Xvfb, measured.

    .venv/bin/python scripts/desktop_harness.py propagation [--file-manager pcmanfm]
    .venv/bin/python scripts/desktop_harness.py thumbnails [--images 1000]
    .venv/bin/python scripts/desktop_harness.py remount [--file-manager nautilus]

Each run starts a throwaway PostgreSQL, local chunk stores, Xvfb and a D-Bus session in a
temporary directory, and stops all of them (and every mount) at the end. Needs root,
/dev/fuse and Debian's xvfb, inotify-tools, libglib2.0-bin (gio) and the file manager.

propagation  Two mounts of one account, A and B. A file manager shows a directory of A;
             changes are made through B (create, write, rename, delete, mkdir) and the
             harness reports how long each takes to reach A, as seen by `gio monitor`
             (the GFileMonitor file managers use to refresh an open view) and by
             inotifywait, or "never" after --wait seconds.
thumbnails   A directory of N small JPEG images; PCManFM shows it with thumbnails on and
             off, on the mount and on a local directory; reports the time until the
             view is settled and the bytes the daemon read, and GIO's filesystem::remote.
remount      A file manager window left open on the mount across `dfsfs umount` + `dfsfs
             mount`: the file manager's and the daemon's CPU use over the next seconds.
Output: a table on stdout, and JSON with --json FILE.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mounting import Deployment  # noqa: E402 - after the path set-up
from dfsfs.embedded import PostgresServer  # noqa: E402

TICK_S = float(os.sysconf("SC_CLK_TCK"))


# ---- the environment ---------------------------------------------------------------------------


@contextlib.contextmanager
def site(base: Path):
    """A throwaway PostgreSQL and a Deployment (local stores) in `base`."""
    base.chmod(0o755)
    server = PostgresServer(base / "pg", port=5432, durable=False)
    server.start()
    try:
        name = "desk_" + uuid.uuid4().hex[:8]
        server.ensure_database(name)
        yield Deployment(server.url(name), base / "dep", chunk_size="1M")
    finally:
        server.stop(mode="immediate")


@contextlib.contextmanager
def desktop(base: Path):
    """Xvfb and a D-Bus session; yields the environment for desktop programs."""
    display = next(f":{n}" for n in range(90, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    home = base / "home"
    for sub in (".config", ".cache", ".local/share", "Desktop"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "DISPLAY": display, "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_DATA_HOME": str(home / ".local/share"),
           "XDG_RUNTIME_DIR": str(base / "runtime"), "LANG": "C.UTF-8",
           "GTK_A11Y": "none", "NO_AT_BRIDGE": "1", "GSETTINGS_BACKEND": "memory",
           "GIO_USE_VFS": os.environ.get("GIO_USE_VFS", "")}
    Path(env["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
    with started(["Xvfb", display, "-screen", "0", "1280x1024x24", "-nolisten", "tcp"], env):
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{display[1:]}").exists(), 10, "Xvfb")
        bus = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1",
                              "--print-pid=1"], env=env, capture_output=True, text=True, check=True)
        address, pid = bus.stdout.split()
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        try:
            yield env
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)


@contextlib.contextmanager
def started(command, env, **kwargs):
    """A background process, killed with its process group at the end."""
    process = subprocess.Popen(command, env=env, start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=kwargs.pop("stderr", subprocess.DEVNULL), **kwargs)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(condition, timeout_s: float, what: str) -> float:
    started_at = time.monotonic()
    while not condition():
        if time.monotonic() - started_at > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - started_at


def file_manager(name: str, path: Path, env: dict):
    """The command that opens a window of `name` on `path`."""
    if name == "pcmanfm":
        return ["pcmanfm", "--no-desktop", "-n", str(path)]
    if name == "nautilus":
        return ["nautilus", "--new-window", str(path)]
    return [name, str(path)]  # thunar and others take the directory


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(fields[i]) for i in (11, 12)) / TICK_S


def pids_of(name: str) -> list[int]:
    found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


# ---- propagation -------------------------------------------------------------------------------


class EventLog:
    """Lines of a monitor process, each with the time it arrived."""

    def __init__(self, command, env):
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        import threading

        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def first_after(self, since: float, needle: str) -> float | None:
        for at, line in self.lines:
            if at >= since and needle in line:
                return at - since
        return None

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def propagation(args, base: Path) -> dict:
    results = {}
    with site(base) as deployment, deployment.mount("alice") as a, \
            deployment.mount("alice") as b, desktop(base) as env:
        (a.path / "view").mkdir()
        time.sleep(1.5)  # past the entry timeout: B sees the directory
        view_a, view_b = a.path / "view", b.path / "view"
        with started(file_manager(args.file_manager, view_a, env), env):
            time.sleep(3)  # the window is open and its monitor set up
            gio = EventLog(["gio", "monitor", "-d", str(view_a)], env)
            inotify = EventLog(["inotifywait", "-m", "-q", "--format", "%e %f", str(view_a)],
                               env)
            time.sleep(1)
            steps = [
                # the control: a change made through A itself must reach A's view at once
                ("create through A itself", "control.txt",
                 lambda: (view_a / "control.txt").write_text("x")),
                ("create", "created.txt", lambda: (view_b / "created.txt").write_text("x")),
                ("write+close", "created.txt",
                 lambda: (view_b / "created.txt").write_text("longer content")),
                ("rename", "renamed.txt",
                 lambda: (view_b / "created.txt").rename(view_b / "renamed.txt")),
                ("mkdir", "subdir", lambda: (view_b / "subdir").mkdir()),
                ("delete", "renamed.txt", lambda: (view_b / "renamed.txt").unlink()),
            ]
            for label, name, change in steps:
                since = time.monotonic()
                change()
                deadline = since + args.wait
                while time.monotonic() < deadline and gio.first_after(since, name) is None:
                    time.sleep(0.02)
                results[label] = {"gio_monitor_s": gio.first_after(since, name),
                                  "inotify_s": inotify.first_after(since, name)}
            gio.stop()
            inotify.stop()
            listing = sorted(os.listdir(view_a))
            results["listing_of_A_after"] = listing
            screenshot(args.screenshot and f"{args.screenshot}-propagation.png", env)
    return results


def screenshot(path: str | None, env: dict) -> None:
    """The whole screen as a PNG (ImageMagick's import), if asked for."""
    if path:
        subprocess.run(["import", "-window", "root", path], env=env, check=True)


# ---- thumbnails --------------------------------------------------------------------------------


def make_images(directory: Path, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    template = directory / "template.jpg"
    subprocess.run(["convert", "-size", "640x480", "plasma:fractal", "-quality", "85",
                    str(template)], check=True, capture_output=True)
    data = template.read_bytes()
    template.unlink()
    for index in range(count):
        # distinct files (a comment segment after the SOI marker), same decodable image
        comment = f"dfsfs image {index}".encode()
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        (directory / f"img{index:04d}.jpg").write_bytes(data[:2] + segment + data[2:])


def view_cost(directory: Path, env: dict, thumbnails: bool, daemon_pid: int | None) -> dict:
    """Open PCManFM (icon view) on `directory`; measure until its CPU use settles."""
    config = Path(env["XDG_CONFIG_HOME"]) / "libfm" / "libfm.conf"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"[config]\nshow_thumbnail={int(thumbnails)}\nthumbnail_local=0\n")
    read_before = daemon_read_bytes(daemon_pid)
    started_at = time.monotonic()
    with started(file_manager("pcmanfm", directory, env), env) as process:
        settled_at = settle(process.pid)
        cpu = cpu_seconds(process.pid)
    return {"view_settled_after_s": round(settled_at - started_at, 2),
            "file_manager_cpu_s": round(cpu, 2),
            "daemon_read_mb": daemon_read_mb(daemon_pid, read_before)}


def settle(pid: int, quiet_s: float = 2.0, timeout_s: float = 120.0) -> float:
    """When the process last used CPU before `quiet_s` seconds of (almost) none."""
    deadline = time.monotonic() + timeout_s
    last_busy, last_cpu = time.monotonic(), cpu_seconds(pid)
    while time.monotonic() - last_busy < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        cpu = cpu_seconds(pid)
        if cpu - last_cpu > 0.02:
            last_busy = time.monotonic()
        last_cpu = cpu
    return last_busy


def thumbnailer_cost(directory: Path, out: Path, daemon_pid: int | None) -> dict:
    """What a thumbnail factory does for every image: gdk-pixbuf-thumbnailer -s 128."""
    out.mkdir(exist_ok=True)
    read_before = daemon_read_bytes(daemon_pid)
    started_at = time.monotonic()
    images = sorted(directory.iterdir())
    for image in images:
        subprocess.run(["gdk-pixbuf-thumbnailer", "-s", "128", str(image),
                        str(out / (image.name + ".png"))], check=True)
    elapsed = time.monotonic() - started_at
    shutil.rmtree(out)
    return {"images": len(images), "seconds": round(elapsed, 2),
            "ms_per_image": round(1000 * elapsed / len(images), 1),
            "daemon_read_mb": daemon_read_mb(daemon_pid, read_before)}


def listing_cost(directory: Path, daemon_pid: int | None) -> dict:
    """What a view of a remote folder costs: names, types and sizes, no content."""
    read_before = daemon_read_bytes(daemon_pid)
    started_at = time.monotonic()
    for entry in os.scandir(directory):
        entry.stat()
    return {"seconds": round(time.monotonic() - started_at, 3),
            "daemon_read_mb": daemon_read_mb(daemon_pid, read_before)}


def daemon_read_bytes(pid: int | None) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def daemon_read_mb(pid: int | None, before: int) -> float | None:
    return None if pid is None else round((daemon_read_bytes(pid) - before) / 1e6, 1)


def thumbnails(args, base: Path) -> dict:
    results = {}
    local = base / "local-images"
    make_images(local, args.images)
    results["image_bytes"] = sum(p.stat().st_size for p in local.iterdir())
    with site(base) as deployment, deployment.mount("alice") as mnt, desktop(base) as env:
        remote = subprocess.run(["gio", "info", "-f", "-a", "filesystem::remote", str(mnt.path)],
                                env=env, capture_output=True, text=True).stdout
        results["gio_filesystem_remote"] = remote.strip().splitlines()[-1].strip()
        subprocess.run(["cp", "-r", str(local), str(mnt.path / "images")], check=True)
        for where, directory in (("dfsfs", mnt.path / "images"), ("local disk", local)):
            def cold() -> int | None:
                """The daemon's pid after a remount: the kernel caches nothing of the mount.
                (The local disk stays in the page cache: dropping it would disturb others.)"""
                if where != "dfsfs":
                    return None
                mnt.remount()
                return mnt.pid

            results[f"{where}: listing only (remote view)"] = listing_cost(directory, cold())
            results[f"{where}: every image thumbnailed"] = thumbnailer_cost(
                directory, base / "thumbs", cold())
            for wanted in (True, False):
                results[f"{where}: PCManFM view, thumbnails {'on' if wanted else 'off'}"] = \
                    view_cost(directory, env, wanted, cold())
    return results


# ---- remount -----------------------------------------------------------------------------------


def remount(args, base: Path) -> dict:
    results = {}
    with site(base) as deployment, desktop(base) as env:
        if args.filesystem == "tmpfs":  # the control
            mnt = TmpfsMount(base / "tmpfs")
        else:
            mnt = deployment.mount("alice")
        with mnt:
            for index in range(50):
                (mnt.path / f"file{index:02d}.txt").write_text(f"file {index}\n")
            (mnt.path / "folder").mkdir()
            with started(file_manager(args.file_manager, mnt.path, env), env):
                time.sleep(5)  # the window shows the mount
                results["before_remount"] = sample_cpu(args.file_manager, mnt.pid, args.sample)
                screenshot(args.screenshot and f"{args.screenshot}-before.png", env)
                mnt.umount()
                time.sleep(2)
                results["between"] = sample_cpu(args.file_manager, None, args.sample)
                mnt.mount()
                results["after_remount"] = sample_cpu(args.file_manager, mnt.pid, args.sample)
                results["entries_after_remount"] = len(os.listdir(mnt.path))
                screenshot(args.screenshot and f"{args.screenshot}-after.png", env)
    return results


class TmpfsMount:
    """A tmpfs that keeps its files across umount + mount (copied aside), as the control."""

    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir()
        self.pid = None
        self.saved = path.with_name("tmpfs-saved")
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)

    def umount(self) -> None:
        shutil.copytree(self.path, self.saved)
        subprocess.run(["umount", str(self.path)], check=True)

    def mount(self) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(self.path)], check=True)
        shutil.copytree(self.saved, self.path, dirs_exist_ok=True)
        shutil.rmtree(self.saved)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


def sample_cpu(name: str, daemon_pid: int | None, seconds: float) -> dict:
    """Cores used by the file manager and the daemon over `seconds`."""
    pids = pids_of(name)
    start = {pid: cpu_seconds(pid) for pid in pids}
    daemon_start = cpu_seconds(daemon_pid) if daemon_pid else 0.0
    time.sleep(seconds)
    used = sum(cpu_seconds(pid) - start[pid] for pid in pids)
    daemon_used = (cpu_seconds(daemon_pid) - daemon_start) if daemon_pid else 0.0
    return {"file_manager_cores": round(used / seconds, 2),
            "daemon_cores": round(daemon_used / seconds, 2)}


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measurement", choices=("propagation", "thumbnails", "remount"))
    parser.add_argument("--file-manager", default="pcmanfm")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait for an event")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds of CPU sampling")
    parser.add_argument("--filesystem", choices=("dfsfs", "tmpfs"), default="dfsfs",
                        help="remount: the file system (tmpfs is the control)")
    parser.add_argument("--screenshot", metavar="PREFIX",
                        help="save screenshots as PREFIX-*.png (ImageMagick's import)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dfsfs-desktop-", dir="/tmp"))
    try:
        results = {"propagation": propagation, "thumbnails": thumbnails,
                   "remount": remount}[args.measurement](args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
