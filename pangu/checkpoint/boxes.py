"""The geometry of checkpoint pieces: boxes of a full tensor ([start, stop) in every dimension)
and flat ranges of a box's row-major elements, cut into the rectangles a reader copies."""

from __future__ import annotations

import math

Box = tuple[tuple[int, int], ...]


def flat_runs(shape: tuple[int, ...], start: int, stop: int):
    """The elements [start, stop) of an array of `shape` in row-major order, as rectangles:
    (first index, sizes, offset of the rectangle's first element from `start`). A flat range of
    an n-dimensional box is at most 2n - 1 rectangles (a partial first row, whole rows, a partial
    last row, recursively)."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield (start,), (stop - start,), 0
        return
    inner = math.prod(shape[1:])
    row, offset = start // inner, 0
    if start % inner:  # a partial first row
        end = min(stop, (row + 1) * inner)
        for first, sizes, at in flat_runs(shape[1:], start - row * inner, end - row * inner):
            yield (row, *first), (1, *sizes), at
        offset, row = end - start, row + 1
        if end == stop:
            return
    last = stop // inner
    if last > row:  # whole rows
        yield (row,) + (0,) * (len(shape) - 1), (last - row, *shape[1:]), offset
        offset += (last - row) * inner
    if stop % inner:  # a partial last row
        for first, sizes, at in flat_runs(shape[1:], 0, stop - last * inner):
            yield (last, *first), (1, *sizes), offset + at


def rectangles(box: Box, flat: tuple[int, int]):
    """(rectangle in full-tensor coordinates, offset in the run's data) of a flat range of a box."""
    shape = tuple(b - a for a, b in box)
    for first, sizes, at in flat_runs(shape, *flat):
        yield tuple((a + f, a + f + n) for (a, _), f, n in zip(box, first, sizes)), at


def overlaps(a: Box, b: Box) -> bool:
    return all(max(x0, y0) < min(x1, y1) for (x0, x1), (y0, y1) in zip(a, b))


def numel(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def sizes(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def local(box: Box, within: Box) -> tuple[slice, ...]:
    return tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(box, within))
