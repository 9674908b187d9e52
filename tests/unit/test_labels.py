"""Container labels → the config's own models (backupd.labels) and merged jobs (backupd.discovery)."""

from __future__ import annotations

from typing import Any

import pytest

from backupd.config import ContainerSelector, VolumeSelector, parse_config
from backupd.discovery import configured, describe, discover, is_discovered
from backupd.errors import ConfigError, LabelError
from backupd.labels import Container, read_container

ON = {"backupd.enable": "true"}
SHOP = {"com.docker.compose.project": "shop"}


def config(**discovery: Any) -> Any:
    return parse_config({"destinations": {"local": {"type": "local", "path": "/b"},
                                          "far": {"type": "local", "path": "/f"}},
                         "retention": {"keep_last": 3},
                         "discovery": {"enabled": True, "schedule": "0 3 * * *", **discovery}})


def db(name: str = "shop-db-1", **labels: str) -> Container:
    return Container(name, {**ON, **SHOP, "com.docker.compose.service": "db", "backupd.database": "postgres",
                            **labels}, ("shop_dbdata",))


def app(name: str = "shop-app-1", **labels: str) -> Container:
    return Container(name, {**ON, **SHOP, **labels}, ("shop_appdata", "shop_cache"))


def test_enable_backs_up_every_volume_of_the_container_through_the_same_selector_as_the_config() -> None:
    part = read_container(app())
    assert part is not None and part.job == "shop"
    assert [sel for sel, _ in part.volumes] == [VolumeSelector(container="shop-app-1")]
    assert part.databases == [] and part.stop == []


def test_volumes_label_takes_full_or_compose_names_and_refuses_one_the_container_does_not_mount() -> None:
    part = read_container(app(**{"backupd.volumes": "appdata, shop_cache"}))
    assert part is not None
    assert [sel.name for sel, _ in part.volumes] == ["shop_appdata", "shop_cache"]
    with pytest.raises(LabelError) as caught:
        read_container(app(**{"backupd.volumes": "uploads"}))
    assert caught.value.container == "shop-app-1" and caught.value.label == "backupd.volumes"
    assert "uploads" in str(caught.value) and "shop_appdata" in str(caught.value)


def test_a_database_label_is_a_dump_in_that_container_with_options_as_keys_and_no_volume_copy() -> None:
    part = read_container(db(**{"backupd.database.user": "app", "backupd.database.database": "a,b",
                                "backupd.database.timeout": "10m"}))
    assert part is not None and part.volumes == []
    (spec, source), = part.databases
    assert (spec.name, spec.type, spec.container, spec.user, spec.database) == ("db", "postgres", "shop-db-1",
                                                                                "app", ["a", "b"])
    assert spec.timeout is not None and spec.timeout.total_seconds() == 600
    assert source == "label backupd.database on container shop-db-1"


def test_mysql_kind_and_a_password_file_work_and_the_password_is_read_from_the_file(tmp_path: Any) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    part = read_container(db(**{"backupd.database": "mariadb", "backupd.database.password_file": str(secret)}),
                          secrets_dir=tmp_path)
    assert part is not None
    spec = part.databases[0][0]
    assert spec.kind == "mysql" and spec.password is not None and spec.password.get_secret_value() == "s3cret"


def test_a_label_names_a_secret_file_only_inside_the_operators_secrets_dir(tmp_path: Any) -> None:
    """Whoever labels a container must not make backupd read its other secrets (its S3 key, a
    repository password) and hand them to that container's dump tool as a password."""
    allowed, elsewhere = tmp_path / "labels", tmp_path / "backupd"
    allowed.mkdir(), elsewhere.mkdir()
    (allowed / "pg").write_text("fine\n")
    (elsewhere / "s3_secret").write_text("not-for-labels\n")
    (allowed / "sneaky").symlink_to(elsewhere / "s3_secret")
    label = "backupd.database.password_file"
    for value, words in [(str(elsewhere / "s3_secret"), "not inside discovery.secrets_dir"),
                         (str(allowed / ".." / "backupd" / "s3_secret"), "not inside discovery.secrets_dir"),
                         ("sneaky", "not inside discovery.secrets_dir")]:
        with pytest.raises(LabelError, match=words) as err:
            read_container(db(**{"backupd.database": "postgres", label: value}), secrets_dir=allowed)
        assert err.value.label == label and "not-for-labels" not in str(err.value)
    with pytest.raises(LabelError, match="discovery.secrets_dir, which is not set"):
        read_container(db(**{"backupd.database": "postgres", label: str(allowed / "pg")}))
    part = read_container(db(**{"backupd.database": "postgres", label: "pg"}), secrets_dir=allowed)
    assert part is not None and part.databases[0][0].password.get_secret_value() == "fine"  # type: ignore[union-attr]


