"""The sidecar's HTTP endpoint: /healthz (JSON, 200 or 503) and /metrics (Prometheus).

Standard library only (ThreadingHTTPServer in a daemon thread): two read-only
endpoints do not justify a framework. Each connection has its own thread and a
read timeout, so a client that connects and sends nothing (or trickles) holds
only its own thread, and only for REQUEST_TIMEOUT. /metrics asks for a bearer
token when `http.metrics_token` (or its `_file` twin) is set; /healthz stays open
for the image's HEALTHCHECK and reports no error text.

Where it listens, most explicit first: `backupd run --http [HOST:]PORT`; nowhere
when the config says `http: {enabled: false}` in so many words (the image's
BACKUPD_HTTP does not override an operator who turned it off); $BACKUPD_HTTP;
`http.enabled: true` with the config's host and port; otherwise nowhere.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from backupd.config import Http

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
MetricsFn = Callable[[], bytes]
TokenFn = Callable[[], "str | None"]
REQUEST_TIMEOUT = 10.0  # seconds a client may keep a read waiting


def http_bind(flag: str | None, env: str | None, settings: "Http") -> str | None:
    """Where to listen ([HOST:]PORT), or None; see the module docstring for the order."""
    if flag:
        return flag
    if "enabled" in settings.model_fields_set and not settings.enabled:
        return None
    if env:
        return env
    if settings.enabled:
        return f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"
    return None


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


def _handler(health: HealthFn, metrics: MetricsFn, token: TokenFn,
             read_timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "backupd"
        timeout = read_timeout  # socketserver sets it on each connection: no read waits longer

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    ok, report = health()
                    self._reply(200 if ok else 503, "application/json",
                                json.dumps(report, indent=2).encode())
                elif path == "/metrics":
                    if not self._authorized(token()):
                        self._reply(401, "text/plain", b"unauthorized: send Authorization: Bearer <token>\n",
                                    {"WWW-Authenticate": 'Bearer realm="backupd metrics"'})
                        return
                    self._reply(200, CONTENT_TYPE_LATEST, metrics())
                else:
                    self._reply(404, "text/plain", b"not found: try /healthz or /metrics\n")
            except Exception:  # noqa: BLE001 - report, never kill the server thread
                log.exception("http: %s failed", path)
                self._reply(500, "text/plain", b"internal error\n")

        def _authorized(self, expected: str | None) -> bool:
            if not expected:
                return True
            scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())

        def _reply(self, code: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http: " + format, *args)

    return Handler


class HttpEndpoint:
    """Serves until `close()`; port 0 picks a free port (see `.port`)."""

    def __init__(self, host: str, port: int, health: HealthFn, metrics: MetricsFn,
                 metrics_token: TokenFn = lambda: None, request_timeout: float = REQUEST_TIMEOUT) -> None:
        try:
            self.server = ThreadingHTTPServer((host, port), _handler(health, metrics, metrics_token, request_timeout))
        except OSError as exc:
            from backupd.errors import ConfigError

            raise ConfigError(f"http: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="backupd-http", daemon=True)
        self.thread.start()
        log.info("health and metrics on http://%s:%d/healthz and /metrics%s", host, self.port,
                 " (bearer token required)" if metrics_token() else "")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
