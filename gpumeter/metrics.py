"""Self-metrics in the Prometheus text format (0.0.4): a textfile (node_exporter collector) or HTTP.
The agent's and the loader's.

``render`` is a pure function of plain values; ``serve`` and ``write_textfile``
are the two thin edges.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gpumeter.files import write_atomic

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: str  # counter | gauge
    help: str
    samples: tuple[tuple[Mapping[str, str], float], ...] = field(default_factory=tuple)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{esc[k]}"' for k in sorted(esc)) + "}"


def _value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(metrics: list[Metric]) -> str:
    lines = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        lines.extend(f"{m.name}{_labels(labels)} {_value(v)}" for labels, v in m.samples)
    return "\n".join(lines) + "\n"


def one(name: str, kind: str, help: str, value: float) -> Metric:
    return Metric(name, kind, help, (({}, value),))


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` whole (a collector reads the old or the new text, never a mix), at 0644
    whatever the umask: node_exporter runs as another user, and self-metrics hold no secret."""
    write_atomic(path, text.encode("utf-8"), sync=False, mode=0o644)


def serve(host: str, port: int, body: Callable[[], str]) -> ThreadingHTTPServer:
    """GET /metrics on (host, port) in a daemon thread; returns the server (``shutdown()`` to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            data = body().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # no access log on stderr
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
