"""The sidecar's HTTP endpoint: /healthz (JSON, 200 or 503) and /metrics (Prometheus).

Standard library only (ThreadingHTTPServer in a daemon thread): two read-only
endpoints do not justify a framework.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
MetricsFn = Callable[[], bytes]


def parse_bind(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """'8080', ':8080' or 'HOST:PORT' -> (host, port)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"'{text}' is not [HOST:]PORT") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return (host.strip("[]") or default_host), number


def _handler(health: HealthFn, metrics: MetricsFn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "backupd"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    ok, report = health()
                    self._reply(200 if ok else 503, "application/json",
                                json.dumps(report, indent=2).encode())
                elif path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, metrics())
                else:
                    self._reply(404, "text/plain", b"not found: try /healthz or /metrics\n")
            except Exception:  # noqa: BLE001 - report, never kill the server thread
                log.exception("http: %s failed", path)
                self._reply(500, "text/plain", b"internal error\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http: " + format, *args)

    return Handler


class HttpEndpoint:
    """Serves until `close()`; port 0 picks a free port (see `.port`)."""

    def __init__(self, host: str, port: int, health: HealthFn, metrics: MetricsFn) -> None:
        try:
            self.server = ThreadingHTTPServer((host, port), _handler(health, metrics))
        except OSError as exc:
            from backupd.errors import ConfigError

            raise ConfigError(f"http: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="backupd-http", daemon=True)
        self.thread.start()
        log.info("health and metrics on http://%s:%d/healthz and /metrics", host, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
