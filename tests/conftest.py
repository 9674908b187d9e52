"""Shared by unit and integration tests."""

from __future__ import annotations

import pytest

from backupd.redaction import SECRETS


@pytest.fixture(autouse=True)
def _forget_secrets():
    """A process never forgets a secret; a test must not mask another test's text."""
    yield
    SECRETS.clear()


# The integration files that take longest (one to six minutes each, mostly waiting on cron minutes,
# image builds and the engine; per-file sums of --durations on this machine). Collected first, so
# `-n 3 --dist loadfile --no-loadscope-reorder` hands them out first (xdist would otherwise order
# files by how many tests they hold, putting these few-test files last) and no worker is left
# running one alone at the end.
SLOWEST_FIRST = ("test_daemon.py", "test_sidecar.py", "test_hostile.py", "test_repository_sftp.py",
                 "test_quiesce.py", "test_volumes.py", "test_destinations.py", "test_repository.py",
                 "test_repository_dumps.py", "test_labels.py", "test_sqlite_redis.py", "test_downtime.py",
                 "test_compose_stack.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}

    def order(item: pytest.Item) -> int:
        return rank.get(item.path.name, len(rank)) if item.path.parent.name == "integration" else len(rank)

    items.sort(key=order)  # stable: the rest keep their order