@pytest.mark.parametrize("labels, label, words", [
    ({"backupd.database.password": "hunter2"}, "backupd.database.password", "password_file"),
    ({"backupd.database": "mongodb"}, "backupd.database", "not a database kind"),
    ({"backupd.database.host": "elsewhere"}, "backupd.database.host", "not an option"),
    ({"backupd.database.port": "x"}, "backupd.database.port", "integer"),
    ({"backupd.database.name": "bad name"}, "backupd.database", "must match"),
    ({"backupd.stop": "yes"}, "backupd.stop", "not true or false"),
    ({"backupd.job": "no/slash"}, "backupd.job", "must match"),
    ({"backupd.volums": "x"}, "backupd.volums", "unknown label"),
])
def test_bad_labels_are_typed_errors_naming_the_container_and_the_label(labels: dict, label: str, words: str) -> None:
    with pytest.raises(LabelError) as caught:
        read_container(db(**labels))
    assert isinstance(caught.value, ConfigError)
    assert (caught.value.container, caught.value.label) == ("shop-db-1", label)
    assert words in str(caught.value) and "hunter2" not in str(caught.value)


def test_database_options_without_a_kind_and_a_container_without_mounts_are_refused() -> None:
    with pytest.raises(LabelError, match="need backupd.database=<kind>"):
        read_container(app(**{"backupd.database.user": "x"}))
    with pytest.raises(LabelError, match="mounts no volume") as caught:
        read_container(Container("bare", ON))
    assert caught.value.label == "backupd.enable"


def test_enable_false_opts_out_and_stop_true_stops_the_container() -> None:
    assert read_container(app(**{"backupd.enable": "FALSE"})) is None
    part = read_container(app(**{"backupd.stop": "true"}))
    assert part is not None and [sel for sel, _ in part.stop] == [ContainerSelector(name="shop-app-1")]


def test_job_is_the_label_then_the_compose_project_then_the_container_name() -> None:
    assert read_container(app(**{"backupd.job": "nightly"})).job == "nightly"  # type: ignore[union-attr]
    assert read_container(app()).job == "shop"  # type: ignore[union-attr]
    assert read_container(Container("solo", ON, ("v",))).job == "solo"  # type: ignore[union-attr]


def test_excludes_are_checked_as_the_config_checks_them_and_carried_into_each_volume() -> None:
    with pytest.raises(LabelError, match="absolute"):
        read_container(app(**{"backupd.exclude": "/abs"}))
    with pytest.raises(LabelError, match=r"'\.\.'"):
        read_container(app(**{"backupd.exclude": "a/../b"}))
    part = read_container(app(**{"backupd.exclude": "cache/*,./tmp/"}))
    assert part is not None and part.volumes
    assert all(sel.exclude == ["cache/*", "tmp"] for sel, _ in part.volumes)


def test_discovered_jobs_take_the_discovery_defaults_and_are_plain_config_jobs() -> None:
    found = discover(config(destinations=["far"], format="archive"), [db(), app(**{"backupd.stop": "true"})])
    job = found.config.job("shop")
    assert job.schedule == "0 3 * * *" and job.destinations == ["far"]
    assert [d.container for d in job.databases] == ["shop-db-1"]
    assert job.volumes == [VolumeSelector(container="shop-app-1")]
    assert found.config.job_destinations("shop") == {"far": found.config.destinations["far"]}
    assert found.config.job_retention("shop").keep_last == 3  # type: ignore[union-attr]
    assert is_discovered(found.config, "shop") and configured(found.config).jobs == {}


