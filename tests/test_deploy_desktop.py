"""scripts/desktop_harness.py keeps working: a file manager under Xvfb over a real mount.

The harness is the lead's yardstick for cross-mount invalidation; this test runs its
propagation measurement and checks the control (a change through the viewed mount itself
reaches GIO's monitor and inotify at once). It skips where the desktop tools are missing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("Xvfb", "dbus-daemon", "gio", "inotifywait", "pcmanfm")
pytestmark = pytest.mark.timeout(180)


@pytest.mark.skipif(not all(shutil.which(tool) for tool in TOOLS),
                    reason=f"needs {', '.join(TOOLS)} (Debian: xvfb dbus libglib2.0-bin "
                           "inotify-tools pcmanfm)")
@pytest.mark.skipif(os.geteuid() != 0, reason="the harness mounts as root")
def test_propagation_harness_measures_the_control_and_every_change(tmp_path):
    out = tmp_path / "propagation.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "desktop_harness.py"), "propagation",
         "--wait", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=170, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    control = measured["create through A itself"]
    assert control["gio_monitor_s"] is not None and control["gio_monitor_s"] < 1.0
    assert control["inotify_s"] is not None and control["inotify_s"] < 1.0
    for change in ("create", "write+close", "rename", "mkdir", "delete"):
        assert set(measured[change]) == {"gio_monitor_s", "inotify_s"}
