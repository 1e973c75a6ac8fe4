"""Reconcile an adapter's module paths with the base checkpoint's tensor names.

An adapter trained on `BertModel` says `encoder.layer.0...` where a `BertForMaskedLM` checkpoint says
`bert.encoder.layer.0...`; GPT-2 checkpoints exist with and without `transformer.`. One prefix rewrite must
explain every name of the adapter; none, or more than one, is an error rather than a guess.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.worker.engine.errors import InputError


@dataclass(frozen=True)
class PrefixRewrite:
    strip: str = ""
    add: str = ""

    def __call__(self, name: str) -> str:
        return self.add + name[len(self.strip):]

    def applies_to(self, name: str) -> bool:
        return name.startswith(self.strip)

    def describe(self) -> str:
        return f"strip {self.strip!r}, add {self.add!r}"


IDENTITY = PrefixRewrite()


def _candidates(name: str, base_names: Collection[str]) -> Iterable[PrefixRewrite]:
    yield IDENTITY
    parts = name.split(".")
    for cut in range(1, len(parts)):
        rest = ".".join(parts[cut:])
        strip = name[: len(name) - len(rest)]
        if rest in base_names:
            yield PrefixRewrite(strip=strip)
    for base_name in base_names:
        if base_name.endswith("." + name):
            yield PrefixRewrite(add=base_name[: -len(name)])


def find_rewrite(names: list[str], base_names: Collection[str], where: Path, adapter: int) -> PrefixRewrite:
    """The one prefix rewrite that maps every name of adapter `adapter` (its file: `where`) onto a base
    tensor name."""
    if not names or all(name in base_names for name in names):
        return IDENTITY
    first_missing = next(name for name in names if name not in base_names)
    working = {
        rewrite
        for rewrite in _candidates(first_missing, base_names)
        if all(rewrite.applies_to(name) and rewrite(name) in base_names for name in names)
    }
    if len(working) == 1:
        return working.pop()
    if not working:
        unmatched = [name for name in names if name not in base_names]
        raise InputError(
            f"{where}: tensor for {unmatched[0]!r} matches no tensor of the base model "
            f"({len(unmatched)} of {len(names)} unmatched); is this adapter for a different base?",
            file=where, tensor=unmatched[0], input=adapter,
        )
    options = "; ".join(sorted(rewrite.describe() for rewrite in working))
    raise InputError(f"{where}: adapter names fit the base model in several ways ({options}); refusing to guess",
                     file=where, input=adapter)
