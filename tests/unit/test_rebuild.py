"""catalog rebuild: manifests carry block digests, vouch only for their own destination's
copies in their own directory, and a bad one is skipped with a warning naming it."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from backupd.artifact import store_artifact
from backupd.catalog import MISSING, STORED, Catalog
from backupd.config import Compression, parse_config
from backupd.manifest import manifest_key
from backupd.prune import PruneReport, delete_backup, rebuild_catalog
from backupd.restore import restore_volume
from backupd.run import write_manifests
from tests.unit.test_restore import FakeHost, SwappingStore, unpacked


def small_tar(text: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = text.encode() * 1000
        info = tarfile.TarInfo("./file")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def env(tmp_path: Path):
    config = parse_config({
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "destinations": {"a": {"type": "local", "path": str(tmp_path / "a")},
                         "b": {"type": "local", "path": str(tmp_path / "b")}},
        "jobs": {"j": {"volumes": ["v"]}},
    }, env={})
    catalog = Catalog(config.catalog)
    stores = {"a": SwappingStore("a", tmp_path / "a"), "b": SwappingStore("b", tmp_path / "b")}

    def backup(text: str = "precious") -> tuple[str, bytes]:
        tar = small_tar(text)
        backup_id = catalog.start_backup("j")
        store_artifact(catalog=catalog, backup_id=backup_id, job="j", kind="volume", name="v",
                       source="volume:v", open_source=lambda: contextlib.nullcontext([tar]), stores=stores,
                       compression=Compression(level=1))
        catalog.finish_backup(backup_id)
        view = catalog.get(backup_id)
        write_manifests(view, stores, {a.id: catalog.blocks(a.id) for a in view.artifacts})
        return backup_id, tar

    return config, catalog, stores, backup, tmp_path


def lose_catalog(config, catalog: Catalog, tmp_path: Path) -> Catalog:
    catalog.close()
    (tmp_path / "catalog.db").unlink()
    return Catalog(config.catalog)


def rebuild_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "backupd.prune" and r.levelno >= logging.WARNING]


def manifest_path(tmp_path: Path, dest: str, backup_id: str) -> Path:
    return tmp_path / dest / manifest_key("j", backup_id)


def test_manifests_carry_the_block_digests_so_a_rebuilt_catalog_restores_with_one_read(env, monkeypatch):
    config, catalog, stores, backup, tmp_path = env
    backup_id, tar = backup()
    artifact_id = catalog.get(backup_id).artifacts[0].id
    recorded = catalog.blocks(artifact_id)
    manifest = json.loads(manifest_path(tmp_path, "a", backup_id).read_text())
    blocks = manifest["artifacts"][0]["blocks"]
    assert (blocks["size"], base64.b64decode(blocks["sha256"])) == recorded

    fresh = lose_catalog(config, catalog, tmp_path)
    assert rebuild_catalog(fresh, "a", stores["a"]) == ([backup_id], [])
    assert fresh.blocks(fresh.get(backup_id).artifacts[0].id) == recorded
    monkeypatch.setattr("backupd.restore.configured_stores", lambda config: stores)
    host = FakeHost()
    stores["a"].reads = 0
    restore_volume(config=config, catalog=fresh, host=host, backup_id=backup_id, volume="v")
    assert host.volumes["v"] == unpacked(tar) and stores["a"].reads == 1


def test_a_manifest_cannot_vouch_for_copies_on_another_destination(env):
    """A forged manifest on `a` claims the archive of another backup on `b` as its own:
    rebuilt from `a` and pruned, it must not cost `b` that archive."""
    config, catalog, stores, backup, tmp_path = env
    victim, _ = backup("victim")
    forged, _ = backup("forged")
    victim_key = catalog.get(victim).artifacts[0].copies[1].key
    path = manifest_path(tmp_path, "a", forged)
    data = json.loads(path.read_text())
    data["artifacts"][0]["destinations"][1]["key"] = victim_key  # on b: the victim's archive
    path.write_text(json.dumps(data))

    fresh = lose_catalog(config, catalog, tmp_path)
    rebuild_catalog(fresh, "a", stores["a"])
    copies = fresh.get(forged).artifacts[0].copies
    assert [(c.destination, c.status) for c in copies] == [("a", STORED)]
    report = PruneReport("j", [])
    delete_backup(fresh, fresh.get(forged), stores, report)
    assert (tmp_path / "b" / victim_key).exists()


def test_a_manifest_claiming_an_object_outside_its_own_directory_is_skipped(env, caplog):
    config, catalog, stores, backup, tmp_path = env
    victim, _ = backup("victim")
    forged, _ = backup("forged")
    path = manifest_path(tmp_path, "a", forged)
    data = json.loads(path.read_text())
    data["artifacts"][0]["destinations"][0]["key"] = catalog.get(victim).artifacts[0].copies[0].key
    path.write_text(json.dumps(data))

    fresh = lose_catalog(config, catalog, tmp_path)
    with caplog.at_level(logging.WARNING, logger="backupd.prune"):
        assert rebuild_catalog(fresh, "a", stores["a"]) == ([victim], [])
    [warning] = rebuild_warnings(caplog)
    assert f"skipping manifest j/{forged}/manifest.json on a" in warning and "outside its backup's directory" in warning


def test_a_copy_whose_object_is_gone_or_of_another_size_is_imported_missing(env):
    config, catalog, stores, backup, tmp_path = env
    gone, _ = backup("gone")
    resized, _ = backup("resized")
    (tmp_path / "a" / catalog.get(gone).artifacts[0].copies[0].key).unlink()
    with open(tmp_path / "a" / catalog.get(resized).artifacts[0].copies[0].key, "ab") as f:
        f.write(b"more")
    fresh = lose_catalog(config, catalog, tmp_path)
    rebuild_catalog(fresh, "a", stores["a"])
    for backup_id in (gone, resized):
        [copy] = fresh.get(backup_id).artifacts[0].copies
        assert copy.status == MISSING and "recorded size" in copy.error


def test_rebuilding_from_a_second_destination_adds_only_the_copies_the_catalog_agrees_with(env, caplog):
    config, catalog, stores, backup, tmp_path = env
    agreed, _ = backup("agreed")
    disputed, _ = backup("disputed")
    path = manifest_path(tmp_path, "b", disputed)
    data = json.loads(path.read_text())
    data["artifacts"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))

    fresh = lose_catalog(config, catalog, tmp_path)
    rebuild_catalog(fresh, "a", stores["a"])
    with caplog.at_level(logging.WARNING, logger="backupd.prune"):
        assert sorted(rebuild_catalog(fresh, "b", stores["b"])[1]) == sorted([agreed, disputed])
    assert [c.destination for c in fresh.get(agreed).artifacts[0].copies] == ["a", "b"]
    assert [c.destination for c in fresh.get(disputed).artifacts[0].copies] == ["a"]
    assert any(f"backup {disputed} on b disagrees with the catalog" in m for m in rebuild_warnings(caplog))
    rebuild_catalog(fresh, "b", stores["b"])  # again: nothing added twice
    assert [c.destination for c in fresh.get(agreed).artifacts[0].copies] == ["a", "b"]


def _edit(data: dict, change) -> bytes:
    change(data)
    return json.dumps(data).encode()


def _set(path: str, value):
    """Set a dotted path ("artifacts.0.size") in a manifest."""
    def change(data):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return change


_DELETE = object()

MALFORMED = {
    "not JSON": lambda data: b'{"id": ',
    "deeply nested": lambda data: b"[" * 100_000 + b"]" * 100_000,
    "a list": lambda data: b"[]",
    "missing id": lambda data: _edit(data, _set("id", _DELETE)),
    "missing artifacts": lambda data: _edit(data, _set("artifacts", _DELETE)),
    "size as text": lambda data: _edit(data, _set("artifacts.0.size", "123")),
    "negative size": lambda data: _edit(data, _set("artifacts.0.size", -1)),
    "artifacts not a list": lambda data: _edit(data, _set("artifacts", {"0": {}})),
    "copies not a list": lambda data: _edit(data, _set("artifacts.0.destinations", "a")),
    "copy without key": lambda data: _edit(data, _set("artifacts.0.destinations.0.key", _DELETE)),
    "unknown kind": lambda data: _edit(data, _set("artifacts.0.kind", "file")),
    "running": lambda data: _edit(data, _set("status", "running")),
    "naive time": lambda data: _edit(data, _set("started_at", "2026-01-01T00:00:00")),
    "no time": lambda data: _edit(data, _set("started_at", "yesterday")),
    "newer format": lambda data: _edit(data, _set("format", 2)),
    "another backup's id": lambda data: _edit(data, _set("id", "20200101T000000Z-abcdef")),
    "blocks not base64": lambda data: _edit(data, _set("artifacts.0.blocks.sha256", "!!!")),
    "a block short": lambda data: _edit(data, _set("artifacts.0.blocks.sha256", base64.b64encode(b"").decode())),
    "block size as text": lambda data: _edit(data, _set("artifacts.0.blocks.size", "4194304")),
}


@pytest.mark.parametrize("damage", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_manifest_is_skipped_with_a_warning_naming_it_and_the_rebuild_goes_on(env, caplog, damage):
    config, catalog, stores, backup, tmp_path = env
    good, _ = backup("good")
    bad, _ = backup("bad")
    path = manifest_path(tmp_path, "a", bad)
    path.write_bytes(damage(json.loads(path.read_text())))
    fresh = lose_catalog(config, catalog, tmp_path)
    with caplog.at_level(logging.WARNING, logger="backupd.prune"):
        assert rebuild_catalog(fresh, "a", stores["a"]) == ([good], [])
    [warning] = rebuild_warnings(caplog)
    assert warning.startswith(f"catalog rebuild: skipping manifest j/{bad}/manifest.json on a: ")


def test_a_manifest_of_an_older_backupd_without_block_digests_still_imports(env):
    config, catalog, stores, backup, tmp_path = env
    backup_id, _ = backup()
    path = manifest_path(tmp_path, "a", backup_id)
    data = json.loads(path.read_text())
    del data["artifacts"][0]["blocks"]
    data["a key from a later backupd"] = True
    path.write_text(json.dumps(data))
    fresh = lose_catalog(config, catalog, tmp_path)
    assert rebuild_catalog(fresh, "a", stores["a"]) == ([backup_id], [])
    assert fresh.blocks(fresh.get(backup_id).artifacts[0].id) is None
    assert fresh.get(backup_id).started_at.tzinfo == timezone.utc
    assert fresh.get(backup_id).started_at <= datetime.now(timezone.utc)


def test_a_rebuilt_catalog_keeps_each_archives_excludes_and_file_count(env):
    """The file-count guard and `show` need them after a rebuild too."""
    config, catalog, stores, _, tmp_path = env
    tar = small_tar("counted")
    backup_id = catalog.start_backup("j")
    store_artifact(catalog=catalog, backup_id=backup_id, job="j", kind="volume", name="v", source="volume:v",
                   open_source=lambda: contextlib.nullcontext([tar]), stores=stores,
                   compression=Compression(level=1), check_tar=True, excludes=("cache/*", "tmp"))
    catalog.finish_backup(backup_id)
    view = catalog.get(backup_id)
    assert (view.artifacts[0].excludes, view.artifacts[0].file_count) == (("cache/*", "tmp"), 1)
    write_manifests(view, stores, {a.id: catalog.blocks(a.id) for a in view.artifacts})

    fresh = lose_catalog(config, catalog, tmp_path)
    rebuild_catalog(fresh, "a", stores["a"])
    [art] = fresh.get(backup_id).artifacts
    assert (art.excludes, art.file_count) == (("cache/*", "tmp"), 1)
