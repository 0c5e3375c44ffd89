"""Splitting a grid into blocks of whole zarr chunks (DESIGN §4). Pure functions."""

from __future__ import annotations

from collections.abc import Iterator

from rasterkube.grid import Window


def plan_blocks(shape: tuple[int, int], chunk: tuple[int, int], multiplier: int) -> list[Window]:
    """Row-major windows of ``multiplier`` × ``chunk`` pixels, clipped to ``shape``.

    Block edges fall on chunk edges, so concurrent writers never touch the same chunk.
    """
    if multiplier < 1 or chunk[0] < 1 or chunk[1] < 1:
        raise ValueError("chunk sizes and multiplier must be positive")
    by, bx = chunk[0] * multiplier, chunk[1] * multiplier
    return [
        Window(y0, min(y0 + by, shape[0]), x0, min(x0 + bx, shape[1]))
        for y0 in range(0, shape[0], by)
        for x0 in range(0, shape[1], bx)
    ]


def shift(window: Window, dy: int, dx: int) -> Window:
    return Window(window.y0 + dy, window.y1 + dy, window.x0 + dx, window.x1 + dx)


def row_strips(window: Window, max_pixels: int) -> Iterator[Window]:
    """Cut a window into full-width strips of at most ``max_pixels`` (bounds task memory)."""
    rows = max(1, max_pixels // max(1, window.x1 - window.x0))
    for y0 in range(window.y0, window.y1, rows):
        yield Window(y0, min(y0 + rows, window.y1), window.x0, window.x1)
