"""Excludes and the file-count shrinkage guard on the real engine, through the CLI."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.integration.test_repository import repo_config, restic_image  # noqa: F401 - fixture
from tests.integration.test_volumes import backupd, listing, mountpoint, snapshot, write_config

pytestmark = pytest.mark.integration


def populate(root) -> None:
    for path in ("cache/a/f", "cache/x", "tmp/y", "keep/cache/z", "keep/tmp/w", "top.log", "sub/deep.log",
                 "-rf", "data/real"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(path)


def test_excluded_files_are_left_out_recorded_shown_and_the_archive_restores(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("excl")
    populate(mountpoint(docker_client, vol))
    config = write_config(tmp_path, helper_image, {"j": {
        "exclude": ["tmp/"],
        "volumes": [{"name": vol, "exclude": ["cache/*", "*.log", "-rf"]}]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()

    [art] = listing(config)[0]["artifacts"]
    assert art["excludes"] == ["tmp", "cache/*", "*.log", "-rf"]
    # ./ cache/ keep/ keep/cache/ keep/cache/z keep/tmp/ keep/tmp/w sub/ sub/deep.log data/ data/real
    assert art["file_count"] == 11
    shown = backupd(config, "show", backup_id, check=True).stdout
    assert "excludes: tmp, cache/*, *.log, -rf" in shown and "11 files" in shown
    assert json.loads(backupd(config, "show", backup_id, "--json", check=True).stdout)["artifacts"][0][
        "excludes"] == art["excludes"]
    manifest = json.loads(next((tmp_path / "backups").rglob("manifest.json")).read_text())
    assert manifest["artifacts"][0]["excludes"] == art["excludes"]

    target = f"{vol}-restored"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
        root = mountpoint(docker_client, target)
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        assert present == ["cache", "data", "data/real", "keep", "keep/cache", "keep/cache/z", "keep/tmp",
                           "keep/tmp/w", "sub", "sub/deep.log"]
        assert (root / "data/real").read_text() == "data/real"
    finally:
        docker_client.volumes.get(target).remove(force=True)


def test_a_backup_whose_file_count_collapsed_is_suspicious_and_retention_holds(
        docker_client, helper_image, volume_factory, tmp_path):
    """Four hundred files become one of the same size: the size guard is blind to it, the count guard is not."""
    vol = volume_factory("count")
    root = mountpoint(docker_client, vol)
    for i in range(400):
        (root / "files" / f"{i // 50}").mkdir(parents=True, exist_ok=True)
        (root / "files" / f"{i // 50}" / f"f{i}").write_bytes(os.urandom(4096))
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "retention": {"keep_last": 1}}})
    for _ in range(3):
        backupd(config, "backup", "j", check=True)
    shutil.rmtree(root / "files")
    (root / "one").write_bytes(os.urandom(400 * 4096))

    proc = backupd(config, "backup", "j", check=True)
    backup_id = proc.stdout.strip()
    # ./ files/ 8 directories 400 files, then ./ one
    assert "warning: suspicious: file count 2 is 100% below the median 410" in proc.stderr
    newest = listing(config)[0]
    assert newest["id"] == backup_id and newest["suspicion"].startswith("file count 2 "), "not by size"
    assert f"{backup_id}  j    suspicious" in backupd(config, "list", check=True).stdout
    pruned = backupd(config, "prune", "--job", "j")
    assert pruned.returncode == 3 and "suspicious" in pruned.stderr
    assert len(listing(config)) == 4, "retention deleted nothing"


def test_repository_mode_leaves_out_exactly_what_archive_mode_leaves_out(
        docker_client, helper_image, restic_image, volume_factory, tmp_path):
    """One volume, one set of patterns, both formats: the restored trees are the same, entry for entry."""
    vol = volume_factory("excl-both")
    root = mountpoint(docker_client, vol)
    populate(root)
    for path in ("x*y", "xzy", "a/b/c/b", "a/q/b", "$HOME", "dir.log/inner", ".hidden.log", "zażółć.log",
                 "sp ace/f", "deep/1/2/3.log", "deep/1/f", "deep/top"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(path)
    patterns = ["cache/*", "*.log", "-rf", "x\\*y", "a/**/b", "$HOME", "sp ace", "deep/*/*"]
    config, _ = repo_config(tmp_path, helper_image, restic_image, {
        "archive": {"format": "archive", "exclude": ["tmp/"], "volumes": [{"name": vol, "exclude": patterns}]},
        "repo": {"exclude": ["tmp/"], "volumes": [{"name": vol, "exclude": patterns}]}})
    ids = {job: backupd(config, "backup", job, check=True).stdout.strip() for job in ("archive", "repo")}
    recorded = {e["job"]: e["artifacts"][0]["excludes"] for e in listing(config)}
    assert recorded["archive"] == recorded["repo"] == ["tmp", *patterns]

    trees = {}
    for job, backup_id in ids.items():
        target = f"{vol}-{job}"
        try:
            backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
            trees[job] = snapshot(mountpoint(docker_client, target))
        finally:
            docker_client.volumes.get(target).remove(force=True)
    assert trees["repo"] == trees["archive"]
    present = {os.fsdecode(name) for name in trees["repo"]["entries"]}
    assert {"cache", "data/real", "keep/tmp/w", "sub/deep.log", "xzy", "a/b/c/b", "a/q", "deep/top"} <= present
    assert not present & {"cache/x", "tmp", "top.log", "-rf", "x*y", "a/q/b", "$HOME", "sp ace", "deep/1/f",
                          "dir.log", ".hidden.log", "zażółć.log"}

    # Each snapshot carries its patterns: a lost catalog gets them back as a manifest gives them back.
    (tmp_path / "catalog.db").unlink()
    backupd(config, "catalog", "rebuild", "--destination", "local", check=True)
    assert {e["job"]: e["artifacts"][0]["excludes"] for e in listing(config)} == recorded
