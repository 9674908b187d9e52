"""The shrinkage guard: a suddenly small backup is flagged, and retention waits for a human."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from backupd.app import App
from backupd.catalog import Catalog
from backupd.cli import main
from backupd.config import parse_config
from backupd.prune import prune_job
from backupd.shrinkage import SuspiciousShrinkError, judge, judge_files

UTC = timezone.utc
T0 = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)


def test_a_backup_far_below_the_median_of_the_last_ones_is_suspicious() -> None:
    assert judge(40, [100, 100, 100], 0.5) is not None
    assert "60% below the median 100 B of the last 3 successful backups" in judge(40, [100, 100, 100], 0.5)
    assert judge(50, [100, 100, 100], 0.5) is None  # exactly at the line
    assert judge(10, [100, 100], 0.5) is None  # too little history to judge
    assert judge(10, [100, 100, 100], 0) is None  # guard off
    assert judge(10, [0, 0, 0], 0.5) is None
    assert judge(30, [100, 10, 100, 100, 1000], 0.5) is not None  # the median, not the mean


def test_a_file_count_far_below_the_median_is_suspicious_by_the_same_rule() -> None:
    assert "file count 40 is 60% below the median 100 of the last 3" in judge_files(40, [100, 100, 100], 0.5)
    assert judge_files(50, [100, 100, 100], 0.5) is None
    assert judge_files(1, [100, 100], 0.5) is None
    assert judge_files(1, [100, 100, 100], 0) is None


def backup_of(catalog: Catalog, stores: dict, size: int, when: datetime, files: int | None = None) -> str:
    bid = catalog.start_backup("j", when)
    data = b"x" * size
    keys = {d: f"j/{bid}/volume-v.tar.zst" for d in stores}
    art = catalog.add_artifact(bid, "volume", "v", "volume:v", "zstd", None, keys)
    for dest, store in stores.items():
        up = store.open_upload(keys[dest])
        up.write(data)
        up.commit()
    catalog.finish_artifact(art, size, hashlib.sha256(data).hexdigest(), {}, file_count=files)
    catalog.finish_backup(bid)
    return bid


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    raw = {"catalog": f"sqlite:///{tmp_path}/catalog.db",
           "destinations": {"local": {"type": "local", "path": str(tmp_path / "b")}},
           "jobs": {"j": {"volumes": ["v"], "retention": {"keep_last": 2}}}}
    path = tmp_path / "backupd.yml"
    path.write_text(json.dumps(raw))
    monkeypatch.setenv("BACKUPD_CONFIG", str(path))
    config = parse_config(raw, env={})
    app = App(config, "test")
    yield config, app, app.stores()
    app.close()


def test_retention_waits_while_the_newest_backup_is_suspicious_until_it_is_accepted(
        env, capsys: pytest.CaptureFixture[str]) -> None:
    config, app, stores = env
    good = [backup_of(app.catalog, stores, 1000, T0 + timedelta(days=d)) for d in range(4)]
    for bid in good:
        assert app.guard_shrinkage(config, "j", bid) is None
    small = backup_of(app.catalog, stores, 10, T0 + timedelta(days=4))
    assert "99% below the median" in app.guard_shrinkage(config, "j", small)

    with pytest.raises(SuspiciousShrinkError, match=f"newest backup {small} is suspicious .* `backupd accept {small}`"):
        prune_job(config, app.catalog, "j", T0 + timedelta(days=5), stores)
    assert len(app.catalog.list(job="j")) == 5, "nothing deleted"

    assert main(["list"]) == 0
    assert f"{small}  j    suspicious" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    flagged = [b for b in json.loads(capsys.readouterr().out) if b["suspicion"]]
    assert [b["id"] for b in flagged] == [small] and flagged[0]["status"] == "succeeded"

    assert main(["accept", small]) == 0
    assert f"accepted backup {small}" in capsys.readouterr().out
    report = prune_job(config, app.catalog, "j", T0 + timedelta(days=5), stores)
    assert sorted(report.deleted) == sorted(good[:3])
    assert "accepted by an operator" in app.catalog.get(small).warnings[0]


def test_a_later_normal_backup_lifts_the_hold_and_the_small_one_is_kept_only_like_a_failed_one(env) -> None:
    config, app, stores = env
    good = [backup_of(app.catalog, stores, 1000, T0 + timedelta(days=d)) for d in range(3)]
    small = backup_of(app.catalog, stores, 10, T0 + timedelta(days=3))
    assert app.guard_shrinkage(config, "j", small) is not None
    normal = backup_of(app.catalog, stores, 1000, T0 + timedelta(days=4))
    assert app.guard_shrinkage(config, "j", normal) is None, "compared with trusted backups only"
    report = prune_job(config, app.catalog, "j", T0 + timedelta(days=5), stores)
    kept = {d.id: d.reasons for d in report.decisions if d.keep}
    assert set(kept) == {small, normal, good[2]}
    assert kept[small] == ("suspicious within 7d",)


def test_a_backup_of_the_usual_size_with_far_fewer_files_is_suspicious(env) -> None:
    """Thousands of files replaced by one big one: the size holds, the count does not."""
    config, app, stores = env
    for d in range(3):
        assert app.guard_shrinkage(config, "j", backup_of(app.catalog, stores, 1000, T0 + timedelta(days=d),
                                                          files=200)) is None
    same_size_few_files = backup_of(app.catalog, stores, 1000, T0 + timedelta(days=3), files=20)
    reason = app.guard_shrinkage(config, "j", same_size_few_files)
    assert reason == "file count 20 is 90% below the median 200 of the last 3 successful backups " \
                     "(more than 50% fewer is suspicious)"
    assert app.catalog.get(same_size_few_files).suspicion == reason
    normal = backup_of(app.catalog, stores, 1000, T0 + timedelta(days=4), files=190)
    assert app.guard_shrinkage(config, "j", normal) is None, "the flagged one is not part of the median"


def test_both_size_and_file_count_are_named_when_both_fell(env) -> None:
    config, app, stores = env
    for d in range(3):
        backup_of(app.catalog, stores, 1000, T0 + timedelta(days=d), files=200)
    reason = app.guard_shrinkage(config, "j", backup_of(app.catalog, stores, 10, T0 + timedelta(days=3), files=2))
    assert "size 10 B is 99% below" in reason and "file count 2 is 99% below" in reason


def test_backups_that_counted_no_files_are_not_compared_by_count(env) -> None:
    """Backups from before file counts (or of dumps only) give the count guard no history."""
    config, app, stores = env
    for d in range(3):
        backup_of(app.catalog, stores, 1000, T0 + timedelta(days=d))
    assert app.catalog.recent_file_counts("j", T0 + timedelta(days=9), 5) == []
    assert app.guard_shrinkage(config, "j", backup_of(app.catalog, stores, 1000, T0 + timedelta(days=3),
                                                      files=1)) is None
