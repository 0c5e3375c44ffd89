"""A headless Chromium for screenshots of the viewer (``rasterkube view --screenshot``, tests).

Where it comes from: the npm package ``@sparticuz/chromium`` ships a complete
chrome-headless-shell build for x86-64 Linux *inside its registry tarball* (brotli-compressed:
the browser, SwiftShader for software WebGL, a font, and NSS libraries for systems without
them), so it installs from the npm registry alone — no browser download from the web, no
root, no system packages. We ``npm pack`` the pinned version, check the tarball's sha256,
decompress with Node's zlib (brotli) and cache the result in
``~/.cache/rasterkube/chromium-<version>/`` (``RASTERKUBE_CACHE`` moves it). Needs ``npm`` and
``node`` once; about 70 MB downloaded, 220 MB unpacked.

The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: file
descriptors 3 and 4, NUL-separated JSON), so no port is opened and no extra Python package is
needed.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Final, Self

from rasterkube.errors import UserError
from rasterkube.sampledata import cache_dir
from rasterkube.viewer.npm import NpmPackage, pack

CHROMIUM: Final = NpmPackage(
    "@sparticuz/chromium", "153.0.0", "20e5656fcdcf4118ede85edfb9d6bb9cc1bbb7ffb8b75622fffbcf36a835c3c0"
)
ENV_CHROMIUM: Final = "RASTERKUBE_CHROMIUM"  # an existing chromium/chrome binary to use instead
_ARCHIVES: Final = ("fonts.tar", "swiftshader.tar", "al2023.tar")
_FLAGS: Final = (
    "--headless=shell",
    "--no-sandbox",
    "--no-zygote",
    "--single-process",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-extensions",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
    # WebGL (MapLibre) in software: ANGLE on SwiftShader Vulkan, which the package ships.
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--in-process-gpu",
)
_DECOMPRESS_JS: Final = (
    "const z=require('zlib'),fs=require('fs'),{pipeline}=require('stream');"
    "pipeline(fs.createReadStream(process.argv[1]),z.createBrotliDecompress(),fs.createWriteStream(process.argv[2]),"
    "e=>{if(e){console.error(e);process.exit(1)}})"
)


def install_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"chromium-{CHROMIUM.version}"


def ensure_chromium(cache: Path | None = None) -> Path:
    """The path of the cached headless Chromium, fetched and unpacked on first use."""
    override = os.environ.get(ENV_CHROMIUM)
    if override:
        return Path(override)
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise UserError(
            f"the bundled headless Chromium ({CHROMIUM.spec}) is for x86-64 Linux; "
            f"set {ENV_CHROMIUM} to a Chrome/Chromium binary"
        )
    target = install_dir(cache)
    binary = target / "chromium"
    if (target / ".complete").exists() and binary.exists():
        return binary
    node = shutil.which("node")
    if node is None:
        raise UserError("node is needed once to unpack the headless Chromium (brotli); install Node.js")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tarball = pack(CHROMIUM, Path(tmp))
        staging = Path(tmp) / "chromium"
        staging.mkdir()
        with tarfile.open(tarball, "r:gz") as tf:
            for name in ("chromium", *_ARCHIVES):
                src = tf.extractfile(f"package/bin/{name}.br")
                assert src is not None
                with src, open(Path(tmp) / f"{name}.br", "wb") as out:
                    shutil.copyfileobj(src, out)
        tarball.unlink()
        for name in ("chromium", *_ARCHIVES):
            dest = staging / name if name == "chromium" else Path(tmp) / name
            subprocess.run([node, "-e", _DECOMPRESS_JS, str(Path(tmp) / f"{name}.br"), str(dest)], check=True)
            (Path(tmp) / f"{name}.br").unlink()
        for archive in _ARCHIVES:
            sub = staging / "al2023" if archive == "al2023.tar" else staging
            with tarfile.open(Path(tmp) / archive) as tf:
                tf.extractall(sub, filter="data")
        (staging / "chromium").chmod(0o755)
        (staging / "fonts.conf").write_text(_fonts_conf(target), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    (target / ".complete").touch()
    return binary


def _fonts_conf(target: Path) -> str:
    return (
        '<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "fonts.dtd">\n<fontconfig>\n'
        f"  <dir>{target / 'fonts'}</dir>\n  <dir>/usr/share/fonts</dir>\n"
        f"  <cachedir>{target / 'fonts-cache'}</cachedir>\n</fontconfig>\n"
    )


class BrowserError(RuntimeError):
    pass


class HeadlessBrowser:
    """One headless Chromium process and one page, driven over the DevTools pipe.

    ``with HeadlessBrowser() as b: b.open(url, width, height); b.wait_for("window.ready"); png = b.screenshot()``
    """

    def __init__(self, binary: Path | None = None, timeout: float = 60.0) -> None:
        self.binary = binary or ensure_chromium()
        self.timeout = timeout
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        self._id = 0
        self._buf = b""
        self._session: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile = tempfile.TemporaryDirectory(prefix="rasterkube-chromium-")

    def __enter__(self) -> Self:
        base = self.binary.parent
        env = dict(os.environ, HOME=self._profile.name)
        if (base / "fonts.conf").exists():  # the unpacked @sparticuz/chromium layout
            env["FONTCONFIG_PATH"] = str(base)
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(base / "al2023" / "lib"), os.environ.get("LD_LIBRARY_PATH", "")) if p
            )
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        args = [str(self.binary), *_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}/profile"]
        # The DevTools pipe: Chromium reads fd 3 and writes fd 4. A small exec shim moves our
        # pipe ends there (no preexec_fn: it is unsafe when the caller runs threads, e.g. our
        # server; dash cannot redirect descriptors above 9).
        r, w = to_chrome_r, from_chrome_w
        shim = (
            "import fcntl, os, sys\n"
            f"r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in ({r}, {w}))\n"  # out of the way of 3 and 4
            f"os.close({r}); os.close({w}); os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)\n"
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        self._log = open(Path(self._profile.name) / "chromium.log", "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", shim, *args, "about:blank"], env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, pass_fds=(r, w),
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._session = None
                self._send("Browser.close", {})
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(10)
        for fd in (getattr(self, "_to_chrome", None), getattr(self, "_from_chrome", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if hasattr(self, "_log"):
            self._log.close()
        self._profile.cleanup()

    # ------------------------------------------------------------------------- protocol

    def _send(self, method: str, params: dict[str, Any]) -> int:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self._session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        return self._id

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        wanted = self._send(method, params)
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                message = json.loads(raw)
                self._event(message)
                if message.get("id") == wanted:
                    if "error" in message:
                        raise BrowserError(f"{method}: {message['error'].get('message')}")
                    return message.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise BrowserError(f"{method}: no answer from Chromium in {self.timeout:.0f} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (code {self._proc.poll() if self._proc else None})")
            self._buf += chunk

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append(f"log.{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}".strip())

    # ------------------------------------------------------------------------- page

    def open(self, url: str, width: int = 1024, height: int = 768) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"could not open {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; its value, or BrowserError with the console log."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError as exc:  # e.g. the page is still loading
                last_error, value = str(exc), None
            if value:
                return value
            time.sleep(interval)
        raise BrowserError(
            f"{expression} still false after {timeout:.0f} s {last_error}; page console:\n" + "\n".join(self.console)
        )

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