def test_a_configured_job_of_the_same_name_wins_whole_and_list_jobs_says_so() -> None:
    base = parse_config({"discovery": {"enabled": True},
                         "jobs": {"shop": {"schedule": "0 1 * * *", "volumes": ["other"]}}})
    found = discover(base, [app()])
    assert found.config.jobs == base.jobs and not is_discovered(found.config, "shop")
    (row,) = describe(found)
    assert row["origin"] == "config" and row["containers"] == ["shop-app-1"]
    assert "wins" in row["notes"][0]
    assert row["settings"]["schedule"] == {"value": "0 1 * * *", "from": "config (jobs.shop.schedule)"}


def test_a_bad_label_breaks_its_own_job_only() -> None:
    found = discover(config(), [db(**{"backupd.database.password": "x"}), app(), Container("solo", ON, ("v",))])
    assert set(found.config.jobs) == {"solo"}  # shop's database would be missing: shop is not run
    error = found.broken("shop")
    assert error is not None and error.container == "shop-db-1"
    assert found.broken("solo") is None
    rows = {r["job"]: r for r in describe(found)}
    assert "backupd.database.password" in rows["shop"]["error"] and "settings" not in rows["shop"]


def test_a_job_the_shared_checks_refuse_is_pinned_on_the_label_that_made_it() -> None:
    base = parse_config({"destinations": {"local": {"type": "local", "path": "/b", "repository_password": "p"}},
                         "discovery": {"enabled": True, "format": "repository"}})
    # Repository mode takes excludes, but not a '?', which restic and tar can match differently.
    found = discover(base, [db(), app(**{"backupd.exclude": "cache/?.tmp"})])
    error = found.broken("shop")
    assert error is not None and (error.container, error.label) == ("shop-app-1", "backupd.exclude")
    assert "format: repository" in str(error) and "cache/?.tmp" in str(error)
    assert discover(base, [db(), app(**{"backupd.exclude": "cache/*"})]).broken("shop") is None


def test_provenance_names_the_label_and_container_of_each_part_and_the_default_of_each_setting() -> None:
    found = discover(config(), [db(), app(**{"backupd.volumes": "appdata", "backupd.stop": "true"})])
    (row,) = describe(found)
    s = row["settings"]
    assert row["origin"] == "labels" and row["containers"] == ["shop-app-1", "shop-db-1"]
    assert s["schedule"]["from"] == "discovery default (discovery.schedule)"
    assert s["retention"] == {"value": {"keep_last": 3}, "from": "config (retention)"}
    assert s["destinations"] == {"value": ["local", "far"], "from": "default"}
    assert s["volumes"] == [{"value": {"name": "shop_appdata"},
                             "from": "label backupd.volumes on container shop-app-1"}]
    assert s["databases"][0]["from"] == "label backupd.database on container shop-db-1"
    assert s["stop_containers"] == [{"value": {"name": "shop-app-1"},
                                     "from": "label backupd.stop on container shop-app-1"}]


def test_discovery_off_reads_no_label_and_rediscovery_replaces_what_an_earlier_one_added() -> None:
    off = parse_config({})
    assert discover(off, [app()]).config.jobs == {}
    first = discover(config(), [app()])
    again = discover(first.config, [Container("solo", ON, ("v",))])
    assert set(again.config.jobs) == {"solo"}  # shop's container went away: so did the job


# ---------------------------------------------------------------- the daemon's jobs


