"""The seams between the scheduler and what it runs are typed: a signature that drifts (the
daemon once called prune without its stores, hidden behind Callable[..., Any]) fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKED = ["backupd/app.py", "backupd/scheduler.py", "backupd/daemon.py", "backupd/catalog/leases.py",
           "backupd/identity.py", "backupd/labels.py", "backupd/discovery.py", "backupd/events.py"]


def test_the_composition_root_and_the_scheduler_type_check() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                             "--no-error-summary", *CHECKED], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
