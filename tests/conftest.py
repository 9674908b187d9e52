"""Shared by unit and integration tests."""

from __future__ import annotations

import pytest

from backupd.redaction import SECRETS


@pytest.fixture(autouse=True)
def _forget_secrets():
    """A process never forgets a secret; a test must not mask another test's text."""
    yield
    SECRETS.clear()
