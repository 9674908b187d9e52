"""Config validation: every error names the key path and what is wrong."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from backupd.config import load_config, parse_config, parse_duration
from backupd.errors import ConfigError


def job(**extra):
    return {"jobs": {"nightly": {"volumes": ["app_data"], **extra}}}


def error_of(data, env=None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "backupd.yml", env=env or {})
    return str(info.value)


def test_minimal_config_gets_embedded_defaults():
    config = parse_config(job(), env={})
    assert config.catalog == "sqlite:////var/lib/backupd/catalog.db"
    assert str(config.destinations["local"].path) == "/backups"
    assert list(config.job_destinations("nightly")) == ["local"]
    assert config.job_compression("nightly").algorithm == "zstd"
    assert config.job_compression("nightly").effective_level == 3


def test_design_doc_example_keeps_its_meaning():
    config = parse_config({
        "catalog": "sqlite:////var/lib/backupd/catalog.db",
        "destinations": {"local": {"type": "local", "path": "/backups"}},
        "jobs": {"nightly": {"schedule": "0 3 * * *", "volumes": ["app_data"],
                             "destinations": ["local"], "retention": {"keep_last": 7}}},
    }, env={})
    nightly = config.jobs["nightly"]
    assert nightly.schedule == "0 3 * * *"
    assert nightly.volumes[0].name == "app_data"
    assert nightly.retention.keep_last == 7


def test_volume_selector_with_two_kinds_names_its_index():
    msg = error_of(job(volumes=["a", {"label": "x=y", "path": "/srv"}]))
    assert msg.startswith("backupd.yml: jobs.nightly.volumes[1]: ")
    assert "exactly one of" in msg


def test_unknown_key_is_a_typo_error_with_its_path():
    assert error_of(job(retnetion={"keep_last": 1})) == \
        "backupd.yml: jobs.nightly.retnetion: unknown key (check spelling)"


def test_job_referring_to_undefined_destination():
    msg = error_of(job(destinations=["offsite"]))
    assert "jobs.nightly.destinations[0]: destination 'offsite' is not defined" in msg


def test_missing_required_key_in_destination():
    msg = error_of({"destinations": {"s3": {"type": "s3"}}, **job()})
    assert "destinations.s3.bucket: required key is missing" in msg


def test_unknown_destination_type():
    msg = error_of({"destinations": {"x": {"type": "ftp"}}, **job()})
    assert "destinations.x" in msg and "ftp" in msg


def test_sftp_without_host_key_verification_is_refused():
    msg = error_of({"destinations": {"o": {"type": "sftp", "host": "h", "user": "u",
                                           "key_file": "/k"}}, **job()})
    assert "destinations.o: " in msg and "known_hosts" in msg


def test_bad_cron_and_timezone_and_duration():
    assert "jobs.nightly.schedule: schedule '* * *' must have 5 fields" in error_of(job(schedule="* * *"))
    assert "jobs.nightly.timezone: unknown timezone 'Mars/Base'" in error_of(job(timezone="Mars/Base"))
    msg = error_of(job(hooks={"before": [{"command": "x", "timeout": "soon"}]}))
    assert "jobs.nightly.hooks.before[0].timeout: invalid duration 'soon'" in msg


def test_retention_that_keeps_nothing_is_an_error():
    assert "would keep nothing" in error_of(job(retention={"keep_last": 0}))


def test_job_with_nothing_to_back_up():
    assert "jobs.empty: job backs up nothing" in error_of({"jobs": {"empty": {}}})


def test_relative_host_path_is_refused():
    assert "must be absolute" in error_of(job(volumes=[{"path": "srv/data"}]))


def test_compression_level_out_of_range():
    assert "level 22 is out of range 1..19 for zstd" in error_of(job(compression={"level": 22}))


def test_env_interpolation_with_default_and_escape():
    config = parse_config({"catalog": "${CAT}", "helper_image": "${IMG:-backupd:latest}",
                           "jobs": {"j": {"volumes": ["$${literal}"]}}}, env={"CAT": "sqlite://"})
    assert config.catalog == "sqlite://"
    assert config.helper_image == "backupd:latest"
    assert config.jobs["j"].volumes[0].name == "${literal}"


def test_missing_env_variable_names_key_path():
    assert error_of(job(volumes=["${NOPE}"])) == \
        "backupd.yml: jobs.nightly.volumes[0]: environment variable 'NOPE' is not set"


def test_secret_from_file_is_read_and_hidden(tmp_path: Path):
    secret = tmp_path / "s3key"
    secret.write_text("hunter2\n")
    config = parse_config({"destinations": {"s3": {"type": "s3", "bucket": "b",
                                                    "secret_access_key_file": str(secret)}}, **job()},
                          env={})
    value = config.destinations["s3"].secret_access_key
    assert value.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config)


def test_unreadable_secret_file_is_an_error_naming_it(tmp_path: Path):
    msg = error_of({"destinations": {"s3": {"type": "s3", "bucket": "b",
                                             "secret_access_key_file": str(tmp_path / "nope")}}, **job()})
    assert "destinations.s3" in msg and "cannot read secret file" in msg


def test_load_config_reports_yaml_position(tmp_path: Path):
    path = tmp_path / "b.yml"
    path.write_text("jobs:\n  j: [unclosed\n")
    with pytest.raises(ConfigError, match=r"b.yml: line \d+ column \d+: not valid YAML"):
        load_config(path)


def test_load_config_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yml")


def test_unknown_job_lists_known_ones():
    config = parse_config(job(), env={})
    with pytest.raises(ConfigError, match=r"job 'weekly' is not defined.*nightly"):
        config.job("weekly")


@pytest.mark.parametrize("text,expected", [
    ("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("12h", timedelta(hours=12)),
    ("7d", timedelta(days=7)), ("2w", timedelta(weeks=2)), ("1d12h", timedelta(days=1, hours=12)),
    (90, timedelta(seconds=90)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


def test_shipped_example_config_is_valid():
    root = Path(__file__).resolve().parents[2] / "config"
    examples = sorted(root.glob("*.yml"))
    assert examples, "config/ must ship example configs"
    for path in examples:
        load_config(path, env={"S3_BUCKET": "b", "POSTGRES_PASSWORD_FILE": "/dev/null"})


@pytest.mark.parametrize("value,expected", [
    ("256m", 256 << 20), ("1g", 1 << 30), ("65536k", 64 << 20), (40_000_000, 40_000_000), (None, None)])
def test_helper_memory_in_docker_units(value, expected):
    assert parse_config({**job(), "helper_memory": value}, env={}).helper_memory == expected


def test_helper_memory_defaults_to_a_limit():
    assert parse_config(job(), env={}).helper_memory == 256 << 20


@pytest.mark.parametrize("value,message", [
    ("lots", "helper_memory: 'lots' is not a size"),
    ("1m", "helper_memory: must be at least 32m"),
    ("-5m", "helper_memory: '-5m' is not a size"),
])
def test_bad_helper_memory_names_the_key(value, message):
    assert message in error_of({**job(), "helper_memory": value})


@pytest.mark.parametrize("value,problem", [
    (0, "greater than or equal to 1"), (65, "less than or equal to 64"), ("many", "valid integer")])
def test_s3_concurrency_is_checked_and_named_by_its_key_path(value, problem):
    dest = {"type": "s3", "bucket": "b", "concurrency": value}
    message = error_of({"destinations": {"offsite": dest}, **job()})
    assert message.startswith("backupd.yml: destinations.offsite.concurrency: ") and problem in message


def test_s3_uploads_default_to_concurrent_parts_within_the_memory_budget():
    s3 = parse_config({"destinations": {"offsite": {"type": "s3", "bucket": "b"}}, **job()},
                      env={}).destinations["offsite"]
    assert s3.concurrency >= 2 and s3.concurrency * s3.part_size_mb <= 64
