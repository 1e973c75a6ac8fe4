"""PEFT's per-module patterns (`rank_pattern`, `alpha_pattern`, `trainable_token_indices` keys), matched as
PEFT matches them, but with RE2.

PEFT takes the first key, in JSON order, for which `re.match(rf"(.*\\.)?({key})$", module_path)` succeeds.
The keys come from the adapter's config, that is from whoever uploaded it, and Python's backtracking `re`
can take exponential time on some of them (`(a+)+c` against `model.aaaa...a`). RE2 matches in time linear
in the module path whatever the key; it has no backreferences or lookarounds, so a key that needs them is
refused as an InputError naming the option and the key, as is an invalid one. Keys are bounded in number
and length, and each compiled key in memory, so a config cannot make planning slow or large either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import re2

from adapter_merge.worker.engine.errors import InputError

V = TypeVar("V")

MAX_KEYS = 4096
"""Keys per option. Hand-written patterns have a few; tools that write one key per module (EVA's
rank_pattern) write one per adapted layer: 4096 covers 7 projections in each of 585 layers."""
MAX_KEY_CHARS = 1024
"""Characters per key: a full module path is under 100."""
RE2_MAX_MEM = 64 * 2**10
"""RE2's memory budget per key (program and matching cache); a key that needs more, such as `(a{1000}){1000}`
style repetition, does not compile and is refused. 4096 keys stay within 256 MiB in the worst case."""


def _options() -> Any:
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.never_capture = True
    options.log_errors = False
    return options


class ModulePatterns(Generic[V]):
    """One option's keys, compiled once, each with its value; `lookup` finds the first key that matches."""

    def __init__(self, option: str, values: Mapping[str, V], config: Path, input: int) -> None:
        def refuse(detail: str) -> InputError:
            return InputError(f"{config}: {option}: {detail}", file=config, option=option, input=input)

        if len(values) > MAX_KEYS:
            raise refuse(f"{len(values)} keys, more than the {MAX_KEYS} this engine accepts")
        self.values = dict(values)
        self._compiled = []
        options = _options()
        for key in self.values:
            if len(key) > MAX_KEY_CHARS:
                raise refuse(f"key {key[:40]!r}... is {len(key)} characters long, more than {MAX_KEY_CHARS}")
            try:
                self._compiled.append((key, re2.compile(rf"(.*\.)?({key})$", options)))
            except re2.error as error:
                reason = error.args[0].decode() if error.args and isinstance(error.args[0], bytes) else error
                raise refuse(f"key {key!r} is not a regular expression this engine can match ({reason}); "
                             f"backreferences and lookarounds are not supported") from error
        self._found: dict[str, str | None] = {}

    def key(self, module_path: str) -> str | None:
        """The first key, in JSON order, that matches the end of the module path (as PEFT matches them)."""
        if module_path not in self._found:
            self._found[module_path] = next(
                (key for key, regex in self._compiled if regex.match(module_path) is not None), None)
        return self._found[module_path]

    def lookup(self, module_path: str, default: V) -> V:
        key = self.key(module_path)
        return default if key is None else self.values[key]

    def __bool__(self) -> bool:
        return bool(self.values)
