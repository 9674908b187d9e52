"""Leftovers of interrupted uploads: listed per store, judged by their backup's owner, removed by
start-up recovery and `prune --orphans`. Real SQLite catalog and local stores; S3 against moto
(the real store, SeaweedFS, in tests/integration/test_offsite.py)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from backupd.app import App, job_lease
from backupd.catalog import Catalog
from backupd.cli import main
from backupd.config import S3Destination, parse_config
from backupd.leftovers import backup_of, sweep_leftovers, why_kept
from backupd.storage.base import Leftover
from backupd.storage.local import LocalStore
from backupd.storage.s3 import S3Store

UTC = timezone.utc
T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
ID = "20261122T030000Z-abcdef"


def killed_upload(store: LocalStore, key: str, data: bytes = b"half an archive") -> None:
    """An upload its process never committed nor aborted (as SIGKILL leaves it)."""
    upload = store.open_upload(key)
    upload.write(data)
    upload._file.flush()  # type: ignore[attr-defined]


def partials(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.partial-*"))


# ------------------------------------------------------------------ stores


def test_a_local_store_lists_partial_files_of_its_layout_only_and_removes_them(tmp_path: Path) -> None:
    store = LocalStore("local", tmp_path)
    killed_upload(store, f"j/{ID}/volume-v.tar.zst", b"x" * 1000)
    done = store.open_upload(f"j/{ID}/manifest.json")
    done.write(b"{}")
    done.commit()
    (tmp_path / ".stray.partial-12345678").write_bytes(b"not in the layout")
    (tmp_path / "j" / "deeper" / "still").mkdir(parents=True)
    (tmp_path / "j" / "deeper" / "still" / ".x.partial-12345678").write_bytes(b"not in the layout")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / ".y.partial-1").write_bytes(b"outside, behind a link")
    os.symlink(tmp_path / "elsewhere", tmp_path / "j" / "20261122T030000Z-123456")
    (tmp_path / "_restic" / ID).mkdir(parents=True)  # a restic repository (repository mode): not ours
    (tmp_path / "_restic" / ID / ".z.partial-12345678").write_bytes(b"restic's")

    [leftover] = store.leftovers()
    assert leftover.key.startswith(f"j/{ID}/.volume-v.tar.zst.partial-") and leftover.size == 1000
    assert leftover.modified is not None and abs(leftover.modified - datetime.now(UTC)) < timedelta(minutes=1)
    assert [o.key for o in store.list()] == [f"j/{ID}/manifest.json"]  # never an object
    store.remove_leftover(leftover)
    store.remove_leftover(leftover)  # already gone: no error
    assert list(store.leftovers()) == []
    assert (tmp_path / "elsewhere" / ".y.partial-1").exists() and (tmp_path / ".stray.partial-12345678").exists()


def test_a_store_refuses_to_remove_anything_but_a_partial_file(tmp_path: Path) -> None:
    store = LocalStore("local", tmp_path)
    done = store.open_upload(f"j/{ID}/volume-v.tar.zst")
    done.write(b"a whole archive")
    done.commit()
    with pytest.raises(ValueError, match="not a partial upload"):
        store.remove_leftover(Leftover(f"j/{ID}/volume-v.tar.zst", 15))
    assert (tmp_path / "j" / ID / "volume-v.tar.zst").exists()


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="AK", aws_secret_access_key="S")
        client.create_bucket(Bucket="bucket")
        yield client


def test_an_s3_store_lists_open_multipart_uploads_under_its_prefix_with_their_size_and_aborts_them(s3) -> None:
    store = S3Store("offsite", S3Destination(type="s3", bucket="bucket", prefix="pre", part_size_mb=5,
                                             secret_access_key="S"), client=s3)
    upload = store.open_upload(f"j/{ID}/volume-v.tar.zst")
    upload.write(os.urandom(6 << 20))  # one 5 MiB part sent, the rest buffered in the dead process
    s3.create_multipart_upload(Bucket="bucket", Key=f"other/j/{ID}/x")  # another prefix: not ours
    s3.create_multipart_upload(Bucket="bucket", Key="pre/not-the-layout")
    s3.create_multipart_upload(Bucket="bucket", Key=f"pre/_restic/{ID}/x")  # repository mode: restic's

    [leftover] = store.leftovers()
    assert leftover.key == f"j/{ID}/volume-v.tar.zst" and leftover.size == 5 << 20
    assert leftover.upload_id and leftover.modified is not None
    store.remove_leftover(leftover)
    store.remove_leftover(leftover)  # already aborted: no error
    assert list(store.leftovers()) == []
    keys = sorted(u["Key"] for u in s3.list_multipart_uploads(Bucket="bucket")["Uploads"])
    assert keys == [f"other/j/{ID}/x", f"pre/_restic/{ID}/x", "pre/not-the-layout"]


# ------------------------------------------------------------------ the rule


def leftover(key: str = f"j/{ID}/.volume-v.tar.zst.partial-12345678", modified: datetime = T0) -> Leftover:
    return Leftover(key, 10, modified)


def test_a_leftover_belongs_to_the_backup_its_key_names() -> None:
    assert backup_of(f"j/{ID}/.volume-v.tar.zst.partial-12345678") == ID
    assert backup_of(f"j/{ID}/volume-v.tar.zst") == ID
    assert backup_of("j/not-an-id/.x.partial-1") is None
    assert backup_of(f"{ID}/.x.partial-1") is None


def test_a_live_runs_leftover_stays_and_any_other_known_backups_goes_whatever_the_times() -> None:
    live = {ID: T0 + timedelta(hours=1)}
    assert why_kept(leftover(), live, {ID}) == f"backup {ID} is still running"
    assert why_kept(leftover(), {"20261122T040000Z-000000": T0 - timedelta(days=1)}, {ID}) is None


def test_a_leftover_of_a_backup_the_catalog_does_not_know_goes_only_if_older_than_every_live_run() -> None:
    other = "20261122T040000Z-000000"
    assert why_kept(leftover(), {}, set()) is None
    assert why_kept(leftover(modified=T0), {other: T0 + timedelta(seconds=1)}, set()) is None
    assert "not in this catalog" in (why_kept(leftover(modified=T0), {other: T0}, set()) or "")
    assert why_kept(leftover("j/x/.y.partial-1"), {}, set()) == "not in backupd's <job>/<backup id>/ layout"


def test_a_sweep_removes_a_dead_runs_partial_and_keeps_a_live_runs(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    stores = {"a": LocalStore("a", tmp_path / "a"), "b": LocalStore("b", tmp_path / "b")}
    dead = catalog.start_backup("j", owner="dead-owner")
    live = catalog.start_backup("j", owner="live-owner")
    for store in stores.values():
        killed_upload(store, f"j/{dead}/volume-v.tar.zst", b"d" * 300)
        killed_upload(store, f"j/{live}/volume-v.tar.zst")

    dry = sweep_leftovers(catalog, stores, lambda owner: owner == "live-owner", dry_run=True)
    assert len(dry.found) == 4 and dry.removed == [] and dry.failures == []
    assert len(partials(tmp_path)) == 4
    report = sweep_leftovers(catalog, stores, lambda owner: owner == "live-owner")
    assert sorted(f.destination for f in report.removed) == ["a", "b"] and report.removed_bytes == 600
    assert {f.leftover.key.split("/")[1] for f in report.removed} == {dead}
    assert [f.keep for f in report.found if f.keep] == [f"backup {live} is still running"] * 2
    left = partials(tmp_path)
    assert len(left) == 2 and {p.split("/")[2] for p in left} == {live}


def test_a_store_that_cannot_be_listed_does_not_stop_the_others(tmp_path: Path) -> None:
    class Unreachable(LocalStore):
        def leftovers(self):  # type: ignore[override]
            raise OSError("connection refused")

    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    dead = catalog.start_backup("j", owner="dead-owner")
    stores = {"down": Unreachable("down", tmp_path / "down"), "up": LocalStore("up", tmp_path / "up")}
    killed_upload(stores["up"], f"j/{dead}/volume-v.tar.zst")
    report = sweep_leftovers(catalog, stores, lambda owner: False)
    assert report.failures == ["down: cannot list leftovers: connection refused"]
    assert len(report.removed) == 1 and partials(tmp_path / "up") == []


# ------------------------------------------------------------------ recovery and the CLI


class FakeHost:
    """The engine as recovery sees it when nothing is stopped and no helper is left."""

    def engine_id(self) -> str:
        return "engine"

    def remove_helpers(self, alive) -> int:  # noqa: ANN001
        return 0


def config_for(tmp_path: Path) -> dict:
    return {"catalog": f"sqlite:///{tmp_path / 'catalog.db'}",
            "destinations": {"a": {"type": "local", "path": str(tmp_path / "a")},
                             "b": {"type": "local", "path": str(tmp_path / "b")}},
            "jobs": {"j": {"volumes": ["v"]}}}


def test_the_first_backup_to_a_destination_removes_a_killed_runs_partials_and_keeps_a_live_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(config_for(tmp_path), env={})
    app = App(config, "backup")
    app.leases.register()
    killed = app.catalog.start_backup("j", owner="a-backupd-that-was-killed")
    running = app.catalog.start_backup("j", owner=app.leases.me.id)  # this process: alive
    stores = app.stores()
    for store in stores.values():
        killed_upload(store, f"j/{killed}/volume-v.tar.zst", b"k" * 2048)
        killed_upload(store, f"j/{running}/volume-v.tar.zst")
    app._host = FakeHost()
    app.recovery = app.recover()
    assert app.recovery.failed_runs == [killed]
    assert len(partials(tmp_path)) == 4  # recovery alone touches no destination (a restore needs none)

    with caplog.at_level("INFO", logger="backupd.app"):
        app._first_use({"a": stores["a"]})  # what App.backup does with its plan's stores
        app._first_use(stores)
    assert app.recovery.leftovers_removed == 2 and app.recovery.leftover_bytes == 4096
    assert "removed 1 leftover(s) of interrupted uploads (2.0 KiB) from a" in caplog.text
    assert "removed 1 leftover(s) of interrupted uploads (2.0 KiB) from b" in caplog.text
    left = partials(tmp_path)
    assert len(left) == 2 and all(f"/{running}/" in p for p in left)

    killed_upload(stores["a"], f"j/{killed}/volume-w.tar.zst")
    app._first_use(stores)  # once per destination and process
    assert len(partials(tmp_path)) == 3
    app.close()


def test_prune_orphans_dry_run_lists_leftovers_with_sizes_and_without_it_removes_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "backupd.yml"
    cfg.write_text(json.dumps(config_for(tmp_path)))
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    killed = catalog.start_backup("j", owner="gone")
    catalog.close()
    killed_upload(LocalStore("a", tmp_path / "a"), f"j/{killed}/volume-v.tar.zst", b"z" * 3 * 1024 * 1024)

    assert main(["--config", str(cfg), "prune", "--orphans", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"leftover a: j/{killed}/.volume-v.tar.zst.partial-" in out
    assert "(partial file, 3.0 MiB): would be removed" in out
    assert len(partials(tmp_path)) == 1

    assert main(["--config", str(cfg), "prune", "--orphans"]) == 0
    assert "(partial file, 3.0 MiB): removed" in capsys.readouterr().out
    assert partials(tmp_path) == []
    assert main(["--config", str(cfg), "prune", "--orphans"]) == 0
    assert "no leftovers, no orphans, no missing copies" in capsys.readouterr().out


def test_a_recovery_that_finds_a_killed_run_has_each_destination_swept_again(tmp_path: Path) -> None:
    """The daemon recovers every minute: a CLI backup killed meanwhile leaves partials its
    destinations' next backup removes, though the daemon swept them once already."""
    app = App(parse_config(config_for(tmp_path), env={}), "run")
    app.leases.register()
    app._host = FakeHost()
    app.recovery = app.recover()
    stores = app.stores()
    app._first_use(stores)
    killed = app.catalog.start_backup("j", owner="a-cli-backup-killed-meanwhile")
    killed_upload(stores["a"], f"j/{killed}/volume-v.tar.zst")
    app._first_use(stores)
    assert len(partials(tmp_path)) == 1  # swept once already, and nothing said a run died
    assert app.recover(quiet=True).failed_runs == [killed]
    app._first_use(stores)
    assert partials(tmp_path) == []
    app.close()


