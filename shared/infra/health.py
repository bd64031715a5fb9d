"""The small HTTP server every service runs: ``/healthz`` (liveness + readiness) and ``/metrics``.

Metrics are plain counters and gauges in the Prometheus text format; no client library needed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

from aiohttp import web

from shared.infra.settings import HttpSettings

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    """Process-local counters and gauges, rendered for Prometheus."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[Labels, float]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add to a counter (``name`` without the ``espbridge_`` prefix)."""
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        self._gauges[name][tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 if never set)."""
        key = tuple(sorted(labels.items()))
        return self._counters.get(name, {}).get(key, self._gauges.get(name, {}).get(key, 0.0))

    def render(self) -> str:
        """The Prometheus text exposition of all series."""
        lines: list[str] = []
        for kind, table in (("counter", self._counters), ("gauge", self._gauges)):
            for name, series in sorted(table.items()):
                full = f"espbridge_{name}"
                lines.append(f"# TYPE {full} {kind}")
                for labels, val in sorted(series.items()):
                    all_labels = (("service", self.service), *labels)
                    text = ",".join(f'{k}="{_escape(v)}"' for k, v in all_labels)
                    lines.append(f"{full}{{{text}}} {val:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class HealthServer:
    """Serves /healthz (200 when ``ready()`` is true, else 503), /metrics, and a service's extra routes."""

    def __init__(self, settings: HttpSettings, metrics: Metrics, ready: Callable[[], bool]) -> None:
        self._settings = settings
        self._metrics = metrics
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self._routes: list[tuple[str, str, Handler]] = []
        self.port: int | None = None

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve another route on the same port (call before :meth:`start`)."""
        self._routes.append((method, path, handler))

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok = self._ready()
        return web.json_response(
            {"service": self._metrics.service, "status": "ok" if ok else "starting"},
            status=200 if ok else 503,
        )

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        return web.Response(text=self._metrics.render(), content_type="text/plain", charset="utf-8")

    async def start(self) -> None:
        """Start listening; the bound port is in ``self.port`` (useful with port 0)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics_handler)
        for method, path, handler in self._routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        await site.start()
        server = site._server  # aiohttp exposes the bound socket only here
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._settings.port
        log.info(
            "health endpoint listening", extra={"url": f"http://{self._settings.host}:{self.port}/healthz"}
        )

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
