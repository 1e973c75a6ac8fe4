"""JSON from input files, parsed within limits: every JSON document the engine reads (config.json,
adapter_config.json, model.safetensors.index.json, safetensors headers) goes through `parse_json`.

Python's `json` has three failure modes a hostile file can trigger, none of them a JSONDecodeError: nesting
100,000 deep raises RecursionError (the decoder recurses once per level), an integer of more than 4,300
digits raises ValueError (CPython's int/str conversion limit), and a big file simply takes time and memory
(each `[]` of two bytes becomes a list object of about 60). The size limit is the readers' (they know a
file's size before reading it); the number of arrays and objects, their nesting and the length of numbers
are checked here, all but the last before the decoder sees the text.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import re2

MAX_DEPTH = 64
"""Nesting of arrays and objects. Real files nest 3 or 4 deep (a safetensors header: object, entry, shape)."""
MAX_NUMBER_CHARS = 64
"""Characters in one number. A shape, offset or count fits in 20 digits; a float prints in 25 characters."""
MAX_CONTAINERS = 2**20
"""Arrays and objects in one document (brackets inside strings count too, to keep the count a byte count):
a safetensors header has 3 per tensor, so this is room for 350,000 tensors, and at most ~100 MB of them."""


def _nesting_pattern(depth: int) -> bytes:
    """A regular expression for text whose brackets pair up and nest at most `depth` deep, strings (and the
    brackets in them) skipped. Bounded nesting is a regular language, so RE2 checks it in one linear pass
    with no recursion; every valid JSON text within the limit matches it."""
    neutral = rb'(?:[^\[\]{}"]|"(?:[^"\\]|\\[\x00-\xff])*")*'
    pattern = neutral
    for _ in range(depth):
        pattern = neutral + rb"(?:[\[{]" + pattern + rb"[\]}]" + neutral + rb")*"
    return pattern


def _compile_nesting() -> Any:
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1  # one byte, one character: any UTF-8 byte >= 0x80 is neutral
    options.never_capture = True
    options.log_errors = False
    return re2.compile(_nesting_pattern(MAX_DEPTH), options)


_WITHIN_DEPTH = _compile_nesting()


class JsonError(ValueError):
    """The text is not JSON, or not JSON within the limits; the message says which, worded to follow a
    file's name ("<file>: <what> is not valid JSON (...)")."""


def parse_json(raw: bytes) -> Any:
    """Decode UTF-8 JSON text nested at most MAX_DEPTH deep, with numbers of at most MAX_NUMBER_CHARS."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonError(f"is not valid UTF-8 ({error})") from error
    if (containers := raw.count(b"[") + raw.count(b"{")) > MAX_CONTAINERS:
        raise JsonError(f"has {containers} arrays and objects, more than the {MAX_CONTAINERS} this engine reads")
    if _WITHIN_DEPTH.fullmatch(raw) is not None:
        return _decode(text)
    # Too deep, or brackets that do not pair up (then the decoder's own message is the better one): decoding
    # tells which, and is safe: the decoder stops at the interpreter's recursion limit, and the containers
    # are bounded.
    with contextlib.suppress(RecursionError):
        _decode(text)
    raise JsonError(f"is nested deeper than {MAX_DEPTH} levels")


def _decode(text: str) -> Any:
    try:
        return json.loads(text, parse_int=_int, parse_float=_float)
    except json.JSONDecodeError as error:
        raise JsonError(f"is not valid JSON ({error})") from error


def _int(token: str) -> int:
    _check_length(token)
    return int(token)


def _float(token: str) -> float:
    _check_length(token)
    return float(token)


def _check_length(token: str) -> None:
    if len(token) > MAX_NUMBER_CHARS:
        raise JsonError(f"has a number of {len(token)} characters (at most {MAX_NUMBER_CHARS})")