def test_a_leftover_of_a_job_a_live_backupd_holds_stays():
    """A run writes its manifest after it is recorded finished, still under its job's lease:
    that upload's partial is not a leftover, though its backup is no longer running."""
    assert why_kept(leftover(), {}, {ID}, busy_jobs={"j"}) == \
        "job j is held by a running backupd (its run may still be writing a manifest)"
    assert why_kept(leftover(), {}, {ID}, busy_jobs={"other"}) is None


def test_the_manifest_upload_of_a_finished_run_is_not_swept_while_its_job_is_held(tmp_path: Path) -> None:
    """Through the real leases: a run recorded finished still holds its job while it writes
    its manifest, so another process's first backup to that destination leaves that upload be."""
    app = App(parse_config(config_for(tmp_path), env={}), "run")
    app.leases.register()
    app._host = FakeHost()
    app.recovery = app.recover()
    finished = app.catalog.start_backup("j", owner=app.leases.me.id)
    app.catalog.finish_backup(finished, None)
    stores = app.stores()
    with app.leases.hold([job_lease("j")], "backup of job j"):
        killed_upload(stores["a"], f"j/{finished}/manifest.json")
        report = app.sweep_leftovers()
        assert report.removed == [] and len(partials(tmp_path)) == 1
        assert report.found[0].keep == "job j is held by a running backupd (its run may still be writing a manifest)"
    assert len(app.sweep_leftovers().removed) == 1 and partials(tmp_path) == []
    app.close()
