"""Container downtime per run: kept in the catalog (schema v8), shown by `show`, and a metric."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from backupd.catalog import Catalog
from backupd.cli import main
from backupd.metrics import Metrics


def test_a_v7_catalog_gains_the_downtime_column_and_keeps_its_runs(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/c.db"
    catalog = Catalog(url)
    old = catalog.start_backup("j")
    catalog.finish_backup(old)
    catalog.close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute("ALTER TABLE backups DROP COLUMN downtime")
    db.execute("DELETE FROM backupd_schema WHERE version >= 8")
    db.commit()
    db.close()
    catalog = Catalog(url)
    assert catalog.get(old).downtime is None
    bid = catalog.start_backup("j")
    catalog.set_downtime(bid, 1.25)
    assert catalog.get(bid).downtime == 1.25
    assert catalog.get(bid).to_json()["downtime_seconds"] == 1.25


def test_show_prints_the_downtime_only_for_runs_that_stopped_containers(capsys, tmp_path: Path, monkeypatch):
    config = tmp_path / "backupd.yml"
    config.write_text(json.dumps({"catalog": f"sqlite:///{tmp_path}/catalog.db",
                                  "destinations": {"local": {"type": "local", "path": str(tmp_path / "b")}},
                                  "jobs": {"j": {"volumes": ["v"]}}}))
    monkeypatch.setenv("BACKUPD_CONFIG", str(config))
    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    held, plain = catalog.start_backup("j"), catalog.start_backup("j")
    catalog.set_downtime(held, 0.84)
    for bid in (held, plain):
        catalog.finish_backup(bid)
    assert main(["show", held]) == 0
    assert "downtime  0.8 s" in capsys.readouterr().out
    assert main(["show", plain]) == 0
    assert "downtime" not in capsys.readouterr().out
    assert main(["show", held, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["downtime_seconds"] == 0.84


def test_the_downtime_histogram_counts_runs_that_stopped_containers_per_job(tmp_path: Path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    held, plain = catalog.start_backup("web"), catalog.start_backup("web")
    catalog.set_downtime(held, 1.5)
    metrics = Metrics(catalog, lambda: ["web"])
    metrics.observe_run("web", "succeeded", 4.0, catalog.get(held))
    metrics.observe_run("web", "succeeded", 3.0, catalog.get(plain))
    text = metrics.render().decode()
    assert 'backupd_container_downtime_seconds_count{job="web"} 1.0' in text
    assert 'backupd_container_downtime_seconds_sum{job="web"} 1.5' in text
    assert 'backupd_container_downtime_seconds_bucket{job="web",le="2.0"} 1.0' in text
    assert 'backupd_container_downtime_seconds_bucket{job="web",le="1.0"} 0.0' in text
