"""One redaction point: every secret config loading resolved is masked wherever text leaves
backupd (logs, stderr, the catalog, manifests, notifications), and nothing else is."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from backupd import notify
from backupd.catalog import Catalog
from backupd.config import Hook, Job, Notifications, parse_config
from backupd.errors import BackupdError
from backupd.logs import JsonFormatter, TextFormatter
from backupd.quiesce import postgres
from backupd.quiesce.databases import Target
from backupd.quiesce.hooks import HookError, run_hooks
from backupd.quiesce.runner import LocalRunner
from backupd.redaction import SECRETS, redact, redact_all, remember

SECRET = "hunter2-very-secret"


def config_with(**job_extra) -> dict:
    return {"jobs": {"j": {"volumes": ["v"], **job_extra}}}


# ------------------------------------------------------------------ the registry


def test_every_occurrence_is_masked_and_a_longer_secret_whole():
    remember("abc123")
    remember("abc123-and-more")
    assert redact("x abc123 y abc123-and-more z") == "x *** y *** z"


def test_the_json_and_repr_forms_of_a_secret_are_masked_too():
    tricky = 'pa"ss\\wörd'
    remember(tricky)
    assert tricky not in redact(json.dumps({"e": f"bad {tricky}"}))
    assert "pa" not in redact(json.dumps({"e": tricky}, ensure_ascii=True)).replace('"e"', "")
    assert redact(repr([tricky])) == "['***']"


def test_nothing_recorded_nothing_masked():
    assert redact("plain text") == "plain text"
    remember(None)
    remember("")
    assert redact("plain text") == "plain text"


def test_redact_all_walks_json_values():
    remember(SECRET)
    assert redact_all({"a": [SECRET, 1, {"b": f"x{SECRET}"}], "n": None}) == {"a": ["***", 1, {"b": "x***"}], "n": None}


# ------------------------------------------------------------------ what config loading records


def test_password_fields_and_their_file_twins_are_recorded(tmp_path: Path):
    (tmp_path / "pw").write_text("from-a-file-secret\n")
    (tmp_path / "s3").write_text("s3-secret-key")
    parse_config({
        "destinations": {"s3": {"type": "s3", "bucket": "b", "secret_access_key_file": str(tmp_path / "s3")}},
        **config_with(databases=[
            {"name": "a", "type": "postgres", "container": "pg", "password_file": str(tmp_path / "pw")},
            {"name": "b", "type": "postgres", "container": "pg", "password": "${DBPW}"}]),
    }, env={"DBPW": "from-the-environment"})
    for value in ("from-a-file-secret", "s3-secret-key", "from-the-environment"):
        assert value in SECRETS, value


def test_the_catalog_urls_password_and_the_webhook_url_are_recorded():
    parse_config({"catalog": "postgresql://backupd:cat-pw-123@db/backupd",
                  "notifications": {"webhook_url": "https://hooks.example/T0K3N"}, **config_with()})
    assert "cat-pw-123" in SECRETS and "https://hooks.example/T0K3N" in SECRETS


def test_vars_expanded_into_hook_commands_are_recorded_but_not_short_ones_or_other_keys():
    parse_config({"helper_image": "${IMAGE}", **config_with(hooks={"before": [
        {"command": "curl -u admin:${API_TOKEN} https://x/${FLAG}"},
        {"command": ["notify", "--key=${KEY2}"]}]})},
        env={"API_TOKEN": "tok-abcdef", "FLAG": "yes", "KEY2": "list-form-key", "IMAGE": "some/helper-image"})
    assert "tok-abcdef" in SECRETS and "list-form-key" in SECRETS
    assert "yes" not in SECRETS and "some/helper-image" not in SECRETS


def test_a_target_does_not_show_its_password_in_repr():
    target = Target(None, postgres, LocalRunner(), {"PGPASSWORD": SECRET}, SECRET, {})  # type: ignore[arg-type]
    assert SECRET not in repr(target)


# ------------------------------------------------------------------ where text leaves backupd


def _record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    return logging.makeLogRecord({
        "name": "backupd.x", "levelno": logging.INFO, "levelname": "INFO", "msg": "%s", "args": (message,),
        "exc_info": (type(exc), exc, None) if exc else None, "backup_id": f"id-{SECRET}"})


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_log_lines_are_masked_message_exception_and_context(formatter):
    remember(SECRET)
    line = formatter.format(_record(f"running ['sh', '-c', 'x {SECRET}']", ValueError(f"bad {SECRET}")))
    assert SECRET not in line and "***" in line


def test_catalog_errors_and_warnings_are_masked_in_the_database(tmp_path: Path):
    remember(SECRET)
    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    backup_id = catalog.start_backup("j")
    art = catalog.add_artifact(backup_id, "volume", "v", "volume:v", "zstd", None, {"local": "j/x"})
    catalog.fail_artifact(art, f"tool said {SECRET}")
    catalog.add_warnings(backup_id, [f'hook "{SECRET}" failed'])
    catalog.finish_backup(backup_id, f"hook ({SECRET}) exited 1")
    failed = catalog.record_failed_run("j", f"planning failed: {SECRET}")
    catalog.close()
    dump = "\n".join(sqlite3.connect(tmp_path / "c.db").iterdump())
    assert SECRET not in dump and dump.count("***") >= 5
    assert catalog.get(backup_id).warnings == ('hook "***" failed',) and failed


def test_webhook_body_and_ping_body_are_masked(monkeypatch):
    remember(SECRET)
    sent: list[bytes] = []
    monkeypatch.setattr(notify, "_send", lambda method, url, body, timeout, what: sent.append(body) or True)
    settings = Notifications(webhook_url="https://hooks.example/x", ping_url="https://ping.example/u")
    report = notify.RunReport("j", "id", "failed", [f"hook ({SECRET}) exited 1"], warnings=[SECRET])
    notify.run_finished(settings, Job(volumes=[{"name": "v"}]), "j", report)  # type: ignore[list-item]
    assert len(sent) == 2 and all(SECRET.encode() not in body for body in sent)


def test_error_lines_on_stderr_are_masked(monkeypatch, capsys):
    from backupd import cli

    remember(SECRET)

    def fail(path):
        raise BackupdError(f"could not {SECRET}")

    monkeypatch.setattr(cli, "load_config", fail)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # main() installs its own
    code = cli.main(["--config", "unused.yml", "--log-format", "json", "config", "check"])
    err = capsys.readouterr().err
    assert code == 1 and SECRET not in err and "could not ***" in err


# ------------------------------------------------------------------ hooks


def test_a_failing_hook_with_a_secret_in_its_command_is_masked_even_where_it_is_cut(caplog):
    # The secret straddles the 80th character of the command, where the message cuts it.
    secret = "Z" * 20 + "-tail-of-the-secret"
    remember(secret)
    command = f"echo {'x' * 60} {secret} >&2; echo out {secret}; exit 3"
    hook = Hook(command=command)
    with caplog.at_level(logging.INFO), pytest.raises(HookError) as failed:
        run_hooks([hook], "before", None, "jobs.j")  # type: ignore[arg-type]
    message = str(failed.value)
    assert "Z" * 5 not in message and "tail-of-the-secret" not in message
    assert message.endswith(f"exited 3: {'x' * 60} ***")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    for record in caplog.records:
        handler.emit(record)
    assert secret not in stream.getvalue() and "Z" * 20 not in stream.getvalue()

