"""The composition root: what the CLI and the daemon share. The engine-facing parts (recovery,
leases around real runs) are crossed for real in tests/integration/test_daemon.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backupd.app import App, Operations
from backupd.cli import main
from backupd.config import parse_config
from backupd.errors import BackupdError


def engine_down() -> None:
    raise BackupdError("cannot reach the Docker engine (is /var/run/docker.sock mounted?): refused")


def test_a_run_that_fails_while_planning_is_recorded_failed_with_its_cause(tmp_path: Path) -> None:
    config = parse_config({"catalog": f"sqlite:///{tmp_path / 'c.db'}", "jobs": {"j": {"volumes": ["v"]}}})
    app = App(config, "backup", connect=engine_down)
    outcome = app.backup("j")
    assert outcome.status == "failed" and isinstance(outcome.planning_error, BackupdError)
    [row] = app.catalog.list(job="j")
    assert row.id == outcome.backup_id and row.status == "failed" and row.finished_at is not None
    assert row.error == "planning failed: cannot reach the Docker engine (is /var/run/docker.sock mounted?): refused"
    app.close()


def test_the_cli_reports_a_planning_failure_and_list_shows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "backupd.yml"
    cfg.write_text(json.dumps({"catalog": f"sqlite:///{tmp_path / 'c.db'}", "jobs": {"j": {"volumes": ["v"]}}}))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    assert main(["--config", str(cfg), "backup", "j"]) == 1
    assert "backupd: error: cannot reach the Docker engine" in capsys.readouterr().err
    assert main(["--config", str(cfg), "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["status"] == "failed" and row["error"].startswith("planning failed: cannot reach the Docker engine")


def test_app_is_the_operations_the_daemon_is_handed() -> None:
    """The scheduler only sees Operations; App must offer each of them with the same keywords."""
    import inspect

    for name in ("backup", "prune", "verify_latest"):
        wanted = inspect.signature(getattr(Operations, name))
        offered = inspect.signature(getattr(App, name))
        assert list(offered.parameters) == list(wanted.parameters), name
        for param, spec in wanted.parameters.items():
            assert offered.parameters[param].kind == spec.kind, (name, param)
