"""CLI parsing and the commands that need no Docker engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backupd.catalog import Catalog
from backupd.cli import build_parser, main


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "backupd.yml"
    path.write_text(f"""
catalog: sqlite:///{tmp_path}/catalog.db
destinations:
  local: {{type: local, path: {tmp_path}/backups}}
jobs:
  nightly:
    volumes: [app_data]
""")
    monkeypatch.setenv("BACKUPD_CONFIG", str(path))
    return path


@pytest.mark.parametrize("argv", [
    ["list"], ["list", "--job", "j", "--json"], ["show", "id", "--json"],
    ["backup", "nightly"], ["restore", "id", "--volume", "v", "--to-volume", "w", "--force"],
    ["restore", "id", "--database", "db", "--to-container", "c"], ["config", "check"],
    ["--config", "x.yml", "list"],
])
def test_contract_commands_parse(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_restore_needs_exactly_one_of_volume_or_database(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["restore", "id", "--volume", "v", "--database", "d"])
    assert info.value.code == 2


def test_to_volume_requires_volume(capsys, config_file):
    assert main(["restore", "id", "--database", "d", "--to-volume", "x"]) == 2
    assert "--to-volume goes with --volume" in capsys.readouterr().err


def test_config_check_ok(capsys, config_file):
    assert main(["config", "check"]) == 0
    assert "ok (1 job(s), 1 destination(s))" in capsys.readouterr().out


def test_config_check_reports_key_path_and_fails(capsys, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("jobs:\n  nightly:\n    volumes: [a]\n    destinations: [nowhere]\n")
    assert main(["--config", str(bad), "config", "check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"backupd: error: {bad}: jobs.nightly.destinations[0]: "
                   "destination 'nowhere' is not defined (defined: local)")


def test_list_json_is_an_array_even_when_empty(capsys, config_file):
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_show_unknown_id_fails_clearly(capsys, config_file):
    assert main(["show", "20990101T000000Z-abcdef"]) == 2
    assert "backup '20990101T000000Z-abcdef' is not in the catalog" in capsys.readouterr().err


def test_list_and_show_print_recorded_backups(capsys, config_file, tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    bid = catalog.start_backup("nightly")
    art = catalog.add_artifact(bid, "volume", "app_data", "volume:app_data", "zstd", None,
                               {"local": f"nightly/{bid}/volume-app_data.tar.zst"})
    catalog.finish_artifact(art, 2048, "f" * 64, {})
    catalog.add_warnings(bid, ["jobs.nightly.hooks.before[0] (true) exited 1"])
    catalog.finish_backup(bid)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert bid in out and "succeeded" in out and "2.0 KiB" in out
    assert main(["list", "--json", "--job", "nightly"]) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert item["id"] == bid and item["artifacts"][0]["sha256"] == "f" * 64
    assert item["warnings"] == ["jobs.nightly.hooks.before[0] (true) exited 1"]
    assert main(["show", bid]) == 0
    shown = capsys.readouterr().out
    assert f"local: stored nightly/{bid}/volume-app_data.tar.zst" in shown
    assert "warning   jobs.nightly.hooks.before[0] (true) exited 1" in shown


def test_list_table_is_exact(capsys, config_file, tmp_path):
    """Newest first, started in UTC to the second, sizes for humans and right-aligned, no trailing spaces."""
    from datetime import datetime, timezone
    from zoneinfo import ZoneInfo

    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    older = catalog.start_backup("nightly", datetime(2026, 11, 22, 3, 0, 5, 120000, tzinfo=timezone.utc))
    art = catalog.add_artifact(older, "volume", "app_data", "volume:app_data", "zstd", None,
                               {"local": f"nightly/{older}/volume-app_data.tar.zst"})
    catalog.finish_artifact(art, 1536, "f" * 64, {})
    catalog.finish_backup(older)
    newer = catalog.start_backup("nightly", datetime(2026, 11, 23, 4, 30, tzinfo=ZoneInfo("Europe/Berlin")))
    catalog.finish_backup(newer)
    assert main(["list", "--job", "nightly"]) == 0
    assert capsys.readouterr().out == (
        "ID                       JOB      STATUS     STARTED                    SIZE  ARTIFACTS\n"
        f"{newer}  nightly  failed     2026-11-23 03:30:00         0 B  0\n"
        f"{older}  nightly  succeeded  2026-11-22 03:00:05     1.5 KiB  1\n"
    )


def test_backup_of_unknown_job_fails_before_touching_anything(capsys, config_file, tmp_path):
    assert main(["backup", "weekly"]) == 2
    assert "job 'weekly' is not defined" in capsys.readouterr().err
    assert not (tmp_path / "backups").exists()


def test_list_table_is_written_in_batches_without_losing_a_row(capsys):
    from backupd.catalog import BackupSummary
    from backupd.cli import _print_summaries

    rows = [BackupSummary(f"b{i}", "a-long-job-name", "partial", "2026-11-22 03:00:05.5", i << 20, i)
            for i in range(5)]
    _print_summaries(iter(rows), longest=(2, 15, 7), batch=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ID  JOB              STATUS   STARTED                    SIZE  ARTIFACTS"
    assert lines[1:] == [f"b{i}  a-long-job-name  partial  2026-11-22 03:00:05  {f'{i}.0 MiB' if i else '0 B':>10}  {i}"
                         for i in range(5)]


def test_a_reader_that_goes_away_ends_list_quietly(config_file, tmp_path):
    """`backupd list | head -1`: no traceback, the exit status of a process ended by SIGPIPE."""
    import os
    import subprocess
    import sys

    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    for _ in range(3):
        catalog.finish_backup(catalog.start_backup("nightly"))
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails
    proc = subprocess.run([sys.executable, "-m", "backupd", "--config", str(config_file), "list"],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_the_entry_point_loads_with_the_collector_off_and_commands_run_with_it_on(config_file, monkeypatch):
    """backupd.__main__ pauses cycle collection while libraries load; the daemon must not run without it."""
    import gc

    import backupd.__main__ as entry
    import backupd.cli as cli

    seen = []
    real_main = cli.main
    monkeypatch.setattr(cli, "main", lambda: seen.append(gc.isenabled()) or real_main(["list", "--json"]))
    try:
        assert entry.run() == 0
        assert seen == [False] and gc.isenabled()
    finally:
        gc.enable()


def test_tables_pad_every_column_but_the_last_and_leave_no_trailing_spaces():
    from backupd.table import format_table

    assert format_table([("JOB", "ACTION", "NEXT RUN"), ("nightly", "backup", ""), ("a", "prune", "soon")]) == (
        "JOB      ACTION  NEXT RUN\n"
        "nightly  backup\n"
        "a        prune   soon")


def test_list_schedule_prints_a_table(capsys, config_file):
    assert main(["list", "--schedule"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["JOB", "ACTION", "SCHEDULE", "TIMEZONE", "NEXT", "RUN"]
    assert all(line == line.rstrip() for line in lines)


def test_a_stop_that_left_a_run_going_exits_at_once_with_its_code(config_file, monkeypatch):
    """`backupd run` whose stop could not unwind a run leaves without waiting for its thread."""
    import backupd.cli
    import backupd.daemon

    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)

    monkeypatch.setattr(backupd.daemon, "run_daemon", lambda *args, **kwargs: backupd.daemon.RUNS_LEFT)
    monkeypatch.setattr(backupd.cli, "exit_now", exit_now)
    main(["--config", str(config_file), "run"])
    assert exits == [backupd.daemon.RUNS_LEFT]


def test_exit_now_does_not_wait_for_a_thread_that_never_ends():
    import subprocess
    import sys

    code = ("import threading, time\n"
            "from backupd.cli import exit_now\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon thread\n"
            "exit_now(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1, proc.stderr
