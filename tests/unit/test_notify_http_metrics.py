"""Notifications against a loopback receiver; the HTTP endpoint; metrics from runs and the catalog."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from backupd import notify
from backupd.catalog import Catalog
from backupd.config import Job, Notifications
from backupd.http import HttpEndpoint, parse_bind
from backupd.metrics import Metrics


class Receiver:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        got = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                got.append((self.command, self.path, body))
                self.send_response(500 if "broken" in self.path else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _record  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


JOB = Job(volumes=[{"name": "v"}])  # type: ignore[list-item]


def report(status: str) -> notify.RunReport:
    return notify.RunReport("nightly", "20240101T000000Z-abc123", status, [] if status == "succeeded" else ["disk full"])


def test_a_failure_posts_the_webhook_and_pings_fail(receiver: Receiver) -> None:
    settings = Notifications(webhook_url=receiver.base + "/hook/TOKEN", ping_url=receiver.base + "/ping/uuid")
    notify.run_started(settings, "nightly")
    notify.run_finished(settings, JOB, "nightly", report("failed"))
    assert [(m, p) for m, p, _ in receiver.requests] == [
        ("GET", "/ping/uuid/start"), ("POST", "/ping/uuid/fail"), ("POST", "/hook/TOKEN")]
    body = json.loads(receiver.requests[2][2])
    assert body["job"] == "nightly" and body["status"] == "failed" and body["errors"] == ["disk full"]
    assert body["backup_id"] == "20240101T000000Z-abc123" and "size" in body and "artifacts" in body


def test_a_success_pings_but_posts_the_webhook_only_when_asked(receiver: Receiver) -> None:
    settings = Notifications(webhook_url=receiver.base + "/hook", ping_url=receiver.base + "/ping")
    notify.run_finished(settings, JOB, "nightly", report("succeeded"))
    assert [(m, p) for m, p, _ in receiver.requests] == [("POST", "/ping")]
    notify.run_finished(settings, Job(volumes=[{"name": "v"}], notify_on_success=True),  # type: ignore[list-item]
                        "nightly", report("succeeded"))
    assert receiver.requests[-1][1] == "/hook"
    receiver.requests.clear()
    notify.run_finished(Notifications(webhook_url=receiver.base + "/hook", on_success=True),
                        Job(volumes=[{"name": "v"}], notify_on_success=False),  # type: ignore[list-item]
                        "nightly", report("succeeded"))
    assert receiver.requests == [], "the job's own setting wins over the global one"


def test_the_webhook_url_can_come_from_a_secret_file(receiver: Receiver, tmp_path: Path) -> None:
    secret = tmp_path / "hook"
    secret.write_text(receiver.base + "/from-file\n")
    notify.run_finished(Notifications(webhook_url_file=secret), JOB, "nightly", report("failed"))
    assert receiver.requests[0][1] == "/from-file"


def test_a_broken_label_posts_the_webhook_naming_the_container_and_label_and_pings_fail(
        receiver: Receiver) -> None:
    from backupd.errors import LabelError

    settings = Notifications(webhook_url=receiver.base + "/hook", ping_url=receiver.base + "/ping/uuid")
    error = LabelError("shop-db-1", "backupd.database.pasword", "'pasword' is not an option")
    notify.label_broken(settings, "shop", error)
    assert [(m, p) for m, p, _ in receiver.requests] == [("POST", "/ping/uuid/fail"), ("POST", "/hook")]
    body = json.loads(receiver.requests[1][2])
    assert (body["job"], body["status"], body["backup_id"]) == ("shop", notify.LABEL_ERROR, None)
    assert (body["container"], body["label"]) == ("shop-db-1", "backupd.database.pasword")
    assert body["errors"] == [str(error)] and body["artifacts"] == []
    assert "container" not in notify.RunReport("shop", None, "failed").payload()  # only when a label broke


def test_an_unreachable_or_failing_receiver_never_raises_and_logs_only_the_host(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    settings = Notifications(webhook_url=f"http://user:pw@127.0.0.1:{port}/hook/SECRET",
                             ping_url=receiver.base + "/broken/SECRET2", timeout="2s")
    notify.run_finished(settings, JOB, "nightly", report("failed"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP 500" in text and "127.0.0.1" in text
    assert "SECRET" not in text and "pw" not in text and "/hook" not in text


def test_parse_bind_accepts_port_or_host_and_port() -> None:
    assert parse_bind("8080") == ("0.0.0.0", 8080)
    assert parse_bind("127.0.0.1:9") == ("127.0.0.1", 9)
    assert parse_bind("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_bind("host:http")


def test_healthz_answers_200_or_503_with_the_report_and_metrics_in_prometheus_format() -> None:
    state = {"ok": True}
    endpoint = HttpEndpoint("127.0.0.1", 0, lambda: (state["ok"], {"healthy": state["ok"]}),
                            lambda: b"backupd_up 1\n")
    try:
        base = f"http://127.0.0.1:{endpoint.port}"
        with urllib.request.urlopen(base + "/healthz") as r:
            assert r.status == 200 and json.load(r) == {"healthy": True}
        state["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/healthz")
        assert err.value.code == 503 and json.load(err.value) == {"healthy": False}
        with urllib.request.urlopen(base + "/metrics") as r:
            assert r.read() == b"backupd_up 1\n" and r.headers["Content-Type"].startswith("text/plain")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/other")
        assert err.value.code == 404
    finally:
        endpoint.close()


def test_metrics_count_runs_by_status_and_read_last_success_and_artifacts_from_the_catalog(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    bid = catalog.start_backup("nightly")
    art = catalog.add_artifact(bid, "volume", "v", "volume:v", "zstd", None, {"local": "k1", "s3": "k2"})
    catalog.finish_artifact(art, 1000, "ab" * 32, {"s3": "refused"})
    catalog.finish_backup(bid)
    good = catalog.start_backup("nightly")
    art = catalog.add_artifact(good, "volume", "v", "volume:v", "zstd", None, {"local": "k3"})
    catalog.finish_artifact(art, 500, "cd" * 32, {})
    catalog.finish_backup(good)

    metrics = Metrics(catalog, lambda: ["nightly", "never-ran"])
    metrics.observe_run("nightly", "partial", 3.0, catalog.get(bid))
    metrics.observe_run("nightly", "succeeded", 2.0, catalog.get(good))
    text = metrics.render().decode()
    assert 'backupd_runs_total{job="nightly",status="partial"} 1.0' in text
    assert 'backupd_runs_total{job="nightly",status="succeeded"} 1.0' in text
    assert 'backupd_run_duration_seconds_count{job="nightly"} 2.0' in text
    assert 'backupd_bytes_written_total{destination="local",job="nightly"} 1500.0' in text
    assert 'backupd_artifacts{destination="local"} 2.0' in text
    assert 'backupd_artifacts{destination="s3"}' not in text
    finished = catalog.get(good).finished_at.timestamp()
    assert f'backupd_last_success_timestamp_seconds{{job="nightly"}} {finished!r}' in text \
        or 'backupd_last_success_timestamp_seconds{job="nightly"} ' in text
    assert 'job="never-ran"' not in text


# ------------------------------------------------------------------ the endpoint against hostile clients


def test_a_client_that_connects_and_sends_nothing_holds_neither_the_endpoint_nor_its_thread() -> None:
    import socket
    import time

    endpoint = HttpEndpoint("127.0.0.1", 0, lambda: (True, {"healthy": True}), lambda: b"", request_timeout=0.5)
    try:
        silent = socket.create_connection(("127.0.0.1", endpoint.port))
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/healthz", timeout=5) as r:
            assert r.status == 200
        assert time.monotonic() - started < 0.5, "another request waited for the silent client"
        silent.settimeout(5)
        assert silent.recv(1) == b"", "the silent client's connection stays open"
        assert time.monotonic() - started < 3
        silent.close()
    finally:
        endpoint.close()


def test_metrics_ask_for_the_bearer_token_when_one_is_set_and_healthz_stays_open() -> None:
    token = {"value": "m3trics-t0ken"}
    endpoint = HttpEndpoint("127.0.0.1", 0, lambda: (True, {"healthy": True}), lambda: b"backupd_up 1\n",
                            metrics_token=lambda: token["value"])
    base = f"http://127.0.0.1:{endpoint.port}"

    def get(path: str, auth: str | None = None) -> int:
        request = urllib.request.Request(base + path, headers={"Authorization": auth} if auth else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as err:
            if err.code == 401:
                assert err.headers["WWW-Authenticate"].startswith("Bearer")
            return err.code

    try:
        assert get("/metrics") == 401
        assert get("/metrics", "Bearer wrong") == 401
        assert get("/metrics", "Basic bTN0cmljcy10MGtlbg==") == 401
        assert get("/metrics", "Bearer m3trics-t0ken") == 200
        assert get("/healthz") == 200
        token["value"] = None  # a reload that drops the token
        assert get("/metrics") == 200
    finally:
        endpoint.close()


def test_the_metrics_token_can_come_from_a_file_and_is_a_secret(tmp_path: Path) -> None:
    from backupd.config import parse_config
    from backupd.redaction import SECRETS

    (tmp_path / "token").write_text("file-token-value\n")
    config = parse_config({"http": {"metrics_token_file": str(tmp_path / "token")}, "jobs": {"j": {"volumes": ["v"]}}},
                          env={})
    assert config.http.token() == "file-token-value" and "file-token-value" in SECRETS
    assert "file-token-value" not in repr(config)


@pytest.mark.parametrize("flag, env, http, expected", [
    (None, None, {}, None),                                             # off by default
    (None, "0.0.0.0:8080", {}, "0.0.0.0:8080"),                         # the image's variable
    (None, "0.0.0.0:8080", {"enabled": False}, None),                   # an operator who turned it off wins over it
    ("127.0.0.1:9", "0.0.0.0:8080", {"enabled": False}, "127.0.0.1:9"),  # the command line wins over all
    (None, "0.0.0.0:8080", {"enabled": True, "port": 9090}, "0.0.0.0:8080"),  # the HEALTHCHECK's port
    (None, None, {"enabled": True, "host": "127.0.0.1", "port": 9090}, "127.0.0.1:9090"),
    (None, None, {"enabled": True, "host": "::1"}, "[::1]:8080"),
    (None, "0.0.0.0:8080", {"port": 9090}, "0.0.0.0:8080"),             # `enabled` not said: not turned off
])
def test_where_the_endpoint_listens(flag, env, http, expected) -> None:
    from backupd.config import Http
    from backupd.http import http_bind

    assert http_bind(flag, env, Http(**http)) == expected
    if expected is not None:
        parse_bind(expected)