def test_the_daemon_adds_replaces_and_removes_scheduled_jobs_as_labels_change(tmp_path: Any) -> None:
    from backupd.catalog import Catalog
    from backupd.daemon import Jobs, refresh_labels
    from backupd.errors import BackupdError
    from backupd.scheduler import Sidecar
    from apscheduler.schedulers.background import BackgroundScheduler

    containers: list[Container] | BackupdError = [app()]

    def read(written: Any) -> Any:
        if isinstance(containers, BackupdError):
            raise containers
        return discover(written, containers)

    base = config(retention={"keep_last": 2, "schedule": "30 4 * * *"})
    jobs = Jobs(base, read)
    sidecar = Sidecar(jobs.current(), object(), Catalog(f"sqlite:///{tmp_path / 'c.db'}"),  # type: ignore[arg-type]
                      scheduler=BackgroundScheduler())
    sidecar.start()
    try:
        assert sorted(e.id for e in sidecar.entries()) == ["backup:shop", "prune:shop"]
        containers = [app(), Container("solo", {**ON, "backupd.job": "solo"}, ("v",))]
        refresh_labels(sidecar, jobs)
        assert sorted(e.id for e in sidecar.entries()) == ["backup:shop", "backup:solo", "prune:shop", "prune:solo"]
        containers = [app(**{"backupd.volumes": "cache"}), Container("solo", {**ON, "backupd.stop": "maybe"}, ())]
        refresh_labels(sidecar, jobs)  # shop replaced, solo broken: unscheduled, shop untouched by it
        assert sidecar.config.job("shop").volumes == [VolumeSelector(name="shop_cache")]
        assert sorted(e.id for e in sidecar.entries()) == ["backup:shop", "prune:shop"]
        containers = BackupdError("engine away")
        refresh_labels(sidecar, jobs)  # the jobs found last stay
        assert sorted(e.id for e in sidecar.entries()) == ["backup:shop", "prune:shop"]
        containers = []
        refresh_labels(sidecar, jobs)
        assert sidecar.entries() == [] and sidecar.scheduler.get_jobs() == []
    finally:
        sidecar.stop(grace=0)


def test_the_daemon_reports_a_broken_label_once_when_it_appears_not_at_every_refresh() -> None:
    from backupd.daemon import Jobs
    from backupd.errors import BackupdError

    containers: list[Container] | BackupdError = [app(), Container("solo", {**ON, "backupd.stop": "maybe"}, ("v",))]
    reported: list[tuple[str, str, str]] = []

    def read(written: Any) -> Any:
        if isinstance(containers, BackupdError):
            raise containers
        return discover(written, containers)

    jobs = Jobs(config(), read, lambda cfg, broken: reported.extend((j, e.container, e.label) for j, e in broken))
    jobs.current()
    assert reported == [("solo", "solo", "backupd.stop")]
    jobs.current()  # the same breakage found again: an event, a poll, a SIGHUP
    containers = BackupdError("engine away")
    jobs.current()
    containers = [app(), Container("solo", {**ON, "backupd.stop": "maybe"}, ("v",))]
    jobs.current()
    assert reported == [("solo", "solo", "backupd.stop")]
    containers = [app(), Container("solo", {**ON, "backupd.volumes": "nope"}, ("v",))]
    jobs.current()  # a different breakage of the same job is news
    containers = [app()]
    jobs.current()
    containers = [app(), Container("solo", {**ON, "backupd.stop": "maybe"}, ("v",))]
    jobs.current()  # fixed, then broken again: news again
    assert [r[0] for r in reported] == ["solo", "solo", "solo"] and len(set(reported)) == 2


def test_a_broken_label_of_a_job_the_config_overrides_is_not_reported() -> None:
    from backupd.daemon import Jobs

    written = parse_config({"discovery": {"enabled": True, "schedule": "0 3 * * *"},
                            "jobs": {"solo": {"volumes": ["v"]}}})
    reported: list[Any] = []
    jobs = Jobs(written, lambda w: discover(w, [Container("solo", {**ON, "backupd.stop": "maybe"}, ("v",))]),
                lambda cfg, broken: reported.extend(broken))
    jobs.current()
    assert reported == []


def test_an_unknown_backupd_label_the_image_set_is_the_image_authors_and_ignored() -> None:
    labels = {**ON, "backupd.recipe": "abc"}
    assert read_container(Container("c", labels, ("v",), inherited=frozenset({"backupd.recipe"}))) is not None
    with pytest.raises(LabelError, match="unknown label"):
        read_container(Container("c", labels, ("v",)))


