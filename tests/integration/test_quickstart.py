"""The README's first command, run as a user runs it: `bash scripts/quickstart` backs up the
demo volume on the embedded defaults (SQLite catalog under /var/lib/backupd, destination
local:/backups), lists it, and prints a restore command that works."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.integration.test_volumes import REPO, mountpoint

pytestmark = pytest.mark.integration


def test_the_quickstart_backs_up_the_demo_volume_on_the_defaults_and_its_printed_restore_works(
        docker_client) -> None:
    proc = subprocess.run(["bash", "scripts/quickstart"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"^backup id: (\S+)$", proc.stdout, re.M)
    assert found, proc.stdout
    backup_id = found.group(1)
    assert re.search(rf"^{re.escape(backup_id)}\s+demo\s+succeeded\b", proc.stdout, re.M), proc.stdout
    assert (Path("/backups/demo") / backup_id / "volume-backupd_demo.tar.zst").is_file()  # the default destination

    restore = proc.stdout.strip().splitlines()[-1].strip()
    assert restore.endswith("--to-volume backupd_demo_restored"), restore
    target = f"backupd_demo_restored_{uuid.uuid4().hex[:8]}"
    try:
        done = subprocess.run(["sh", "-c", restore.replace("backupd_demo_restored", target)], cwd=REPO,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (mountpoint(docker_client, target) / "app" / "hello.txt").read_bytes() == b"hello from backupd\n"
    finally:
        try:
            docker_client.volumes.get(target).remove(force=True)
        except Exception:  # noqa: BLE001 - not made when the restore failed before creating it
            pass
