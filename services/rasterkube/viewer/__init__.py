"""``rasterkube view``: a local, basemap-free map of GeoZarr stores, GeoParquet and PMTiles.

A small HTTP server (:mod:`.server`, bound to 127.0.0.1) serves a MapLibre GL JS page
(``static/``; MapLibre and the pmtiles library are bundled from the npm registry, see
:mod:`.vendor`), raster tiles rendered from the store's multiscale pyramid (:mod:`.tiles`,
:mod:`.layers`), features as GeoJSON and PMTiles archives with range requests. Nothing is
fetched from the internet. :func:`screenshot` renders the page in a headless Chromium
(:mod:`.browser`).
"""

from __future__ import annotations

import signal
import webbrowser
from pathlib import Path
from typing import Final

from rasterkube.viewer.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    BackgroundServer,
    make_server,
)

READY: Final = "window.rasterkube && window.rasterkube.ready && !!document.querySelector('.layer')"
# What stops `rasterkube view`: Ctrl-C and SIGTERM (kill, a process manager).
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "BackgroundServer", "make_server", "screenshot", "serve"]


def serve(paths: list[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, open_browser: bool = True) -> None:
    """Serve the viewer until interrupted: Ctrl-C (SIGINT) or SIGTERM (``kill``, a process
    manager). Both are handled explicitly — a process started in the background by a
    non-interactive shell inherits SIGINT as *ignored*, and would otherwise never stop."""
    server = make_server(paths, host, port, quiet=True)
    print(f"rasterkube view: {server.url}  ({len(server.layers)} layers; Ctrl-C to stop)", flush=True)
    if open_browser:
        webbrowser.open(server.url)
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def screenshot(paths: list[str], out: str | Path, width: int = 1200, height: int = 800, timeout: float = 60.0) -> Path:
    """Render the viewer with ``paths`` in a headless Chromium and write a PNG to ``out``.

    Waits until the map has loaded every visible tile; raises BrowserError (with the page's
    console) if it does not within ``timeout`` seconds or the page reports an error."""
    from rasterkube.viewer.browser import BrowserError, HeadlessBrowser

    out = Path(out)
    with BackgroundServer(paths) as url, HeadlessBrowser(timeout=timeout) as browser:
        browser.open(url, width, height)
        browser.wait_for(READY, timeout=timeout)
        errors = browser.evaluate("window.rasterkube.errors")
        if errors:
            raise BrowserError("the viewer reported errors: " + "; ".join(errors))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(browser.screenshot())
    return out