def test_a_spec_whose_password_came_from_its_file_validates_again_inside_a_job(tmp_path: Any) -> None:
    from backupd.config import DatabaseSpec, Job

    (tmp_path / "pw").write_text("x")
    spec = DatabaseSpec.model_validate({"name": "a", "type": "postgres", "container": "c",
                                        "password_file": str(tmp_path / "pw")})
    assert Job.model_validate({"databases": [spec]}).databases[0].password is not None
    with pytest.raises(ValueError, match="not both"):
        DatabaseSpec.model_validate({"name": "a", "type": "postgres", "container": "c", "password": "y",
                                     "password_file": str(tmp_path / "pw")})


def test_sighup_reads_the_new_file_and_the_labels_again(tmp_path: Any) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    from backupd.catalog import Catalog
    from backupd.daemon import Jobs, reload_config
    from backupd.scheduler import Sidecar

    jobs = Jobs(config(), lambda written: discover(written, [app()]))
    sidecar = Sidecar(jobs.current(), object(), Catalog(f"sqlite:///{tmp_path / 'c.db'}"),  # type: ignore[arg-type]
                      scheduler=BackgroundScheduler())
    sidecar.start()
    try:
        new = config(schedule="0 5 * * *")
        assert reload_config(sidecar, "unused", load=lambda path: new, jobs=jobs)
        assert jobs.written is new and sidecar.config.job("shop").schedule == "0 5 * * *"
        off = parse_config({"discovery": {"enabled": False}, "jobs": {"a": {"schedule": "0 1 * * *",
                                                                           "volumes": ["v"]}}})
        assert reload_config(sidecar, "unused", load=lambda path: off, jobs=jobs)
        assert [e.id for e in sidecar.entries()] == ["backup:a"]
    finally:
        sidecar.stop(grace=0)


def test_repository_discovery_needs_a_password_on_each_destination_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"discovery\.format: .*destination 'local'"):
        parse_config({"discovery": {"enabled": True, "format": "repository"}})
    with pytest.raises(ConfigError, match=r"discovery\.destinations\[0\]: destination 'x' is not defined"):
        parse_config({"discovery": {"destinations": ["x"]}})
    parse_config({"destinations": {"local": {"type": "local", "repository_password": "p"}},
                  "discovery": {"enabled": True, "format": "repository"}})


def test_an_engine_gone_away_while_labels_are_read_is_a_backupd_error_and_the_jobs_found_last_stay(
        tmp_path: Any) -> None:
    from types import SimpleNamespace

    import requests

    from backupd.app import App
    from backupd.daemon import Jobs
    from backupd.errors import BackupdError

    base = config().model_copy(update={"catalog": f"sqlite:///{tmp_path / 'c.db'}"})
    app_ = App(base, "test")
    try:
        def gone(**_: Any) -> Any:
            raise requests.exceptions.ConnectionError("Connection aborted.")

        app_._host = SimpleNamespace(client=SimpleNamespace(api=SimpleNamespace(containers=gone)))
        with pytest.raises(BackupdError, match="cannot read container labels.*ConnectionError"):
            app_.discover()
        jobs = Jobs(base, lambda written: discover(written, [app()]))
        assert set(jobs.current().jobs) == {"shop"}
        jobs._discover = lambda written: app_.discover(written)
        assert set(jobs.current().jobs) == {"shop"}
    finally:
        app_.close()


def test_a_label_notification_still_being_sent_at_stop_is_waited_for_and_a_stuck_one_is_not() -> None:
    """A breakage found just before SIGTERM is still reported: the daemon waits for its sender
    before exiting, but not beyond the bound it was given."""
    import threading
    import time

    from backupd.daemon import Jobs

    sent: list[str] = []
    release = threading.Event()

    def send_slowly(cfg: Any, broken: Any) -> threading.Thread | None:
        def send() -> None:
            release.wait(5)
            sent.extend(job for job, _ in broken)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        return thread

    jobs = Jobs(config(), lambda w: discover(w, [Container("solo", {**ON, "backupd.stop": "maybe"}, ("v",))]),
                send_slowly)
    jobs.current()
    started = time.monotonic()
    assert jobs.finish_notifying(0.2) is False  # stuck: given up after the bound
    assert time.monotonic() - started < 2 and sent == []
    threading.Timer(0.3, release.set).start()
    assert jobs.finish_notifying(5) is True
    assert sent == ["solo"]
