"""HTTP Range headers (RFC 9110 section 14) for a single range, the only kind model clients send."""

from __future__ import annotations

import re

_SINGLE = re.compile(r"bytes=(\d*)-(\d*)")


class Unsatisfiable(ValueError):
    """The range starts past the end of the resource: answer 416 with `Content-Range: bytes */SIZE`."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte positions a Range header asks of a resource of `size` bytes, or None to
    send the whole resource (no header, or one this server ignores as RFC 9110 allows: malformed, several
    ranges). Raises Unsatisfiable for a range that selects nothing."""
    if header is None:
        return None
    match = _SINGLE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(size - length, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise Unsatisfiable(header)
    return start, min(end, size - 1)
