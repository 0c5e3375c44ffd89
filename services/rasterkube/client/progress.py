"""Progress bars for the client: tqdm when it is installed, else a small text bar.

A job reports ``(percent, message)``; the bar shows both. In a terminal or a notebook the
bar redraws in place (carriage return); elsewhere (logs, CI) it prints one line per 10 %.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

BAR_WIDTH = 30
MESSAGE_WIDTH = 60


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


class TextBar:
    """``label [#########.....................]  30% message`` on one redrawn line."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self._stream = stream or sys.stderr
        isatty = getattr(self._stream, "isatty", lambda: False)
        self._inplace = bool(isatty()) or _in_notebook()
        self._last: tuple[int, str] | None = None
        self._open = False

    def _line(self, percent: int, message: str) -> str:
        filled = BAR_WIDTH * percent // 100
        return f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3d}% {message[:MESSAGE_WIDTH]}"

    def update(self, percent: int, message: str, reason: str | None = None) -> None:
        """``reason`` set (the job is held up, e.g. Ray cannot place its tasks): the whole
        message on a line of its own, also in logs, once per change."""
        if self._last == (percent, message):
            return
        if reason is not None:
            start = "\r" if self._open else ""
            print(f"{start}{self.label} {percent:3d}% {message}", file=self._stream, flush=True)
            self._open = False
        elif self._inplace:
            line = self._line(percent, message)
            print(f"\r{line:<{len(self.label) + BAR_WIDTH + MESSAGE_WIDTH + 9}}", end="", file=self._stream, flush=True)
            self._open = True
        elif self._last is None or percent // 10 != self._last[0] // 10:
            print(self._line(percent, message), file=self._stream, flush=True)
        self._last = (percent, message)

    def close(self) -> None:
        if self._open:
            print(file=self._stream, flush=True)
            self._open = False


class TqdmBar:
    """The same interface over ``tqdm.auto`` (a widget in notebooks, a bar in terminals)."""

    def __init__(self, label: str, tqdm: Any) -> None:
        self._bar = tqdm(total=100, desc=label, unit="%", bar_format="{desc} {bar} {n:3.0f}% {postfix}")
        self._n = 0
        self._held: str | None = None

    def update(self, percent: int, message: str, reason: str | None = None) -> None:
        if reason is not None and message != self._held:
            self._bar.write(f"{self._bar.desc} {message}")  # the whole message, above the bar
        self._held = message if reason is not None else None
        if percent > self._n:
            self._bar.update(percent - self._n)
            self._n = percent
        self._bar.set_postfix_str(message[:MESSAGE_WIDTH], refresh=True)

    def close(self) -> None:
        self._bar.close()


class NoBar:
    def update(self, percent: int, message: str, reason: str | None = None) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(label: str, enabled: bool = True, stream: TextIO | None = None) -> TextBar | TqdmBar | NoBar:
    """A bar for one resource; ``stream`` forces the text bar (used by tests)."""
    if not enabled:
        return NoBar()
    if stream is None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return TqdmBar(label, tqdm)
    return TextBar(label, stream)
