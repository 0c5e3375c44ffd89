"""The viewer's HTTP server (standard library ``ThreadingHTTPServer``; local use only).

Routes (all GET):

==================================  =====================================================
``/``                               the map page (``static/index.html``)
``/static/<file>``                  the page's scripts and styles, MapLibre GL JS, pmtiles
``/api/layers``                     the layers as JSON (bounds, bands, times, stretch, …)
``/api/colormaps``                  colormap stops and the categorical palette (legend)
``/tiles/<layer>/<z>/<x>/<y>.png``  a raster tile; query ``band``, ``time`` (index),
                                    ``colormap``, ``vmin``, ``vmax`` or ``rgb=b1,b2,b3``
``/features/<layer>.geojson``       a GeoParquet layer as GeoJSON (EPSG:4326)
``/files/<layer>.pmtiles``          a PMTiles archive, with HTTP range requests
==================================  =====================================================
"""

from __future__ import annotations

import json
import mimetypes
import re
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from rasterkube.errors import UserError
from rasterkube.viewer import tiles
from rasterkube.viewer.layers import FEATURES, PMTILES, RASTER, open_layers

STATIC_DIR: Final = Path(__file__).parent / "static"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8765
_TILE = re.compile(r"^/tiles/([\w-]+)/(\d+)/(\d+)/(\d+)\.png$")
_FEATURES = re.compile(r"^/features/([\w-]+)\.geojson$")
_PMTILES = re.compile(r"^/files/([\w-]+)\.pmtiles$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, layers: dict[str, Any], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, quiet: bool = True):
        self.layers = layers
        self.quiet = quiet
        super().__init__((host, port), ViewerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def layers_json(self) -> bytes:
        return json.dumps({"layers": [layer.describe() for layer in self.layers.values()]}).encode()


def make_server(paths: list[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, quiet: bool = True) -> ViewerServer:
    """A server for the layers at ``paths`` (opened and checked now); ``port=0`` picks a free one."""
    layers = open_layers(paths)
    try:
        return ViewerServer(layers, host, port, quiet)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port (0 = any free)") from None


class BackgroundServer:
    """``with BackgroundServer(paths) as url:`` — the viewer on a free port in a thread."""

    def __init__(self, paths: list[str], host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.server = make_server(paths, host, port)
        self.thread = threading.Thread(target=self.server.serve_forever, name="rasterkube-viewer", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.server.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        try:
            self._route(url.path, query)
        except UserError as exc:
            self._send(HTTPStatus.BAD_REQUEST, str(exc).encode(), "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 — a bug: say so in the response, keep serving
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, traceback.format_exc().encode(), "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _route(self, path: str, query: dict[str, str]) -> None:
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/") :])
        if path == "/api/layers":
            return self._send(HTTPStatus.OK, self.server.layers_json(), "application/json")
        if path == "/api/colormaps":
            body = {"colormaps": tiles.COLORMAPS, "categorical": tiles.CATEGORICAL, "default": tiles.DEFAULT_COLORMAP}
            return self._send(HTTPStatus.OK, json.dumps(body).encode(), "application/json")
        if m := _TILE.match(path):
            layer = self._layer(m.group(1), RASTER)
            try:
                png = layer.render(int(m.group(2)), int(m.group(3)), int(m.group(4)), query)
            except ValueError as exc:  # no such tile, unknown colormap, a vmin that is not a number
                raise UserError(str(exc)) from None
            return self._send(HTTPStatus.OK, png, "image/png", cache=True)
        if m := _FEATURES.match(path):
            layer = self._layer(m.group(1), FEATURES)
            return self._send(HTTPStatus.OK, layer.geojson, "application/geo+json")
        if m := _PMTILES.match(path):
            return self._file_range(self._layer(m.group(1), PMTILES).path)
        return self._send(HTTPStatus.NOT_FOUND, f"no such page: {path}".encode(), "text/plain; charset=utf-8")

    def _layer(self, layer_id: str, kind: str) -> Any:
        layer = self.server.layers.get(layer_id)
        if layer is None or layer.kind != kind:
            raise UserError(f"no {kind} layer {layer_id!r} (layers: {', '.join(self.server.layers)})")
        return layer

    def _static(self, name: str) -> None:
        root = STATIC_DIR.resolve()
        file = (root / name).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            return self._send(HTTPStatus.NOT_FOUND, f"no such file: {name}".encode(), "text/plain; charset=utf-8")
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        self._send(HTTPStatus.OK, file.read_bytes(), ctype)

    def _file_range(self, path: Path) -> None:
        size = path.stat().st_size
        header = self.headers.get("Range")
        start, end, status = 0, size - 1, HTTPStatus.OK
        if header:
            m = _RANGE.match(header.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain", extra={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start, end = int(m.group(1)), min(size - 1, int(m.group(2)) if m.group(2) else size - 1)
            else:  # the last N bytes
                start = max(0, size - int(m.group(2)))
            if start > end or start >= size:
                return self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain", extra={"Content-Range": f"bytes */{size}"})
            status = HTTPStatus.PARTIAL_CONTENT
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        extra = {"Accept-Ranges": "bytes"}
        if status == HTTPStatus.PARTIAL_CONTENT:
            extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, body, "application/octet-stream", extra=extra)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, cache: bool = False, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
